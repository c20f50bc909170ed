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
import json
import os
import sys
from pathlib import Path

from megatron_copsd.config import Config, load_config


def check_paths(cfg: Config) -> None:
    """Fails early on missing inputs (before distributed init)."""
    if not cfg.data.train_path.startswith("fixture:"):
        if not Path(cfg.data.train_path).is_file():
            raise ValueError(f"config field data.train_path: file {cfg.data.train_path!r} does not exist")
        if not cfg.data.langs and cfg.data.format == "copsd":
            raise ValueError("config field data.langs: list the language codes to train on (e.g. [swa])")
    eval_langs = (cfg.data.langs or ["swa"]) if cfg.data.format == "copsd" else ["eng"]
    for lang in eval_langs if cfg.data.eval_path else []:
        path = cfg.data.eval_path.replace("{lang}", lang)
        if not Path(path).is_file():
            raise ValueError(f"config field data.eval_path: file {path!r} does not exist")
    if not cfg.model.hf_path.startswith("tiny:") and not (Path(cfg.model.hf_path) / "config.json").is_file():
        raise ValueError(f"config field model.hf_path: no config.json in {cfg.model.hf_path!r}")
    if not cfg.model.hf_path.startswith("tiny:"):
        _check_layout(cfg, json.loads((Path(cfg.model.hf_path) / "config.json").read_text()))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if world % (cfg.parallel.tp * cfg.parallel.pp):
        raise ValueError(f"config fields parallel.tp={cfg.parallel.tp} x parallel.pp={cfg.parallel.pp} do not divide "
                         f"the {world} launched processes")
    if cfg.data.train_path.startswith("fixture:") and cfg.data.train_path != "fixture:tiny":
        raise ValueError(f"config field data.train_path: unknown fixture {cfg.data.train_path!r} (use fixture:tiny)")


def _check_layout(cfg: Config, hf: dict) -> None:
    """TP must divide the attention / KV heads and PP the layers (Megatron would fail later, mid-setup)."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    heads = hf.get("num_attention_heads", 1)
    kv = hf.get("num_key_value_heads") or heads
    if heads % tp or kv % tp:
        raise ValueError(f"config field parallel.tp={tp} must divide num_attention_heads={heads} and "
                         f"num_key_value_heads={kv} of {cfg.model.hf_path}")
    if hf.get("num_hidden_layers", pp) % pp:
        raise ValueError(f"config field parallel.pp={pp} must divide num_hidden_layers={hf.get('num_hidden_layers')}")


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
        torch.set_num_threads(cfg.train.cpu_threads)
    from megatron_copsd.megatron.dist import destroy_distributed
    from megatron_copsd.trainer import NonFiniteLossError, Trainer

    try:
        result = Trainer(cfg).run()
    except NonFiniteLossError as e:
        print(f"copsd train: {e}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()
    if not result.get("preempted") and result.get("rank", 0) == 0:
        print(f"metrics:    {result['metrics']}\ncheckpoint: {result['checkpoint']}\n"
              f"hf export:  {result['hf']}\nreport:     {result['report']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
