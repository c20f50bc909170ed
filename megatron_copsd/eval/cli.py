"""`copsd eval`: evaluation reports from scored generations.

    copsd eval report --generations scored.jsonl [more.jsonl ...] --out reports/run1 [--title T] [--ks 1,2,4,8]

The scored-generation JSONL format is documented in `megatron_copsd.eval.metrics`. Records from several
files are concatenated (e.g. one file for the base model, one for the trained one, with different
`model` labels).
"""
from __future__ import annotations

import argparse
import sys

from megatron_copsd.data.loaders import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="copsd eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="write report.md, metrics.csv and PNG plots")
    r.add_argument("--generations", nargs="+", required=True, help="scored-generation JSONL file(s)")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--title", default="Evaluation report")
    r.add_argument("--ks", default=None, help="comma-separated k values (default: powers of 2 up to n)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_copsd.eval.metrics import read_scored_generations
    from megatron_copsd.eval.report import write_report

    try:
        ks = [int(k) for k in args.ks.split(",")] if args.ks else None
    except ValueError:
        print(f"copsd eval: --ks must be comma-separated integers, got {args.ks!r}", file=sys.stderr)
        return 2
    try:
        records = [r for path in args.generations for r in read_scored_generations(path)]
        paths = write_report(records, args.out, title=args.title, ks=ks)
    except (DataError, ValueError, OSError) as e:
        print(f"copsd eval: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
