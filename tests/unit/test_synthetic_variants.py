"""The benchmark's named method variants (COPSD with and without the reference's token clip, the divergence
ablation), the harder regime, the per-method pass@k / maj@k plots and the resume of finished runs."""
import json
from pathlib import Path

import pytest

from megatron_copsd.config import config_from_dict
from megatron_copsd.synthetic.presets import ABLATION_METHODS, METHOD_SPECS, METHODS, MODES
from megatron_copsd.synthetic.run import mode_from_config, objective_settings, parse_args, trainer_config
from megatron_copsd.synthetic.summary import settings_table


def _cfg(method, mode="quick", overrides=None):
    return config_from_dict(trainer_config(MODES[mode], method, 0, Path("b"), Path("r"), overrides))


def test_method_variants_resolve_to_their_objective_settings():
    quick = MODES["quick"]
    ref = _cfg("copsd_ref")
    assert ref.objective.name == "copsd" and ref.objective.token_clip == 0.05
    assert ref.objective.token_clip_mode == "entry"
    assert ref.objective.temperature == ref.rollout.temperature == quick.train.temperature  # `auto` resolved
    main = _cfg("copsd")
    assert main.objective.token_clip is None and main.objective.temperature == quick.train.temperature
    assert main.objective.divergence == "forward_kl"
    assert _cfg("copsd_rkl").objective.divergence == "reverse_kl"
    jsd = _cfg("copsd_jsd").objective
    assert jsd.divergence == "jsd" and jsd.beta == 0.5 and jsd.token_clip is None
    assert _cfg("sampled_kl").objective.name == "sampled_kl" and _cfg("grpo").objective.name == "grpo"
    # tuning overrides come last: they can switch the clip of any COPSD variant
    assert _cfg("copsd", overrides={"objective.token_clip": 0.05}).objective.token_clip == 0.05
    # labels are `<method>-s<seed>`: no method name may contain '-s'
    assert all("-s" not in m for m in METHOD_SPECS) and set(METHODS) | set(ABLATION_METHODS) <= set(METHOD_SPECS)
    with pytest.raises(ValueError, match="unknown benchmark method 'sft'"):
        trainer_config(quick, "sft", 0, Path("b"), Path("r"))


def test_settings_table_states_which_methods_run_the_reference_settings():
    quick = MODES["quick"]
    md = "\n".join(settings_table({m: objective_settings(quick, m) for m in ("copsd", "copsd_ref", "grpo")}))
    row = next(line for line in md.splitlines() if line.startswith("| copsd_ref |"))
    assert "| 0.05 |" in row and "| entry |" in row
    assert "loss temperature = sampling temperature): copsd_ref." in md
    assert "Departures from the reference settings: copsd (" in md


def test_ablation_flag_and_config_methods():
    args = parse_args(["--out", "x", "--ablation"])
    assert args.ablation and ABLATION_METHODS[:4] == ("copsd", "copsd_rkl", "copsd_jsd", "sampled_kl")
    mode = mode_from_config(None, "quick")
    assert mode.methods == METHODS
    with pytest.raises(SystemExit):  # argparse rejects an unknown method
        parse_args(["--out", "x", "--methods", "sft"])


def test_hard_regime_is_harder_than_quick():
    from megatron_copsd.synthetic.generator import generate_problems

    quick, hard = MODES["quick"], MODES["hard"]
    qg, hg = quick.base.corpus.gen, hard.base.corpus.gen
    assert "mul" in hg.ops and "mul" not in qg.ops
    assert hg.max_steps > qg.max_steps and hg.max_value > qg.max_value and hg.max_result > qg.max_result
    probs = generate_problems(3, 200, "train", hg)
    assert any(s.op == "mul" for p in probs for s in p.steps)
    assert min(len(p.steps) for p in probs) >= 2
    assert hard.base != quick.base  # its own base-model cache entry
    assert hard.train.max_new_tokens > quick.train.max_new_tokens and hard.eval.max_new_tokens > quick.eval.max_new_tokens
    cfg = _cfg("grpo", "hard")
    assert cfg.rollout.max_new_tokens == hard.train.max_new_tokens


def _recs(label, lang, correct, samples=()):
    from megatron_copsd.eval.metrics import ScoredGeneration

    out = [ScoredGeneration(label, lang, "math", f"synth-eval-{i}", 0, True, "ሀ \\boxed{3}", "3", bool(c), True, 4)
           for i, c in enumerate(correct)]
    for j, row in enumerate(samples):  # row: per-problem correctness of sample j
        out += [ScoredGeneration(label, lang, "math", f"synth-eval-{i}", j + 1, False, "ሀ \\boxed{3}", "3", bool(c),
                                 True, 4) for i, c in enumerate(row)]
    return out


