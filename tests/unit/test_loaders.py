"""Loaders on the real files (skipped when ../shared/data is absent) and on generated junk rows."""
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from megatron_copsd.data import loaders as Ld
from megatron_copsd.data.loaders import DataError

SHARED = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def need(rel):
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"real data file {p} not present (../shared/data next to the repo)")
    return p


@pytest.mark.data
def test_real_mgsm_all_languages():
    by_lang = {}
    for lang in ("en", "sw", "fr", "zh"):
        ex = Ld.load_mgsm_tsv(need(f"mgsm/mgsm_{lang}.tsv"))
        assert len(ex) == 250
        by_lang[ex[0].lang] = ex
    assert set(by_lang) == {"eng", "swa", "fra", "zh"}
    # the same problems in every language: answers line up
    assert [e.answer for e in by_lang["swa"]] == [e.answer for e in by_lang["eng"]]
    assert any("," in e.answer for e in by_lang["eng"])  # thousands commas are kept as written
    assert by_lang["swa"][0].problem.startswith("Bata wa Janet")


@pytest.mark.data
def test_real_gsm8k_matches_mgsm_en():
    test = Ld.load_gsm8k(need("gsm8k/test.jsonl"))
    assert len(test) == 1319
    assert "<<" not in test[0].solution_en and "####" not in test[0].solution_en
    assert test[0].answer == "18"
    mgsm = Ld.load_mgsm_tsv(need("mgsm/mgsm_en.tsv"))
    assert [e.problem for e in test[:250]] == [e.problem for e in mgsm]
    assert len(Ld.load_gsm8k(need("gsm8k/train.jsonl"))) == 7473


@pytest.mark.data
def test_real_aime_zero_padded():
    ex = Ld.load_aime(need("aime24/test.jsonl"))
    assert len(ex) == 30 and any(e.answer.startswith("0") for e in ex)


@pytest.mark.data
def test_real_sciknoweval_domains():
    counts = {}
    for dom in ("biology", "chemistry", "material", "physics"):
        ex = Ld.load_sciknoweval(need(f"rosd/sciknoweval_{dom}_test.json"))
        assert {e.domain for e in ex} == {dom} and all(e.answer in "ABCD" for e in ex)
        counts[dom] = len(ex)
    assert counts == {"biology": 50, "chemistry": 210, "material": 94, "physics": 80}
    assert len(Ld.load_sciknoweval(need("rosd/sciknoweval_physics_train.json"))) == 720


