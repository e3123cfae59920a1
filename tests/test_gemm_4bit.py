"""gemm_4bit against the reference: every M/K/N shape class, dtype, bias, ISA."""
import pytest
import torch

import pythia_native as pn
from conftest import CPU_ISAS
from pythia_native import reference as ref



def _problem(M, K, N, dtype, device, bias=True, blocksize=64, quant_type="nf4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    packed, absmax = pn.quantize_4bit(w.to(device), blocksize, quant_type)
    to = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return to(x), packed, absmax, to(b)


def _rel_err(y, y_ref):
    return ((y.double() - y_ref.double()).abs().max() / y_ref.double().abs().max().clamp_min(1e-30)).item()


def _check(x, packed, absmax, shape, bias, blocksize=64, quant_type="nf4"):
    y = pn.gemm_4bit(x, packed, absmax, shape, bias, blocksize, quant_type)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], shape[0])
    if x.numel() == 0:
        return
    exact = ref.gemm_4bit(x.double(), packed, absmax, shape, None if bias is None else bias.double(), blocksize, quant_type)
    if x.dtype == torch.float32:
        assert _rel_err(y, exact) <= 1e-5
    else:
        # Held to 2x the error of plain PyTorch doing the same dequantized matmul in x's dtype.
        w = pn.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, x.dtype)
        plain = torch.nn.functional.linear(x, w, bias)
        assert _rel_err(y, exact) <= 2 * _rel_err(plain, exact) + 1e-6, (_rel_err(y, exact), _rel_err(plain, exact))


