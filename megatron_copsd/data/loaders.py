"""Data set loaders: every row becomes an `Example`, or a `DataError` naming file, row and field.

    from megatron_copsd.data.loaders import load_mgsm_tsv, load_copsd_training
    ex = load_mgsm_tsv("../shared/data/mgsm/mgsm_sw.tsv")          # lang from the file name
    train = load_copsd_training("copsd_train.json", "swa")

Rows are numbered from 1: the line number for line-based files (JSONL, TSV; a TSV header is line 1),
the list index + 1 for a JSON list. Filters that drop rows on purpose, and only these:
  - blank lines in JSONL/TSV files are not rows;
  - COPSD training rows whose `problem_<lang>_ok` is present and false (`require_ok=True`), counted in
    the log message.
Everything else that is malformed raises. `Example.lang` is the registry's canonical code.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from megatron_copsd.data.languages import get_language

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A malformed input row. `file`, `row` (1-based) and `field` say where."""

    def __init__(self, file, row: int | None, field: str | None, reason: str):
        self.file, self.row, self.field, self.reason = str(file), row, field, reason
        where = self.file + (f":{row}" if row is not None else "")
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{what} {reason}")


@dataclass
class Example:
    """One evaluation or training problem. `answer`: the gold answer as a string (math: the number as
    written, e.g. "025"; mcq: a letter; tooluse: the gold JSON list of calls). `problem_en`/`solution_en`:
    privileged English context for the COPSD teacher (None when the source has none)."""

    id: str
    lang: str
    problem: str
    answer: str | None
    problem_en: str | None = None
    solution_en: str | None = None
    domain: str = "math"
    meta: dict[str, Any] = field(default_factory=dict)


_NUMBER = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?$")


def _number(value, file, row, fld) -> str:
    """A numeric answer as written (thousands commas allowed); DataError otherwise."""
    s = str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    if s is None or not _NUMBER.match(s):
        raise DataError(file, row, fld, f"expected a number, got {value!r}")
    return s


def _text(row: dict, fld: str, file, rown, *, optional: bool = False) -> str | None:
    if fld not in row or row[fld] is None:
        if optional:
            return None
        raise DataError(file, rown, fld, "missing")
    v = row[fld]
    if not isinstance(v, str) or not v.strip():
        raise DataError(file, rown, fld, f"expected a non-empty string, got {type(v).__name__} {str(v)[:40]!r}")
    return v


def iter_json_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number, object) from a JSON list or JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not UTF-8 text: {e}") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"invalid JSON list: {e}") from None
        for i, obj in enumerate(data, 1):
            if not isinstance(obj, dict):
                raise DataError(path, i, None, f"expected a JSON object, got {type(obj).__name__}")
            yield i, obj
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, i, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(path, i, None, f"expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def _tsv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    # QUOTE_NONE: MGSM questions contain bare '"' characters that must not start a quoted field.
    with open(path, encoding="utf-8", newline="") as f:
        try:
            for i, fields in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not fields or all(not x.strip() for x in fields):
                    continue
                yield i, fields
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(path, None, None, f"unreadable TSV: {e}") from None


def _lang_field(row: dict, lang: str) -> str:
    """The `problem_<code>` key present in the row among the language's code and aliases."""
    lg = get_language(lang)
    for code in (lang, lg.code, *lg.aliases):
        if f"problem_{code}" in row:
            return f"problem_{code}"
    return f"problem_{lang}"


_BOXED_OR_HASH = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)\s*$")


def load_copsd_training(path, lang: str, *, require_ok: bool = True) -> list[Example]:
    """COPSD training file (JSON list or JSONL): `problem` (English), `solution` (English),
    `problem_<lang>` and optional boolean `problem_<lang>_ok` (rows with false are skipped when
    `require_ok`). An optional `answer` field is kept; otherwise a trailing `#### n` of the solution."""
    path = Path(path)
    canon = get_language(lang).code
    out, skipped = [], 0
    for rown, row in iter_json_records(path):
        key = _lang_field(row, lang)
        ok = row.get(f"{key}_ok")
        if ok is not None and not isinstance(ok, bool):
            raise DataError(path, rown, f"{key}_ok", f"expected true/false, got {ok!r}")
        if require_ok and ok is False:
            # checked first: a translation flagged as bad may well be empty or broken
            skipped += 1
            continue
        problem_en = _text(row, "problem", path, rown)
        solution = _text(row, "solution", path, rown)
        problem = _text(row, key, path, rown)
        answer = row.get("answer")
        if answer is not None:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise DataError(path, rown, "answer", f"expected a string or number, got {answer!r}")
            answer = str(answer).strip()
        else:
            m = _BOXED_OR_HASH.search(solution)
            answer = m.group(1) if m else None
        out.append(Example(id=str(row.get("id", rown)), lang=canon, problem=problem, answer=answer,
                           problem_en=problem_en, solution_en=solution, domain="math",
                           meta={"source": str(path), "row": rown}))
    if skipped:
        log.info("%s: skipped %d row(s) with %s_ok = false", path, skipped, lang)
    return out


