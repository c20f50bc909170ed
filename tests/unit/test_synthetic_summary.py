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
