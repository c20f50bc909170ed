"""Seeded multi-step arithmetic word problems, rendered in English and in synthetic languages.

A `Problem` is pure data (a person, an item, a start count and a list of steps); English text, the
step-by-step English solution ending in `\\boxed{N}` and the renderings in other languages are all derived
from it, so the same underlying problem exists in every language.

Train and eval splits are disjoint *by construction*: a problem's split is a hash of its canonical
signature (`split_of`), so no seed or sample count can ever put one problem into both splits.

Difficulty knobs (`GeneratorConfig`): number of steps, number range, which operations.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field

from megatron_copsd.synthetic.languages import SYNTHETIC_LANGUAGES, translate

NAMES = ("Ana", "Ben", "Chen", "Dina", "Eli", "Femi", "Gita", "Hugo", "Ines", "Juma", "Kofi", "Lena")
ITEMS = ("apples", "books", "coins", "pens", "stones", "cards", "eggs", "shells", "cups", "seeds")

# Per operation: (problem sentence, short solution label) templates, one per phrasing variant.
# Every amount is >= 2, so plural nouns are always grammatical.
OP_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "add": (
        ("{name} buys {n} more {item}.", "{name} buys {n}"),
        ("{name} finds {n} more {item}.", "{name} finds {n}"),
    ),
    "sub": (
        ("{name} gives {n} {item} to a friend.", "{name} gives away {n}"),
        ("{name} loses {n} {item}.", "{name} loses {n}"),
    ),
    "mul": (
        ("Then the number of {item} that {name} has becomes {n} times as large.", "{name} gets {n} times as many"),
    ),
}
OP_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
LANG_EN = "eng"


@dataclass(frozen=True)
class GeneratorConfig:
    """Difficulty knobs for `generate_problems`."""

    min_steps: int = 1
    """Fewest operations after the start count."""
    max_steps: int = 2
    """Most operations after the start count."""
    min_value: int = 2
    """Smallest start count / operand (>= 2 keeps plurals right)."""
    max_value: int = 9
    """Largest start count / add-or-subtract operand."""
    ops: tuple[str, ...] = ("add", "sub")
    """Operations to draw from: any of add, sub, mul."""
    max_multiplier: int = 3
    """Largest factor of a `mul` step."""
    max_result: int = 99
    """Every intermediate count stays in [0, max_result]."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not 2 <= self.min_value <= self.max_value:
            raise ValueError(f"need 2 <= min_value <= max_value, got {self.min_value}, {self.max_value}")
        bad = [op for op in self.ops if op not in OP_TEMPLATES]
        if not self.ops or bad:
            raise ValueError(f"ops must be a non-empty subset of {sorted(OP_TEMPLATES)}, got {self.ops}")
        if self.max_multiplier < 2:
            raise ValueError(f"max_multiplier must be >= 2, got {self.max_multiplier}")
        if self.max_result < self.max_value:
            raise ValueError(f"max_result ({self.max_result}) must be >= max_value ({self.max_value})")


@dataclass(frozen=True)
class Step:
    """One operation on the running count."""

    op: str
    amount: int
    variant: int = 0
    """Index into OP_TEMPLATES[op] (phrasing only; the arithmetic ignores it)."""


@dataclass(frozen=True)
class Problem:
    """An arithmetic word problem as data; every text is rendered from it."""

    name: str
    item: str
    start: int
    steps: tuple[Step, ...] = field(default_factory=tuple)

    def counts(self) -> list[int]:
        """The running count after the start and after each step."""
        out = [self.start]
        for s in self.steps:
            out.append(apply_op(out[-1], s.op, s.amount))
        return out

    @property
    def answer(self) -> int:
        return self.counts()[-1]

    def signature(self) -> str:
        """Canonical text of everything that defines the problem (phrasing variants included)."""
        steps = ";".join(f"{s.op}{s.amount}v{s.variant}" for s in self.steps)
        return f"{self.name}|{self.item}|{self.start}|{steps}"

    @property
    def uid(self) -> str:
        return hashlib.sha1(self.signature().encode()).hexdigest()[:12]


def apply_op(value: int, op: str, amount: int) -> int:
    if op == "add":
        return value + amount
    if op == "sub":
        return value - amount
    if op == "mul":
        return value * amount
    raise ValueError(f"unknown op {op!r}")


