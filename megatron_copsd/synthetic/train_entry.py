"""Trainer entry for the benchmark: registers the synthetic languages, then runs `copsd train`.

    python -m megatron_copsd.synthetic.train_entry --config runs/synth/runs/copsd-s0/config.yaml

The synthetic languages (qge, qva) live outside the built-in registry, so a plain `copsd train` would not
know their prompts; this wrapper registers them in the trainer's process first.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from megatron_copsd.synthetic.languages import register_synthetic_languages

    register_synthetic_languages()
    from megatron_copsd import train

    return int(train.main(list(sys.argv[1:] if argv is None else argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
