"""Per-group ROSD decisions: who gets a reflection, what each rollout is distilled on, and the counters.

Per training step, for each prompt group (n graded rollouts of one problem):

    plan = plan_group(tok, group, settings)            # decides the group's case; reflection prompts
    texts = <generate plan.requests[i].prompt.ids with the reflection sampling params>
    result = finalize_group(tok, plan, texts, settings)  # parse, localize, teacher prompts, masks
    stats.add(result)                                   # RosdStats -> metrics() for the step's log

Cases (settings mean what they say; every decision is written to `plan.reason` / `target.reason` and
counted in `RosdStats`):
- mixed group (some correct, some wrong): every rollout is reflected on. A failed rollout is shown a
  correct solution -- a successful sibling (`correct_solution_source="sibling"`, siblings assigned
  round-robin so the failures of a group see different solutions) or the data's reference solution
  (`"reference"`, falling back to a sibling when the example has none).
- all wrong: `on_all_wrong="skip"` drops the group; `"reference_solution"` reflects on the failures with
  the data's reference solution -- when the example has none, the group is dropped and counted as
  `skipped_all_wrong_no_reference`.
- all correct: `on_all_correct="distill_whole"` reflects on every rollout and distills whole responses
  (the reference code's zero-variance filter silently dropped these groups); `"skip"` drops them.

Per rollout after reflection:
- failed: the quote is localized (see `localize.py`); found -> distill tokens [k, L); not found (or no
  quote parsed) -> `on_no_quote="whole"` distills [0, L), `"skip"` does not distill the rollout.
- correct: whole response.
- teacher prompt: problem + key idea (the parsed explanation); with no explanation, the correct solution
  instead (failed: the one shown to its reflector; correct: another successful sibling, else the
  reference solution, else its own response).
"""
from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from .localize import LocalizeResult, localize_quote
from .parse import Reflection, parse_reflection
from .prompts import PLACEHOLDERS, RosdPrompt, failed_reflection_prompt, success_reflection_prompt, teacher_prompt


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class RosdSettings:
    """The ROSD switches (mirrored by the trainer config's rosd section)."""

    on_all_wrong: str = "skip"
    """"skip" | "reference_solution": groups without any correct rollout."""
    on_all_correct: str = "distill_whole"
    """"distill_whole" | "skip": groups without any wrong rollout."""
    on_no_quote: str = "whole"
    """"whole" | "skip": failed rollout whose error quote is missing or not found in the response."""
    reflector_sees_answer: bool = True
    """Show the gold final answer to the failed-rollout reflector (the paper does; it can leak into the
    teacher context through the explanation)."""
    correct_solution_source: str = "sibling"
    """"sibling" | "reference": which correct solution a failed rollout's reflector sees."""
    fuzzy_threshold: float = 0.75
    """Minimum similarity (1 - edit distance / quote length) for a fuzzy quote match."""
    min_fuzzy_chars: int = 8
    """Shorter normalized quotes are only matched exactly/normalized."""
    max_reflection_prompt_tokens: int | None = 4096
    """Budget of a reflection prompt; long parts are shortened in the middle."""
    max_teacher_prompt_tokens: int | None = None
    """Budget of a teacher prompt (None: unlimited)."""
    reflection_enable_thinking: bool | None = None
    """Passed to the chat template for reflection prompts (None: template default)."""
    accept_unclosed_tags: bool = True
    """Use a tag block cut by the reflection length limit."""

    def __post_init__(self):
        _choice("on_all_wrong", self.on_all_wrong, ("skip", "reference_solution"))
        _choice("on_all_correct", self.on_all_correct, ("distill_whole", "skip"))
        _choice("on_no_quote", self.on_no_quote, ("whole", "skip"))
        _choice("correct_solution_source", self.correct_solution_source, ("sibling", "reference"))
        if not 0.0 < self.fuzzy_threshold <= 1.0:
            raise ValueError(f"fuzzy_threshold must be in (0, 1], got {self.fuzzy_threshold}")
        if self.min_fuzzy_chars < 1:
            raise ValueError(f"min_fuzzy_chars must be >= 1, got {self.min_fuzzy_chars}")
        for name in ("max_reflection_prompt_tokens", "max_teacher_prompt_tokens"):
            v = getattr(self, name)
            if v is not None and v < 64:
                raise ValueError(f"{name} must be None or >= 64, got {v}")


