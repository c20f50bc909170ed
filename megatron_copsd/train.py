"""`copsd train`: run a COPSD / sampled-KL / GRPO / SFT training job.

    copsd train --config examples/tiny_cpu_copsd.yaml [section.field=value ...]
    torchrun --nproc-per-node 2 -m megatron_copsd.train --config X.yaml parallel.tp=2
    srun python -m megatron_copsd.train --config X.yaml        (Slurm env is detected)

The config is loaded and validated (and the data / model paths checked) before any process group or
model is created, so a bad value fails in a second with a message naming the field. At the end the
command prints where the metrics, the checkpoint, the HF export and the eval report are.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_copsd.config import Config, load_config


def check_paths(cfg: Config) -> None:
    """Fails early on missing inputs (before distributed init)."""
    if not cfg.data.train_path.startswith("fixture:"):
        if not Path(cfg.data.train_path).is_file():
            raise ValueError(f"config field data.train_path: file {cfg.data.train_path!r} does not exist")
        if not cfg.data.langs:
            raise ValueError("config field data.langs: list the language codes to train on (e.g. [swa])")
    for lang in (cfg.data.langs or ["swa"]) if cfg.data.eval_path else []:
        path = cfg.data.eval_path.replace("{lang}", lang)
        if not Path(path).is_file():
            raise ValueError(f"config field data.eval_path: file {path!r} does not exist")
    if not cfg.model.hf_path.startswith("tiny:") and not (Path(cfg.model.hf_path) / "config.json").is_file():
        raise ValueError(f"config field model.hf_path: no config.json in {cfg.model.hf_path!r}")
    if cfg.data.train_path.startswith("fixture:") and cfg.data.train_path != "fixture:tiny":
        raise ValueError(f"config field data.train_path: unknown fixture {cfg.data.train_path!r} (use fixture:tiny)")


def _single_process_port() -> None:
    """Outside torchrun/srun, pick a free rendezvous port so two single-process runs can coexist."""
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if not launched and "MASTER_PORT" not in os.environ:
        from megatron_copsd.testing.multiproc import free_port

        os.environ["MASTER_PORT"] = str(free_port())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="copsd train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML run config (examples/*.yaml); omitted: defaults")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 train.steps=10")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_paths(cfg)
    except ValueError as e:
        print(f"copsd train: {e}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("COPSD_THREADS", "2")))))
    _single_process_port()
    from megatron_copsd.megatron.dist import destroy_distributed
    from megatron_copsd.trainer import Trainer

    try:
        result = Trainer(cfg).run()
    finally:
        destroy_distributed()
    if not result.get("preempted") and result.get("rank", 0) == 0:
        print(f"metrics:    {result['metrics']}\ncheckpoint: {result['checkpoint']}\n"
              f"hf export:  {result['hf']}\nreport:     {result['report']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
