"""Chunked torch log-probs (and entropy) vs the naive float64 reference, with gradients."""
import pytest
import torch

from copsd_kernels import fused_linear_logprobs
from tests.kernels.parity_cases import check_logprobs, make_inputs

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 1.1, 2.0])
@pytest.mark.parametrize("return_entropy", [True, False])
def test_chunked_logprobs_match_reference(dtype, temperature, return_entropy):
    check_logprobs("chunked", T=41, H=64, V=1271, dtype=dtype, temperature=temperature, valid_vocab=1250,
                   return_entropy=return_entropy, chunk_size=16)


def test_logprobs_are_log_softmax_at_targets():
    hs, _, w, _, _ = make_inputs(11, 16, 97, torch.float32)
    y = torch.arange(11) * 7
    out = fused_linear_logprobs(hs, w, y, temperature=1.3, return_entropy=True)
    logq = torch.log_softmax(hs @ w.T / 1.3, -1)
    torch.testing.assert_close(out.logprobs, logq[torch.arange(11), y])
    torch.testing.assert_close(out.entropy, -(logq.exp() * logq).sum(-1))
    assert fused_linear_logprobs(hs, w, y).entropy is None


def test_bad_target_shape_raises():
    hs, _, w, _, _ = make_inputs(5, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="target_ids"):
        fused_linear_logprobs(hs, w, torch.zeros(4, dtype=torch.long))