@dataclass
class RosdRollout:
    response_ids: Sequence[int]
    correct: bool


@dataclass
class RosdGroup:
    """One prompt's graded rollouts plus what the data knows about the problem."""

    problem: str
    """The problem as the student saw it (user message content)."""
    rollouts: list[RosdRollout]
    system_prompt: str | None = None
    """The student's system prompt (task format), reused in the teacher prompt."""
    reference_solution: str | None = None
    gold_answer: str | None = None
    domain: str = "default"
    assistant_prefix: str = ""
    """The student's assistant-turn prefix, reused in the teacher prompt."""
    enable_thinking: bool | None = None
    """The student's chat-template thinking switch, reused in the teacher prompt."""


@dataclass
class ReflectionRequest:
    rollout_index: int
    kind: str
    """"failed" | "success"."""
    prompt: RosdPrompt
    correct_solution: str | None
    """The correct solution shown to a failed rollout's reflector (teacher fallback)."""
    solution_source: str
    """"sibling:<i>" | "reference" | "none"."""


@dataclass
class GroupPlan:
    group: RosdGroup
    case: str
    """"mixed" | "all_correct" | "all_wrong"."""
    action: str
    """"reflect" | "skip"."""
    reason: str
    """Why, in words, e.g. "skipped: all 8 rollouts wrong and on_all_wrong=skip"."""
    requests: list[ReflectionRequest]
    response_texts: list[str]
    """`tok.decode(response_ids)` of each rollout: the text the token offsets refer to."""
    display_texts: list[str]
    """The responses as shown to reflectors / teachers: trailing stop tokens dropped and special-token
    strings removed, so a pasted response cannot end the chat turn it is pasted into."""


@dataclass
class RolloutTarget:
    rollout_index: int
    correct: bool
    distill: bool
    distill_start: int
    """k: response tokens [k, L) are distilled (0 for whole responses)."""
    num_tokens: int
    teacher_prompt: RosdPrompt | None
    teacher_context: str
    """"explanation" | "solution" | "none"."""
    reason: str
    reflection: Reflection | None = None
    localization: LocalizeResult | None = None

    @property
    def mask(self) -> list[int]:
        """Per response token: 1 = distilled."""
        if not self.distill:
            return [0] * self.num_tokens
        return [0] * self.distill_start + [1] * (self.num_tokens - self.distill_start)

    @property
    def distilled_fraction(self) -> float:
        return (self.num_tokens - self.distill_start) / self.num_tokens if self.distill and self.num_tokens else 0.0


@dataclass
class GroupResult:
    plan: GroupPlan
    targets: list[RolloutTarget] = field(default_factory=list)


def display_text(tok, response_ids: Sequence[int]) -> str:
    """A response as text to paste into another prompt (see `GroupPlan.display_texts`)."""
    stops = set(tok.stop_token_ids) | {tok.eos_token_id, tok.pad_token_id}
    ids = list(response_ids)
    while ids and ids[-1] in stops:
        ids.pop()
    text = tok.decode(ids)
    for sid in sorted(stops):
        special = tok.decode([sid])
        if special.strip():
            text = text.replace(special, "")
    return text


