"""Everything a tiny end-to-end run needs without downloads: a generated data fixture and a tiny model.

    train_path, eval_path = write_fixture(out_dir, langs=["swa"], seed=0)
    hf_dir = materialize_tiny_model(out_dir / "tiny_model", "qwen3", texts, seed=0)

The fixture is one- and two-step arithmetic word problems with English translations and English
reference solutions, in the COPSD training format read by `data.loaders.load_copsd_training`
(`problem`, `solution`, `problem_<lang>`, `answer`). The tiny model gets a SentencePiece tokenizer
trained on the fixture's prompt texts (saved next to the weights, so the folder is a complete model).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

TEMPLATES = {
    # (target-language problem, English problem); {name} {a} {b} {item_*}
    "swa": ("{name} ana {item_sw} {a}. Ananunua {item_sw} {b} zaidi. Ana {item_sw} wangapi sasa?",
            "{name} has {a} {item_en}. She buys {b} more {item_en}. How many {item_en} does she have now?"),
    "yor": ("{name} ni {item_yo} {a}. O ra {item_yo} {b} si. {item_yo} melo ni o ni bayi?",
            "{name} has {a} {item_en}. She buys {b} more {item_en}. How many {item_en} does she have now?"),
}
ITEMS = [("machungwa", "osan", "oranges"), ("vitabu", "iwe", "books"), ("kalamu", "peni", "pens")]
NAMES = ["Amina", "Juma", "Ade", "Bola", "Neema"]


def fixture_rows(num: int, *, langs=("swa",), seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(num):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        name = rng.choice(NAMES)
        sw, yo, en = rng.choice(ITEMS)
        fill = dict(name=name, a=a, b=b, item_sw=sw, item_yo=yo, item_en=en)
        row = {"id": f"fx{seed}-{i}", "answer": str(a + b)}
        row["problem"] = TEMPLATES["swa"][1].format(**fill)
        row["solution"] = f"{name} starts with {a} {en} and buys {b} more. {a} + {b} = {a + b}. \\boxed{{{a + b}}}"
        for lang in langs:
            if lang not in TEMPLATES:
                raise ValueError(f"fixture language {lang!r} not available; choose from {sorted(TEMPLATES)}")
            row[f"problem_{lang}"] = TEMPLATES[lang][0].format(**fill)
        rows.append(row)
    return rows


def _write_jsonl(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def write_fixture(out_dir: str | Path, *, langs=("swa",), seed: int = 0, num_train: int = 64,
                  num_eval: int = 16) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evalp = out_dir / "fixture_train.jsonl", out_dir / "fixture_eval.jsonl"
    _write_jsonl(fixture_rows(num_train, langs=langs, seed=seed), train)
    _write_jsonl(fixture_rows(num_eval, langs=langs, seed=seed + 10_000), evalp)
    return train, evalp


def tokenizer_texts(examples) -> list[str]:
    """Prompt and solution texts of the examples, as the prompts will render them."""
    from megatron_copsd.data.languages import get_language
    from megatron_copsd.data.prompts import copsd_teacher_user_content

    texts = []
    for ex in examples:
        if not ex.problem_en:  # SciKnowEval / ToolUse style rows: the prompt is used as given
            texts.append(f"{ex.meta.get('system') or ''}\n{ex.problem}\n{ex.answer or ''}")
            continue
        lang = get_language(ex.lang)
        texts.append(f"{ex.problem}\n\n{lang.instruction}")
        texts.append(copsd_teacher_user_content(lang, ex.problem, ex.problem_en, ex.solution_en))
        texts.append("assistant\nuser\nsystem\n" + (ex.solution_en or ""))
    return texts


def materialize_tiny_model(out_dir: str | Path, family: str, texts: list[str], *, seed: int = 0,
                           vocab_size: int = 400, **overrides) -> Path:
    """Tokenizer + random tiny HF model in `out_dir` (written to a temp dir and renamed; reused if present)."""
    import shutil
    import tempfile

    from megatron_copsd.data.tokenizer import train_sentencepiece_tokenizer
    from megatron_copsd.testing.tiny import make_tiny_hf_model

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        tok = train_sentencepiece_tokenizer(texts, tmp, vocab_size, byte_fallback=False)
        kwargs = dict(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        kwargs.update(overrides)
        make_tiny_hf_model(tmp, family, seed=seed, **kwargs)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
