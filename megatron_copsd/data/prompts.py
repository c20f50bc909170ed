"""Student and COPSD teacher prompts (methods.md section 1), rendered through the tokenizer's chat format.

    from megatron_copsd.data.prompts import student_prompt, copsd_teacher_prompt
    s = student_prompt(tok, "swa", problem_sw)
    t = copsd_teacher_prompt(tok, "swa", problem_sw, problem_en, solution_en)
    student_seq, teacher_seq = s.ids + response_ids, t.ids + response_ids

Both prompts end with the opened assistant turn, so appending the sampled response ids gives the full
sequence; the student and teacher are aligned on those response tokens only. When a reasoning prefix
is used, pass the same `use_reasoning_prefix` to both builders: the prefix is part of the prompt on both
sides, so the teacher scores the response in the same context the student produced it in.

The assistant prefix is tokenized separately from the chat text, so `prefix_start` is an exact token
boundary (`ids[prefix_start:]` are the prefix's tokens).

The trainer's switch (`data.reasoning_prefix`, the reference runs' `--student_enable_thinking`) goes
through `reasoning_prefix_mode(tok, lang)`: it checks the prefix can be honoured and returns the
`enable_thinking` to render with (True where the tokenizer knows `<think>`: the assistant turn then opens
with `<think>` + newline + the prefix, as in the reference's Qwen3 runs; None elsewhere: the bare prefix).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_copsd.data.languages import Language, get_language
from megatron_copsd.data.tokenizer import Tokenizer

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class PromptIds:
    """Token ids of a prompt and its text (`text == tok.decode(ids)` for a lossless tokenizer).

    `prefix_start`: index in `ids` where the opened assistant turn's pre-filled content begins (equals
    `len(ids)` when there is no prefix). `user_content`: the user message as built, for logs.
    """

    ids: list[int]
    text: str
    prefix_start: int
    user_content: str

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


def _lang(lang: str | Language) -> Language:
    return lang if isinstance(lang, Language) else get_language(lang)


def _require_text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value.strip()


def assistant_prefix(tok: Tokenizer, lang: str | Language, *, use_reasoning_prefix: bool,
                     enable_thinking: bool | None) -> str:
    """Text that pre-fills the assistant turn: with thinking explicitly on and a tokenizer that knows
    `<think>`, the think block is opened first so the target-language prefix starts the reasoning."""
    lang = _lang(lang)
    prefix = lang.reasoning_prefix if use_reasoning_prefix else ""
    if enable_thinking is True and _knows_think(tok) and prefix:
        return f"{THINK_OPEN}\n{prefix}"
    return prefix


def _knows_think(tok: Tokenizer) -> bool:
    return len(tok.encode(THINK_OPEN)) == 1


def reasoning_prefix_mode(tok: Tokenizer, lang: str | Language) -> bool | None:
    """The `enable_thinking` that prompts with `use_reasoning_prefix=True` must be rendered with, after
    checking the prefix can be honoured; raises ValueError (naming the language or the template) if not.

    True: the tokenizer has `<think>` as one token, so the prefix opens a think block (Qwen3). None: no
    `<think>` token; the prefix alone opens the assistant turn (the template is rendered as usual)."""
    lang = _lang(lang)
    if not lang.reasoning_prefix.strip():
        raise ValueError(
            f"data.reasoning_prefix: language {lang.code!r} ({lang.name}) has no reasoning prefix (the registry "
            "holds only English stand-ins for it, and an English prefix would steer the model to English); add "
            "one with a data.language_overrides file (field reasoning_prefix) or set data.reasoning_prefix false")
    if not _knows_think(tok):
        return None
    msgs = [{"role": "user", "content": "x"}]
    opened = tok.apply_chat(msgs, add_generation_prompt=True, enable_thinking=True)
    closed = tok.apply_chat(msgs, add_generation_prompt=False, enable_thinking=True)
    tail = opened[len(closed):] if opened.startswith(closed) else opened[-64:]
    if THINK_CLOSE in tail or THINK_OPEN in tail:
        raise ValueError(
            "data.reasoning_prefix: the tokenizer's chat template already writes a think block into the opened "
            f"assistant turn even with enable_thinking=True ({tail!r}), so the reasoning prefix cannot open "
            "the reasoning; use a template that leaves the assistant turn empty (Qwen3's does)")
    return True


def _render(tok: Tokenizer, messages: list[dict], prefix: str, enable_thinking: bool | None,
            user_content: str) -> PromptIds:
    chat_text = tok.apply_chat(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    chat_ids = tok.encode_chat(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    prefix_ids = tok.encode(prefix) if prefix else []
    return PromptIds(ids=chat_ids + prefix_ids, text=chat_text + prefix, prefix_start=len(chat_ids),
                     user_content=user_content)


def _messages(user: str, system: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


def student_prompt(tok: Tokenizer, lang: str | Language, problem: str, *, use_reasoning_prefix: bool = False,
                   enable_thinking: bool | None = None, system: str | None = None) -> PromptIds:
    """The student sees only the target-language problem and the target-language instruction."""
    lang = _lang(lang)
    user = f"{_require_text(problem, 'problem')}\n\n{lang.instruction}"
    prefix = assistant_prefix(tok, lang, use_reasoning_prefix=use_reasoning_prefix,
                              enable_thinking=enable_thinking)
    return _render(tok, _messages(user, system), prefix, enable_thinking, user)


def copsd_teacher_user_content(lang: str | Language, problem: str, problem_en: str | None,
                               solution_en: str | None, *, include_problem_en: bool = True,
                               include_reference_solution_en: bool = True) -> str:
    """The teacher's user message: the target-language problem, then (switchable) its English translation
    and the English reference solution between begin/end markers, then the instruction."""
    lang = _lang(lang)
    labels = lang.labels()
    parts = [f"{labels.problem}\n{_require_text(problem, 'problem')}"]
    if include_problem_en:
        parts.append(f"{labels.problem_en}\n{_require_text(problem_en, 'problem_en')}")
    if include_reference_solution_en:
        sol = _require_text(solution_en, "solution_en")
        parts.append(f"{labels.reference_begin}\n{sol}\n{labels.reference_end}")
    parts.append(labels.instruction)
    return "\n\n".join(parts)


def copsd_teacher_prompt(tok: Tokenizer, lang: str | Language, problem: str, problem_en: str | None,
                         solution_en: str | None, *, include_problem_en: bool = True,
                         include_reference_solution_en: bool = True, use_reasoning_prefix: bool = False,
                         enable_thinking: bool | None = None, system: str | None = None) -> PromptIds:
    """The teacher's privileged prompt; use the same `use_reasoning_prefix`/`enable_thinking` as the student."""
    lang = _lang(lang)
    user = copsd_teacher_user_content(lang, problem, problem_en, solution_en,
                                      include_problem_en=include_problem_en,
                                      include_reference_solution_en=include_reference_solution_en)
    prefix = assistant_prefix(tok, lang, use_reasoning_prefix=use_reasoning_prefix,
                              enable_thinking=enable_thinking)
    return _render(tok, _messages(user, system), prefix, enable_thinking, user)
