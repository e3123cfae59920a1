"""gemm_f16w (float16 weight, float32 sums) against the reference: shapes
including the K % 16 tails, M on both sides of the GEMV/BLAS switch, every
dtype and ISA, bias, leading dims, non-contiguous x, and bad input."""
import pytest
import torch

import pythia_native as pn
from conftest import CPU_ISAS
from pythia_native import reference as ref


def _problem(M, K, N, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K**0.5).half()
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    to = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return to(x), w.to(device), to(b)


def _rel_err(y, y_ref):
    return ((y.double() - y_ref.double()).abs().max() / y_ref.double().abs().max().clamp_min(1e-30)).item()


def _check(x, w, bias):
    y = pn.gemm_f16w(x, w, bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    if x.numel() == 0:
        return
    exact = ref.gemm_f16w(x.double(), w, None if bias is None else bias.double())
    # Sums in float32, then one rounding to x's dtype: at most half an ulp of
    # each output (unit roundoff u = eps / 2; 0 for float32), plus the float32
    # summation's error.
    u = 0.0 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps / 2
    assert _rel_err(y, exact) <= u + 1e-5


@pytest.mark.parametrize("M", [0, 1, 3, 8, 9, 40])
@pytest.mark.parametrize("K", [1, 7, 16, 17, 100, 768])
@pytest.mark.parametrize("N", [1, 5, 64, 301])
def test_shapes_fp32(M, K, N, device):
    x, w, b = _problem(M, K, N, torch.float32, device, seed=M + K + N)
    _check(x, w, b)


# M crosses each CPU kernel boundary (ops.cpp): GEMV up to 8, tiles up to 16
# (AVX2) / 64 (AVX-512) when K allows them, panels + BLAS above.
@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65])
@pytest.mark.parametrize("K,N", [(1, 3), (15, 7), (33, 9), (48, 5), (768, 50)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_cpu_isa(cpu_isa, M, K, N, dtype):
    x, w, b = _problem(M, K, N, dtype, "cpu", seed=M)
    _check(x, w, b)
    _check(x, w, None)


def test_float32_equals_widened_weight(device):
    """The point of the op: for float32 x it is the float32 layer on the widened weight."""
    x, w, _ = _problem(4, 768, 300, torch.float32, device)
    dense = torch.nn.functional.linear(x.double(), w.double())
    assert _rel_err(pn.gemm_f16w(x, w), dense) <= 1e-6


def test_leading_dims_empty_and_noncontiguous(device):
    x, w, b = _problem(12, 40, 9, torch.float32, device)
    _check(x.reshape(2, 3, 2, 40), w, b)
    _check(x[:0], w, b)
    wide = torch.randn(5, 80, device=device)
    _check(wide[:, ::2], w, b)  # stride 2 along K
    _check(x.T.contiguous().T, w, b)


def test_errors():
    x, w, b = _problem(2, 16, 3, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="weight must be float16"):
        pn.gemm_f16w(x, w.float())
    with pytest.raises(RuntimeError, match=r"x must have shape \[\.\.\., k\] with k = 16"):
        pn.gemm_f16w(x[:, :15], w)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        pn.gemm_f16w(x.double(), w)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        pn.gemm_f16w(x[:, :8], torch.randn(3, 16).half()[:, ::2])
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        pn.gemm_f16w(x, w, b.half())
    with pytest.raises(RuntimeError, match=r"bias must have shape \[3\]"):
        pn.gemm_f16w(x, w, torch.zeros(4))
    with pytest.raises(RuntimeError, match=r"weight must have shape \[n, k\]"):
        pn.gemm_f16w(x, w.reshape(-1))