def _ablation_records(n=200):
    recs = []
    for lang in ("qge", "qva"):
        for s in range(2):
            recs += _recs(f"copsd-s{s}", lang, [i % 2 == 0 for i in range(n)],
                          samples=[[i % 2 == 0 for i in range(n)], [i % 4 == 1 for i in range(n)]])
            recs += _recs(f"copsd_rkl-s{s}", lang, [i % 2 == 0 for i in range(n)])  # the same: a tie
            recs += _recs(f"copsd_jsd-s{s}", lang, [i % 10 == 0 for i in range(n)])  # clearly worse
            recs += _recs(f"sampled_kl-s{s}", lang, [i % 2 == 0 for i in range(n)],
                          samples=[[False] * n, [False] * n])
    return recs


def test_ablation_table_orients_each_variant_against_forward_kl():
    from megatron_copsd.eval.stats import compare_methods
    from megatron_copsd.synthetic.summary import ablation_table

    recs = _ablation_records()
    methods = ["copsd", "copsd_rkl", "copsd_jsd", "sampled_kl"]
    settings = {m: objective_settings(MODES["quick"], m) for m in methods}
    settings["copsd_jsd"] = objective_settings(MODES["quick"], "copsd_jsd", {"objective.token_clip": 0.05})
    comparisons = compare_methods(recs, methods, langs=("qge", "qva"), target_langs=("qge", "qva"), num_resamples=200)
    table = "\n".join(ablation_table(comparisons, recs, methods, settings, ("qge", "qva"), num_resamples=200))
    assert table.startswith("## Divergence ablation") and "| copsd | forward_kl | 0.500 [" in table
    jsd = next(line for line in table.splitlines() if line.startswith("| copsd_jsd |"))
    assert "| jsd (beta 0.5), token clip 0.05 (entry) |" in jsd  # a clipped row says so
    assert "| -0.400 |" in jsd and jsd.rstrip().endswith("| copsd |")  # copsd - jsd = 0.4, interval excludes 0
    rkl = next(line for line in table.splitlines() if line.startswith("| copsd_rkl |"))
    assert "| +0.000 |" in rkl and "none (CI contains 0)" in rkl
    assert "| sampled_kl | sampled-token KL |" in table
    # no ablation table when the run has no other COPSD divergence
    assert ablation_table(comparisons, recs, ["copsd", "sampled_kl"], settings, ("qge", "qva")) == []


def test_per_method_at_k_curves_average_seeds():
    """The plots drawn from these curves are checked by the e2e smoke run (tests/e2e/test_synth_bench.py)."""
    from megatron_copsd.eval.metrics import compute_metrics
    from megatron_copsd.synthetic.analysis import at_k_curves

    rows = compute_metrics(_ablation_records(40))
    curves = at_k_curves(rows, "pass")
    pts = {k: v for k, v, _ in curves[("copsd", "qge")]}
    assert pts[1] == pytest.approx(0.375) and pts[2] == pytest.approx(0.75)  # mean c/n; i%2==0 or i%4==1
    assert {k: v for k, v, _ in curves[("sampled_kl", "qva")]}[2] == 0.0
    assert all(n == 2 for _, _, n in curves[("copsd", "qge")])  # two seeds averaged
    assert ("copsd_rkl", "qge") not in curves  # greedy only: no pass@k


def test_resume_reuses_only_an_unchanged_finished_eval(tmp_path):
    from megatron_copsd.synthetic.run import _reuse, _save

    recs = _recs("copsd-s0", "qge", [True, False])
    key = {"eval": {"num_samples": 4}, "trainer_config": {"optim": {"lr": 1e-4}}}
    assert _reuse(tmp_path / "bench_eval", key, print) is None  # nothing saved yet
    _save(tmp_path / "bench_eval", key, recs, seconds={"train copsd-s0": (10.0, 9.0)})
    assert _reuse(tmp_path / "bench_eval", key, print) == recs
    assert json.loads((tmp_path / "bench_eval.json").read_text())["seconds"]["train copsd-s0"] == [10.0, 9.0]
    logs = []
    changed = {**key, "trainer_config": {"optim": {"lr": 3e-4}}}
    assert _reuse(tmp_path / "bench_eval", changed, logs.append) is None and "settings changed" in logs[0]
    (tmp_path / "bench_eval.json").unlink()  # an eval interrupted before its key was written is not reused
    assert _reuse(tmp_path / "bench_eval", key, print) is None


def test_resume_accepts_an_eval_setting_added_later_at_its_default(tmp_path):
    """A run saved before `EvalSettings.task` existed is reused while `task` is at its default ("math"),
    and re-run once it is not."""
    from megatron_copsd.synthetic.run import _reuse, _save

    recs = _recs("copsd-s0", "qge", [True])
    old_key = {"eval": {"num_samples": 8}, "base": "/b"}
    _save(tmp_path / "bench_eval", old_key, recs)
    assert _reuse(tmp_path / "bench_eval", {"eval": {"num_samples": 8, "task": "math"}, "base": "/b"}, print) == recs
    assert _reuse(tmp_path / "bench_eval", {"eval": {"num_samples": 8, "task": "code"}, "base": "/b"}, print) is None
    assert _reuse(tmp_path / "bench_eval", {"eval": {"num_samples": 4, "task": "math"}, "base": "/b"}, print) is None
    assert _reuse(tmp_path / "bench_eval", {"eval": {"num_samples": 8, "nope": 1}, "base": "/b"}, print) is None