def plan_group(tok, group: RosdGroup, settings: RosdSettings) -> GroupPlan:
    """Decides the group's case and builds its reflection prompts (none when the group is skipped)."""
    n = len(group.rollouts)
    if n == 0:
        raise ValueError("plan_group: group has no rollouts")
    texts = [tok.decode(r.response_ids) for r in group.rollouts]
    good = [i for i, r in enumerate(group.rollouts) if r.correct]
    bad = [i for i, r in enumerate(group.rollouts) if not r.correct]
    has_ref = bool(group.reference_solution and group.reference_solution.strip())
    case = "mixed" if good and bad else ("all_correct" if good else "all_wrong")

    shown = [display_text(tok, r.response_ids) for r in group.rollouts]

    def skip(reason):
        return GroupPlan(group, case, "skip", f"skipped: {reason}", [], texts, shown)

    if case == "all_wrong":
        if settings.on_all_wrong == "skip":
            return skip(f"all {n} rollouts wrong and on_all_wrong=skip")
        if not has_ref:
            return skip(f"all {n} rollouts wrong, on_all_wrong=reference_solution but the example has no "
                        "reference solution")
    if case == "all_correct" and settings.on_all_correct == "skip":
        return skip(f"all {n} rollouts correct and on_all_correct=skip")

    answer = group.gold_answer if settings.reflector_sees_answer else None
    requests = []
    for j, i in enumerate(bad):
        use_ref = has_ref and (settings.correct_solution_source == "reference" or not good)
        if use_ref:
            sol, src = group.reference_solution, "reference"
        else:
            sib = good[j % len(good)]
            sol, src = shown[sib], f"sibling:{sib}"
        p = failed_reflection_prompt(tok, group.problem, sol, shown[i], gold_answer=answer,
                                     max_prompt_tokens=settings.max_reflection_prompt_tokens,
                                     enable_thinking=settings.reflection_enable_thinking)
        requests.append(ReflectionRequest(i, "failed", p, sol, src))
    for i in good:
        p = success_reflection_prompt(tok, group.problem, shown[i],
                                      max_prompt_tokens=settings.max_reflection_prompt_tokens,
                                      enable_thinking=settings.reflection_enable_thinking)
        requests.append(ReflectionRequest(i, "success", p, None, "none"))
    requests.sort(key=lambda r: r.rollout_index)
    if case == "mixed":
        reason = f"reflect: {len(good)} correct, {len(bad)} wrong"
    elif case == "all_correct":
        reason = f"reflect: all {n} rollouts correct, on_all_correct=distill_whole"
    else:
        reason = f"reflect: all {n} rollouts wrong, on_all_wrong=reference_solution"
    return GroupPlan(group, case, "reflect", reason, requests, texts, shown)


def _success_fallback(plan: GroupPlan, i: int) -> str:
    others = [j for j, r in enumerate(plan.group.rollouts) if r.correct and j != i]
    if others:
        return plan.display_texts[others[0]]
    if plan.group.reference_solution and plan.group.reference_solution.strip():
        return plan.group.reference_solution
    return plan.display_texts[i]


