"""Student and COPSD teacher prompts through the chat templates."""
import pytest

from megatron_copsd.data.languages import get_language
from megatron_copsd.data.prompts import copsd_teacher_prompt, student_prompt
from megatron_copsd.data.tokenizer import train_byte_bpe_tokenizer, train_sentencepiece_tokenizer

CORPUS = ["Bata wa Janet hutaga mayai 16 kwa siku. Tatua tatizo hili hatua kwa hatua.",
          "Janet's ducks lay 16 eggs per day. She sells the rest for $2 each. So 16-3-4=9 eggs; 9*2=18."] * 10
P_SW = "Bata wa Janet hutaga mayai 16 kwa siku."
P_EN = "Janet's ducks lay 16 eggs per day."
S_EN = "16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars. #### 18"


@pytest.fixture(scope="module", params=["sp", "bpe"])
def tok(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "sp":
        return train_sentencepiece_tokenizer(CORPUS, d, 700)  # >= 512: byte fallback for unseen chars
    return train_byte_bpe_tokenizer(CORPUS, d, 350)


def test_student_prompt(tok):
    p = student_prompt(tok, "sw", P_SW)
    assert p.text.endswith("<|im_start|>assistant\n")
    assert P_SW in p.text and get_language("swa").instruction in p.text
    assert "English" not in p.text  # no privileged context leaks into the student prompt
    assert tok.decode(p.ids) == p.text and p.prefix_start == len(p.ids)


def test_reasoning_prefix_is_exact_token_boundary(tok):
    p = student_prompt(tok, "swa", P_SW, use_reasoning_prefix=True)
    prefix = get_language("swa").reasoning_prefix
    assert p.text.endswith("assistant\n" + prefix)
    assert tok.decode(p.ids[p.prefix_start:]) == prefix
    assert tok.decode(p.ids[: p.prefix_start]).endswith("assistant\n")
    t = copsd_teacher_prompt(tok, "swa", P_SW, P_EN, S_EN, use_reasoning_prefix=True)
    assert t.ids[t.prefix_start:] == p.ids[p.prefix_start:]  # same context for the response on both sides


def test_thinking_prefix_opens_think_block(tmp_path):
    tok = train_byte_bpe_tokenizer(CORPUS, tmp_path, 350)
    p = student_prompt(tok, "fr", "2+2 ?", use_reasoning_prefix=True, enable_thinking=True)
    assert p.text.endswith("<think>\n" + get_language("fr").reasoning_prefix)
    q = student_prompt(tok, "fr", "2+2 ?", enable_thinking=False)
    assert q.text.endswith("<think>\n\n</think>\n\n")


def test_teacher_prompt_parts_and_switches(tok):
    labels = get_language("swa").labels()
    t = copsd_teacher_prompt(tok, "swa", P_SW, P_EN, S_EN)
    body = t.user_content
    assert body.index(P_SW) < body.index(P_EN) < body.index(labels.reference_begin) < body.index(S_EN) \
        < body.index(labels.reference_end) < body.index(labels.instruction)
    assert tok.decode(t.ids) == t.text and t.text.endswith("<|im_start|>assistant\n")
    no_en = copsd_teacher_prompt(tok, "swa", P_SW, None, S_EN, include_problem_en=False)
    assert P_EN not in no_en.text and S_EN in no_en.text
    no_sol = copsd_teacher_prompt(tok, "swa", P_SW, P_EN, None, include_reference_solution_en=False)
    assert S_EN not in no_sol.text and labels.reference_begin not in no_sol.text and P_EN in no_sol.text
    bare = copsd_teacher_prompt(tok, "swa", P_SW, None, None, include_problem_en=False,
                                include_reference_solution_en=False)
    assert len(bare.ids) < len(no_sol.ids) < len(t.ids)


def test_missing_fields_raise(tok):
    with pytest.raises(ValueError, match="problem_en"):
        copsd_teacher_prompt(tok, "swa", P_SW, "", S_EN)
    with pytest.raises(ValueError, match="solution_en"):
        copsd_teacher_prompt(tok, "swa", P_SW, P_EN, None)
    with pytest.raises(ValueError, match="problem"):
        student_prompt(tok, "swa", "   ")
