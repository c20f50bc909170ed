"""`copsd prepare-data`: build COPSD-format training files, or download the published data sets.

    copsd prepare-data gsm8k-mgsm --gsm8k ../shared/data/gsm8k/test.jsonl --mgsm-dir ../shared/data/mgsm \\
        --langs sw fr zh --out data/copsd_mgsm.json
    copsd prepare-data afrimgsm --folder afrimgsm/data --langs hau yor --gsm8k gsm8k/test.jsonl --out data/afri.json
    copsd prepare-data download --dataset yihongLiu/COPSD-AfriMGSM-TrainDataset --out data/hf/copsd_afri
    copsd prepare-data download --dataset masakhane/afrimgsm --out data/hf/afrimgsm   # then: afrimgsm --folder .../data

Output (JSON list, or JSON Lines when `--out` ends in .jsonl): one object per problem with `id`,
`problem` (English), `solution` (English reasoning, GSM8K `<<calc>>` notes removed, its `#### n` line
replaced by `The final answer is \\boxed{n}.` so the teacher sees the answer format the student is asked
for), `answer`, and `problem_<lang>` per language (codes as given on the command line). Rows are
aligned by position (MGSM and AfriMGSM translate GSM8K test rows 0-249 in order); the builders check
that the numeric answers agree row by row and stop with an error naming the row otherwise. Note: these
sources are test sets; use them as format fixtures or smoke runs, not for real training.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from megatron_copsd.data.graders import normalize_number
from megatron_copsd.data.loaders import DataError, Example, load_afrimgsm, load_gsm8k, load_mgsm_tsv

KNOWN_HF_DATASETS = ("yihongLiu/COPSD-AfriMGSM-TrainDataset", "yihongLiu/COPSD-PolyMath-TrainDataset",
                     "masakhane/afrimgsm")


def _progress(it, total, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, total=total, desc=desc, unit="row", disable=not sys.stderr.isatty())


def boxed_solution(solution: str, answer: str) -> str:
    return f"{solution.rstrip()}\nThe final answer is \\boxed{{{answer}}}."


def _check_same_answer(a: str, b: str, where: str, row: int) -> None:
    if normalize_number(a) != normalize_number(b):
        raise DataError(where, row, "answer", f"answers disagree across sources: {a!r} vs {b!r} (rows misaligned?)")


def build_parallel_rows(english: list[Example], targets: dict[str, list[Example]], *,
                        solutions: list[Example] | None = None, limit: int | None = None) -> list[dict]:
    """COPSD rows from an English list and per-language lists aligned by position. `solutions`
    (e.g. GSM8K) supplies `solution_en` by position when `english` has none."""
    n = min([len(english)] + [len(v) for v in targets.values()])
    if solutions is not None:
        n = min(n, len(solutions))
    if limit is not None:
        n = min(n, limit)
    rows = []
    for i in _progress(range(n), n, "building rows"):
        en = english[i]
        src = solutions[i] if solutions is not None else en
        if solutions is not None:
            _check_same_answer(src.answer, en.answer, src.meta.get("source", "solutions"), i + 1)
        sol = src.solution_en or en.meta.get("answer_text")
        if not sol:
            raise DataError(en.meta.get("source", "english"), en.meta.get("row"), "solution",
                            "no English solution for this row; pass --gsm8k to take it from GSM8K")
        row = {"id": f"{i}", "problem": en.problem, "solution": boxed_solution(sol, en.answer),
               "answer": en.answer.replace(",", "")}
        for lang, exs in targets.items():
            _check_same_answer(exs[i].answer, en.answer, exs[i].meta.get("source", lang), exs[i].meta.get("row", i + 1))
            row[f"problem_{lang}"] = exs[i].problem
        rows.append(row)
    return rows


def write_rows(rows: list[dict], out) -> Path:
    """JSON list (or JSONL for *.jsonl), written atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    return out


def download_dataset(name: str, out_dir, *, revision: str | None = None, endpoint: str | None = None) -> Path:
    """Snapshot of a Hugging Face data set into `out_dir`; RuntimeError with the reason when offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - installed with transformers
        raise RuntimeError("huggingface_hub is not installed") from e
    try:
        path = snapshot_download(repo_id=name, repo_type="dataset", local_dir=str(out_dir), revision=revision,
                                 endpoint=endpoint, etag_timeout=10)
    except Exception as e:  # network errors come in many types (requests, httpx, hub errors)
        raise RuntimeError(f"could not download the data set {name!r} from the Hugging Face hub "
                           f"({type(e).__name__}: {str(e)[:300]}). This needs network access; offline, "
                           "place the files in a local folder and use the 'afrimgsm' builder instead.") from None
    return Path(path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="copsd prepare-data", description="Build COPSD-format training files.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gsm8k-mgsm", help="GSM8K test rows + MGSM translations (mgsm_<lang>.tsv)")
    g.add_argument("--gsm8k", required=True, help="GSM8K JSONL (test split: MGSM translates its rows 0-249)")
    g.add_argument("--mgsm-dir", required=True)
    g.add_argument("--langs", nargs="+", required=True, help="MGSM language codes, e.g. sw fr zh")
    g.add_argument("--out", required=True)
    g.add_argument("--limit", type=int, default=None)
    a = sub.add_parser("afrimgsm", help="a local AfriMGSM folder (<lang>/test.tsv), English from eng/")
    a.add_argument("--folder", required=True)
    a.add_argument("--langs", nargs="+", required=True)
    a.add_argument("--gsm8k", default=None, help="GSM8K test JSONL for English solutions (recommended)")
    a.add_argument("--split", default="test")
    a.add_argument("--out", required=True)
    a.add_argument("--limit", type=int, default=None)
    d = sub.add_parser("download", help="download a Hugging Face data set (needs network)")
    d.add_argument("--dataset", required=True, help=f"e.g. one of {', '.join(KNOWN_HF_DATASETS)}")
    d.add_argument("--out", required=True)
    d.add_argument("--revision", default=None)
    d.add_argument("--endpoint", default=None, help="hub endpoint (default: huggingface.co / HF_ENDPOINT)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "download":
            path = download_dataset(args.dataset, args.out, revision=args.revision, endpoint=args.endpoint)
            print(f"downloaded {args.dataset} to {path}")
            return 0
        if args.command == "gsm8k-mgsm":
            gsm = load_gsm8k(args.gsm8k)
            targets = {lang: load_mgsm_tsv(Path(args.mgsm_dir) / f"mgsm_{lang}.tsv", lang) for lang in args.langs}
            rows = build_parallel_rows(gsm, targets, limit=args.limit)
        else:
            need = list(dict.fromkeys(["eng", *args.langs]))
            data = load_afrimgsm(args.folder, need, split=args.split)
            from megatron_copsd.data.languages import canonical_code
            english = data["eng"]
            targets = {lang: data[canonical_code(lang)] for lang in args.langs if canonical_code(lang) != "eng"}
            sols = load_gsm8k(args.gsm8k) if args.gsm8k else None
            rows = build_parallel_rows(english, targets, solutions=sols, limit=args.limit)
    except (DataError, ValueError, RuntimeError, OSError) as e:
        print(f"copsd prepare-data: {e}", file=sys.stderr)
        return 1
    out = write_rows(rows, args.out)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
