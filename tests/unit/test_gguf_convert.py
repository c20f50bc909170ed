"""`copsd convert gguf-to-hf`: the real SmolLM2-135M-Instruct GGUF -> an fp32 HF folder, cached.

The weights are checked against an independent dequantization of the same GGUF tensors by the `gguf`
package (not through transformers); that transformers' GGUF loader maps every tensor right is what
`test_embedded_engine.py::test_smollm2_greedy_matches_transformers_generate` and the Megatron logits
checks rely on, not proven here.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from megatron_copsd.checkpoint.cli import main as convert_main
from megatron_copsd.checkpoint.gguf import MARKER, default_gguf_path, gguf_to_hf


def test_converted_smollm2_folder(smollm2_hf_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from megatron_copsd.megatron.model_provider import check_supported, load_hf_config

    cfg = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["hidden_size"], cfg["vocab_size"]) == ("llama", 30, 9, 3, 576, 49152)
    assert cfg["tie_word_embeddings"] is True
    check_supported(load_hf_config(smollm2_hf_dir))  # the Megatron side accepts it
    marker = json.loads((smollm2_hf_dir / MARKER).read_text())
    assert marker["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(marker["sha256"]) == 64

    state = load_file(str(smollm2_hf_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values())
    reader = GGUFReader(str(default_gguf_path()))
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                               ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
                               ("output_norm.weight", "model.norm.weight")]:
        t = tensors[gguf_name]
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float().reshape(state[hf_name].shape)
        assert torch.equal(state[hf_name], ref), hf_name

    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 apples."}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"


def test_second_call_is_a_noop(smollm2_hf_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_hf_dir.iterdir()}
    t0 = time.perf_counter()
    assert gguf_to_hf(smollm2_hf_dir) == smollm2_hf_dir
    assert convert_main(["gguf-to-hf", "--out", str(smollm2_hf_dir)]) == 0
    elapsed = time.perf_counter() - t0
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_hf_dir.iterdir()} == before
    assert f"wrote {smollm2_hf_dir}" in capsys.readouterr().out
    print(f"two cached calls: {elapsed:.2f} s")  # hashing 98 MB twice, no transformers load


def test_errors_name_the_file_and_write_nothing(tmp_path, capsys):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ValueError, match=f"file {missing} does not exist"):
        gguf_to_hf(tmp_path / "out", missing)
    assert not (tmp_path / "out").exists()
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    with pytest.raises(ValueError, match=f"{occupied} exists but is not a complete conversion of {fake}"):
        gguf_to_hf(occupied, fake)
    assert convert_main(["gguf-to-hf", "--gguf", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err


def test_unreadable_gguf_is_an_error_naming_it(tmp_path):
    pytest.importorskip("gguf", reason="the `gguf` package reads GGUF files (tools/setup_env.sh installs it)")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs `accelerate`")
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ValueError, match=f"cannot load {fake}"):
        gguf_to_hf(tmp_path / "out", fake)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]  # no temp dir left behind
