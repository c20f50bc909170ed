"""Bad inputs to conversion fail loudly, naming the tensor/file, and leave no output behind; the CLI
round-trips HF -> Megatron files -> HF bit-exactly; sharded safetensors with index load back."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_copsd.checkpoint.cli import main as convert_main
from megatron_copsd.checkpoint.convert import hf_to_megatron, load_hf_state_dict, save_hf_checkpoint
from megatron_copsd.testing.tiny import make_tiny_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_tiny_hf_model(d, "qwen3")
    (d / "tokenizer_config.json").write_text("{}")
    return d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _cli_fails(args, out, capsys, match):
    rc = convert_main(args + ["--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_cli_roundtrip_bit_exact(hf_dir, tmp_path, capsys):
    mg, back = tmp_path / "mg", tmp_path / "back"
    assert convert_main(["hf-to-megatron", "--hf-dir", str(hf_dir), "--out", str(mg), "--tp", "2", "--pp", "2",
                         "--no-progress"]) == 0
    assert sorted(p.name for p in mg.iterdir() if p.is_dir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert convert_main(["megatron-to-hf", "--megatron-dir", str(mg), "--out", str(back), "--tokenizer-dir",
                         str(hf_dir), "--no-progress"]) == 0
    a, b = load_hf_state_dict(hf_dir), load_hf_state_dict(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (back / "tokenizer_config.json").is_file()
    assert json.loads((back / "config.json").read_text())["model_type"] == "qwen3"


def test_unsupported_model_type(tmp_path, capsys):
    import transformers

    src = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(src)
    out = tmp_path / "out"
    _cli_fails(["hf-to-megatron", "--hf-dir", str(src), "--out", str(out)], out, capsys, "unsupported model_type 'gpt2'")


def test_missing_tensor_is_named(hf_dir, tmp_path, capsys):
    src = _copy(hf_dir, tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    _cli_fails(["hf-to-megatron", "--hf-dir", str(src), "--out", str(out), "--tp", "2"], out, capsys,
               "missing tensor model.layers.1.mlp.up_proj.weight")


def test_shape_mismatch_is_named(hf_dir, tmp_path, capsys):
    src = _copy(hf_dir, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the weights were saved with 112
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _cli_fails(["hf-to-megatron", "--hf-dir", str(src), "--out", str(out)], out, capsys,
               "model.layers.0.mlp.gate_proj.weight has shape (112, 64), config expects (96, 64)")


def test_corrupt_safetensors_names_file(hf_dir, tmp_path, capsys):
    src = _copy(hf_dir, tmp_path / "src")
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _cli_fails(["hf-to-megatron", "--hf-dir", str(src), "--out", str(out)], out, capsys, str(path))


def test_existing_output_is_refused(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    rc = convert_main(["hf-to-megatron", "--hf-dir", str(hf_dir), "--out", str(out), "--no-progress"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_unexpected_tensor_and_bad_tp(hf_dir):
    state = load_hf_state_dict(hf_dir)
    cfg = make_tiny_hf_model(None, "qwen3").config
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.self_attn.o_proj.bias"):
        hf_to_megatron({**state, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, cfg)
    with pytest.raises(ValueError, match="tp_size=4"):
        hf_to_megatron(state, cfg, tp_size=4)


def test_sharded_save_with_index_and_failed_save_leaves_nothing(hf_dir, tmp_path):
    state = load_hf_state_dict(hf_dir)
    cfg = make_tiny_hf_model(None, "qwen3").config
    out = save_hf_checkpoint(state, cfg, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = load_hf_state_dict(out)
    assert all(torch.equal(back[k], state[k]) for k in state)
    broken = dict(state)
    broken.pop("model.norm.weight")
    with pytest.raises(ValueError, match="missing tensor model.norm.weight"):
        save_hf_checkpoint(broken, cfg, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    # A shard listed in the index but absent is named.
    first = sorted(set(index["weight_map"].values()))[0]
    (out / first).unlink()
    with pytest.raises(ValueError, match=first):
        load_hf_state_dict(out)
