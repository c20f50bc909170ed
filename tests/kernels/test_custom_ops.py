"""The fused kernels as torch custom ops: real implementation = the direct path, fake implementation runs
on meta and under FakeTensorMode with the right shapes, and `torch.library.opcheck` accepts the ops.

What this cannot prove: that the fake implementations' workspace equals what the Triton kernels allocate
on a GPU (they mirror the buffers the code allocates: dZ chunk, fp32 gradient buffers, statistics)."""
import pytest
import torch

import copsd_kernels
from copsd_kernels import ops


def _inputs(t=7, h=16, v=40, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(t, h, generator=g, dtype=dtype).to(device)
    ht = torch.randn(t, h, generator=g, dtype=dtype).to(device)
    w = (torch.randn(v, h, generator=g, dtype=dtype) * 0.3).to(device)
    return hs, ht, w


def test_divergence_goes_through_the_op_and_matches_the_reference():
    hs, ht, w = _inputs()
    hs.requires_grad_(True)
    w.requires_grad_(True)
    res = copsd_kernels.fused_linear_divergence(hs, ht, w, divergence="jsd", beta=0.3, token_clip=0.5,
                                                valid_vocab=37, impl="chunked")
    res.loss.backward()
    h2, w2 = hs.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = copsd_kernels.fused_linear_divergence(h2, ht.double(), w2, divergence="jsd", beta=0.3, token_clip=0.5,
                                                valid_vocab=37, impl="reference")
    ref.loss.backward()
    torch.testing.assert_close(res.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.grad.double(), h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w2.grad, rtol=1e-4, atol=1e-6)


def test_divergence_runs_on_meta_with_gradients_of_the_right_shape():
    hs, ht, w = _inputs(device="meta", dtype=torch.bfloat16)
    hs.requires_grad_(True)
    w.requires_grad_(True)
    res = copsd_kernels.fused_linear_divergence(hs, ht, w, token_clip=0.05, valid_vocab=37)
    assert res.loss.shape == () and res.per_token.shape == (7,) and res.loss.is_meta
    res.loss.backward()
    assert hs.grad.shape == hs.shape and hs.grad.dtype == torch.bfloat16
    assert w.grad.shape == w.shape and w.grad.dtype == torch.bfloat16


def test_logprobs_on_meta_and_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    hs, _, w = _inputs(device="meta")
    hs.requires_grad_(True)
    res = copsd_kernels.fused_linear_logprobs(hs, w, torch.zeros(7, dtype=torch.long, device="meta"),
                                              return_entropy=True)
    (res.logprobs.sum() + res.entropy.sum()).backward()
    assert res.logprobs.shape == (7,) and hs.grad.shape == hs.shape
    with FakeTensorMode():
        hs, ht, w = _inputs()
        out = copsd_kernels.fused_linear_divergence(hs, ht, w, divergence="reverse_kl")
        assert out.per_token.shape == (7,)
        lp = copsd_kernels.fused_linear_logprobs(hs, w, torch.zeros(7, dtype=torch.long)).logprobs
        assert lp.shape == (7,) and lp.dtype == torch.float32


def test_logprob_op_autograd_matches_the_direct_path():
    hs, _, w = _inputs(seed=3)
    tgt = torch.tensor([0, 5, 39, 12, 3, 3, 20])
    h1, w1 = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = ops.logprobs_via_op(h1, w1, tgt, impl="chunked", temperature=0.7, tp_group=None, vocab_start=0,
                                  valid_vocab=38, chunk_size=3)
    (lp * torch.arange(7.0)).sum().add(ent.sum() * 0.5).backward()
    h2, w2 = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = copsd_kernels.fused_linear_logprobs(h2, w2, tgt, temperature=0.7, valid_vocab=38, return_entropy=True,
                                              impl="chunked", chunk_size=3)
    (ref.logprobs * torch.arange(7.0)).sum().add(ref.entropy.sum() * 0.5).backward()
    torch.testing.assert_close(lp, ref.logprobs)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("need,clip", [((True, True), None), ((True, False), None), ((False, False), None),
                                       ((True, True), "entry"), ((False, False), "position")])
def test_opcheck_divergence_op(need, clip):
    import json

    hs, ht, w = _inputs()
    opts = json.dumps(dict(kind="jsd" if clip == "entry" else "forward_kl", beta=0.5, tau=1.0,
                           clip=None if clip is None else 0.05, clip_mode=clip or "entry", vocab_total=40, nv=40,
                           chunk_size=None))
    torch.library.opcheck(torch.ops.copsd.divergence_fwd_bwd, (hs, ht, w, w, None, "chunked", "", opts, *need),
                          test_utils=("test_schema", "test_faketensor"))