def load_mgsm_tsv(path, lang: str | None = None) -> list[Example]:
    """MGSM `question<TAB>answer` file without header; `lang` defaults to the `mgsm_<lang>.tsv` name."""
    path = Path(path)
    if lang is None:
        m = re.match(r"mgsm_(\w+)\.tsv$", path.name)
        if not m:
            raise DataError(path, None, None, "cannot infer the language from the file name; pass lang=")
        lang = m.group(1)
    canon = get_language(lang).code
    out = []
    for rown, fields in _tsv_rows(path):
        if len(fields) != 2:
            raise DataError(path, rown, None, f"expected 2 tab-separated fields (question, answer), got {len(fields)}")
        q, a = fields
        if not q.strip():
            raise DataError(path, rown, "question", "empty")
        out.append(Example(id=f"mgsm-{len(out)}", lang=canon, problem=q, answer=_number(a, path, rown, "answer"),
                           meta={"source": str(path), "row": rown}))
    return out


AFRIMGSM_COLUMNS = ("question", "answer", "answer_number", "equation_solution")


def load_afrimgsm_tsv(path, lang: str) -> list[Example]:
    """One AfriMGSM `<lang>/<split>.tsv` file with a header naming at least `question`, `answer_number`."""
    path = Path(path)
    canon = get_language(lang).code
    rows = _tsv_rows(path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise DataError(path, None, None, "empty file (no header)") from None
    header = [h.strip() for h in header]
    for col in ("question", "answer_number"):
        if col not in header:
            raise DataError(path, 1, col, f"missing column in header {header}")
    out = []
    for rown, fields in rows:
        if len(fields) != len(header):
            raise DataError(path, rown, None, f"expected {len(header)} tab-separated fields, got {len(fields)}")
        row = dict(zip(header, fields))
        q = row["question"]
        if not q.strip():
            raise DataError(path, rown, "question", "empty")
        num = _number(row["answer_number"], path, rown, "answer_number")
        sol = row.get("answer", "").strip() or None
        out.append(Example(id=f"afrimgsm-{len(out)}", lang=canon, problem=q, answer=num, solution_en=None,
                           meta={"source": str(path), "row": rown, "answer_text": sol,
                                 "equation_solution": row.get("equation_solution")}))
    return out


def load_afrimgsm(folder, langs=None, split: str = "test") -> dict[str, list[Example]]:
    """AfriMGSM folder layout `<folder>/<lang>/<split>.tsv`; `langs=None` loads every language folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, None, "AfriMGSM folder does not exist")
    if langs is None:
        langs = sorted(p.name for p in folder.iterdir() if (p / f"{split}.tsv").is_file())
        if not langs:
            raise DataError(folder, None, None, f"no <lang>/{split}.tsv files found")
    out = {}
    for lang in langs:
        f = folder / lang / f"{split}.tsv"
        if not f.is_file():
            raise DataError(f, None, None, "file not found")
        out[get_language(lang).code] = load_afrimgsm_tsv(f, lang)
    return out


_CALC_NOTE = re.compile(r"<<[^<>]*>>")


def load_gsm8k(path) -> list[Example]:
    """GSM8K JSONL `{"question", "answer"}`; answer ends with `#### n`. `solution_en` has the reasoning
    without the `<<calc>>` notes and without the `#### n` line (raw text in `meta["raw_answer"]`)."""
    path = Path(path)
    out = []
    for rown, row in iter_json_records(path):
        q = _text(row, "question", path, rown)
        a = _text(row, "answer", path, rown)
        head, sep, tail = a.rpartition("####")
        if not sep:
            raise DataError(path, rown, "answer", "no '#### <number>' final line")
        num = _number(tail, path, rown, "answer")
        sol = _CALC_NOTE.sub("", head).strip()
        out.append(Example(id=f"gsm8k-{len(out)}", lang="eng", problem=q, answer=num, problem_en=q,
                           solution_en=sol, meta={"source": str(path), "row": rown, "raw_answer": a}))
    return out


def load_aime(path) -> list[Example]:
    """AIME JSONL with `problem` (or `question`) and `answer` (zero-padded integer strings kept as written)."""
    path = Path(path)
    out = []
    for rown, row in iter_json_records(path):
        key = "problem" if "problem" in row else "question"
        p = _text(row, key, path, rown)
        a = row.get("answer")
        if isinstance(a, bool) or not isinstance(a, (str, int)) or not str(a).strip().lstrip("-").isdigit():
            raise DataError(path, rown, "answer", f"expected an integer (string), got {a!r}")
        sol = row.get("solution") if isinstance(row.get("solution"), str) else None
        out.append(Example(id=str(row.get("id", rown)), lang="eng", problem=p, answer=str(a).strip(),
                           problem_en=p, solution_en=sol, meta={"source": str(path), "row": rown,
                                                                "url": row.get("url")}))
    return out


_SKE_NAME = re.compile(r"sciknoweval[_-]([a-z]+)")


def load_sciknoweval(path, domain: str | None = None) -> list[Example]:
    """SciKnowEval MCQ JSONL: `prompt`, `answer` (a letter), optional `system`. The domain comes from
    `domain=`, else a `domain` field, else the file name `sciknoweval_<domain>_...` (the `dataset`
    field says only "sciknoweval", so it cannot tell domains apart)."""
    path = Path(path)
    if domain is None:
        m = _SKE_NAME.search(path.name.lower())
        domain = m.group(1) if m else None
    out = []
    for rown, row in iter_json_records(path):
        p = _text(row, "prompt", path, rown)
        a = _text(row, "answer", path, rown).strip()
        if not re.fullmatch(r"[A-Z]", a):
            raise DataError(path, rown, "answer", f"expected one capital letter, got {a!r}")
        sysmsg = row.get("system")
        if sysmsg is not None and not isinstance(sysmsg, str):
            raise DataError(path, rown, "system", f"expected a string, got {type(sysmsg).__name__}")
        d = domain or row.get("domain")
        if not isinstance(d, str) or not d:
            raise DataError(path, rown, "domain", "no domain (name the file sciknoweval_<domain>_*.json or pass domain=)")
        out.append(Example(id=str(row.get("idx", rown)), lang="eng", problem=p, answer=a, domain=d,
                           meta={"source": str(path), "row": rown, "system": sysmsg}))
    return out


def parse_gold_tool_calls(answer, file="<answer>", row=None) -> list[tuple[str, Any]]:
    """Gold ToolUse answer (a JSON list, or its JSON string) -> [(action, parsed arguments)].
    `Action_Input` may itself be a JSON-encoded string; it is decoded."""
    if isinstance(answer, str):
        try:
            answer = json.loads(answer)
        except json.JSONDecodeError as e:
            raise DataError(file, row, "answer", f"invalid JSON: {e.msg}") from None
    if not isinstance(answer, list) or not answer:
        raise DataError(file, row, "answer", "expected a non-empty JSON list of calls")
    calls = []
    for j, c in enumerate(answer):
        if not isinstance(c, dict) or not isinstance(c.get("Action"), str) or "Action_Input" not in c:
            raise DataError(file, row, f"answer[{j}]", "expected {\"Action\": str, \"Action_Input\": ...}")
        args = c["Action_Input"]
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise DataError(file, row, f"answer[{j}].Action_Input", f"invalid JSON: {e.msg}") from None
        calls.append((c["Action"].strip(), args))
    return calls


def load_tooluse(path) -> list[Example]:
    """ToolUse JSONL: `prompt` (tool docs + Thought/Action/Action Input format) and `answer`, a JSON list
    of `{"Action", "Action_Input"}` (validated here; kept as the JSON string)."""
    path = Path(path)
    out = []
    for rown, row in iter_json_records(path):
        p = _text(row, "prompt", path, rown)
        a = row.get("answer")
        if a is None:
            raise DataError(path, rown, "answer", "missing")
        parse_gold_tool_calls(a, path, rown)
        out.append(Example(id=str(row.get("idx", rown)), lang="eng", problem=p,
                           answer=a if isinstance(a, str) else json.dumps(a), domain="tooluse",
                           meta={"source": str(path), "row": rown}))
    return out
