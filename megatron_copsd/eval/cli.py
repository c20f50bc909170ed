"""`copsd eval`: evaluation reports from scored generations.

    copsd eval report --generations scored.jsonl [more.jsonl ...] --out reports/run1 [--title T] [--ks 1,2,4,8]
    copsd eval score --generations raw.jsonl --task math|math_number|mcq|tooluse --out scored.jsonl

`score` grades raw generations: records with the scored-generation fields except `extracted`,
`correct` and `formatted`, plus `answer` (the gold answer); it writes scored-generation records.

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
    sc = sub.add_parser("score", help="grade raw generations (with a gold `answer`) into scored records")
    sc.add_argument("--generations", required=True)
    sc.add_argument("--task", required=True, choices=["math", "math_number", "mcq", "tooluse"])
    sc.add_argument("--out", required=True)
    return p


def score_file(path, task: str):
    """Raw generation records (see the module docstring) -> scored-generation records."""
    from pathlib import Path

    from megatron_copsd.data.graders import get_grader
    from megatron_copsd.data.loaders import iter_json_records
    from megatron_copsd.eval.metrics import record_from_dict

    grader = get_grader(task)
    out = []
    for i, obj in iter_json_records(Path(path)):
        if obj.get("answer") is None:
            raise DataError(path, i, "answer", "missing gold answer")
        if not isinstance(obj.get("response"), str):
            raise DataError(path, i, "response", "expected a string")
        g = grader(obj["response"], obj["answer"])
        obj.update(extracted=g.extracted, correct=g.correct, formatted=g.formatted)
        out.append(record_from_dict({k: v for k, v in obj.items() if k != "answer"}, path, i))
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_copsd.eval.metrics import read_scored_generations, write_scored_generations
    from megatron_copsd.eval.report import write_report

    if args.command == "score":
        try:
            records = score_file(args.generations, args.task)
            write_scored_generations(records, args.out)
        except (DataError, ValueError, OSError) as e:
            print(f"copsd eval: {e}", file=sys.stderr)
            return 1
        acc = sum(r.correct for r in records) / max(len(records), 1)
        print(f"scored {len(records)} generations (mean correct {acc:.3f}) -> {args.out}")
        return 0

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
