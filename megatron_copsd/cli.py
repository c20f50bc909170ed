"""The `copsd` command: one entry point, subcommands dispatched lazily.

    copsd train --config examples/tiny_cpu_copsd.yaml [dotted.key=value ...]
    copsd eval ...            (reports from scored generations or a checkpoint)
    copsd convert ...         (HF <-> Megatron checkpoints)
    copsd prepare-data ...    (COPSD-format training files)
    copsd bench-kernels ...   (fused divergence microbenchmarks)
    copsd synth-bench ...     (the one-CPU crosslingual benchmark: COPSD vs GRPO)
    copsd dry-run --config X  (one training step on meta tensors at the real layout: device bugs, memory)
    copsd real-bench ...      (the same comparison on SmolLM2-135M-Instruct, French/Spanish/German)

Each subcommand lives in its own module as `main(argv: list[str]) -> int`, imported only when used,
so `copsd convert` never pays for importing the trainer.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": ("megatron_copsd.train", "run a COPSD / ROSD / GRPO training job"),
    "eval": ("megatron_copsd.eval.cli", "evaluate generations or a checkpoint; write Markdown/CSV/PNG"),
    "convert": ("megatron_copsd.checkpoint.cli", "convert checkpoints between HF and Megatron"),
    "prepare-data": ("megatron_copsd.data.prepare", "build COPSD-format training files"),
    "bench-kernels": ("copsd_kernels.bench", "benchmark the fused divergence kernels"),
    "synth-bench": ("megatron_copsd.synthetic.run", "crosslingual benchmark on one CPU: COPSD vs GRPO"),
    "dry-run": ("megatron_copsd.dry_run", "one training step on meta tensors: device checks + memory per rank"),
    "real-bench": ("megatron_copsd.realbench", "SmolLM2-135M-Instruct on fr/es/de word problems: COPSD vs GRPO"),
}


def _usage() -> str:
    lines = ["usage: copsd <command> [args...]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"copsd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