@pytest.mark.parametrize("M", [0, 1, 3, 17, 64, 300])
@pytest.mark.parametrize("K", [64, 200, 768, 3072])
@pytest.mark.parametrize("N", [1, 7, 768, 2304])
def test_shapes_fp32(M, K, N, device):
    if M * K * N > 300 * 768 * 768:
        pytest.skip("covered at smaller M; keeps the CPU run short")
    x, p, a, b = _problem(M, K, N, torch.float32, device)
    _check(x, p, a, (N, K), b)


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
# M crosses each CPU kernel boundary (ops.cpp): GEMV up to 4, tiles up to 16
# (AVX2) / 64 (AVX-512), panels + BLAS above.
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64, 65])
@pytest.mark.parametrize("K,N,blocksize", [(64, 7, 64), (768, 768, 64), (96, 3, 32), (256, 17, 128), (200, 5, 64), (1024, 33, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_cpu_isa(cpu_isa, M, K, N, blocksize, dtype):
    x, p, a, b = _problem(M, K, N, dtype, "cpu", blocksize=blocksize, seed=M)
    _check(x, p, a, (N, K), b, blocksize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M", [1, 16, 300])
def test_dtypes_quant_types_bias(dtype, quant_type, bias, M, device):
    if device == "cpu" and dtype == torch.float16 and M == 300:
        pytest.skip("fp16 matmul on the CPU is slow and adds nothing here")
    x, p, a, b = _problem(M, 768, 2304, dtype, device, bias=bias, quant_type=quant_type)
    _check(x, p, a, (2304, 768), b, quant_type=quant_type)


def test_leading_dims_and_empty(device):
    x, p, a, b = _problem(6, 64, 7, torch.float32, device)
    y = pn.gemm_4bit(x.view(2, 3, 64), p, a, (7, 64), b)
    assert y.shape == (2, 3, 7)
    assert torch.equal(y.view(6, 7), pn.gemm_4bit(x, p, a, (7, 64), b))
    assert pn.gemm_4bit(x[:0].view(0, 5, 64), p, a, (7, 64), b).shape == (0, 5, 7)


def test_noncontiguous_x(device):
    x, p, a, b = _problem(8, 128, 33, torch.float32, device)
    wide = torch.randn(8, 256, device=device)
    wide[:, ::2] = x  # x as a strided view of every other column
    xs = wide[:, ::2]
    assert not xs.is_contiguous()
    torch.testing.assert_close(pn.gemm_4bit(xs, p, a, (33, 128), b), pn.gemm_4bit(x, p, a, (33, 128), b), rtol=0, atol=0)
    xt = x.t().contiguous().t()  # column-major
    torch.testing.assert_close(pn.gemm_4bit(xt, p, a, (33, 128), b), pn.gemm_4bit(x, p, a, (33, 128), b), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 3])
def test_misaligned_x_gives_the_same_bits(M, dtype, device):
    # x one element past a 16-byte boundary, and rows of K + 1 elements (a row
    # stride that is no multiple of 16 bytes): the same kernel, so the same
    # bits, as an aligned contiguous x. (On CUDA the GEMV's 16-byte loads need
    # aligned rows: such an x is copied, not sent to dequantize + cuBLAS.)
    K, N = 768, 40
    x, p, a, b = _problem(M, K, N, dtype, device)
    want = pn.gemm_4bit(x, p, a, (N, K), b)
    shifted = torch.zeros(M * K + 1, dtype=dtype, device=device)[1:].view(M, K)
    shifted.copy_(x)
    padded = torch.zeros(M * (K + 1) + 1, dtype=dtype, device=device)[1:].view(M, K + 1)[:, :K]
    padded.copy_(x)
    for view in (shifted, padded):
        assert view.data_ptr() % 16 != 0
        assert torch.equal(pn.gemm_4bit(view, p, a, (N, K), b), want)


def test_odd_element_count_layout(device):
    # N*K odd: the last byte holds a pad nibble; rows straddle bytes and blocks.
    x, p, a, b = _problem(3, 5, 7, torch.float32, device)
    _check(x, p, a, (7, 5), b)


def _huge_x_problem(M, K, N, dtype, device, blocksize):
    # Every x is +-3e38 (finite in float32 and bf16), W ~1e-6: y ~1e34 is
    # finite, but a sum of |code * x| over a block before its absmax scales
    # it passes the float32 maximum (the GEMVs once returned inf here).
    g = torch.Generator().manual_seed(M + K)
    w = torch.randn(N, K, generator=g) * 1e-6
    x = torch.where(torch.rand(M, K, generator=g) < 0.5, -3e38, 3e38)
    packed, absmax = pn.quantize_4bit(w.to(device), blocksize)
    return x.to(dtype).to(device), packed, absmax


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("K,blocksize", [(768, 64), (256, 32), (1024, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_x_near_float32_max_cpu(cpu_isa, M, K, blocksize, dtype):
    x, p, a = _huge_x_problem(M, K, 9, dtype, "cpu", blocksize)
    _check(x, p, a, (9, K), None, blocksize)


@pytest.mark.parametrize("M", [1, 16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_x_near_float32_max(M, dtype, device):
    x, p, a = _huge_x_problem(M, 1088, 9, dtype, device, 64)
    _check(x, p, a, (9, 1088), None)


@pytest.mark.parametrize("compute", ["float32", "int16"])
@pytest.mark.parametrize("K,N", [(768, 7), (768, 33), (3072, 13), (4096, 6), (8192, 5)])
def test_row_order_does_not_change_bits(K, N, compute):
    # The M = 1 GEMVs read a block's rows far apart (rows i, i + q, ... of a
    # thread's range) and the rows left over one at a time: each output must
    # still be exactly its row of W computed alone.
    x, p, a, b = _problem(1, K, N, torch.float32, "cpu")
    y = pn.gemm_4bit(x, p, a, (N, K), b, compute=compute)
    rb, ab = K // 2, K // 64
    for r in range(N):
        alone = pn.gemm_4bit(x, p.flatten()[r * rb : (r + 1) * rb].clone(), a[r * ab : (r + 1) * ab].clone(),
                             (1, K), b[r : r + 1], compute=compute)
        assert torch.equal(y[:, r], alone[:, 0]), r


@pytest.mark.parametrize("M", [1, 16])
def test_respects_thread_count(M):
    x, p, a, b = _problem(M, 768, 2304, torch.float32, "cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = pn.gemm_4bit(x, p, a, (2304, 768), b)
    finally:
        torch.set_num_threads(n)
    # Each output is computed whole by one thread (GEMV: a row of W; tiles: a
    # group of 4 rows): the result does not depend on the split.
    assert torch.equal(y1, pn.gemm_4bit(x, p, a, (2304, 768), b))


@pytest.mark.parametrize("M", [1, 17, 300])
def test_float32_matmul_precision_follows_torch(M, device):
    """The contract in gemm_4bit's docstring: below "highest", its BLAS paths
    follow torch.set_float32_matmul_precision as F.linear on the dequantized
    weight does (bf16 or TF32 products), its own kernels stay float32, and
    "highest" (the default) is float32 again."""
    shape = (768, 768)
    x, p, a, b = _problem(M, 768, 768, torch.float32, device)
    exact = ref.gemm_4bit(x.double(), p, a, shape, b.double())
    w = pn.dequantize_4bit(p, a, shape, dtype=torch.float32)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        y = pn.gemm_4bit(x, p, a, shape, b)
        plain = torch.nn.functional.linear(x, w, b)
    finally:
        torch.set_float32_matmul_precision(before)
    assert _rel_err(y, exact) <= max(1e-5, 2 * _rel_err(plain, exact))
    if M == 1:  # a GEMV on every device: never BLAS, so float32 whatever the setting
        assert _rel_err(y, exact) <= 1e-5
    assert _rel_err(pn.gemm_4bit(x, p, a, shape, b), exact) <= 1e-5
