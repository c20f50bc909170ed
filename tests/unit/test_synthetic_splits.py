"""The benchmark's eval and dev sets: sizes, determinism, and disjointness from training and each other."""
from megatron_copsd.synthetic.corpus import benchmark_splits, build_corpus, examples_of, training_signatures
from megatron_copsd.synthetic.generator import split_of
from megatron_copsd.synthetic.presets import MODES


def test_eval_and_dev_are_disjoint_from_training_and_each_other():
    mode = MODES["quick"]
    spec = mode.base.corpus
    evals, dev = benchmark_splits(spec, mode.num_eval, mode.num_dev)
    assert len(evals) == mode.num_eval >= 500 and len(dev) == mode.num_dev > 0
    ev, dv = {p.signature() for p in evals}, {p.signature() for p in dev}
    assert len(ev) == len(evals) and len(dv) == len(dev)  # distinct problems
    trained = training_signatures(build_corpus(spec))  # pretraining pools and the RL pool
    assert not ev & trained and not dv & trained and not ev & dv
    # eval comes from the held-out split; dev from the training distribution (the train split)
    assert all(split_of(p, 0.2) == "eval" for p in evals) and all(split_of(p, 0.2) == "train" for p in dev)
    # deterministic, and the same problems in every language
    again = benchmark_splits(spec, mode.num_eval, mode.num_dev)
    assert [p.signature() for p in again[0]] == [p.signature() for p in evals]
    rows = examples_of(evals[:3], ("eng", "qge", "qva"), "eval")
    assert [r["lang"] for r in rows] == ["eng"] * 3 + ["qge"] * 3 + ["qva"] * 3
    assert len({r["id"].rsplit("-", 1)[0] for r in rows}) == 3 and all(r["answer"] for r in rows)
