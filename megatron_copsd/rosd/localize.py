"""Error localization: where in a failed response does the reflector's quote start, in tokens.

    offsets = tok.token_char_offsets(response_ids)        # char span of each token in tok.decode(ids)
    res = localize_quote(quote, tok.decode(response_ids), offsets, fuzzy_threshold=0.75)
    res.token_index                                       # k: distill response tokens [k, L)

Three stages, first hit wins (the reference code only did the first, on re-decoded text, and then
re-tokenized the prefix, which is off by one at BPE boundaries; we never re-tokenize):

1. "exact": first occurrence of the stripped quote in the response text.
2. "normalized": both strings go through `normalize_with_map` (whitespace removed, case folded,
   NFKC, LaTeX noise dropped: `$`, `\\(`/`\\)`, `\\[`/`\\]`, `\\left`/`\\right`, `\\,` and friends, `{}`,
   `\\text`/`\\mathrm`...; `\\cdot`/`\\times`/`×`/`·`/`*` -> `*`; unicode minus and dashes -> `-`;
   `\\le`/`\\ge`/`\\neq` -> `≤`/`≥`/`≠`; `\\dfrac` -> `\\frac`; curly quotes -> straight). The normalized
   text keeps, for every character, the index of the original character it came from, so a hit maps
   back to an original char offset. First occurrence.
3. "fuzzy": semi-global alignment of the normalized quote (its first `max_fuzzy_chars` characters --
   the start is what matters) against the normalized response, edit costs 1 except skipped response
   characters (0.5, see TEXT_GAP_COST); score = 1 - cost / len(quote). Accepted when score >= `fuzzy_threshold` and the normalized quote has at least
   `min_fuzzy_chars` characters (short quotes match anywhere). Ties go to the earliest end.

A quote abbreviated with an ellipsis ("a = 3 ... so b = 7") is also tried as its part before the
ellipsis, after the full quote fails at that stage.

Token index: the token whose span contains the match start, i.e. the first token whose span ends after
the start char. A BPE token straddling the start (" 12" when the quote starts at "12") therefore is the
first distilled token -- we distill slightly more rather than leave part of the error undistilled.
When a character's bytes are split over several tokens, `token_char_offsets` gives the character to the
first of them, so the whole character is distilled.
"""
from __future__ import annotations

import bisect
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class LocalizeResult:
    token_index: int | None
    """k, the first response token to distill; None when the quote was not found."""
    method: str
    """"exact" | "normalized" | "fuzzy" | "none"."""
    score: float
    """1.0 for exact/normalized hits; alignment similarity for fuzzy (best score seen when "none")."""
    char_start: int | None
    """Start of the match in the response text."""

    @property
    def found(self) -> bool:
        return self.token_index is not None


_W = r"(?![A-Za-z])"
_RULES: list[tuple[str, str]] = [
    (r"\\(?:left|right|displaystyle|textstyle|scriptstyle|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg"
     r"|text|mathrm|mathbf|mathit|mathsf|mathbb|mathcal|textbf|textit|textrm|operatorname|boldsymbol|quad|qquad)" + _W, ""),
    (r"\\(?:cdot|times|ast)" + _W, "*"),
    (r"\\(?:leqslant|leq|le)" + _W, "\u2264"),
    (r"\\(?:geqslant|geq|ge)" + _W, "\u2265"),
    (r"\\(?:neq|ne)" + _W, "\u2260"),
    (r"\\approx" + _W, "\u2248"),
    (r"\\div" + _W, "/"),
    (r"\\pm" + _W, "\u00b1"),
    (r"\\[dt]frac" + _W, "\\frac"),
    (r"\\\\", ""),  # LaTeX line break
    (r"\\[,;:! ]", ""),
    (r"\\[()\[\]]", ""),
    (r"\\[{}$]", ""),
    (r"\\%", "%"),
    (r"\*\*+", ""),  # markdown bold
    (r"[{}$]", ""),
    (r"[\u00d7\u00b7\u22c5\u2219\u2715*]", "*"),
    (r"[\u2212\u2013\u2012\ufe63\uff0d]", "-"),
    (r"[\u201c\u201d\u201e\u2033]", '"'),
    (r"[\u2018\u2019\u201a\u2032]", "'"),
    (r"\s+", ""),
]
_RULE_RE = re.compile("|".join(f"(?P<r{i}>{p})" for i, (p, _) in enumerate(_RULES)))
_RULE_OUT = {f"r{i}": out for i, (_, out) in enumerate(_RULES)}
# Characters that can start a rule; everything else takes the fast per-character path.
_RULE_FIRST = set("\\*{}$\u00d7\u00b7\u22c5\u2219\u2715\u2212\u2013\u2012\ufe63\uff0d\u201c\u201d\u201e\u2033"
                  "\u2018\u2019\u201a\u2032")
_ELLIPSIS = re.compile(r"\.\.\.+|\u2026|\[\s*\.\.\.\s*\]")


def normalize_with_map(text: str) -> tuple[str, list[int]]:
    """Normalized text and, per normalized char, the index of the original char it came from."""
    out: list[str] = []
    src: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _RULE_FIRST or ch.isspace():
            m = _RULE_RE.match(text, i)
            if m is not None:
                rep = _RULE_OUT[m.lastgroup]
                out.extend(rep)
                src.extend([i] * len(rep))
                i = m.end()
                continue
        rep = unicodedata.normalize("NFKC", ch).lower()
        out.extend(rep)
        src.extend([i] * len(rep))
        i += 1
    return "".join(out), src


