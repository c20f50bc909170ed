"""Tag parsing of reflection outputs."""
import pytest

from megatron_copsd.rosd.parse import parse_reflection
from megatron_copsd.rosd.prompts import EXPLANATION_PLACEHOLDER, PLACEHOLDERS, QUOTE_PLACEHOLDER


def test_well_formed():
    r = parse_reflection("<error_quote>12 x 4 = 46</error_quote>\n<explanation>12 x 4 is 48.</explanation>")
    assert (r.error_quote, r.explanation) == ("12 x 4 = 46", "12 x 4 is 48.")
    assert r.quote_parsed and r.explanation_parsed and r.quote_closed and r.explanation_closed


@pytest.mark.parametrize("text", [
    "<Error_Quote>12 x 4 = 46</ERROR_QUOTE><EXPLANATION>fix</Explanation>",
    "< error_quote >12 x 4 = 46</ error_quote ><explanation >fix</explanation>",
    "<error-quote>12 x 4 = 46</error-quote> <explanation>fix</explanation>",
    "<error quote>12 x 4 = 46</error quote> <explanation>fix</explanation>",
    "<errorquote>12 x 4 = 46</errorquote> <explanation>fix</explanation>",
    "<error\\_quote>12 x 4 = 46</error\\_quote> <explanation>fix</explanation>",
    "```xml\n<error_quote>\n  12 x 4 = 46\n</error_quote>\n<explanation>\nfix\n</explanation>\n```",
    "<error_quote>\"12 x 4 = 46\"</error_quote><explanation>fix</explanation>",
    "<error_quote>`12 x 4 = 46`</error_quote><explanation>fix</explanation>",
    "<error_quote>\u201c12 x 4 = 46\u201d</error_quote><explanation>fix</explanation>",
    "Sure! Here is my analysis.\n<error_quote>12 x 4 = 46</error_quote>\nThen:\n<explanation>fix</explanation>\nDone.",
])
def test_variants(text):
    r = parse_reflection(text)
    assert (r.error_quote, r.explanation) == ("12 x 4 = 46", "fix")


def test_missing_tags():
    r = parse_reflection("The mistake is in step 2, 12 x 4 is 48.")
    assert r.error_quote is None and r.explanation is None
    assert not r.quote_parsed and not r.explanation_parsed
    r = parse_reflection("<explanation>only this</explanation>")
    assert r.error_quote is None and r.explanation == "only this"


def test_repeated_tags_first_non_empty_wins():
    text = ("<error_quote></error_quote><error_quote>first</error_quote><explanation>one</explanation>"
            "<error_quote>second</error_quote><explanation>two</explanation>")
    r = parse_reflection(text)
    assert (r.error_quote, r.explanation) == ("first", "one")
    assert (r.num_quote_blocks, r.num_explanation_blocks) == (3, 2)


def test_echoed_placeholder_is_skipped():
    text = (f"The format is <error_quote>{QUOTE_PLACEHOLDER}</error_quote> "
            f"<explanation>{EXPLANATION_PLACEHOLDER}</explanation>.\n"
            "<error_quote>12 x 4 = 46</error_quote><explanation>fix</explanation>")
    r = parse_reflection(text, placeholders=PLACEHOLDERS)
    assert (r.error_quote, r.explanation) == ("12 x 4 = 46", "fix")


def test_unclosed_tags():
    r = parse_reflection("<error_quote>12 x 4 = 46\n<explanation>multiply again, 12 x 4 is 4")
    assert r.error_quote == "12 x 4 = 46" and not r.quote_closed
    assert r.explanation == "multiply again, 12 x 4 is 4" and not r.explanation_closed
    strict = parse_reflection("<error_quote>12 x 4 = 46\n<explanation>cut", accept_unclosed=False)
    assert strict.error_quote is None and strict.explanation is None


def test_unclosed_then_reopened_same_tag():
    r = parse_reflection("<error_quote>a b c<error_quote>d e f</error_quote><explanation>x</explanation>")
    assert r.error_quote == "a b c" and not r.quote_closed and r.num_quote_blocks == 2


def test_reasoning_block_is_ignored():
    text = ("<think>maybe <error_quote>wrong guess</error_quote> hmm</think>\n"
            "<error_quote>12 x 4 = 46</error_quote><explanation>fix</explanation>")
    assert parse_reflection(text).error_quote == "12 x 4 = 46"
    # Qwen3 opens <think> in the prompt: only the closing tag is in the output
    text = "I think <explanation>draft</explanation></think><explanation>final</explanation>"
    assert parse_reflection(text).explanation == "final"


def test_bad_input():
    with pytest.raises(ValueError):
        parse_reflection(None)
