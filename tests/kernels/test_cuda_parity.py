"""Triton kernels compiled for the GPU vs the float64 reference, fp32 and bf16 (run by tools/gpu_check.sh).

Skipped without CUDA (this project's CI has no GPU; tests/kernels/test_triton_interpret.py runs the same
kernels under the Triton interpreter there, and test_triton_aot.py compiles them for sm_90). On a GPU this
is the only test that runs the compiled kernels: Qwen3-like widths (H 1024 / 2048), odd token counts,
padded vocabularies, every divergence, separate teacher heads, log-probs with entropy."""
import pytest
import torch

from tests.kernels.parity_cases import TRITON_BF16_GRAD_TOL, check_divergence, check_logprobs

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tools/gpu_check.sh)")]

DTYPES = [torch.float32, torch.bfloat16]
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence,beta", KINDS)
def test_triton_divergence_on_cuda(divergence, beta, dtype):
    check_divergence("triton", T=333, H=1024, V=8197, valid_vocab=8100, dtype=dtype, divergence=divergence,
                     beta=beta, temperature=1.1, clip=divergence == "forward_kl", chunk_size=128,
                     separate_teacher=divergence == "reverse_kl", device="cuda",
                     grad_tol=TRITON_BF16_GRAD_TOL if dtype == torch.bfloat16 else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_triton_divergence_on_cuda_at_qwen3_width(dtype):
    check_divergence("triton", T=1029, H=2048, V=37984, valid_vocab=37950, dtype=dtype, divergence="forward_kl",
                     temperature=1.0, clip=True, device="cuda",
                     grad_tol=TRITON_BF16_GRAD_TOL if dtype == torch.bfloat16 else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_triton_logprobs_on_cuda(dtype):
    check_logprobs("triton", T=517, H=1024, V=8197, valid_vocab=8100, dtype=dtype, temperature=1.1,
                   chunk_size=128, device="cuda", grad_tol=TRITON_BF16_GRAD_TOL if dtype == torch.bfloat16 else None)


def test_auto_picks_triton_on_cuda():
    from copsd_kernels.api import _pick

    assert _pick("auto", torch.zeros(1, device="cuda")) == "triton"
