"""Fair tuning: the same grid size per method, the dev score decides (ties: the earlier point), the chosen
settings reach the trainer config."""
from pathlib import Path

import pytest

from megatron_copsd.config import config_from_dict
from megatron_copsd.synthetic.presets import METHODS, MODES
from megatron_copsd.synthetic.run import objective_settings, trainer_config
from megatron_copsd.synthetic.tuning import LR_GRID, choose, grid, tune, tuning_table


def test_every_method_gets_the_same_budget_and_valid_settings():
    sizes = {m: len(grid(m)) for m in METHODS}
    assert set(sizes.values()) == {len(LR_GRID) * 2}
    for m in METHODS:
        assert sorted({g["optim.lr"] for g in grid(m)}) == sorted(LR_GRID)
        for overrides in grid(m):  # every grid point is a valid trainer config
            cfg = config_from_dict(trainer_config(MODES["quick"], m, 0, Path("b"), Path("r"), overrides))
            assert cfg.optim.lr == overrides["optim.lr"] and cfg.objective.name == m
    with pytest.raises(ValueError, match="no tuning knob"):
        grid("sft")


def test_tune_chooses_on_dev_scores_with_deterministic_ties():
    assert choose([({"a": 1}, 0.5), ({"a": 2}, 0.7), ({"a": 3}, 0.7)]) == ({"a": 2}, 0.7)
    trained, scored = [], []

    def train(method, overrides):
        trained.append((method, overrides))
        return (method, overrides["optim.lr"])

    def dev_score(result, method, overrides):
        scored.append(result)
        # copsd peaks at lr 1e-4 with clip 0.05; grpo is flat (tie: the first grid point wins)
        if method == "copsd":
            return 0.9 if (overrides["optim.lr"], overrides["objective.token_clip"]) == (1e-4, 0.05) else 0.4
        return 0.5

    res = tune(["copsd", "grpo"], train=train, dev_score=dev_score, log=lambda s: None)
    assert len(trained) == len(scored) == 12
    assert res["copsd"]["chosen"] == {"optim.lr": 1e-4, "objective.token_clip": 0.05} and res["copsd"]["dev_score"] == 0.9
    assert res["grpo"]["chosen"] == grid("grpo")[0]
    # the chosen settings reach the trainer config and the summary's settings table
    cfg = config_from_dict(trainer_config(MODES["quick"], "copsd", 0, Path("b"), Path("r"), res["copsd"]["chosen"]))
    assert cfg.optim.lr == 1e-4 and cfg.objective.token_clip == 0.05
    assert objective_settings(MODES["quick"], "copsd", res["copsd"]["chosen"])["token_clip"] == 0.05
    md = "\n".join(tuning_table(res))
    assert "| copsd | optim.lr=0.0001, objective.token_clip=0.05 | 0.900 | yes |" in md
    assert md.count("| yes |") == 2