def finalize_group(tok, plan: GroupPlan, reflection_texts: Sequence[str], settings: RosdSettings) -> GroupResult:
    """Turns the reflections (one text per `plan.requests`, same order) into per-rollout targets."""
    if len(reflection_texts) != len(plan.requests):
        raise ValueError(f"finalize_group: got {len(reflection_texts)} reflection texts for "
                         f"{len(plan.requests)} requests")
    g = plan.group
    result = GroupResult(plan)
    if plan.action == "skip":
        for i, r in enumerate(g.rollouts):
            result.targets.append(RolloutTarget(i, r.correct, False, 0, len(r.response_ids), None, "none",
                                                plan.reason))
        return result
    by_rollout = {req.rollout_index: (req, txt) for req, txt in zip(plan.requests, reflection_texts)}
    for i, r in enumerate(g.rollouts):
        L = len(r.response_ids)
        if i not in by_rollout:  # a correct rollout in an all-wrong group cannot exist; wrong ones always reflect
            raise AssertionError(f"rollout {i} has no reflection request")
        req, txt = by_rollout[i]
        refl = parse_reflection(txt, placeholders=PLACEHOLDERS, accept_unclosed=settings.accept_unclosed_tags)
        if refl.explanation is not None:
            ctx, fallback = "explanation", None
        else:
            ctx = "solution"
            fallback = req.correct_solution if req.kind == "failed" else _success_fallback(plan, i)
        tp = teacher_prompt(tok, g.problem, explanation=refl.explanation, fallback_solution=fallback,
                            system_prompt=g.system_prompt, max_prompt_tokens=settings.max_teacher_prompt_tokens,
                            enable_thinking=g.enable_thinking, assistant_prefix=g.assistant_prefix)
        if req.kind == "success":
            result.targets.append(RolloutTarget(i, True, L > 0, 0, L, tp, ctx,
                                                f"correct: whole response, teacher context={ctx}", refl))
            continue
        if refl.error_quote is None:  # spare the incremental decoding of the offsets
            loc = LocalizeResult(None, "none", 0.0, None)
        else:
            loc = localize_quote(refl.error_quote, plan.response_texts[i], tok.token_char_offsets(r.response_ids),
                                 fuzzy_threshold=settings.fuzzy_threshold,
                                 min_fuzzy_chars=settings.min_fuzzy_chars)
        if loc.found:
            reason = (f"failed: quote found ({loc.method}, score {loc.score:.2f}) at token "
                      f"{loc.token_index}/{L}, teacher context={ctx}")
            result.targets.append(RolloutTarget(i, False, True, loc.token_index, L, tp, ctx, reason, refl, loc))
        elif settings.on_no_quote == "whole":
            why = "no quote parsed" if refl.error_quote is None else "quote not found"
            result.targets.append(RolloutTarget(i, False, L > 0, 0, L, tp, ctx,
                                                f"failed: {why}, on_no_quote=whole", refl, loc))
        else:
            why = "no quote parsed" if refl.error_quote is None else "quote not found"
            result.targets.append(RolloutTarget(i, False, False, 0, L, None, ctx,
                                                f"failed: {why}, on_no_quote=skip", refl, loc))
    return result


def reflection_prompt_ids(plans: Sequence[GroupPlan]) -> list[list[int]]:
    """All reflection prompts of a step, flattened in (group, request) order, for one generate call."""
    return [req.prompt.ids for plan in plans for req in plan.requests]


def split_reflections(plans: Sequence[GroupPlan], texts: Sequence[str]) -> list[list[str]]:
    """Inverse of `reflection_prompt_ids`: the generated texts regrouped per plan."""
    total = sum(len(p.requests) for p in plans)
    if len(texts) != total:
        raise ValueError(f"split_reflections: got {len(texts)} texts for {total} reflection requests")
    out, pos = [], 0
    for p in plans:
        out.append(list(texts[pos:pos + len(p.requests)]))
        pos += len(p.requests)
    return out


