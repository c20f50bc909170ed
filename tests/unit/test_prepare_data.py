"""`copsd prepare-data`: real GSM8K + MGSM rows, a local AfriMGSM folder, and a clear offline error."""
import json
from pathlib import Path

import pytest

from megatron_copsd.data.loaders import load_copsd_training
from megatron_copsd.data.prepare import main

SHARED = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


@pytest.mark.data
def test_gsm8k_mgsm_real(tmp_path):
    if not (SHARED / "mgsm" / "mgsm_sw.tsv").is_file() or not (SHARED / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"real MGSM/GSM8K files not present under {SHARED}")
    out = tmp_path / "copsd.jsonl"
    assert main(["gsm8k-mgsm", "--gsm8k", str(SHARED / "gsm8k/test.jsonl"), "--mgsm-dir", str(SHARED / "mgsm"),
                 "--langs", "sw", "fr", "--out", str(out)]) == 0
    ex = load_copsd_training(out, "swa")
    assert len(ex) == 250 and ex[0].problem.startswith("Bata wa Janet")
    assert ex[0].solution_en.endswith("\\boxed{18}.") and "<<" not in ex[0].solution_en
    assert len(load_copsd_training(out, "fr")) == 250


def _afri(tmp_path, answers_hau=("18", "3")):
    header = "question\tanswer\tanswer_number\tequation_solution\n"
    for lang, qs, ans in (("eng", ["Ducks lay 16 eggs", "A robe takes 2 bolts"], ("18", "3")),
                          ("hau", ["Agwagi 16", "Riga 2"], answers_hau)):
        (tmp_path / "af" / lang).mkdir(parents=True, exist_ok=True)
        (tmp_path / "af" / lang / "test.tsv").write_text(
            header + "".join(f"{q}\t\t{a}\t\n" for q, a in zip(qs, ans)), encoding="utf-8")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "Ducks lay 16 eggs", "answer": "16-3-4=<<16-3-4=9>>9; 9*2=18\n#### 18"})
                   + "\n" + json.dumps({"question": "A robe", "answer": "2+1=3\n#### 3"}) + "\n")
    return tmp_path / "af", gsm


def test_afrimgsm_folder(tmp_path, capsys):
    folder, gsm = _afri(tmp_path)
    out = tmp_path / "afri.json"
    assert main(["afrimgsm", "--folder", str(folder), "--langs", "hau", "--gsm8k", str(gsm), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["problem_hau"] for r in rows] == ["Agwagi 16", "Riga 2"]
    assert rows[0]["solution"] == "16-3-4=9; 9*2=18\nThe final answer is \\boxed{18}."
    # without GSM8K there is no English solution: a clear error, not a row without solution
    assert main(["afrimgsm", "--folder", str(folder), "--langs", "hau", "--out", str(out)]) == 1
    assert "no English solution" in capsys.readouterr().err


def test_misaligned_answers_are_an_error(tmp_path, capsys):
    folder, gsm = _afri(tmp_path, answers_hau=("18", "4"))
    assert main(["afrimgsm", "--folder", str(folder), "--langs", "hau", "--gsm8k", str(gsm),
                 "--out", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err
    assert "hau/test.tsv:3: field 'answer': answers disagree" in err
    assert not (tmp_path / "x.json").exists()


def test_download_offline_gives_clear_error(tmp_path, capsys):
    # a closed local port stands in for "no network": the real HTTP client fails to connect
    rc = main(["download", "--dataset", "masakhane/afrimgsm", "--out", str(tmp_path / "hf"),
               "--endpoint", "http://127.0.0.1:9"])
    assert rc == 1
    assert "needs network access" in capsys.readouterr().err