def normalize(text: str) -> str:
    return normalize_with_map(text)[0]


# Skipping response characters the quote left out (an abbreviated quote) costs less than a wrong
# character: "So total is" should align with "So the total is" from "So", not from "he total is".
TEXT_GAP_COST = 0.5


def _semiglobal_costs(query: str, text: str, *, anchored: bool = False) -> np.ndarray:
    """D[j] = min alignment cost of `query` against any substring of `text` ending at j (len n+1); with
    `anchored` the substring must start at 0. Costs: substitution 1, query char unmatched 1, text char
    skipped TEXT_GAP_COST. One numpy pass per query char; the in-row dependency is a running minimum."""
    n = len(text)
    t = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) if n else np.zeros(0, np.uint32)
    gap = TEXT_GAP_COST * np.arange(n + 1, dtype=np.float64)
    # empty query: cost 0 at every end (free start), or j skipped text chars when anchored at 0
    prev = gap.copy() if anchored else np.zeros(n + 1, dtype=np.float64)
    a = np.empty(n + 1, dtype=np.float64)
    for i, qc in enumerate(query, start=1):
        cost = (t != ord(qc)).astype(np.float64)
        a[0] = prev[0] + 1
        np.minimum(prev[:-1] + cost, prev[1:] + 1, out=a[1:])
        # skipping text chars: D[j] = min_{j'<=j} a[j'] + gap * (j - j')
        prev = np.minimum.accumulate(a - gap) + gap
    return prev


def fuzzy_find(query: str, text: str) -> tuple[int, int, float]:
    """Best approximate occurrence of `query` in `text`: (start, end, similarity = 1 - cost / len)."""
    m = len(query)
    if m == 0 or not text:
        return 0, 0, 0.0
    fwd = _semiglobal_costs(query, text)
    end = int(np.argmin(fwd))  # first minimum = earliest end
    dist = float(fwd[end])
    # start: align the reversed query against the reversed text[:end], anchored at `end`
    rev = _semiglobal_costs(query[::-1], text[:end][::-1], anchored=True)
    best = rev.min()
    # among equally good starts take the earliest one (longest reversed match)
    length = int(np.flatnonzero(rev <= best + 1e-9)[-1])
    return end - length, end, max(0.0, 1.0 - dist / m)


def token_index_at_char(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the token containing `char` (the first token whose span ends after it)."""
    ends = [e for _, e in offsets]
    k = bisect.bisect_right(ends, char)
    if k >= len(offsets):
        raise ValueError(f"char {char} lies beyond the last token span (ends at {ends[-1] if ends else 0})")
    return k


def _candidates(quote: str) -> list[str]:
    q = quote.strip()
    out = [q]
    parts = [p.strip() for p in _ELLIPSIS.split(q)]
    if len(parts) > 1 and parts[0] and parts[0] != q:
        out.append(parts[0])
    return out


def localize_quote(quote: str | None, response_text: str, offsets: Sequence[tuple[int, int]], *,
                   fuzzy_threshold: float = 0.75, min_fuzzy_chars: int = 8, max_fuzzy_chars: int = 200,
                   ) -> LocalizeResult:
    """Maps `quote` to the response token where it starts (see the module docstring)."""
    if not 0.0 < fuzzy_threshold <= 1.0:
        raise ValueError(f"fuzzy_threshold must be in (0, 1], got {fuzzy_threshold}")
    if offsets and offsets[-1][1] != len(response_text):
        raise ValueError(f"offsets end at char {offsets[-1][1]} but the response text has "
                         f"{len(response_text)} chars; pass tok.decode(ids) with tok.token_char_offsets(ids)")
    none = LocalizeResult(None, "none", 0.0, None)
    if not quote or not quote.strip() or not offsets:
        return none
    cands = _candidates(quote)
    for c in cands:
        pos = response_text.find(c)
        if pos >= 0:
            return LocalizeResult(token_index_at_char(offsets, pos), "exact", 1.0, pos)
    norm_resp, src = normalize_with_map(response_text)
    norm_cands = [normalize(c) for c in cands]
    for nc in norm_cands:
        if nc:
            pos = norm_resp.find(nc)
            if pos >= 0:
                start = src[pos]
                return LocalizeResult(token_index_at_char(offsets, start), "normalized", 1.0, start)
    best = 0.0
    for nc in norm_cands:
        nc = nc[:max_fuzzy_chars]
        if len(nc) < min_fuzzy_chars or not norm_resp:
            continue
        s, _, score = fuzzy_find(nc, norm_resp)
        best = max(best, score)
        if score >= fuzzy_threshold:
            s = min(s, len(src) - 1)
            start = src[s]
            return LocalizeResult(token_index_at_char(offsets, start), "fuzzy", score, start)
    return LocalizeResult(None, "none", best, None)


def localize_in_response(tok, response_ids: Sequence[int], quote: str | None, **kwargs) -> LocalizeResult:
    """`localize_quote` on `tok.decode(response_ids)` with `tok.token_char_offsets(response_ids)`."""
    return localize_quote(quote, tok.decode(response_ids), tok.token_char_offsets(response_ids), **kwargs)