class RosdStats:
    """Counters over a step's groups; `metrics()` gives the flat dict for the step's log line.

    Rates (NaN when their denominator is 0):
    - `reflection_parse_rate`: reflections with every requested tag parsed (failed: quote and
      explanation; correct: explanation) / reflections;
    - `explanation_parse_rate`, `quote_parse_rate` (over failed-rollout reflections);
    - `quote_found_rate`: failed-rollout reflections whose quote was localized / failed-rollout reflections
      (a missing quote counts as not found); `quotes_found_<method>` split it by stage;
    - `failed_distilled_fraction`: mean (L - k) / L over the distilled failed rollouts (fallback-whole
      ones count 1.0); `localized_distilled_fraction`: the same over localized ones only;
    - `train_accuracy/<domain>`: fraction of correct rollouts per data domain (never merged).
    Counts: `groups`, `groups_{mixed,all_correct,all_wrong}`, `groups_skipped_{all_correct,all_wrong,
    all_wrong_no_reference}`, `rollouts`, `rollouts_distilled`, `tokens_distilled`, `reflections`,
    `teacher_solution_fallback`, `no_quote_distilled_whole`, `no_quote_skipped`.
    """

    def __init__(self):
        self.c = Counter()
        self.failed_fractions: list[float] = []
        self.localized_fractions: list[float] = []
        self.domain_correct = defaultdict(lambda: [0, 0])

    def add(self, result: GroupResult) -> None:
        plan, c = result.plan, self.c
        c["groups"] += 1
        c[f"groups_{plan.case}"] += 1
        if plan.action == "skip":
            if plan.case == "all_wrong" and "no reference" in plan.reason:
                c["groups_skipped_all_wrong_no_reference"] += 1
            else:
                c[f"groups_skipped_{plan.case}"] += 1
        for r in plan.group.rollouts:
            d = self.domain_correct[plan.group.domain]
            d[0] += int(r.correct)
            d[1] += 1
        for t in result.targets:
            c["rollouts"] += 1
            c["rollouts_distilled"] += int(t.distill)
            c["tokens_distilled"] += (t.num_tokens - t.distill_start) if t.distill else 0
            if t.reflection is None:
                continue
            c["reflections"] += 1
            c["explanations_parsed"] += int(t.reflection.explanation_parsed)
            c["teacher_solution_fallback"] += int(t.teacher_context == "solution")
            if t.correct:
                c["reflections_parsed"] += int(t.reflection.explanation_parsed)
                continue
            c["failed_reflections"] += 1
            c["quotes_parsed"] += int(t.reflection.quote_parsed)
            c["reflections_parsed"] += int(t.reflection.quote_parsed and t.reflection.explanation_parsed)
            loc = t.localization
            if loc is not None and loc.found:
                c["quotes_found"] += 1
                c[f"quotes_found_{loc.method}"] += 1
                self.localized_fractions.append(t.distilled_fraction)
            else:
                c[f"no_quote_{'distilled_whole' if t.distill else 'skipped'}"] += 1
            if t.distill:
                self.failed_fractions.append(t.distilled_fraction)

    def metrics(self, prefix: str = "rosd/") -> dict[str, float]:
        c = self.c
        out = {f"{prefix}{k}": float(v) for k, v in sorted(c.items())}
        rate = lambda a, b: float(c[a]) / c[b] if c[b] else float("nan")  # noqa: E731
        out[f"{prefix}reflection_parse_rate"] = rate("reflections_parsed", "reflections")
        out[f"{prefix}explanation_parse_rate"] = rate("explanations_parsed", "reflections")
        out[f"{prefix}quote_parse_rate"] = rate("quotes_parsed", "failed_reflections")
        out[f"{prefix}quote_found_rate"] = rate("quotes_found", "failed_reflections")
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        out[f"{prefix}failed_distilled_fraction"] = mean(self.failed_fractions)
        out[f"{prefix}localized_distilled_fraction"] = mean(self.localized_fractions)
        for dom, (ok, tot) in sorted(self.domain_correct.items()):
            out[f"{prefix}train_accuracy/{dom}"] = ok / tot if tot else float("nan")
        return out

    def summary(self) -> str:
        """One line saying what happened to the step's groups (for the text log)."""
        c = self.c
        return (f"ROSD groups={c['groups']} (mixed {c['groups_mixed']}, all-correct {c['groups_all_correct']}, "
                f"all-wrong {c['groups_all_wrong']}); skipped: all-wrong {c['groups_skipped_all_wrong']}, "
                f"all-wrong without reference {c['groups_skipped_all_wrong_no_reference']}, all-correct "
                f"{c['groups_skipped_all_correct']}; quotes found {c['quotes_found']}/{c['failed_reflections']}; "
                f"failed without quote: distilled whole {c['no_quote_distilled_whole']}, skipped "
                f"{c['no_quote_skipped']}")


def warn_on_settings(settings: RosdSettings, *, data_has_reference_solutions: bool) -> None:
    """Warns once at startup when a setting cannot act on this data (e.g. SciKnowEval has no solutions)."""
    if settings.on_all_wrong == "reference_solution" and not data_has_reference_solutions:
        warnings.warn("rosd.on_all_wrong=reference_solution but the data has no reference solutions: "
                      "all-wrong groups will be skipped (counted as rosd/groups_skipped_all_wrong_no_reference)")
    if settings.correct_solution_source == "reference" and not data_has_reference_solutions:
        warnings.warn("rosd.correct_solution_source=reference but the data has no reference solutions: "
                      "successful siblings are used instead")
