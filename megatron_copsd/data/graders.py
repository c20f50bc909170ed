"""Graders (methods.md section 4). Each returns `Grade(correct, formatted, extracted)`.

    from megatron_copsd.data.graders import get_grader
    grade = get_grader("math")(response, "025")

- math: the content of the last balanced `\\boxed{...}` anywhere in the response (not just its tail),
  compared with `math-verify`; if that says no (or fails), numeric normalization decides (thousands
  commas, zero padding, trailing `.0`, `\\frac{a}{b}` vs decimals, `$`/`%`/`\\text{}` decorations).
  `formatted`: a `\\boxed{}` with content exists.
- math_number: for small models that rarely write `\\boxed{}`: the last `\\boxed{...}` when there is one,
  otherwise the last number in the response (`1,234`, `-3`, `2.5`); compared like `math`. `formatted`: a
  number (or a box) was found.
- mcq: the letter inside the last `<answer>...</answer>`; `formatted`: such a block holds one letter.
- tooluse: every `Action:` line followed by `Action Input:` is one call, its input parsed with
  `json.JSONDecoder.raw_decode` (nested objects are fine); the multiset of (action, arguments) must
  equal the gold one. `formatted`: at least one call, and every call's input parsed.
"""
from __future__ import annotations

import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

from megatron_copsd.data.loaders import DataError, parse_gold_tool_calls


@dataclass(frozen=True)
class Grade:
    correct: bool
    formatted: bool
    extracted: str | None


