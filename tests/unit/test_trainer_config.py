import pytest

from megatron_copsd.config import Config, config_from_dict, load_config
from megatron_copsd.derived_args import (
    megatron_optimizer_kwargs,
    megatron_scheduler_kwargs,
    sglang_launch_args,
)


def test_defaults_validate():
    cfg = Config()
    assert cfg.objective.name == "copsd" and cfg.parallel.tp == 1


def test_yaml_and_overrides_coerce(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1.0e-4\ntrain:\n  steps: 5\nrollout:\n  n: 2\n")
    cfg = load_config(p, ["train.steps=7", "objective.token_clip=0.05", "logging.tensorboard=false",
                          "objective.teacher_top_k=none", "data.langs=[swa, yor]", "optim.clip_grad=1"])
    assert cfg.optim.lr == 1e-4 and cfg.train.steps == 7 and cfg.rollout.n == 2
    assert cfg.objective.token_clip == 0.05 and cfg.logging.tensorboard is False
    assert cfg.objective.teacher_top_k is None and cfg.data.langs == ["swa", "yor"]
    assert isinstance(cfg.optim.clip_grad, float)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.lr=-1", "optim.lr"),
        ("objective.divergence=kl", "objective.divergence"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("parallel.tp=0", "parallel.tp"),
        ("train.steps=abc", "train.steps"),
        ("objective.teacher=frozen", "objective.teacher"),
        ("optim.nope=1", "optim.nope"),
        ("nosection.x=1", "nosection"),
        ("optim=1", "section"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("logging.tensorboard=maybe", "logging.tensorboard"),
    ],
)
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        config_from_dict({}, [override])


def test_unknown_yaml_key_and_cross_checks():
    with pytest.raises(ValueError, match=r"train\.stepz"):
        config_from_dict({"train": {"stepz": 3}})
    with pytest.raises(ValueError, match=r"rollout\.n"):
        config_from_dict({"objective": {"name": "grpo"}, "rollout": {"n": 1}})
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_derived_args():
    import torch
    from megatron.core.optimizer import OptimizerConfig

    cfg = config_from_dict({}, ["optim.lr=1e-3", "optim.clip_grad=0.1", "optim.warmup_steps=2"])
    oc = OptimizerConfig(**megatron_optimizer_kwargs(cfg, params_dtype=torch.float32))
    assert oc.lr == 1e-3 and oc.clip_grad == 0.1 and not oc.bf16
    sk = megatron_scheduler_kwargs(cfg)
    assert sk["lr_warmup_steps"] == 2 and sk["max_lr"] == 1e-3 and sk["init_lr"] == 0.0
    args = sglang_launch_args(cfg, "/m", port=31000)
    assert args[args.index("--port") + 1] == "31000" and "--model-path" in args


@pytest.mark.parametrize("name", ["tiny_cpu_copsd", "tiny_cpu_grpo", "tiny_cpu_sampled_kl", "qwen3_1p7b_copsd",
                                  "qwen3_4b_copsd", "qwen3_8b_copsd", "qwen3_1p7b_grpo", "qwen3_4b_grpo",
                                  "qwen3_8b_grpo"])
def test_example_configs_load(name):
    from pathlib import Path

    from megatron_copsd.data.languages import get_language

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / f"{name}.yaml")
    for lang in cfg.data.langs:
        get_language(lang)
    if name.startswith("qwen3"):
        assert cfg.train.steps == 100 and cfg.rollout.n * cfg.data.prompts_per_step == 32


def test_objective_temperature_auto_follows_rollout():
    import warnings

    from megatron_copsd.config import startup_warnings

    cfg = config_from_dict({"rollout": {"temperature": 1.1}})
    assert cfg.objective.temperature == 1.1 and startup_warnings(cfg) == []  # auto is the default
    for name in ("copsd", "sampled_kl", "rosd", "grpo"):
        c = config_from_dict({"objective": {"name": name, "temperature": "auto"}}, ["rollout.temperature=0.7"])
        assert c.objective.temperature == 0.7 and not startup_warnings(c)
    explicit = config_from_dict({}, ["rollout.temperature=1.1", "objective.temperature=1.0"])
    assert explicit.objective.temperature == 1.0 and isinstance(explicit.objective.temperature, float)
    (msg,) = startup_warnings(explicit)
    assert "objective.temperature (1) differs from rollout.temperature (1.1)" in msg
    (msg,) = startup_warnings(config_from_dict({}, ["objective.name=sampled_kl", "objective.temperature=2"]))
    assert "off-policy" in msg
    (msg,) = startup_warnings(config_from_dict({}, ["objective.name=grpo", "objective.temperature=2"]))
    assert "ignored by objective.name=grpo" in msg
    same = config_from_dict({}, ["rollout.temperature=1.1", "objective.temperature=1.1"])
    assert not startup_warnings(same)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_dict({}, ["objective.temperature=0.5"])  # building a config never warns by itself
    for bad in ("objective.temperature=hot", "objective.temperature=0", "objective.temperature=none"):
        with pytest.raises(ValueError, match=r"objective\.temperature"):
            config_from_dict({}, [bad])
    # a saved (resolved) config reloads to the same numbers
    again = config_from_dict(explicit.to_dict())
    assert again.objective.temperature == 1.0 and again.rollout.temperature == 1.1


def test_reasoning_prefix_field_checks(tmp_path):
    with pytest.raises(ValueError, match=r"data\.reasoning_prefix.*format"):
        config_from_dict({"data": {"reasoning_prefix": True, "format": "tooluse", "task": "tooluse",
                                   "train_path": "x.jsonl"}})
    with pytest.raises(ValueError, match=r"data\.language_overrides"):
        config_from_dict({"data": {"language_overrides": str(tmp_path / "missing.yaml")}})
    assert config_from_dict({}, ["data.reasoning_prefix=true"]).data.reasoning_prefix is True


@pytest.mark.parametrize("size", ["1p7b", "4b", "8b"])
def test_qwen3_copsd_examples_carry_the_reference_settings(size):
    """The settings of cisnlp/COPSD's african_langs_scripts runs (docs/reference_fidelity.md), as loaded."""
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / f"qwen3_{size}_copsd.yaml")
    o, r = cfg.objective, cfg.rollout
    assert (o.name, o.divergence, o.token_clip, o.teacher) == ("copsd", "forward_kl", 0.05, "fixed")
    assert getattr(o, "token_clip_mode", "entry") == "entry"
    assert o.temperature == r.temperature == 1.1 and (r.top_p, r.top_k, r.max_new_tokens) == (0.95, 20, 2048)
    assert cfg.data.reasoning_prefix and (cfg.data.prompts_per_step, r.n) == (32, 1)
    assert (cfg.optim.lr, cfg.optim.clip_grad, cfg.optim.decay_style, cfg.train.steps) == (5e-6, 0.1, "linear", 100)
    from megatron_copsd.data.languages import get_language

    assert all(get_language(lang).reasoning_prefix for lang in cfg.data.langs)  # the prefix can be honoured
