"""`copsd synth-bench`: the one-CPU crosslingual benchmark, COPSD vs GRPO vs the sampled-token objective.

    copsd synth-bench --mode quick --out runs/synth            # minutes on 2 CPU cores, 1 seed
    copsd synth-bench --mode full --out runs/synth-full        # 5 seeds
    copsd synth-bench --mode quick --tune --out runs/tuned     # settings chosen on the dev split first
    copsd synth-bench --mode quick --ablation --out runs/abl   # COPSD divergences + the reference's clip
    copsd synth-bench --mode full --resume --out runs/synth-full --seeds 0 1 2   # reuse finished runs

Pipeline: data (seeded generator) -> SentencePiece tokenizer -> short Megatron pretraining of a tiny
Qwen3-style base model (cached by a hash of its settings under `--cache`, default `<out>/../.synth-cache`)
-> the eval set (`num_eval` problems per language from the generator's eval split, never trained on) and a
dev split (training distribution minus every training problem) in `<out>/data` -> evaluate the base ->
optionally tune each method on dev (synthetic/tuning.py) -> for every seed and method, a trainer run
(`copsd train` with a generated config, same budget) -> evaluate each trained model -> report
(`<out>/report/report.md` + plots from megatron_copsd.eval.report, and `<out>/summary.md`: accuracy with
95% intervals, paired bootstrap intervals of every method difference, the verdict, answer script,
training curves; synthetic/summary.py).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from megatron_copsd.synthetic.presets import ABLATION_METHODS, METHOD_SPECS, MODES, Mode

TARGET_LANGS = ("qge", "qva")


def trainer_config(mode: Mode, method: str, seed: int, base_root: Path, run_dir: Path,
                   overrides: dict | None = None) -> dict:
    """The trainer config (nested dict, `megatron_copsd.config` field names) of one method and seed;
    `overrides`: dotted fields applied last (the settings chosen by tuning). Order: the method's own
    settings (`METHOD_SPECS`), the mode's `extra_overrides`, then `overrides`."""
    if method not in METHOD_SPECS:
        raise ValueError(f"unknown benchmark method {method!r}; choose from {sorted(METHOD_SPECS)}")
    spec = METHOD_SPECS[method]
    t = mode.train
    hf = str(base_root / "hf")
    cfg = {
        "model": {"hf_path": hf, "tokenizer_path": hf, "dtype": "fp32"},
        "data": {"train_path": str(base_root / "data" / "rl_train.jsonl"), "langs": list(TARGET_LANGS),
                 "task": "math", "prompts_per_step": t.prompts_per_step, "max_prompt_tokens": 512},
        "rollout": {"engine": "embedded", "n": t.n, "max_new_tokens": t.max_new_tokens,
                    "temperature": t.temperature, "top_p": 1.0, "top_k": -1, "max_batch_size": 64},
        "objective": {"name": spec.objective, "divergence": t.divergence, "teacher": t.teacher},
        "optim": {"lr": t.lr, "clip_grad": t.clip_grad, "weight_decay": 0.0, "decay_style": "constant"},
        "train": {"steps": t.steps, "seed": seed, "output_dir": str(run_dir), "cpu_threads": mode.cpu_threads},
        "checkpoint": {"save_every": 0, "resume": "none", "export_hf": True},
        "eval": {"every": -1},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    for dotted, value in {**spec.overrides, **mode.extra_overrides, **(overrides or {})}.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def objective_settings(mode: Mode, method: str, overrides: dict | None = None) -> dict:
    """The objective settings `method` runs with in `mode`, as the trainer resolves them (e.g. the loss
    temperature `auto` -> the rollout temperature); the summary prints them per method."""
    from megatron_copsd.config import config_from_dict

    cfg = config_from_dict(trainer_config(mode, method, 0, Path("base"), Path("run"), overrides))
    o, r = cfg.objective, cfg.rollout
    out = {"objective": o.name, "lr": cfg.optim.lr, "grad_clip": cfg.optim.clip_grad,
           "rollout_temperature": r.temperature, "samples_per_prompt": r.n}
    if o.name in ("copsd", "rosd", "sampled_kl"):
        out.update(loss_temperature=o.temperature, teacher=o.teacher)
    if o.name in ("copsd", "rosd"):
        out.update(divergence=o.divergence + (f" (beta {o.beta:g})" if o.divergence == "jsd" else ""),
                   token_clip=o.token_clip)
        if o.token_clip is not None and hasattr(o, "token_clip_mode"):
            out["token_clip_mode"] = o.token_clip_mode
    if o.name == "grpo":
        out.update(ratio_clip=f"[{1 - o.clip_eps_low:g}, {1 + o.clip_eps_high:g}]", std_normalize=o.std_normalize,
                   kl_coef=o.kl_coef)
    return out


def free_port() -> int:
    """A TCP port free right now: the single-process gloo group of each Megatron run needs one, and the
    default (29500) collides with any other run on the machine (another benchmark, a test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_cpu_seconds() -> float:
    """User + system CPU time of the finished child processes (the trainer runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_trainer(cfg: dict, run_dir: Path, log) -> tuple[Path, float]:
    """Runs the trainer in a fresh process (clean Megatron state); returns its exported HF folder and the
    CPU seconds the process used."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "megatron_copsd.synthetic.train_entry", "--config", str(cfg_path)]
    with open(run_dir / "train.log", "w") as logf:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own CPU time, even with runs in parallel
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"trainer failed (exit {proc.returncode}); log {run_dir / 'train.log'}:\n{tail}")
    hf = run_dir / "hf"
    if not (hf / "config.json").is_file():
        raise RuntimeError(f"trainer finished but wrote no HF checkpoint at {hf}")
    return hf, usage.ru_utime + usage.ru_stime


def mode_from_config(path: str | None, mode_name: str | None) -> Mode:
    """The preset named by `mode_name` (or the YAML's `mode`, default quick) with the YAML's overrides:
    `seeds`, `methods`, `num_eval`, `num_dev`, `train` (TrainSettings fields), `eval` (EvalSettings
    fields), `trainer` (dotted trainer-config overrides for every method)."""
    data: dict = {}
    if path is not None:
        import yaml

        if not Path(path).is_file():
            raise ValueError(f"--config: file {path!r} does not exist")
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {"mode", "seeds", "methods", "train", "eval", "trainer", "num_eval", "num_dev"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    name = mode_name or data.get("mode", "quick")
    if name not in MODES:
        raise ValueError(f"{path or '--mode'}: mode must be one of {sorted(MODES)}, got {name!r}")
    mode = MODES[name]
    try:
        if "seeds" in data:
            mode = dataclasses.replace(mode, seeds=tuple(int(s) for s in data["seeds"]))
        if "methods" in data:
            bad = [m for m in data["methods"] if m not in METHOD_SPECS]
            if bad:
                raise ValueError(f"methods: unknown {bad}; choose from {sorted(METHOD_SPECS)}")
            mode = dataclasses.replace(mode, methods=tuple(data["methods"]))
        for key in ("num_eval", "num_dev"):
            if key in data:
                mode = dataclasses.replace(mode, **{key: int(data[key])})
        if "train" in data:
            mode = dataclasses.replace(mode, train=dataclasses.replace(mode.train, **data["train"]))
        if "eval" in data:
            mode = dataclasses.replace(mode, eval=dataclasses.replace(mode.eval, **data["eval"]))
        if "trainer" in data:
            mode = dataclasses.replace(mode, extra_overrides={**mode.extra_overrides, **data["trainer"]})
    except TypeError as e:  # an unknown field name inside train/eval
        raise ValueError(f"{path}: {e}") from None
    return mode


def parse_args(argv):
    p = argparse.ArgumentParser(prog="copsd synth-bench", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=sorted(MODES), default=None, help="preset (default: quick, or the config's)")
    p.add_argument("--config", default=None, help="YAML: mode, seeds, methods, train: {...}, eval: {...}")
    p.add_argument("--out", required=True, help="output folder (metrics, report, runs)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="trainer seeds (default: the mode's)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHOD_SPECS), default=None,
                   help="default: the mode's methods (copsd, grpo, sampled_kl)")
    p.add_argument("--ablation", action="store_true",
                   help=f"the divergence ablation: methods {' '.join(ABLATION_METHODS)} (forward KL, reverse KL, "
                        "JSD 0.5, sampled-token, forward KL with the reference's token clip 0.05), same budget; the summary gets "
                        "its own ablation table")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs in --out (a run whose config is unchanged and whose eval was saved) "
                        "and the saved base eval; render the summary over the requested seeds")
    p.add_argument("--cache", default=None, help="base-model cache folder (default: <out>/../.synth-cache)")
    p.add_argument("--train-steps", type=int, default=None, help="override the mode's trainer steps")
    p.add_argument("--skip-train", action="store_true", help="only build and evaluate the base model")
    p.add_argument("--tune", action="store_true",
                   help="first choose each method's lr and main knob on the dev split (6 runs per method)")
    p.add_argument("--jobs", type=int, default=None, help="trainer runs at once (default: min(2, CPU count))")
    p.add_argument("--summary-only", action="store_true",
                   help="re-render <out>/summary.md from <out>/scored_generations.jsonl and summary.json (no runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mode = mode_from_config(args.config, args.mode)
    if args.seeds:
        mode = dataclasses.replace(mode, seeds=tuple(args.seeds))
    if args.methods and args.ablation:
        raise ValueError("--ablation sets the methods itself; drop --methods")
    if args.methods or args.ablation:
        mode = dataclasses.replace(mode, methods=tuple(args.methods or ABLATION_METHODS))
    if args.train_steps:
        mode = dataclasses.replace(mode, train=dataclasses.replace(mode.train, steps=args.train_steps))
    out = Path(args.out).resolve()
    if args.summary_only:
        path = resummarize(out)
        print(f"[synth-bench] rewrote {path}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve() if args.cache else out.parent / ".synth-cache"
    summary = bench(mode, out, cache, skip_train=args.skip_train, jobs=args.jobs, tune=args.tune,
                    resume=args.resume)
    print(f"\n[synth-bench] done in {summary['timings']['total']:.0f}s wall, "
          f"{summary['cpu_seconds']['total']:.0f} CPU-s (load average {_load_average()})")
    for k, v in summary["files"].items():
        print(f"  {k}: {v}")
    return 0


def bench(mode: Mode, out: Path, cache: Path, *, skip_train: bool = False, log=None, jobs: int | None = None,
          tune: bool = False, resume: bool = False) -> dict:
    """Runs the whole benchmark for `mode` into `out`; returns {timings, cpu_seconds, files, rows}.
    `jobs`: trainer runs (each followed by its eval) at once; default min(2, CPU count). `tune`: choose
    each method's settings on the dev split first (synthetic/tuning.py), then run those on eval. `resume`:
    reuse the base eval and every finished run (trainer config and eval settings unchanged, eval saved
    after it finished) found in `out`; the summary covers `mode.seeds` x `mode.methods` either way."""
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    import torch

    from megatron_copsd.eval.metrics import compute_metrics, write_scored_generations
    from megatron_copsd.eval.report import write_report
    from megatron_copsd.synthetic.evaluate import evaluate_checkpoint, greedy_accuracy
    from megatron_copsd.synthetic.pretrain import build_base_model
    from megatron_copsd.synthetic.summary import write_summary

    log = log or (lambda s: print(s, flush=True))
    # One intra-op thread (mode.cpu_threads): the models are tiny, so extra threads mostly spin; on a
    # busy 2-core machine 2 threads cost ~4x the CPU time of 1 per pretraining step (measured).
    torch.set_num_threads(mode.cpu_threads)
    t_start, c_start = time.time(), time.process_time() + children_cpu_seconds()
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    log(f"[synth-bench] mode {mode.name}: seeds {list(mode.seeds)}, methods {list(mode.methods)}, out {out}")

    @contextlib.contextmanager
    def stage(name):
        t, c = time.time(), time.process_time() + children_cpu_seconds()
        yield
        timings[name] = time.time() - t
        cpu[name] = time.process_time() + children_cpu_seconds() - c

    with stage("base model (data, tokenizer, pretraining)"), _master_port():
        base_root = build_base_model(mode.base, cache, log=log)
    examples, num_eval = eval_set(mode, base_root, out)
    targets = [e for e in examples if e["lang"] in TARGET_LANGS]
    if mode.eval.sample_problems is not None:  # the teacher diagnostic: greedy on the sampled subset only
        targets = _first_per_lang(targets, mode.eval.sample_problems)

    def evaluate(hf_dir, label):
        with stage(f"eval {label}"):
            recs = evaluate_checkpoint(hf_dir, examples, label=label, settings=mode.eval, log=log)
        accs = ", ".join(f"{lang} {greedy_accuracy(recs, lang):.3f}" for lang in ("eng", *TARGET_LANGS))
        log(f"[eval] {label}: greedy accuracy {accs}")
        return recs

    eval_key = {"eval": dataclasses.asdict(mode.eval), "num_eval": mode.num_eval,
                "examples": len(examples), "base": str(base_root)}
    records = _reuse(out / "base_eval", eval_key, log) if resume else None
    if records is None:
        records = evaluate(base_root / "hf", "base")
        _save(out / "base_eval", eval_key, records)
    # Diagnostic: the base model as COPSD teacher (greedy, privileged English context) on target languages.
    teacher_key = {**eval_key, "teacher_prompt": True, "targets": len(targets)}
    teacher_recs = _reuse(out / "teacher_eval", teacher_key, log) if resume else None
    if teacher_recs is None:
        with stage("eval teacher(base)"):
            teacher_recs = evaluate_checkpoint(base_root / "hf", targets, label="teacher(base)",
                                               settings=dataclasses.replace(mode.eval, num_samples=0),
                                               teacher_prompt=True, log=log)
        _save(out / "teacher_eval", teacher_key, teacher_recs)
    teacher_acc = {lang: greedy_accuracy(teacher_recs, lang) for lang in TARGET_LANGS}
    log(f"[eval] teacher(base) with privileged English context: greedy accuracy "
        + ", ".join(f"{k} {v:.3f}" for k, v in teacher_acc.items()))
    checkpoints = {"base": str(base_root / "hf")}
    tuning: dict = {}
    if tune and not skip_train:
        with stage("tuning on dev"):
            tuning = tune_on_dev(mode, base_root, out, log, jobs=jobs, resume=resume)
    chosen = {m: r["chosen"] for m, r in tuning.items()}
    if not skip_train:
        runs = [(seed, method) for seed in mode.seeds for method in mode.methods]

        def train_and_eval(seed_method):
            seed, method = seed_method
            label = f"{method}-s{seed}"
            run_dir = out / "runs" / label
            log(f"[train] {label}: {mode.train.steps} steps x {mode.train.prompts_per_step} prompts x "
                f"{mode.train.n} rollouts ({run_dir / 'train.log'})")
            cfg = trainer_config(mode, method, seed, base_root, run_dir, chosen.get(method))
            key = {**eval_key, "trainer_config": cfg}
            recs = _reuse(run_dir / "bench_eval", key, log) if resume else None
            if recs is not None:
                saved = json.loads((run_dir / "bench_eval.json").read_text()).get("seconds", {})
                for k, (wall, c) in saved.items():  # the reused run's own timings, marked as such
                    timings[f"{k} (reused)"], cpu[f"{k} (reused)"] = wall, c
                return label, str(run_dir / "hf"), recs
            t = time.time()
            hf, child_cpu = run_trainer(cfg, run_dir, log)
            timings[f"train {label}"], cpu[f"train {label}"] = time.time() - t, child_cpu
            t, c = time.time(), time.thread_time()
            recs = evaluate_checkpoint(hf, examples, label=label, settings=mode.eval, log=log)
            timings[f"eval {label}"], cpu[f"eval {label}"] = time.time() - t, time.thread_time() - c
            _save(run_dir / "bench_eval", key, recs,
                  seconds={k: (timings[k], cpu[k]) for k in (f"train {label}", f"eval {label}")})
            log(f"[eval] {label}: greedy accuracy "
                + ", ".join(f"{lang} {greedy_accuracy(recs, lang):.3f}" for lang in ("eng", *TARGET_LANGS)))
            return label, str(hf), recs

        # Runs are independent processes (train) + a single-threaded eval: `jobs` of them at once use
        # the machine's cores (2 on the reference machine) instead of one.
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for label, hf, recs in pool.map(train_and_eval, runs):  # in submission order: stable records
                checkpoints[label] = hf
                records += recs

    write_scored_generations(records, out / "scored_generations.jsonl")
    report_files = {k: str(v) for k, v in write_report(records, out / "report",
                                                         title=f"Synthetic benchmark ({mode.name}): per-model metrics").items()}
    rows = compute_metrics(records)
    timings["total"] = time.time() - t_start
    cpu["total"] = time.process_time() + children_cpu_seconds() - c_start
    t = mode.train
    info = {"mode": mode.name, "seeds": list(mode.seeds), "methods": list(mode.methods),
            "budget": f"{t.steps} steps x {t.prompts_per_step} prompts x {t.n} rollouts, <= {t.max_new_tokens} new tokens",
            "base_model": str(base_root), "checkpoints": checkpoints, "timings": timings, "cpu_seconds": cpu,
            "load_average": _load_average(),
            "teacher_greedy_accuracy": teacher_acc, "num_eval": num_eval,
            "objective_settings": {m: objective_settings(mode, m, chosen.get(m)) for m in mode.methods},
            "tuning": tuning}
    files = {"summary": str(out / "summary.md"), "metrics": report_files.get("csv", ""),
             "report": report_files.get("markdown", ""), "scored generations": str(out / "scored_generations.jsonl"),
             "base checkpoint": str(base_root / "hf")}
    files.update({f"checkpoint {k}": v for k, v in checkpoints.items() if k != "base"})
    write_summary(rows, out, target_langs=TARGET_LANGS, info=info, report_files=files, records=records,
                  run_dirs={k: out / "runs" / k for k in checkpoints if k != "base"})
    return {"timings": timings, "cpu_seconds": cpu, "files": files, "rows": rows}


def tune_on_dev(mode: Mode, base_root: Path, out: Path, log, *, jobs: int = 1, resume: bool = False) -> dict:
    """Every method's tuning grid on the first seed, scored by greedy target-language accuracy on dev.
    `jobs` grid points train (and are scored) at once; the choice does not depend on the order. Each
    point saves its dev score next to its run (`<out>/tune/<method>-<i>/dev_score.json`, keyed by its
    trainer config and the dev set); `resume` reuses a saved score whose key is unchanged."""
    from megatron_copsd.synthetic.evaluate import evaluate_checkpoint
    from megatron_copsd.synthetic.tuning import grid, tune

    path = out / "data" / "dev.jsonl"
    if not mode.num_dev or not path.is_file():
        raise ValueError("--tune needs a dev split: set num_dev (and num_eval) in the mode")
    dev = [e for e in (json.loads(line) for line in path.read_text().splitlines()) if e["lang"] in TARGET_LANGS]
    seed = mode.seeds[0]
    settings = dataclasses.replace(mode.eval, num_samples=0)
    points = [(method, i, overrides) for method in mode.methods for i, overrides in enumerate(grid(method))]

    def run_point(point) -> float:
        method, i, overrides = point
        run_dir = out / "tune" / f"{method}-{i}"
        cfg = trainer_config(mode, method, seed, base_root, run_dir, overrides)
        key = {"trainer_config": cfg, "dev": [e["id"] for e in dev], "eval": dataclasses.asdict(settings)}
        saved = _saved(run_dir / "dev_score.json", key, log) if resume else None
        if saved is not None:
            log(f"[resume] reusing the dev score of {run_dir}")
            return float(saved["dev_score"])
        hf = run_trainer(cfg, run_dir, log)[0]
        recs = evaluate_checkpoint(hf, dev, label=f"dev-{method}-{i}", log=log, settings=settings)
        score = sum(r.correct for r in recs) / len(recs)
        _write_json(run_dir / "dev_score.json", {"key": key, "dev_score": score})  # an interrupted point re-runs
        return score

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        scores = {(m, i): s for (m, i, _), s in zip(points, pool.map(run_point, points))}
    return tune(mode.methods, score=lambda method, overrides: scores[method, grid(method).index(overrides)], log=log)


def eval_set(mode: Mode, base_root: Path, out: Path) -> tuple[list[dict], int]:
    """The eval examples (English and the target languages) and the number of problems per language.
    With `mode.num_eval`, a large eval set (and a dev set) from their own seeds, written to <out>/data;
    otherwise the base corpus' eval pool."""
    from megatron_copsd.synthetic.corpus import benchmark_splits, examples_of, write_jsonl
    from megatron_copsd.synthetic.generator import LANG_EN

    if not mode.num_eval:
        examples = [json.loads(line) for line in (base_root / "data" / "eval.jsonl").read_text().splitlines()]
        return examples, len({e["id"].rsplit("-", 1)[0] for e in examples})
    evals, dev = benchmark_splits(mode.base.corpus, mode.num_eval, mode.num_dev)
    langs = (LANG_EN, *TARGET_LANGS)
    examples = examples_of(evals, langs, "eval")
    write_jsonl(examples, out / "data" / "eval.jsonl")
    if dev:
        write_jsonl(examples_of(dev, langs, "dev"), out / "data" / "dev.jsonl")
    return examples, len(evals)


def _save(stem: Path, key: dict, records: list, seconds: dict | None = None) -> None:
    """Saves a finished eval (`<stem>.jsonl`) and what produced it (`<stem>.json`, written last: a run
    interrupted between the two is not reused)."""
    from megatron_copsd.eval.metrics import write_scored_generations

    write_scored_generations(records, stem.with_suffix(".jsonl"))
    _write_json(stem.with_suffix(".json"), {"key": key, "seconds": seconds or {}})


def _reuse(stem: Path, key: dict, log) -> list | None:
    """The records saved by `_save` when they were produced by exactly `key`; None otherwise (logged)."""
    from megatron_copsd.eval.metrics import read_scored_generations

    recs = stem.with_suffix(".jsonl")
    if not recs.is_file() or _saved(stem.with_suffix(".json"), key, log) is None:
        return None
    log(f"[resume] reusing {recs}")
    return read_scored_generations(recs)


def _write_json(path: Path, data: dict) -> None:
    """`data` as JSON at `path`, atomically (a reader sees the old file or the whole new one)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)


def _saved(path: Path, key: dict, log) -> dict | None:
    """The JSON written at `path` by `_write_json` when its "key" matches `key` (`_same_key`); None when
    there is none or the settings changed (logged)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not _same_key(data.get("key"), json.loads(json.dumps(key, default=str))):
        log(f"[resume] {path.with_suffix('')}: settings changed since it was saved; running it again")
        return None
    return data


def _same_key(saved, current) -> bool:
    """`saved == current`, except that an eval setting added to `EvalSettings` after the run was saved
    (absent from the saved key) counts as unchanged while it is at its default: it did not exist, so the
    saved run behaved as that default does."""
    from megatron_copsd.synthetic.evaluate import EvalSettings

    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return saved == current
    if isinstance(saved.get("eval"), dict) and isinstance(current.get("eval"), dict):
        defaults = json.loads(json.dumps(dataclasses.asdict(EvalSettings()), default=str))
        cur_eval = {k: v for k, v in current["eval"].items()
                    if k in saved["eval"] or k not in defaults or v != defaults[k]}
        current = {**current, "eval": cur_eval}
    return saved == current


def _first_per_lang(examples: list[dict], n: int) -> list[dict]:
    seen: dict = {}
    out = []
    for e in examples:
        seen[e["lang"]] = seen.get(e["lang"], 0) + 1
        if seen[e["lang"]] <= n:
            out.append(e)
    return out


def resummarize(out: Path) -> Path:
    """Re-renders the summary of a finished run from its scored generations and recorded info."""
    from megatron_copsd.eval.metrics import compute_metrics, read_scored_generations
    from megatron_copsd.synthetic.summary import write_summary

    for name in ("scored_generations.jsonl", "summary.json"):
        if not (out / name).is_file():
            raise ValueError(f"--summary-only: {out / name} does not exist (run the benchmark first)")
    records = read_scored_generations(out / "scored_generations.jsonl")
    rows = compute_metrics(records)
    info = json.loads((out / "summary.json").read_text())["info"]
    files = {"summary": str(out / "summary.md"), "report": str(out / "report" / "report.md"),
             "scored generations": str(out / "scored_generations.jsonl")}
    runs = {p.name: p for p in sorted((out / "runs").glob("*")) if p.is_dir()}
    return write_summary(rows, out, target_langs=TARGET_LANGS, info=info, report_files=files, records=records,
                         run_dirs=runs)


@contextlib.contextmanager
def _master_port():
    """Points the in-process (pretraining) gloo group at a free port unless MASTER_PORT is set."""
    if "MASTER_PORT" in os.environ:
        yield
        return
    os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    try:
        yield
    finally:
        os.environ.pop("MASTER_PORT", None)


def _load_average() -> str:
    """1/5/15-minute load averages at the end of the run: timings mean little on a busy machine."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