# ----------------------------------------------------------------------------------------------- math

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance; None when there is none."""
    last = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2  # escaped brace \{ \} does not count
                continue
            depth += (c == "{") - (c == "}")
            i += 1
        if depth == 0:
            last = text[m.end(): i - 1]
    return last


_FRAC = re.compile(r"^\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}$")
_DECOR = [(re.compile(r"\\text\s*\{([^{}]*)\}"), r"\1"), (re.compile(r"\\(?:left|right|!|,|;|:)"), ""),
          (re.compile(r"\\?[$%]"), ""), (re.compile(r"\^\s*\{?\\circ\}?"), ""), (re.compile(r"\\circ"), "")]


def normalize_number(s: str | None) -> Fraction | None:
    """An exact number for a plain numeric answer, or None. Handles `1,234`, `025`, `18.0`, `-3`,
    `\\frac{3}{4}`, `3/4`, `50\\%`, `\\$18`, `18 \\text{ dollars}` -> 18, `x = 5` -> 5."""
    if s is None:
        return None
    t = s.strip()
    for pat, rep in _DECOR:
        t = pat.sub(rep, t)
    t = t.strip()
    if "=" in t:
        t = t.rsplit("=", 1)[1].strip()
    t = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", t)  # thousands separators only
    t = re.sub(r"\s+(?:[A-Za-z][A-Za-z ]*)$", "", t).strip() if re.match(r"^[-+]?[\d.]", t) else t
    t = t.rstrip(".").replace(" ", "")
    m = _FRAC.match(t)
    try:
        if m:
            return Fraction(Fraction(m.group(1)), Fraction(m.group(2)))
        if re.fullmatch(r"[-+]?\d+/\d+", t):
            return Fraction(t)
        if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", t, re.I):
            return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _math_verify_equal(gold: str, pred: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a dependency; numeric fallback still works
        return False
    # math-verify's timeouts use SIGALRM, which only works in the main thread.
    main = threading.current_thread() is threading.main_thread()
    kw = {} if main else {"parsing_timeout": None}
    try:
        g, p = parse(f"${gold}$", **kw), parse(f"${pred}$", **kw)
        if not g or not p:
            return False
        return bool(verify(g, p, **({} if main else {"timeout_seconds": None})))
    except Exception:  # any parser failure means "not shown equal"; the numeric fallback decides
        return False


def math_answers_equal(gold: str, pred: str) -> bool:
    gn, pn = normalize_number(gold), normalize_number(pred)
    if gn is not None and pn is not None:
        return gn == pn  # both plain numbers: exact comparison, no float rounding surprises
    if pred.strip() == gold.strip():
        return True
    return _math_verify_equal(gold, pred)


def grade_math(response: str, gold: str) -> Grade:
    extracted = extract_last_boxed(response)
    if extracted is None or not extracted.strip():
        return Grade(False, False, extracted)
    return Grade(math_answers_equal(str(gold), extracted), True, extracted.strip())


_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number written in `text` (a sentence-final `.` is not a decimal point); None when there is none."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def grade_math_number(response: str, gold: str) -> Grade:
    """`grade_math` when the response has a non-empty box; otherwise its last number, compared the same way."""
    boxed = grade_math(response, gold)
    if boxed.formatted:
        return boxed
    number = extract_last_number(response)
    if number is None:
        return Grade(False, False, None)
    return Grade(math_answers_equal(str(gold), number), True, number)


# ------------------------------------------------------------------------------------------------ mcq

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
# a bare letter, "(C)", "D." or "D: text"; "I think it is B" is not a letter answer
_LETTER = re.compile(r"^[(\[]?\s*([A-Z])\s*(?:[)\].:]|$)")


def grade_mcq(response: str, gold: str) -> Grade:
    blocks = _ANSWER_BLOCK.findall(response)
    if not blocks:
        return Grade(False, False, None)
    m = _LETTER.match(blocks[-1].strip())
    if not m:
        return Grade(False, False, blocks[-1].strip() or None)
    letter = m.group(1)
    return Grade(letter == str(gold).strip().upper(), True, letter)


# -------------------------------------------------------------------------------------------- tooluse

_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*(.*?)[ \t]*$", re.M)
_ACTION_INPUT = re.compile(r"\s*Action[ _]Input[ \t]*:\s*", re.I)
_FENCE = re.compile(r"```(?:json)?\s*")


def parse_tool_calls(response: str) -> tuple[list[tuple[str, Any]], bool]:
    """[(action, parsed input)] and whether every call parsed. An input that is a JSON string holding
    JSON is decoded once more (the gold data stores inputs that way)."""
    decoder = json.JSONDecoder()
    calls, ok = [], True
    for m in _ACTION.finditer(response):
        name = m.group(1).strip().strip("`").strip()
        rest = response[m.end():]
        im = _ACTION_INPUT.match(rest)
        if not name or not im:
            ok = False
            continue
        pos = im.end()
        fm = _FENCE.match(rest, pos)
        if fm:
            pos = fm.end()
        try:
            args, _ = decoder.raw_decode(rest, pos)
        except json.JSONDecodeError:
            ok = False
            calls.append((name, None))
            continue
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        calls.append((name, args))
    return calls, ok and bool(calls)


def _canon(call: tuple[str, Any]) -> str:
    return json.dumps([call[0], call[1]], sort_keys=True, ensure_ascii=False)


def grade_tooluse(response: str, gold) -> Grade:
    try:
        gold_calls = parse_gold_tool_calls(gold)
    except DataError as e:
        raise ValueError(f"grade_tooluse: bad gold answer: {e}") from None
    calls, formatted = parse_tool_calls(response)
    extracted = json.dumps([{"Action": n, "Action_Input": a} for n, a in calls], ensure_ascii=False) \
        if calls else None
    correct = formatted and Counter(map(_canon, calls)) == Counter(map(_canon, gold_calls))
    return Grade(bool(correct), formatted, extracted)


GRADERS: dict[str, Callable[[str, Any], Grade]] = {"math": grade_math, "math_number": grade_math_number,
                                                   "mcq": grade_mcq,
                                                   "tooluse": grade_tooluse}


def get_grader(task: str) -> Callable[[str, Any], Grade]:
    """`task`: "math" | "math_number" | "mcq" | "tooluse"."""
    if task not in GRADERS:
        raise ValueError(f"unknown grading task {task!r}; expected one of {sorted(GRADERS)}")
    return GRADERS[task]
