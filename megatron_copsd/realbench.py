"""`copsd real-bench`: the real-model regime, SmolLM2-135M-Instruct on arithmetic word problems in French,
Spanish and German, COPSD vs GRPO vs the sampled-token objective at equal rollout budget.

    copsd convert gguf-to-hf --out models/smollm2-135m-instruct        # once (cached)
    copsd real-bench --hf models/smollm2-135m-instruct --out runs/real --steps 10 --num-eval 32   # ~55 min here
    copsd real-bench --hf ... --out runs/real-smoke --steps 2 --methods copsd --num-eval 4   # a smoke run

The problems are the synthetic benchmark's seeded generator (`synthetic/generator.py`, train split for
training, eval split for evaluation, so disjoint by construction), written in French, Spanish and German
with this module's own templates; the teacher sees the English problem and the English step-by-step
solution, exactly like the COPSD data format (`problem`, `solution`, `problem_<lang>`, `answer`). Every
method goes through the same Megatron trainer (`copsd train`, a generated config, a fresh process per run),
the embedded engine, the model's own tokenizer and chat template. Evaluation: greedy accuracy per language
(English too) on the eval problems, before and after, with the synthetic benchmark's report and paired
bootstrap intervals (`synthetic/summary.py`), plus the base model's accuracy from the COPSD teacher prompt.

What the 135M model can do (measured greedy, 6 problems per language): with the registry's "solve step
by step ... \\boxed{}" instruction it rambles for 70-256 tokens and scores 0 in every language, English
included, on two-step problems; it almost never writes `\\boxed{}`. Hence: one-step problems (`GEN`), our
own short English instruction (`INSTRUCTION`) for every language, the same in the teacher prompt, and the
`math_number` grader (the last box, else the last number written). The instruction stays English on
purpose: the model follows English instructions only (a French/Spanish/German one made it echo the
problem), and with it the gap under test is the language of the problem. Answers are ~40 tokens in
English, ~20 elsewhere, so 64 new tokens (`Budget.max_new_tokens`) rarely truncate.

Sizing for one CPU: short responses, few prompts per step (2 x 4 samples), fp32. The trainer's own
training checkpoint of each run (weights + Adam state, ~1.6 GB) is deleted after the run; its HF export
(~0.5 GB) is kept for evaluation.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from megatron_copsd.synthetic.generator import GeneratorConfig, Problem, generate_problems, render_problem_en, render_solution_en

LANGS = ("fr", "es", "de")
METHODS = ("copsd", "grpo", "sampled_kl")
GEN = GeneratorConfig(min_steps=1, max_steps=1, max_value=9, max_result=20)
TASK = "math_number"
INSTRUCTION = "Write the final answer as a number inside \\boxed{}."
TEACHER_INSTRUCTION = "Use the material above only as a guide. " + INSTRUCTION

# Our wording. Items: (French, Spanish, Spanish gender, German) per English item of the generator.
ITEMS = {
    "apples": ("pommes", "manzanas", "f", "Äpfel"), "books": ("livres", "libros", "m", "Bücher"),
    "coins": ("pièces", "monedas", "f", "Münzen"), "pens": ("stylos", "bolígrafos", "m", "Stifte"),
    "stones": ("pierres", "piedras", "f", "Steine"), "cards": ("cartes", "cartas", "f", "Karten"),
    "eggs": ("œufs", "huevos", "m", "Eier"), "shells": ("coquillages", "conchas", "f", "Muscheln"),
    "cups": ("tasses", "tazas", "f", "Tassen"), "seeds": ("graines", "semillas", "f", "Samen"),
}
START = {"fr": "{name} a {n} {item}.", "es": "{name} tiene {n} {item}.", "de": "{name} hat {n} {item}."}
STEPS = {  # (op, variant) -> sentence per language, same meaning as the generator's English templates
    ("add", 0): {"fr": "{name} achète {n} {item} de plus.", "es": "{name} compra {n} {item} más.",
                 "de": "{name} kauft {n} weitere {item}."},
    ("add", 1): {"fr": "{name} trouve {n} {item} de plus.", "es": "{name} encuentra {n} {item} más.",
                 "de": "{name} findet {n} weitere {item}."},
    ("sub", 0): {"fr": "{name} donne {n} {item} à un ami.", "es": "{name} le da {n} {item} a un amigo.",
                 "de": "{name} gibt einem Freund {n} {item}."},
    ("sub", 1): {"fr": "{name} perd {n} {item}.", "es": "{name} pierde {n} {item}.", "de": "{name} verliert {n} {item}."},
    ("mul", 0): {"fr": "Ensuite, le nombre de {item} de {name} est multiplié par {n}.",
                 "es": "Luego, el número de {item} de {name} se multiplica por {n}.",
                 "de": "Dann wird die Anzahl der {item} von {name} mit {n} multipliziert."},
}


def _question(lang: str, name: str, item_en: str) -> str:
    fr, es, gender, de = ITEMS[item_en]
    if lang == "fr":
        de_fr = "d'" if fr[0] in "aeiouœ" else "de "
        return f"Combien {de_fr}{fr} a {name} maintenant ?"  # no pronoun: the names are of either gender
    if lang == "es":
        return f"¿{'Cuántas' if gender == 'f' else 'Cuántos'} {es} tiene {name} ahora?"
    return f"Wie viele {de} hat {name} jetzt?"


def render_problem(p: Problem, lang: str) -> str:
    """The problem text of `p` in French, Spanish or German (English: the generator's own rendering)."""
    if lang in ("en", "eng"):
        return render_problem_en(p)
    if lang not in LANGS:
        raise ValueError(f"real-bench renders {LANGS} (and English), got {lang!r}")
    item = ITEMS[p.item][{"fr": 0, "es": 1, "de": 3}[lang]]
    parts = [START[lang].format(name=p.name, n=p.start, item=item)]
    parts += [STEPS[(s.op, s.variant)][lang].format(name=p.name, n=s.amount, item=item) for s in p.steps]
    parts.append(_question(lang, p.name, p.item))
    return " ".join(parts)


def train_rows(problems: list[Problem]) -> list[dict]:
    """COPSD training rows: English problem and solution (the teacher's privileged context) + each language."""
    return [{"id": f"real-train-{p.uid}", "problem": render_problem_en(p), "solution": render_solution_en(p),
             "answer": str(p.answer), **{f"problem_{lang}": render_problem(p, lang) for lang in LANGS}}
            for p in problems]


def eval_examples(problems: list[Problem], langs=("eng", *LANGS)) -> list[dict]:
    """Eval records for `synthetic.evaluate.evaluate_checkpoint` (registry language codes)."""
    from megatron_copsd.data.languages import get_language

    return [{"id": f"real-eval-{p.uid}-{lang}", "lang": get_language(lang).code, "problem": render_problem(p, lang),
             "answer": str(p.answer), "problem_en": render_problem_en(p), "solution_en": render_solution_en(p),
             "domain": "math"} for lang in langs for p in problems]


def language_overrides() -> dict:
    """`data.language_overrides` content: our student and teacher instruction for English and every target."""
    return {code: {"instruction": INSTRUCTION, "teacher_labels": {"instruction": TEACHER_INSTRUCTION}}
            for code in ("eng", "fra", "es", "de")}


@contextlib.contextmanager
def real_languages():
    """The registry with `language_overrides()` applied, restored on exit (evaluation runs in this process)."""
    from megatron_copsd.data.languages import apply_language_overrides, get_language, register_language

    saved = [get_language(code) for code in language_overrides()]
    apply_language_overrides(language_overrides(), source="realbench")
    try:
        yield
    finally:
        for lang in saved:
            register_language(lang, replace=True)


@dataclasses.dataclass(frozen=True)
class Budget:
    """The rollout budget every method shares."""

    steps: int = 10
    prompts_per_step: int = 2
    n: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.7
    lr: float = 1e-5


def trainer_config(hf_dir: Path, train_path: Path, method: str, seed: int, run_dir: Path, b: Budget,
                   cpu_threads: int = 1, overrides_path: Path | None = None) -> dict:
    """The `copsd train` config of one run (nested dict of megatron_copsd.config fields)."""
    return {
        "model": {"hf_path": str(hf_dir), "tokenizer_path": str(hf_dir), "dtype": "fp32"},
        "data": {"train_path": str(train_path), "langs": list(LANGS), "task": TASK,
                 "prompts_per_step": b.prompts_per_step, "max_prompt_tokens": 768,
                 "language_overrides": str(overrides_path) if overrides_path else None},
        "rollout": {"engine": "embedded", "n": b.n, "max_new_tokens": b.max_new_tokens, "temperature": b.temperature,
                    "top_p": 1.0, "top_k": -1, "max_batch_size": 32},
        "objective": {"name": method, "divergence": "forward_kl", "temperature": "auto", "teacher": "fixed"},
        "optim": {"lr": b.lr, "clip_grad": 1.0, "weight_decay": 0.0, "decay_style": "constant"},
        "train": {"steps": b.steps, "seed": seed, "output_dir": str(run_dir), "cpu_threads": cpu_threads,
                  "micro_batch_tokens": 2048},
        "checkpoint": {"save_every": 0, "resume": "none", "export_hf": True},
        "eval": {"every": -1},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


def parse_args(argv):
    p = argparse.ArgumentParser(prog="copsd real-bench", description=__doc__.split("\n")[0])
    p.add_argument("--hf", required=True, help="HF folder of SmolLM2-135M-Instruct (`copsd convert gguf-to-hf`)")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=Budget.steps)
    p.add_argument("--prompts-per-step", type=int, default=Budget.prompts_per_step)
    p.add_argument("--n", type=int, default=Budget.n)
    p.add_argument("--max-new-tokens", type=int, default=Budget.max_new_tokens)
    p.add_argument("--lr", type=float, default=Budget.lr)
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-eval", type=int, default=32, help="eval problems per language")
    p.add_argument("--cpu-threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    b = Budget(a.steps, a.prompts_per_step, a.n, a.max_new_tokens, Budget.temperature, a.lr)
    summary = bench(Path(a.hf), Path(a.out).resolve(), a.methods, a.seeds, b, num_train=a.num_train,
                    num_eval=a.num_eval, cpu_threads=a.cpu_threads)
    print(f"[real-bench] done: {summary}")
    return 0


def bench(hf_dir: Path, out: Path, methods, seeds, b: Budget, *, num_train: int = 256, num_eval: int = 32,
          cpu_threads: int = 1, log=None) -> str:
    """Data -> base eval (student and teacher prompt) -> one trainer run + eval per (seed, method) -> summary.md;
    returns its path."""
    import torch
    import yaml

    from megatron_copsd.eval.metrics import compute_metrics, write_scored_generations
    from megatron_copsd.synthetic.corpus import write_jsonl
    from megatron_copsd.synthetic.evaluate import EvalSettings, evaluate_checkpoint, greedy_accuracy
    from megatron_copsd.synthetic.run import run_trainer
    from megatron_copsd.synthetic.summary import write_summary

    log = log or (lambda s: print(s, flush=True))
    torch.set_num_threads(cpu_threads)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"--hf {hf_dir}: no config.json (convert the GGUF first: copsd convert gguf-to-hf)")
    t0 = time.time()
    timings: dict[str, float] = {}
    train = generate_problems(11, num_train, "train", GEN)
    evals = generate_problems(12, num_eval, "eval", GEN)
    train_path = write_jsonl(train_rows(train), out / "data" / "train.jsonl")
    overrides_path = out / "data" / "languages.yaml"
    overrides_path.write_text(yaml.safe_dump(language_overrides(), allow_unicode=True, sort_keys=False))
    examples = eval_examples(evals)
    write_jsonl(examples, out / "data" / "eval.jsonl")
    settings = EvalSettings(num_samples=0, max_new_tokens=b.max_new_tokens, max_batch_size=64, task=TASK)
    targets = [e for e in examples if e["lang"] != "eng"]
    with real_languages():
        t = time.time()
        records = evaluate_checkpoint(hf_dir, examples, label="base", settings=settings, log=log)
        teacher = evaluate_checkpoint(hf_dir, targets, label="teacher", settings=settings, teacher_prompt=True, log=log)
        timings["base eval (student + teacher prompt)"] = time.time() - t
    write_scored_generations(teacher, out / "teacher_generations.jsonl")
    teacher_acc = {lang: greedy_accuracy(teacher, lang) for lang in sorted({e["lang"] for e in targets})}
    log(f"[real-bench] base greedy accuracy: "
        + ", ".join(f"{lang} {greedy_accuracy(records, lang):.3f}" for lang in ("eng", *sorted(teacher_acc)))
        + "; teacher prompt: " + ", ".join(f"{k} {v:.3f}" for k, v in teacher_acc.items()))
    run_dirs = {}
    for seed in seeds:
        for method in methods:
            label = f"{method}-s{seed}"
            run_dir = out / "runs" / label
            log(f"[real-bench] {label}: {b.steps} steps x {b.prompts_per_step} prompts x {b.n} samples")
            t = time.time()
            cfg = trainer_config(hf_dir, train_path, method, seed, run_dir, b, cpu_threads, overrides_path)
            hf, _ = run_trainer(cfg, run_dir, log)
            timings[f"{label} train"] = time.time() - t
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # weights + Adam state; the HF export stays
            t = time.time()
            with real_languages():
                records += evaluate_checkpoint(hf, examples, label=label, settings=settings, log=log)
            timings[f"{label} eval"] = time.time() - t
            run_dirs[label] = run_dir
    write_scored_generations(records, out / "scored_generations.jsonl")
    timings["total"] = time.time() - t0
    info = {"mode": "real (SmolLM2-135M-Instruct)", "seeds": list(seeds), "num_eval": num_eval,
            "languages": "target languages French (fra), Spanish (es) and German (de) with our own templates, "
                         f"one-step problems, instruction {INSTRUCTION!r} in every language, grader {TASK}",
            "script_metric": False,  # every language here is written in Latin script
            "teacher_greedy_accuracy": teacher_acc,
            "budget": f"{b.steps} steps x {b.prompts_per_step} prompts x {b.n} samples, <= {b.max_new_tokens} new "
                      f"tokens, lr {b.lr:g}, T {b.temperature:g}", "timings": timings,
            "load_average": " / ".join(f"{x:.2f}" for x in os.getloadavg())}
    path = write_summary(compute_metrics(records), out, target_langs=tuple(sorted({e["lang"] for e in targets})),
                         info=info, report_files={}, records=records, run_dirs=run_dirs)
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
