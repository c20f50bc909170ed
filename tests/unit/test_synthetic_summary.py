"""The benchmark summary states the objective settings each method ran with (as the trainer resolves them)."""
from megatron_copsd.synthetic.presets import MODES
from megatron_copsd.synthetic.run import objective_settings
from megatron_copsd.synthetic.summary import settings_table


def test_objective_settings_are_the_trainer_resolved_ones():
    quick = MODES["quick"]
    copsd = objective_settings(quick, "copsd")
    # loss temperature `auto` resolves to the rollout temperature, as in the trainer
    assert copsd["loss_temperature"] == copsd["rollout_temperature"] == quick.train.temperature
    assert copsd["divergence"] == quick.train.divergence and copsd["teacher"] == quick.train.teacher
    assert copsd["lr"] == quick.train.lr and copsd["samples_per_prompt"] == quick.train.n
    grpo = objective_settings(quick, "grpo")
    assert "loss_temperature" not in grpo and grpo["ratio_clip"] == "[0.8, 1.2]"
    sk = objective_settings(quick, "sampled_kl")
    assert sk["loss_temperature"] == quick.train.temperature and "divergence" not in sk

    md = "\n".join(settings_table({m: objective_settings(quick, m) for m in quick.methods}))
    assert "## Objective settings per method" in md
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in md.splitlines() if line.startswith("| grpo |"))
    cells = dict(zip(cols, [c.strip() for c in row.strip("|").split("|")]))
    assert cells["loss temperature"] == "-" and cells["rollout temperature"] == f"{quick.train.temperature:g}"
    row = next(line for line in md.splitlines() if line.startswith("| copsd |"))
    cells = dict(zip(cols, [c.strip() for c in row.strip("|").split("|")]))
    assert cells["token clip"] == "none" and cells["loss temperature"] == f"{quick.train.temperature:g}"
    assert settings_table({}) == []


def _recs(label, lang, correct, response="ሀሁ \\boxed{3}"):
    from megatron_copsd.eval.metrics import ScoredGeneration

    return [ScoredGeneration(label, lang, "math", f"synth-eval-{i}", 0, True, response, "3", bool(c), True, 4)
            for i, c in enumerate(correct)]


def test_summary_intervals_verdict_script_and_curves(tmp_path):
    import json

    from megatron_copsd.eval.metrics import compute_metrics
    from megatron_copsd.synthetic.analysis import latin_share
    from megatron_copsd.synthetic.summary import write_summary

    n = 300
    recs = []
    for lang in ("eng", "qge", "qva"):
        recs += _recs("base", lang, [i % 3 == 0 for i in range(n)])
        for s in range(3):
            recs += _recs(f"copsd-s{s}", lang, [i % 3 != 2 for i in range(n)])  # 2/3 vs grpo's 1/3
            # GRPO answers qge in English: counted by the script metric
            recs += _recs(f"grpo-s{s}", lang, [(i + s) % 3 == 0 for i in range(n)],
                          response="Ana has 3 apples. \\boxed{3}" if lang == "qge" else "ሀሁ \\boxed{3}")
    runs = {}
    for label, accs in (("copsd-s0", [0.2, 0.4, 0.6]), ("grpo-s0", [0.1, 0.1, 0.2])):
        d = tmp_path / "runs" / label
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "accuracy": a, "zero_adv_share": 0.5})
                                                 + "\n" for i, a in enumerate(accs)))
        runs[label] = d
    path = write_summary(compute_metrics(recs), tmp_path, target_langs=("qge", "qva"), info={"mode": "test", "num_eval": n},
                         report_files={}, records=recs, run_dirs=runs, num_resamples=2000)
    md = path.read_text()
    verdict = md.split("**Verdict:** ")[1].splitlines()[0]
    assert verdict.startswith("copsd wins on the target languages (pooled): copsd - grpo = +0.333")
    assert "excludes 0" in verdict
    assert "## Paired differences (a - b) with 95% intervals" in md and "| copsd | grpo | targets |" in md
    js = json.loads((tmp_path / "summary.json").read_text())
    row = next(r for r in js["comparisons"] if (r["a"], r["b"], r["lang"]) == ("copsd", "grpo", "qge"))
    assert row["winner"] == "copsd" and row["low"] > 0 and row["num_seeds"] == 3 and row["num_problems"] == n
    script = md.split("## Answer script")[1].split("##")[0]
    assert "| qge | 0.000 | 0.000 | 1.000 |" in script and "| qva | 0.000 | 0.000 | 0.000 |" in script
    assert latin_share("Ana \\boxed{3}") == 1.0 and latin_share("ሀሁ \\boxed{3}") == 0.0 and latin_share("42") is None
    assert "| copsd | 0.200 | 0.600 | 0.500 |" in md
    assert (tmp_path / "learning_curves.png").is_file() and (tmp_path / "zero_advantage_share.png").is_file()


def test_verdict_names_no_winner_when_the_interval_contains_zero(tmp_path):
    from megatron_copsd.eval.metrics import compute_metrics
    from megatron_copsd.synthetic.summary import write_summary

    recs = []
    for lang in ("qge", "qva"):
        recs += _recs("copsd-s0", lang, [i % 2 == 0 for i in range(200)])
        recs += _recs("grpo-s0", lang, [i % 2 == 1 for i in range(200)])
    md = write_summary(compute_metrics(recs), tmp_path, target_langs=("qge", "qva"), info={"mode": "test"},
                       report_files={}, records=recs, num_resamples=2000).read_text()
    verdict = md.split("**Verdict:** ")[1].splitlines()[0]
    assert verdict.startswith("No winner on the target languages (pooled)") and "contains 0" in verdict
    assert "one seed" in verdict