def split_of(problem: Problem, eval_fraction: float) -> str:
    """'eval' or 'train', a pure function of the problem's signature (hash bucket)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    bucket = int(hashlib.sha256(problem.signature().encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if bucket < eval_fraction else "train"


def sample_problem(rng: random.Random, cfg: GeneratorConfig) -> Problem | None:
    """Draws one problem; None when the drawn operations would leave [0, max_result] (caller retries)."""
    start = rng.randint(cfg.min_value, cfg.max_value)
    value, steps = start, []
    for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        op = rng.choice(cfg.ops)
        if op == "mul":
            amount = rng.randint(2, cfg.max_multiplier)
        elif op == "sub":
            if value < cfg.min_value:
                return None
            amount = rng.randint(cfg.min_value, min(cfg.max_value, value))
        else:
            amount = rng.randint(cfg.min_value, cfg.max_value)
        value = apply_op(value, op, amount)
        if not 0 <= value <= cfg.max_result:
            return None
        steps.append(Step(op, amount, rng.randrange(len(OP_TEMPLATES[op]))))
    return Problem(rng.choice(NAMES), rng.choice(ITEMS), start, tuple(steps))


def generate_problems(
    seed: int,
    num: int,
    split: str,
    cfg: GeneratorConfig = GeneratorConfig(),
    *,
    eval_fraction: float = 0.2,
    exclude: frozenset[str] = frozenset(),
) -> list[Problem]:
    """`num` distinct problems of `split` ('train' | 'eval'), deterministic in (seed, split, cfg).

    `exclude` holds signatures to skip (e.g. to draw a second, disjoint train subset).
    Raises ValueError when the problem space of `cfg` cannot supply `num` distinct problems.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"synthetic-problems:{seed}:{split}")
    seen: set[str] = set(exclude)
    out: list[Problem] = []
    attempts, max_attempts = 0, 50 * num + 10_000
    while len(out) < num:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could only draw {len(out)} of {num} distinct {split} problems; widen the GeneratorConfig "
                f"({cfg}) or lower num"
            )
        p = sample_problem(rng, cfg)
        if p is None or split_of(p, eval_fraction) != split or p.signature() in seen:
            continue
        seen.add(p.signature())
        out.append(p)
    return out


def render_problem_en(p: Problem) -> str:
    parts = [f"{p.name} has {p.start} {p.item}."]
    for s in p.steps:
        parts.append(OP_TEMPLATES[s.op][s.variant][0].format(name=p.name, n=s.amount, item=p.item))
    parts.append(f"How many {p.item} does {p.name} have now?")
    return " ".join(parts)


def render_solution_en(p: Problem) -> str:
    """Step-by-step English solution; one equation per step, ending in `\\boxed{answer}`."""
    counts = p.counts()
    parts = [f"{p.name} starts with {p.start} {p.item}."]
    for i, s in enumerate(p.steps):
        label = OP_TEMPLATES[s.op][s.variant][1].format(name=p.name, n=s.amount)
        parts.append(f"{label}: {counts[i]} {OP_SYMBOL[s.op]} {s.amount} = {counts[i + 1]}.")
    parts.append(f"The answer is \\boxed{{{p.answer}}}.")
    return " ".join(parts)


def languages() -> tuple[str, ...]:
    """Every language code the generator renders: English first, then the synthetic ones."""
    return (LANG_EN, *SYNTHETIC_LANGUAGES)


def render(p: Problem, lang: str) -> tuple[str, str]:
    """(problem text, solution text) of `p` in `lang` ('en' or a synthetic code)."""
    problem_en, solution_en = render_problem_en(p), render_solution_en(p)
    if lang == LANG_EN:
        return problem_en, solution_en
    return translate(problem_en, lang), translate(solution_en, lang)


def to_example(p: Problem, lang: str, split: str) -> dict:
    """A record with the data layer's `Example` fields (id, lang, problem, answer, problem_en, solution_en,
    domain, meta); JSON-serializable."""
    problem, solution = render(p, lang)
    return {
        "id": f"synth-{split}-{p.uid}-{lang}",
        "lang": lang,
        "problem": problem,
        "answer": str(p.answer),
        "problem_en": render_problem_en(p),
        "solution_en": render_solution_en(p),
        "domain": "synthetic_arith",
        "meta": {"solution": solution, "num_steps": len(p.steps), "problem": asdict(p), "split": split},
    }
