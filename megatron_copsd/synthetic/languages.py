"""Synthetic low-resource languages for the one-CPU benchmark, written in real non-Latin scripts.

These are *constructed* languages, clearly labelled as such: no claim is made that they resemble Amharic
or Vai. Each one is a deterministic word-level lexicon: every English word maps to a pseudo-word of 2-3
syllables drawn from one Unicode block (a SHA-256 of language code + word picks the syllables), so the
tokenizer and prompts see genuinely non-Latin text while we can still render any template. Digits,
arithmetic symbols and `\\boxed{...}` are kept verbatim, so answers stay checkable; sentence punctuation
is replaced by the script's own marks.

Codes come from the ISO 639-3 private-use range qaa-qtz, so they can never clash with a real language:
- `qge` ("Geezish", aliases `syn_geez`, `syn-geez`): Ethiopic block U+1200-U+137F.
- `qva` ("Vaish", aliases `syn_vai`, `syn-vai`): Vai block U+A500-U+A63F.

Known simplifications (on purpose): word order and morphology follow English one-to-one; that keeps the
crosslingual mapping learnable by a tiny model in minutes while still being unseen at pretraining.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class SyntheticLanguage:
    """A constructed language rendered by a word-level lexicon into one Unicode block."""

    code: str
    """ISO 639-3 private-use code."""
    name: str
    """Human-readable name (says 'synthetic')."""
    script: str
    """Script name (Unicode block)."""
    block: tuple[int, int]
    """Inclusive code point range the pseudo-words are drawn from."""
    aliases: tuple[str, ...]
    """Other names accepted by `get_synthetic_language`."""
    punctuation: tuple[tuple[str, str], ...]
    """English punctuation -> script punctuation (each target is inside `block`)."""


SYNTHETIC_LANGUAGES: dict[str, SyntheticLanguage] = {
    "qge": SyntheticLanguage(
        code="qge",
        name="Geezish (synthetic, Ge'ez script)",
        script="Ethiopic",
        block=(0x1200, 0x137F),
        aliases=("syn_geez", "syn-geez", "geezish"),
        # Ethiopic full stop, comma, question mark, colon (preface colon).
        punctuation=((".", "\u1362"), (",", "\u1363"), ("?", "\u1367"), (":", "\u1366")),
    ),
    "qva": SyntheticLanguage(
        code="qva",
        name="Vaish (synthetic, Vai script)",
        script="Vai",
        block=(0xA500, 0xA63F),
        aliases=("syn_vai", "syn-vai", "vaish"),
        # Vai full stop, comma, question mark; Vai has no colon, so the comma serves.
        punctuation=((".", "\uA60E"), (",", "\uA60D"), ("?", "\uA60F"), (":", "\uA60D")),
    ),
}


def get_synthetic_language(code_or_alias: str) -> SyntheticLanguage:
    """Looks a synthetic language up by code or alias (case-insensitive)."""
    key = code_or_alias.strip().lower()
    for lang in SYNTHETIC_LANGUAGES.values():
        if key == lang.code or key in lang.aliases:
            return lang
    known = sorted(SYNTHETIC_LANGUAGES)
    raise ValueError(f"unknown synthetic language {code_or_alias!r}; known codes: {known}")


@lru_cache(maxsize=None)
def _syllables(block: tuple[int, int]) -> tuple[str, ...]:
    """The assigned letters (category Lo) of the block; unassigned code points are never used."""
    lo, hi = block
    return tuple(
        chr(cp) for cp in range(lo, hi + 1) if unicodedata.category(chr(cp)) == "Lo"
    )


@lru_cache(maxsize=100_000)
def pseudo_word(word: str, code: str) -> str:
    """The deterministic pseudo-word of an English word (lower-cased) in language `code`."""
    lang = get_synthetic_language(code)
    syll = _syllables(lang.block)
    digest = hashlib.sha256(f"{lang.code}\x00{word.lower()}".encode()).digest()
    # Short English words get short pseudo-words, so sentences keep a plausible rhythm.
    n = 2 if len(word) <= 4 else 3
    return "".join(syll[int.from_bytes(digest[2 * i : 2 * i + 2], "big") % len(syll)] for i in range(n))


# A token is a \boxed{...} group, a number, a word, or a single other character (space, symbol).
_TOKEN_RE = re.compile(r"\\boxed\{[^{}]*\}|\d+|[A-Za-z]+|\s+|.", re.S)


def translate(text: str, code: str) -> str:
    """Renders English template text in a synthetic language, word by word.

    Words become pseudo-words, `.,?:` become the script's marks, everything else (digits, `+ - * =`,
    spaces, `\\boxed{N}`) is copied.
    """
    lang = get_synthetic_language(code)
    punct = dict(lang.punctuation)
    out = []
    for tok in _TOKEN_RE.findall(text):
        if tok[0].isalpha() and tok.isascii():
            out.append(pseudo_word(tok, lang.code))
        elif tok in punct:
            out.append(punct[tok])
        else:
            out.append(tok)
    return "".join(out)


def in_block(text: str, code: str) -> bool:
    """True when every letter of `text` lies in the language's Unicode block (tests use it)."""
    lo, hi = get_synthetic_language(code).block
    return all(lo <= ord(ch) <= hi for ch in text if ch.isalpha())


# Instructions and labels used in prompts, in English; synthetic languages get them through `translate`
# so the student's instruction really is in the target language.
INSTRUCTION_EN = "Solve the problem step by step. Put the final answer in \\boxed{}."


def instruction(code: str) -> str:
    """The student instruction in language `code` ('en' or a synthetic code)."""
    if code.lower() in ("en", "eng", "english"):
        return INSTRUCTION_EN
    # `translate` copies `\boxed{}` verbatim, so the format instruction names it in every language.
    return translate(INSTRUCTION_EN, code)


# ISO 15924 script codes of the blocks (the data layer's Language.script field).
_ISO15924 = {"Ethiopic": "Ethi", "Vai": "Vaii"}


def register_synthetic_languages() -> list[str]:
    """Registers the synthetic languages in `megatron_copsd.data.languages` (idempotent).

    The student instruction is in the language itself; the teacher labels stay English, as for every
    language of the registry. Returns the registered codes.
    """
    from megatron_copsd.data.languages import Language, register_language

    codes = []
    for lang in SYNTHETIC_LANGUAGES.values():
        register_language(
            Language(
                code=lang.code,
                name=lang.name.split(" (")[0] + " (synthetic)",
                script=_ISO15924[lang.script],
                instruction=instruction(lang.code),
                native_name=translate(lang.name.split(" (")[0], lang.code),
                aliases=lang.aliases,
            ),
            replace=True,
        )
        codes.append(lang.code)
    return codes
