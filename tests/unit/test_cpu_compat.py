"""The CPU compatibility layer, exercised in a spawned child so the test process's torch stays pristine."""
from __future__ import annotations

import pytest
import torch

from megatron_copsd.testing.multiproc import run_distributed


def _compat_child(rank, world_size, hf_dir, work_dir, rope_dir, rope_ids):
    import torch

    from megatron_copsd.megatron import cpu_compat

    out = {}
    before = torch.zeros(2).type()
    assert cpu_compat.enable_cpu_compat() is True
    assert cpu_compat.enable_cpu_compat() is True  # idempotent
    out["type_before"] = before
    t = torch.zeros(2, device="cuda")
    out["factory_device"] = str(t.device)
    out["cuda_call"] = str(torch.ones(3).cuda().device)
    out["to_cuda"] = str(torch.ones(3).to("cuda:0").device) + str(torch.ones(3).to(torch.device("cuda")).device)
    out["to_index"] = str(torch.ones(3).to(torch.cuda.current_device()).device)
    out["to_dtype_kept"] = str(torch.ones(3).to(torch.float64).dtype)
    torch.cuda.synchronize()
    out["type_names"] = (torch.zeros(1).type(), torch.zeros(1, dtype=torch.bfloat16).type(),
                         torch.zeros(1, dtype=torch.long).type())
    out["type_cast"] = torch.zeros(1).type(torch.float64).dtype == torch.float64 and \
        torch.zeros(1).type("torch.cuda.HalfTensor").dtype == torch.float16

    # The model-parallel RNG: registered, forks a separate CPU stream and restores the default one.
    from megatron.core import tensor_parallel

    from megatron_copsd.megatron.dist import destroy_distributed, init_distributed

    init_distributed(1, 1, seed=7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    out["rng_registered"] = "model-parallel-rng" in tracker.get_states()
    state = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    out["default_untouched"] = torch.equal(state, torch.get_rng_state())
    with tracker.fork():
        b = torch.rand(4)
    out["fork_advances"] = not torch.equal(a, b)
    init_distributed(1, 1, seed=7)
    with tracker.fork():
        out["fork_reproducible"] = torch.equal(torch.rand(4), a)

    # dist checkpoint CLI round trip (needs the live group; runs single-process).
    from megatron_copsd.checkpoint.cli import main
    from megatron_copsd.checkpoint.convert import load_hf_state_dict

    destroy_distributed()
    assert main(["hf-to-dist", "--hf-dir", hf_dir, "--out", f"{work_dir}/dcp", "--no-progress"]) == 0
    assert main(["dist-to-hf", "--dist-dir", f"{work_dir}/dcp", "--hf-config", hf_dir, "--out",
                 f"{work_dir}/back", "--no-progress"]) == 0
    a_state, b_state = load_hf_state_dict(hf_dir), load_hf_state_dict(f"{work_dir}/back")
    out["dcp_cli_roundtrip"] = sorted(a_state) == sorted(b_state) and all(torch.equal(a_state[k], b_state[k]) for k in a_state)

    # Llama-3 RoPE scaling maps onto megatron-core's rope_scaling (same launch, to save a spawn).
    from megatron_copsd.checkpoint.convert import load_hf_into_model
    from megatron_copsd.megatron.model_provider import build_gpt_model, load_hf_config

    init_distributed(1, 1)
    cfg = load_hf_config(rope_dir)
    model = build_gpt_model(cfg)
    load_hf_into_model(model, rope_dir, cfg)
    model.eval()
    with torch.no_grad():
        pos = torch.arange(rope_ids.shape[1]).unsqueeze(0)
        out["llama3_logits"] = model(rope_ids, pos, None)[..., : cfg.vocab_size].numpy()
    destroy_distributed()

    cpu_compat.disable_cpu_compat()
    out["type_after_disable"] = torch.zeros(1).type()
    out["inactive"] = not cpu_compat.is_active()
    return out


def _llama3_rope_model(path):
    import transformers

    from megatron_copsd.testing.tiny import tiny_hf_config

    cfg = tiny_hf_config("llama", max_position_embeddings=16384)
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def child_results(tmp_path_factory):
    from megatron_copsd.testing.tiny import make_tiny_hf_model

    tmp = tmp_path_factory.mktemp("compat")
    make_tiny_hf_model(tmp / "hf", "llama", tie_word_embeddings=True)
    rope_model = _llama3_rope_model(tmp / "rope")
    ids = torch.randint(0, 301, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = rope_model(ids).logits
    (r,) = run_distributed(_compat_child, 1, args=(str(tmp / "hf"), str(tmp), str(tmp / "rope"), ids), timeout=300)
    return r, ref


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is a no-op with CUDA")
def test_cpu_compat_layer(child_results):
    r, _ = child_results
    assert r["type_before"] == "torch.FloatTensor"
    assert r["factory_device"] == "cpu" and r["cuda_call"] == "cpu" and r["to_cuda"] == "cpucpu"
    assert r["to_index"] == "cpu" and r["to_dtype_kept"] == "torch.float64"
    assert r["type_names"] == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", "torch.cuda.LongTensor")
    assert r["type_cast"]
    assert r["rng_registered"] and r["default_untouched"] and r["fork_advances"] and r["fork_reproducible"]
    assert r["dcp_cli_roundtrip"]
    assert r["type_after_disable"] == "torch.FloatTensor" and r["inactive"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs in the CPU child")
def test_llama3_rope_scaling_logits_match(child_results):
    r, ref = child_results
    # Scaling changes these logits by ~4e-2 (measured), so 1e-4 separates scaled from unscaled RoPE.
    assert (torch.from_numpy(r["llama3_logits"]) - ref).abs().max().item() <= 1e-4
