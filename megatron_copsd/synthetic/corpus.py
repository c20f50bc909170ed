"""The benchmark's data: pretraining documents, the RL training set and the eval set, all from one seed.

Pools (disjoint; RL and pretraining problems come from the generator's train split, eval problems from
its eval split, so no eval problem is ever seen in any form):
- `english`: English problem -> English step-by-step solution, in the student chat format (many: the
  base model should reason well in English);
- `parallel`: per target language, the COPSD teacher layout (target problem + English translation +
  English solution) -> the solution in the target language, plus plain translation pairs between the
  target and English problem text (a little parallel text: it teaches the word mapping and how to use
  privileged English context, not the student task itself);
- `target`: per target language, target problem -> target solution in the student format (few, so the
  base model starts weak on target-language prompts);
- `rl`: target-language problems for COPSD / GRPO training (not in any pretraining pool);
- `eval`: the same underlying eval problems in every language, so accuracies compare across languages.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from megatron_copsd.synthetic.generator import (LANG_EN, GeneratorConfig, Problem, generate_problems, render,
                                                to_example)
from megatron_copsd.synthetic.languages import SYNTHETIC_LANGUAGES

TRANSLATE_INSTRUCTION = "Translate the text above into {target}."


@dataclass(frozen=True)
class CorpusSpec:
    """Sizes of every pool (per target language where it says so)."""

    seed: int = 0
    gen: GeneratorConfig = field(default_factory=GeneratorConfig)
    target_langs: tuple[str, ...] = tuple(SYNTHETIC_LANGUAGES)
    num_english: int = 3000
    """English problems with solutions."""
    num_parallel: int = 300
    """Per target language: teacher-layout documents with the target solution."""
    num_translation: int = 300
    """Per target language: problem translation pairs (each used in both directions)."""
    num_target: int = 40
    """Per target language: target problems with target solutions (student format)."""
    num_rl: int = 256
    """RL training problems (each rendered in every target language)."""
    num_eval: int = 64
    """Eval problems (each rendered in English and every target language)."""

    def __post_init__(self) -> None:
        unknown = [c for c in self.target_langs if c not in SYNTHETIC_LANGUAGES]
        if not self.target_langs or unknown:
            raise ValueError(f"target_langs must be non-empty codes of {sorted(SYNTHETIC_LANGUAGES)}, got "
                             f"{self.target_langs}")
        for name in ("num_english", "num_rl", "num_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"CorpusSpec.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Corpus:
    """Problems of every pool (see the module docstring)."""

    spec: CorpusSpec
    english: list[Problem]
    parallel: dict[str, list[Problem]]
    translation: dict[str, list[Problem]]
    target: dict[str, list[Problem]]
    rl: list[Problem]
    eval: list[Problem]


def build_corpus(spec: CorpusSpec) -> Corpus:
    """Draws all pools, each disjoint from the others (signatures excluded as they are drawn)."""
    used: set[str] = set()

    def draw(tag: str, num: int, split: str = "train") -> list[Problem]:
        if num == 0:
            return []
        # A per-pool seed keeps pools stable when another pool's size changes.
        seed = int.from_bytes(f"{spec.seed}:{tag}".encode()[:8].ljust(8, b"\0"), "little") ^ spec.seed
        probs = generate_problems(seed, num, split, spec.gen, exclude=frozenset(used))
        used.update(p.signature() for p in probs)
        return probs

    english = draw("english", spec.num_english)
    parallel = {c: draw(f"parallel-{c}", spec.num_parallel) for c in spec.target_langs}
    translation = {c: draw(f"translation-{c}", spec.num_translation) for c in spec.target_langs}
    target = {c: draw(f"target-{c}", spec.num_target) for c in spec.target_langs}
    rl = draw("rl", spec.num_rl)
    evals = draw("eval", spec.num_eval, split="eval")
    return Corpus(spec, english, parallel, translation, target, rl, evals)


def training_signatures(corpus: Corpus) -> frozenset[str]:
    """Signatures of every problem any training step sees (pretraining pools and the RL pool)."""
    pools = [corpus.english, corpus.rl] + [ps for d in (corpus.parallel, corpus.translation, corpus.target)
                                           for ps in d.values()]
    return frozenset(p.signature() for ps in pools for p in ps)


def benchmark_splits(spec: CorpusSpec, num_eval: int, num_dev: int) -> tuple[list[Problem], list[Problem]]:
    """(eval, dev) problems of the benchmark, drawn from their own seeds so the base-model cache is untouched.

    eval: the generator's eval split (hash-disjoint from every training problem by construction);
    dev: the generator's train split, i.e. the training distribution, minus every problem of the training
    pools (`training_signatures`), for choosing settings without looking at eval."""
    evals = generate_problems(spec.seed * 7919 + 104_729, num_eval, "eval", spec.gen)
    used = training_signatures(build_corpus(spec))
    dev = generate_problems(spec.seed * 7919 + 1_299_709, num_dev, "train", spec.gen, exclude=used) if num_dev else []
    return evals, dev


def _lang_name(code: str) -> str:
    if code == LANG_EN:
        return "English"
    return SYNTHETIC_LANGUAGES[code].name.split(" (")[0]


def pretrain_documents(corpus: Corpus) -> list[dict]:
    """Documents as chat pieces: {kind, lang, user?, problem, problem_en, solution_en, response}.

    `kind`: "student" (student prompt of `lang` + response), "teacher" (COPSD teacher prompt + response)
    or "chat" (a plain user message + response, for translation pairs). Prompts are rendered later with
    the real prompt builders (`encode_document`), so pretraining sees exactly the trainer's prompts.
    """
    docs = []
    for p in corpus.english:
        prob, sol = render(p, LANG_EN)
        docs.append(dict(kind="student", lang=LANG_EN, problem=prob, response=sol))
    for code in corpus.spec.target_langs:
        for p in corpus.parallel[code]:
            prob, sol = render(p, code)
            prob_en, sol_en = render(p, LANG_EN)
            docs.append(dict(kind="teacher", lang=code, problem=prob, problem_en=prob_en, solution_en=sol_en,
                             response=sol))
        for p in corpus.translation[code]:
            prob, prob_en = render(p, code)[0], render(p, LANG_EN)[0]
            docs.append(dict(kind="chat", lang=code, response=prob_en,
                             user=f"{prob}\n\n{TRANSLATE_INSTRUCTION.format(target='English')}"))
            docs.append(dict(kind="chat", lang=code, response=prob,
                             user=f"{prob_en}\n\n{TRANSLATE_INSTRUCTION.format(target=_lang_name(code))}"))
        for p in corpus.target[code]:
            prob, sol = render(p, code)
            docs.append(dict(kind="student", lang=code, problem=prob, response=sol))
    random.Random(f"docs:{corpus.spec.seed}").shuffle(docs)
    return docs


def encode_document(tok, doc: dict) -> tuple[list[int], int]:
    """(token ids, index of the first response token): prompt via the data layer's builders, then the
    response and the end-of-turn token."""
    from megatron_copsd.data import prompts
    from megatron_copsd.data.tokenizer import IM_END

    if doc["kind"] == "student":
        ids = prompts.student_prompt(tok, doc["lang"], doc["problem"]).ids
    elif doc["kind"] == "teacher":
        ids = prompts.copsd_teacher_prompt(tok, doc["lang"], doc["problem"], doc["problem_en"],
                                           doc["solution_en"]).ids
    elif doc["kind"] == "chat":
        ids = tok.encode_chat([{"role": "user", "content": doc["user"]}])
    else:
        raise ValueError(f"document kind must be student, teacher or chat, got {doc['kind']!r}")
    end = tok.encode(IM_END)
    return list(ids) + tok.encode(doc["response"]) + end, len(ids)


def tokenizer_texts(corpus: Corpus) -> list[str]:
    """Raw texts for training the tokenizer: every rendering of every problem, plus prompt strings."""
    from megatron_copsd.data.languages import get_language

    texts = []
    langs = (LANG_EN, *corpus.spec.target_langs)
    pools = [corpus.english, corpus.rl, corpus.eval]
    pools += [ps for d in (corpus.parallel, corpus.translation, corpus.target) for ps in d.values()]
    for probs in pools:
        for p in probs[:400]:  # enough for the word pieces; keeps training fast
            for code in langs:
                texts.extend(render(p, code))
    for code in langs:
        lang = get_language(code)
        labels = lang.labels()
        texts += [lang.instruction, labels.problem, labels.problem_en, labels.reference_begin,
                  labels.reference_end, labels.instruction, TRANSLATE_INSTRUCTION.format(target=_lang_name(code))]
        texts += ["user", "assistant", "system"]
    return texts


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """Atomic JSONL write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def rl_rows(corpus: Corpus) -> list[dict]:
    """RL training problems in the COPSD training format read by `data.loaders.load_copsd_training`:
    `id`, `problem` (English), `solution` (English), `answer`, and `problem_<code>` per target language."""
    rows = []
    for p in corpus.rl:
        prob_en, sol_en = render(p, LANG_EN)
        row = {"id": f"synth-train-{p.uid}", "problem": prob_en, "solution": sol_en, "answer": str(p.answer)}
        for code in corpus.spec.target_langs:
            row[f"problem_{code}"] = render(p, code)[0]
        rows.append(row)
    return rows


def eval_examples(corpus: Corpus, langs: tuple[str, ...] | None = None) -> list[dict]:
    """Held-out examples: every eval problem in every language (English first)."""
    langs = langs or (LANG_EN, *corpus.spec.target_langs)
    return [to_example(p, code, "eval") for code in langs for p in corpus.eval]


def examples_of(problems: list[Problem], langs: tuple[str, ...], split: str) -> list[dict]:
    """Every problem in every language of `langs` (in that order), as eval-layer example records."""
    return [to_example(p, code, split) for code in langs for p in problems]
