"""Parsing of reflection outputs: `<error_quote>...</error_quote>` and `<explanation>...</explanation>`.

    r = parse_reflection(text)          # Reflection(error_quote, explanation, ...)

Rules (each one exists because small models break the format in exactly this way):

- Reasoning blocks are ignored: with a `</think>` in the text only what follows the last `</think>` is
  read (Qwen3 templates open `<think>` inside the prompt, so the opening tag may be missing).
- Markdown code fences (```` ``` ```` / ```` ```xml ````) around the answer are removed.
- Tag names match case-insensitively, with optional spaces inside the brackets and `_`, `-`, a space,
  an escaped `\\_` or nothing between the words (`<Error Quote>`, `<error-quote>`, `<ERRORQUOTE>`).
- Repeated tags: the FIRST non-empty block is used (the prompt asks for the earliest error, and the
  quote comes first in the requested format); blocks equal to the prompt's placeholder text (a model
  echoing the instructions) are skipped. `num_quote_blocks` / `num_explanation_blocks` count them all.
- Unclosed tag (typically a reflection cut by its length limit): the block runs to the next opening
  tag of the other kind, or to the end of the text; `quote_closed` / `explanation_closed` say so.
  `accept_unclosed=False` rejects such blocks instead.
- The quote is stripped of surrounding whitespace and of one pair of wrapping quotation marks or
  backticks; an empty block counts as missing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Reflection:
    """Parsed reflection. `None` fields were missing (or empty / placeholder-only)."""

    error_quote: str | None
    explanation: str | None
    quote_closed: bool = False
    """The quote came from a closed `<error_quote>...</error_quote>` block."""
    explanation_closed: bool = False
    num_quote_blocks: int = 0
    num_explanation_blocks: int = 0

    @property
    def quote_parsed(self) -> bool:
        return self.error_quote is not None

    @property
    def explanation_parsed(self) -> bool:
        return self.explanation is not None


def _tag_words(name: str) -> str:
    # "error_quote" -> error(?:_|-| |\\_)?quote
    words = name.split("_")
    return r"(?:_|-|\s|\\_)?".join(re.escape(w) for w in words)


def _open_re(name: str) -> re.Pattern:
    return re.compile(r"<\s*" + _tag_words(name) + r"\s*>", re.IGNORECASE)


def _close_re(name: str) -> re.Pattern:
    return re.compile(r"<\s*/\s*" + _tag_words(name) + r"\s*>", re.IGNORECASE)


_TAGS = ("error_quote", "explanation")
_OPEN = {t: _open_re(t) for t in _TAGS}
_CLOSE = {t: _close_re(t) for t in _TAGS}
_FENCE = re.compile(r"^[ \t]*```[A-Za-z0-9_-]*[ \t]*$", re.MULTILINE)
_THINK_END = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)
_WRAPPERS = (('"', '"'), ("'", "'"), ("`", "`"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("«", "»"))


def strip_reasoning(text: str) -> str:
    """Text after the last `</think>` (all of it when there is none)."""
    last = None
    for m in _THINK_END.finditer(text):
        last = m
    return text if last is None else text[last.end():]


def _blocks(text: str, tag: str) -> list[tuple[str, bool]]:
    """All (content, closed) blocks of `tag`, in order."""
    other = [t for t in _TAGS if t != tag]
    out = []
    pos = 0
    while True:
        m = _OPEN[tag].search(text, pos)
        if m is None:
            return out
        start = m.end()
        close = _CLOSE[tag].search(text, start)
        nxt_open = _OPEN[tag].search(text, start)
        # a block ends at its own closing tag unless another tag opens first (then it was left unclosed)
        stops = [x.start() for x in [nxt_open] + [_OPEN[o].search(text, start) for o in other] if x is not None]
        first_stop = min(stops) if stops else len(text)
        if close is not None and close.start() <= first_stop:
            out.append((text[start:close.start()], True))
            pos = close.end()
        else:
            out.append((text[start:first_stop], False))
            pos = first_stop
        if pos >= len(text):
            return out


def _clean_quote(q: str) -> str:
    q = q.strip()
    changed = True
    while changed and len(q) >= 2:
        changed = False
        for a, b in _WRAPPERS:
            if q.startswith(a) and q.endswith(b) and len(q) > len(a) + len(b) - 1:
                q = q[len(a):len(q) - len(b)].strip()
                changed = True
                break
    return q


def _norm_ws(s: str) -> str:
    return " ".join(s.split()).lower()


def _pick(blocks: list[tuple[str, bool]], clean, placeholders: set[str], accept_unclosed: bool):
    for content, closed in blocks:
        if not closed and not accept_unclosed:
            continue
        c = clean(content)
        if not c or _norm_ws(c) in placeholders:
            continue
        return c, closed
    return None, False


def parse_reflection(text: str, *, placeholders: Iterable[str] = (), accept_unclosed: bool = True
                     ) -> Reflection:
    """Parses one reflection output (see the module docstring for the rules)."""
    if not isinstance(text, str):
        raise ValueError(f"parse_reflection: expected a str, got {type(text).__name__}")
    body = _FENCE.sub("", strip_reasoning(text))
    ph = {_norm_ws(p) for p in placeholders}
    qb = _blocks(body, "error_quote")
    eb = _blocks(body, "explanation")
    quote, qc = _pick(qb, _clean_quote, ph, accept_unclosed)
    expl, ec = _pick(eb, str.strip, ph, accept_unclosed)
    return Reflection(quote, expl, qc, ec, len(qb), len(eb))
