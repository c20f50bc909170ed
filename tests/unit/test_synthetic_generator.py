"""The synthetic benchmark's problem generator and constructed languages."""
from __future__ import annotations

import re
import unicodedata

import pytest

from megatron_copsd.synthetic import generator as G
from megatron_copsd.synthetic import languages as L

CFG_HARD = G.GeneratorConfig(min_steps=2, max_steps=4, max_value=20, ops=("add", "sub", "mul"), max_result=200)


def _solve_from_english(text: str) -> int:
    """Independent re-derivation of the answer: parses the *English problem text* with regexes."""
    m = re.match(r"(\w+) has (\d+) (\w+)\.", text)
    assert m, text
    value = int(m.group(2))
    for sentence in re.findall(r"[^.?]+[.?]", text[m.end():]):
        s = sentence.strip()
        if mm := re.search(r"(?:buys|finds) (\d+) more", s):
            value += int(mm.group(1))
        elif mm := re.search(r"(?:gives|loses) (\d+) ", s):
            value -= int(mm.group(1))
        elif mm := re.search(r"becomes (\d+) times as large", s):
            value *= int(mm.group(1))
        else:
            assert s.startswith("How many"), s
    return value


@pytest.mark.parametrize("cfg", [G.GeneratorConfig(), CFG_HARD])
def test_deterministic_and_seed_dependent(cfg):
    a = G.generate_problems(3, 50, "train", cfg)
    b = G.generate_problems(3, 50, "train", cfg)
    c = G.generate_problems(4, 50, "train", cfg)
    assert a == b
    assert [p.signature() for p in a] != [p.signature() for p in c]
    assert [G.render(p, "qge") for p in a] == [G.render(p, "qge") for p in b]


@pytest.mark.parametrize("cfg", [G.GeneratorConfig(), CFG_HARD])
def test_answers_recomputed_independently(cfg):
    for p in G.generate_problems(0, 200, "train", cfg) + G.generate_problems(0, 100, "eval", cfg):
        problem_en, solution_en = G.render(p, "eng")
        expected = _solve_from_english(problem_en)
        assert p.answer == expected
        # The solution's equations are each arithmetically right and chain to the boxed answer.
        for lhs, op, rhs, res in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", solution_en):
            assert eval(f"{lhs}{op}{rhs}") == int(res)
        assert solution_en.endswith(f"\\boxed{{{expected}}}.")
        assert len(p.steps) in range(cfg.min_steps, cfg.max_steps + 1)
        assert all(0 <= c <= cfg.max_result for c in p.counts())


def test_splits_disjoint_by_construction():
    train = G.generate_problems(0, 1500, "train")
    evals = G.generate_problems(1, 300, "eval")  # a different seed still cannot collide
    assert not {p.signature() for p in train} & {p.signature() for p in evals}
    assert len({p.signature() for p in train}) == 1500  # distinct within a split
    assert all(G.split_of(p, 0.2) == "eval" for p in evals)
    extra = G.generate_problems(0, 100, "train", exclude=frozenset(p.signature() for p in train))
    assert not {p.signature() for p in extra} & {p.signature() for p in train}


def test_difficulty_knobs_and_errors():
    probs = G.generate_problems(0, 100, "train", G.GeneratorConfig(min_steps=3, max_steps=3, max_value=5))
    assert all(len(p.steps) == 3 for p in probs)
    assert all(s.amount <= 5 for p in probs for s in p.steps)
    with pytest.raises(ValueError, match="min_steps"):
        G.GeneratorConfig(min_steps=0)
    with pytest.raises(ValueError, match="ops"):
        G.GeneratorConfig(ops=("div",))
    with pytest.raises(ValueError, match="distinct"):
        G.generate_problems(0, 1000, "eval", G.GeneratorConfig(min_steps=1, max_steps=1, max_value=3))


@pytest.mark.parametrize("code,lo,hi,script", [("qge", 0x1200, 0x137F, "ETHIOPIC"), ("qva", 0xA500, 0xA63F, "VAI")])
def test_synthetic_scripts_in_their_unicode_blocks(code, lo, hi, script):
    for p in G.generate_problems(0, 30, "train", CFG_HARD):
        problem, solution = G.render(p, code)
        for text in (problem, solution, L.instruction(code)):
            letters = [ch for ch in text if ch.isalpha() and ch not in "boxed"]
            assert letters, text
            for ch in letters:
                assert lo <= ord(ch) <= hi, (ch, hex(ord(ch)))
                assert unicodedata.name(ch).startswith(script)
            assert not re.search(r"[A-Za-z]", text.replace("\\boxed", ""))
        # Digits and the boxed answer survive translation, so the answer stays checkable.
        assert f"\\boxed{{{p.answer}}}" in solution
        assert re.findall(r"\d+", problem) == re.findall(r"\d+", G.render(p, "eng")[0])


def test_lexicon_is_injective_on_template_words():
    words = set()
    for p in G.generate_problems(0, 300, "train", CFG_HARD):
        words |= set(re.findall(r"[A-Za-z]+", " ".join(G.render(p, "eng"))))
    words |= set(re.findall(r"[A-Za-z]+", L.INSTRUCTION_EN))
    words = {w.lower() for w in words} - {"boxed"}
    for code in L.SYNTHETIC_LANGUAGES:
        mapped = {L.pseudo_word(w, code) for w in words}
        assert len(mapped) == len(words), code
    assert L.pseudo_word("apples", "qge") != L.pseudo_word("apples", "qva")
    assert L.get_synthetic_language("syn_geez").code == "qge"
    with pytest.raises(ValueError, match="unknown synthetic language"):
        L.get_synthetic_language("xx")


def test_example_record_fields():
    p = G.generate_problems(0, 1, "eval")[0]
    ex = G.to_example(p, "qva", "eval")
    assert set(ex) >= {"id", "lang", "problem", "answer", "problem_en", "solution_en", "domain", "meta"}
    assert ex["answer"] == str(p.answer) and ex["lang"] == "qva"
    assert ex["problem_en"] == G.render(p, "eng")[0]


def test_corpus_pools_disjoint_and_loadable(tmp_path):
    from megatron_copsd.data.loaders import load_copsd_training
    from megatron_copsd.synthetic import corpus as C
    from megatron_copsd.synthetic.languages import register_synthetic_languages

    register_synthetic_languages()
    spec = C.CorpusSpec(num_english=200, num_parallel=30, num_translation=30, num_target=5, num_rl=20, num_eval=10)
    c = C.build_corpus(spec)
    pools = [c.english, c.rl, c.eval] + [ps for d in (c.parallel, c.translation, c.target) for ps in d.values()]
    sigs = [p.signature() for ps in pools for p in ps]
    assert len(sigs) == len(set(sigs))  # no problem in two pools
    assert all(G.split_of(p, 0.2) == "eval" for p in c.eval)
    assert not any(G.split_of(p, 0.2) == "eval" for ps in pools[:1] + pools[3:] for p in ps)
    path = C.write_jsonl(C.rl_rows(c), tmp_path / "rl.jsonl")
    for code in ("qge", "qva"):
        exs = load_copsd_training(path, code)
        assert len(exs) == 20 and exs[0].lang == code
        assert L.in_block(exs[0].problem, code) and exs[0].problem_en.isascii()
        assert exs[0].answer == str(c.rl[0].answer)
    kinds = {d["kind"] for d in C.pretrain_documents(c)}
    assert kinds == {"student", "teacher", "chat"}
