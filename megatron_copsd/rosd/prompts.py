"""ROSD prompts: reflection on a failed / successful rollout, and the teacher prompt.

    p = failed_reflection_prompt(tok, problem, correct_solution, failed_response,
                                 gold_answer="B", max_prompt_tokens=4096)
    p.ids, p.text, p.truncated_fields
    t = teacher_prompt(tok, problem, explanation=parsed.explanation, fallback_solution=sibling,
                       system_prompt=task_system_prompt)

All prompts go through the tokenizer's chat template (`tok.encode_chat`) and end with the opened
assistant turn. Wording is ours.

Length control (the reference code truncated reflection prompts from the end and so lost the format
instructions): when a prompt exceeds `max_prompt_tokens`, the long free-text parts (solutions, the
response under review, an explanation) are shortened in their MIDDLE -- head and tail kept, a marker
inserted -- with the token budget shared so that a short part keeps all of it and the rest goes to the
long ones. The problem is only shortened as a last resort, the instructions never; if the instructions
alone exceed the budget a ValueError says so. Note for localization: a quote can only come from the
visible head or tail of a shortened response, and both are verbatim parts of the original.

`reflector_sees_answer` (the `gold_answer` argument of `failed_reflection_prompt`): the paper shows the
reflector the correct final answer. Its explanation then often states that answer, and the explanation
goes into the teacher context, so the teacher may "know" the answer without reasoning. Pass
`gold_answer=None` to leave it out; the correct solution is still shown either way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

TRUNCATION_MARKER = "\n[... middle part omitted for length ...]\n"

QUOTE_PLACEHOLDER = "the exact passage of the attempted answer where its reasoning first goes wrong"
EXPLANATION_PLACEHOLDER = "what the mistake is, how to correct it, and the right reasoning from that point on"
SUCCESS_EXPLANATION_PLACEHOLDER = "the key idea of this answer and why each of its main steps is valid"
PLACEHOLDERS = (QUOTE_PLACEHOLDER, EXPLANATION_PLACEHOLDER, SUCCESS_EXPLANATION_PLACEHOLDER)
"""Template texts inside the format instructions; `parse_reflection(..., placeholders=PLACEHOLDERS)`
skips blocks that merely echo them."""

KEY_IDEA_HEADER = "The key idea to solve the question:"
SOLUTION_HEADER = "A correct solution to the question:"


@dataclass(frozen=True)
class RosdPrompt:
    ids: list[int]
    text: str
    """The rendered chat text the ids encode (including any assistant prefix)."""
    truncated_fields: tuple[str, ...] = field(default=())
    """Names of the parts shortened in the middle to meet the token budget."""


# ----------------------------------------------------------------------------- wording

def _failed_messages(f: dict) -> list[dict]:
    answer = ""
    if f["gold_answer"] is not None:
        answer = f"## The correct final answer\n{f['gold_answer']}\n\n"
    user = (
        "Below are a problem, a correct solution to it, and an attempted answer that ends with a wrong "
        "result. Find the point where the attempted answer first goes wrong and explain how to fix it.\n\n"
        f"## Problem\n{f['problem']}\n\n"
        f"## A correct solution\n{f['solution']}\n\n"
        f"{answer}"
        f"## Attempted answer (incorrect)\n{f['response']}\n\n"
        "## How to reply\n"
        "Reply with exactly two tagged blocks, in this order, and nothing else:\n"
        f"<error_quote>{QUOTE_PLACEHOLDER}</error_quote>\n"
        f"<explanation>{EXPLANATION_PLACEHOLDER}</explanation>\n"
        "Rules:\n"
        "- Copy the quote character for character from the attempted answer (not from the correct "
        "solution): one short sentence or equation, without added quotation marks or '...'.\n"
        "- Choose the earliest wrong step; everything before the quote should be sound.\n"
        "- In the explanation, teach the reasoning that leads to the right result instead of only "
        "stating the result."
    )
    return [{"role": "user", "content": user}]


def _success_messages(f: dict) -> list[dict]:
    user = (
        "Below are a problem and an answer that reaches the correct result. Explain why its reasoning "
        "is valid.\n\n"
        f"## Problem\n{f['problem']}\n\n"
        f"## Answer (correct)\n{f['response']}\n\n"
        "## How to reply\n"
        "Reply with exactly one tagged block and nothing else:\n"
        f"<explanation>{SUCCESS_EXPLANATION_PLACEHOLDER}</explanation>"
    )
    return [{"role": "user", "content": user}]


def _teacher_messages(f: dict) -> list[dict]:
    if f["explanation"] is not None:
        context = f"{KEY_IDEA_HEADER}\n{f['explanation']}\n\n"
        instruction = "Using this idea, solve the question above correctly, reasoning step by step on your own."
    else:
        context = f"{SOLUTION_HEADER}\n{f['solution']}\n\n"
        instruction = ("Using this solution as a guide, solve the question above correctly, reasoning step "
                       "by step on your own.")
    user = f"{f['problem']}\n\n{context}{instruction}"
    msgs = [{"role": "user", "content": user}]
    if f["system_prompt"]:
        msgs.insert(0, {"role": "system", "content": f["system_prompt"]})
    return msgs


# ----------------------------------------------------------------------------- length control

def truncate_middle(tok, text: str, max_tokens: int, *, marker: str = TRUNCATION_MARKER) -> str:
    """`text` if it fits in `max_tokens`, else its head and tail (cut at token boundaries) around
    `marker`; the marker's own tokens count against the budget (approximately: re-encoding may merge
    a token or two at the seams, which the prompt builders absorb by retrying with a smaller budget)."""
    ids = tok.encode(text)
    if len(ids) <= max_tokens:
        return text
    keep = max(0, max_tokens - len(tok.encode(marker)))
    decoded = tok.decode(ids)
    spans = tok.token_char_offsets(ids)
    head = (keep + 1) // 2
    tail = keep - head
    head_end = spans[head - 1][1] if head > 0 else 0
    tail_start = spans[len(ids) - tail][0] if tail > 0 else len(decoded)
    return decoded[:head_end] + marker + decoded[tail_start:]


def _water_fill(lengths: dict[str, int], budget: int) -> dict[str, int]:
    """Shares `budget` tokens: parts shorter than an equal share keep everything, the rest split it."""
    alloc, todo, left = {}, dict(lengths), max(0, budget)
    while todo:
        share = left // len(todo)
        short = {k: n for k, n in todo.items() if n <= share}
        if not short:
            for i, k in enumerate(sorted(todo)):
                alloc[k] = share + (1 if i < left - share * len(todo) else 0)
            return alloc
        for k, n in short.items():
            alloc[k] = n
            left -= n
            del todo[k]
    return alloc


def _build(tok, render: Callable[[dict], list[dict]], fields: dict, cut_order: Sequence[Sequence[str]],
           max_tokens: int | None, *, enable_thinking, assistant_prefix: str = "", what: str) -> RosdPrompt:
    def encode(fs):
        msgs = render(fs)
        ids = tok.encode_chat(msgs, enable_thinking=enable_thinking, assistant_prefix=assistant_prefix)
        return ids, msgs

    ids, msgs = encode(fields)
    if max_tokens is None or len(ids) <= max_tokens:
        return _result(tok, ids, msgs, (), enable_thinking, assistant_prefix)
    marker_len = len(tok.encode(TRUNCATION_MARKER))
    for cuttable in cut_order:  # first the long free-text parts; the problem too only as a last resort
        cuttable = [k for k in cuttable if fields.get(k)]
        lengths = {k: len(tok.encode(fields[k])) for k in cuttable}
        overhead = len(encode({**fields, **{k: "" for k in cuttable}})[0])
        slack = 0
        for _ in range(8):
            budget = max_tokens - overhead - slack
            if budget < len(cuttable) * (marker_len + 8):
                break  # not even a marker and a few tokens per part fit: cut more parts
            alloc = _water_fill(lengths, budget)
            new = dict(fields)
            for k in cuttable:
                if alloc[k] < lengths[k]:
                    new[k] = truncate_middle(tok, fields[k], alloc[k])
            ids, msgs = encode(new)
            if len(ids) <= max_tokens:
                cut = tuple(k for k in cuttable if new[k] != fields[k])
                return _result(tok, ids, msgs, cut, enable_thinking, assistant_prefix)
            slack += len(ids) - max_tokens
    raise ValueError(f"{what}: max_prompt_tokens={max_tokens} is too small even after shortening "
                     f"{list(cut_order[-1])}; the instructions alone take {overhead} tokens")


def _result(tok, ids, msgs, cut, enable_thinking, assistant_prefix) -> RosdPrompt:
    text = tok.apply_chat(msgs, enable_thinking=enable_thinking) + assistant_prefix
    return RosdPrompt(list(ids), text, tuple(cut))


def _need(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


# ----------------------------------------------------------------------------- public builders

def failed_reflection_prompt(tok, problem: str, correct_solution: str, failed_response: str, *,
                             gold_answer: str | None = None, max_prompt_tokens: int | None = None,
                             enable_thinking: bool | None = None) -> RosdPrompt:
    """Reflection on a failed rollout: asks for `<error_quote>` then `<explanation>`.

    `gold_answer=None` hides the correct final answer from the reflector (see module docstring)."""
    fields = {"problem": _need("problem", problem), "solution": _need("correct_solution", correct_solution),
              "response": failed_response, "gold_answer": gold_answer}
    return _build(tok, _failed_messages, fields, [("solution", "response"), ("problem", "solution", "response")],
                  max_prompt_tokens, enable_thinking=enable_thinking, what="failed_reflection_prompt")


def success_reflection_prompt(tok, problem: str, response: str, *, max_prompt_tokens: int | None = None,
                              enable_thinking: bool | None = None) -> RosdPrompt:
    """Reflection on a successful rollout: asks for `<explanation>` of why it is valid."""
    fields = {"problem": _need("problem", problem), "response": response}
    return _build(tok, _success_messages, fields, [("response",), ("problem", "response")],
                  max_prompt_tokens, enable_thinking=enable_thinking, what="success_reflection_prompt")


def teacher_prompt(tok, problem: str, *, explanation: str | None = None, fallback_solution: str | None = None,
                   system_prompt: str | None = None, max_prompt_tokens: int | None = None,
                   enable_thinking: bool | None = None, assistant_prefix: str = "") -> RosdPrompt:
    """The ROSD teacher context: problem + "The key idea to solve the question:" + explanation + an
    instruction to solve it; with no explanation, the correct `fallback_solution` instead.

    `system_prompt`, `enable_thinking` and `assistant_prefix` must be the student's, so that the teacher
    and the student score the response under the same task format."""
    _need("problem", problem)
    if explanation is not None and not explanation.strip():
        explanation = None
    if explanation is None and (fallback_solution is None or not fallback_solution.strip()):
        raise ValueError("teacher_prompt needs an explanation or a fallback_solution")
    fields = {"problem": problem, "explanation": explanation, "solution": fallback_solution,
              "system_prompt": system_prompt}
    body = "explanation" if explanation is not None else "solution"
    return _build(tok, _teacher_messages, fields, [(body,), ("problem", body)], max_prompt_tokens,
                  enable_thinking=enable_thinking, assistant_prefix=assistant_prefix, what="teacher_prompt")


def prompt_wording() -> list[str]:
    """The fixed wording of every ROSD prompt (no problem / solution filled in), e.g. for the corpus of a
    tiny test tokenizer, so that the instructions are not out-of-vocabulary."""
    f = {"problem": "", "solution": "", "response": "", "gold_answer": "", "explanation": "", "system_prompt": None}
    renders = [_failed_messages(f), _success_messages(f), _teacher_messages(f),
               _teacher_messages({**f, "explanation": None}), [{"content": TRUNCATION_MARKER}]]
    return [m["content"] for msgs in renders for m in msgs]