@pytest.mark.data
def test_real_tooluse():
    ex = Ld.load_tooluse(need("rosd/tooluse_test.json"))
    assert len(ex) == 68 and all(Ld.parse_gold_tool_calls(e.answer) for e in ex)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_copsd_training_json_list_jsonl_aliases_and_ok_filter(tmp_path):
    rows = [{"problem": "P1", "solution": "S1 #### 3", "problem_swa": "T1"},
            {"problem": "P2", "solution": "S2", "problem_swa": "", "problem_swa_ok": False},
            {"problem": "P3", "solution": "S3", "problem_swa": "T3", "problem_swa_ok": True, "answer": 7}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    _write_jsonl(tmp_path / "a.jsonl", rows)
    for f in ("a.json", "a.jsonl"):
        ex = Ld.load_copsd_training(tmp_path / f, "sw")  # alias resolves to problem_swa
        assert [e.problem for e in ex] == ["T1", "T3"] and ex[0].lang == "swa"
        assert (ex[0].answer, ex[1].answer) == ("3", "7") and ex[1].problem_en == "P3"
        with pytest.raises(DataError, match=":2: field 'problem_swa'"):  # the flagged row is broken
            Ld.load_copsd_training(tmp_path / f, "swa", require_ok=False)
    with pytest.raises(DataError, match=r"a.json:1: field 'problem_fr': missing"):
        Ld.load_copsd_training(tmp_path / "a.json", "fr")


@pytest.mark.parametrize("rows,msg", [
    ([{"solution": "s", "problem_swa": "t"}], ":1: field 'problem': missing"),
    ([{"problem": "p", "solution": "", "problem_swa": "t"}], ":1: field 'solution': expected a non-empty"),
    ([{"problem": "p", "solution": "s", "problem_swa": "t"}, {"problem": "p", "solution": "s", "problem_swa": 3}],
     ":2: field 'problem_swa'"),
    ([{"problem": "p", "solution": "s", "problem_swa": "t", "problem_swa_ok": "yes"}], "problem_swa_ok"),
    ([[1, 2]], ":1: expected a JSON object"),
])
def test_copsd_training_errors(tmp_path, rows, msg):
    (tmp_path / "c.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=msg):
        Ld.load_copsd_training(tmp_path / "c.json", "swa")


def test_mgsm_quote_none_and_errors(tmp_path):
    f = tmp_path / "mgsm_es.tsv"
    f.write_text('Ella dijo "hola y compró 3\t3\nOtro "caso"\t1,250\n\n', encoding="utf-8")
    ex = Ld.load_mgsm_tsv(f)
    assert [e.answer for e in ex] == ["3", "1,250"] and ex[0].problem.startswith('Ella dijo "hola')
    f.write_text("q1\t3\nq2\tthree\n")
    with pytest.raises(DataError, match=r"mgsm_es.tsv:2: field 'answer': expected a number"):
        Ld.load_mgsm_tsv(f)
    f.write_text("q1\t3\textra\n")
    with pytest.raises(DataError, match=r":1: expected 2 tab-separated fields"):
        Ld.load_mgsm_tsv(f)
    with pytest.raises(DataError, match="cannot infer the language"):
        Ld.load_mgsm_tsv(tmp_path / "other.tsv")


def test_afrimgsm_folder_layout(tmp_path):
    header = "question\tanswer\tanswer_number\tequation_solution\n"
    for lang, q in (("hau", "Tambaya"), ("yor", "Ibeere"), ("eng", "Question")):
        (tmp_path / lang).mkdir()
        (tmp_path / lang / "test.tsv").write_text(header + f'{q} "1"\t\t18\t16-3-4=9\n{q} 2\t\t1,000\t\n')
    data = Ld.load_afrimgsm(tmp_path)
    assert set(data) == {"hau", "yor", "eng"} and [e.answer for e in data["hau"]] == ["18", "1,000"]
    assert data["hau"][0].meta["row"] == 2  # header is line 1
    assert set(Ld.load_afrimgsm(tmp_path, ["hau"])) == {"hau"}
    (tmp_path / "yor" / "test.tsv").write_text(header + "q\t\tx\t\n")
    with pytest.raises(DataError, match=r"yor/test.tsv:2: field 'answer_number'"):
        Ld.load_afrimgsm(tmp_path)
    (tmp_path / "yor" / "test.tsv").write_text("question\tanswer\n")
    with pytest.raises(DataError, match="answer_number.*missing column"):
        Ld.load_afrimgsm(tmp_path, ["yor"])
    with pytest.raises(DataError, match="file not found"):
        Ld.load_afrimgsm(tmp_path, ["zul"])


def test_gsm8k_aime_sciknoweval_tooluse_errors(tmp_path):
    f = tmp_path / "g.jsonl"
    _write_jsonl(f, [{"question": "q", "answer": "no final line"}])
    with pytest.raises(DataError, match="'answer': no '#### <number>'"):
        Ld.load_gsm8k(f)
    _write_jsonl(f, [{"problem": "q", "answer": "x25"}])
    with pytest.raises(DataError, match="'answer': expected an integer"):
        Ld.load_aime(f)
    f = tmp_path / "sciknoweval_chemistry_test.json"
    _write_jsonl(f, [{"prompt": "p", "answer": "B"}, {"prompt": "p", "answer": "b)"}])
    with pytest.raises(DataError, match=r":2: field 'answer': expected one capital letter"):
        Ld.load_sciknoweval(f)
    g = tmp_path / "mcq.jsonl"
    _write_jsonl(g, [{"prompt": "p", "answer": "B"}])
    with pytest.raises(DataError, match="'domain'"):
        Ld.load_sciknoweval(g)
    assert Ld.load_sciknoweval(g, domain="bio")[0].domain == "bio"
    t = tmp_path / "t.jsonl"
    _write_jsonl(t, [{"prompt": "p", "answer": json.dumps([{"Action": "a", "Action_Input": "{bad"}])}])
    with pytest.raises(DataError, match=r"answer\[0\].Action_Input"):
        Ld.load_tooluse(t)


# ------------------------------------------------------------------------- generated junk rows

_json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)
_field_value = st.one_of(st.text(max_size=10), _json_value)
_row = st.fixed_dictionaries({}, optional={k: _field_value for k in (
    "problem", "solution", "problem_swa", "problem_swa_ok", "answer", "question", "prompt", "system", "domain")})
_line = st.one_of(_row.map(lambda r: json.dumps(r)), st.text(max_size=20).filter(lambda s: "\n" not in s and "\r" not in s))

LOADERS = {
    "copsd": (lambda p: Ld.load_copsd_training(p, "swa"), "j.jsonl"),
    "gsm8k": (Ld.load_gsm8k, "g.jsonl"),
    "aime": (Ld.load_aime, "a.jsonl"),
    "ske": (Ld.load_sciknoweval, "sciknoweval_bio_test.json"),
    "tool": (Ld.load_tooluse, "t.jsonl"),
}


@pytest.mark.parametrize("name", sorted(LOADERS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, min_size=1, max_size=5))
def test_junk_jsonl_rows_raise_dataerror_or_load_every_row(tmp_path, name, lines):
    fn, fname = LOADERS[name]
    path = tmp_path / fname
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    num_rows = sum(1 for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())
    try:
        ex = fn(path)
    except DataError as e:
        assert fname in str(e) and e.reason, str(e)
        return
    dropped_by_filter = sum(1 for ln in lines if '"problem_swa_ok": false' in ln) if name == "copsd" else 0
    assert len(ex) == num_rows - dropped_by_filter  # no silent drop


# No surrogates (category Cs): they cannot be written as UTF-8 at all, so they are no test of the loader
# (one CI run drew '\ud800' and failed in write_text).
_tsv_char = st.characters(blacklist_categories=("Cs",),
                          blacklist_characters="\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(st.text(alphabet=_tsv_char, max_size=8), min_size=0, max_size=3), min_size=1, max_size=5))
def test_junk_tsv_rows(tmp_path, rows):
    path = tmp_path / "mgsm_sw.tsv"
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    num_rows = sum(1 for r in rows if any(x.strip() for x in r))
    try:
        ex = Ld.load_mgsm_tsv(path)
    except DataError as e:
        assert "mgsm_sw.tsv:" in str(e) and e.reason
        return
    assert len(ex) == num_rows
