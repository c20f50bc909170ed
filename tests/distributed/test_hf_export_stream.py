"""The streamed HF export (checkpoint/hf_export.py) of a TP=2 and a PP=2 model: several small shards, an
index, every tensor equal to the source HF checkpoint the model was loaded from (fp32: exact), and the
folder loads with transformers. Real megatron-core models over gloo; untied (qwen3) and tied (llama) heads."""
import pytest
import torch

from megatron_copsd.testing.multiproc import run_distributed

pytestmark = pytest.mark.distributed


def _worker(rank, world_size, cases, out_root):
    from megatron_copsd.checkpoint.convert import load_hf_into_model
    from megatron_copsd.checkpoint.hf_export import export_hf_streaming
    from megatron_copsd.megatron.dist import destroy_distributed, init_distributed
    from megatron_copsd.megatron.model_provider import build_gpt_model, load_hf_config

    outs = []
    for hf_dir, tp, pp in cases:
        try:
            init_distributed(tp, pp)
            cfg = load_hf_config(hf_dir)
            model = build_gpt_model(cfg)
            load_hf_into_model(model, hf_dir, cfg)
            out = f"{out_root}/{hf_dir.rsplit('/', 1)[-1]}-tp{tp}pp{pp}"
            export_hf_streaming(model, cfg, out, tokenizer_dir=None, max_shard_bytes=24_000)
            outs.append(out)
        finally:
            destroy_distributed()
    return outs


def test_streamed_export_equals_source(tmp_path):
    import transformers

    from megatron_copsd.checkpoint.convert import SAFE_INDEX, load_hf_state_dict
    from megatron_copsd.testing.tiny import make_tiny_hf_model

    srcs = {}
    for family, tied in (("qwen3", False), ("llama", True)):
        d = tmp_path / family
        make_tiny_hf_model(d, family, tie_word_embeddings=tied)
        srcs[str(d)] = load_hf_state_dict(d)
    cases = [(d, tp, pp) for d in srcs for tp, pp in ((2, 1), (1, 2))]
    outs = run_distributed(_worker, 2, args=(cases, str(tmp_path / "out")), timeout=600)[0]
    for (src, tp, pp), out in zip(cases, outs):
        shards = sorted(p.name for p in (tmp_path / "out").glob(f"{out.rsplit('/', 1)[-1]}/*.safetensors"))
        assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
        assert (tmp_path / "out" / out.rsplit("/", 1)[-1] / SAFE_INDEX).is_file()
        got = load_hf_state_dict(out)
        assert sorted(got) == sorted(srcs[src]), (out, sorted(set(got) ^ set(srcs[src])))
        for name, t in srcs[src].items():
            assert torch.equal(got[name], t), (out, name)
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        sd = model.state_dict()
        for name, t in srcs[src].items():
            assert torch.equal(sd[name], t), (out, name)
        print(f"{out.rsplit('/', 1)[-1]}: {len(shards)} shards, {len(got)} tensors equal to the source")
