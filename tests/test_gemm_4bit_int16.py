"""gemm_4bit(compute="int16"): the int16 GEMVs (csrc/cpu/gemv_i16.cpp with
AVX-512 VNNI, csrc/cpu/gemv_i16_avx2.cpp with AVX2) against their definition
(reference.gemm_4bit_int16), their error against the exact product, and every
case where the op must compute in float32 instead. Each test runs under each
ISA that has an int16 kernel (the cpu_isa fixture forces it)."""
import pytest
import torch

import pythia_native as pn
from conftest import CPU_ISAS
from pythia_native import reference as ref

INT16_MAX_M = pn.build_info()["cpu_gemv_int16_max_m"]
# The ISAs with an int16 kernel: AVX-512 (the VNNI kernel where the CPU has
# VNNI, else the AVX2 one) and AVX2. Scalar computes in float32.
I16_ISAS = ["avx512", "avx2"]
each_int16_isa = pytest.mark.parametrize("cpu_isa", I16_ISAS, indirect=True)


def _problem(M, K, N, dtype, bias=True, blocksize=64, quant_type="nf4", seed=0, x_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    x = torch.randn(M, K, generator=g) * x_scale
    b = torch.randn(N, generator=g) if bias else None
    packed, absmax = pn.quantize_4bit(w, blocksize, quant_type)
    return x.to(dtype), packed, absmax, None if b is None else b.to(dtype)


def _rel(y, r):
    return ((y.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30)).item()


# One unit in the last place of each dtype, relative: how far two roundings
# of (almost) the same float32 value to that dtype can land apart.
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@each_int16_isa
@pytest.mark.parametrize("M", sorted({1, 2, 3, 4, 5, 8, INT16_MAX_M}))  # above 4: rows of x in groups of 4
# K = 4224: 33 groups (a lone last one); at M = 16, 132 KiB of int16 x.
@pytest.mark.parametrize("K,N", [(128, 1), (128, 7), (384, 3), (768, 2304), (3072, 33), (1280, 5), (4224, 19)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_definition(cpu_isa, M, K, N, dtype):
    x, p, a, b = _problem(M, K, N, dtype, seed=M * K + N)
    y = pn.gemm_4bit(x, p, a, (N, K), b, compute="int16")
    assert y.dtype == dtype and y.shape == (M, N)
    r = ref.gemm_4bit_int16(x, p, a, (N, K), b)
    # The integer sums are exact on both sides; what is left is float32
    # rounding of the scaled sums (and, in 16 bits, the final rounding).
    assert _rel(y, r) <= max(4 * ULP[dtype], 1e-6), _rel(y, r)
    if dtype == torch.float32:
        exact = ref.gemm_4bit(x.double(), p, a, (N, K), b.double())
        # The mode's own error (x to 2^-16 of its block max, codes to
        # 2^-14 of absmax): ~6e-5 here, against ~1e-7 for float32.
        assert _rel(y, exact) <= 3e-4, _rel(y, exact)
        assert _rel(pn.gemm_4bit(x, p, a, (N, K), b), exact) <= 1e-5


@each_int16_isa
@pytest.mark.parametrize("blocksize", [64, 128, 256, 1024])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("bias", [True, False])
def test_blocksizes_quant_types(cpu_isa, blocksize, quant_type, bias):
    x, p, a, b = _problem(2, 1024, 37, torch.float32, bias=bias, blocksize=blocksize, quant_type=quant_type)
    y = pn.gemm_4bit(x, p, a, (37, 1024), b, blocksize, quant_type, compute="int16")
    r = ref.gemm_4bit_int16(x, p, a, (37, 1024), b, blocksize, quant_type)
    assert _rel(y, r) <= 1e-6


@each_int16_isa
def test_awkward_x(cpu_isa):
    K, N = 512, 19
    _, p, a, b = _problem(1, K, N, torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, K, generator=g)
    x[0, 0:64] = 0.0  # an all-zero block (scale 0)
    x[0, 64:128] *= 1e30  # blocks of very different magnitude
    x[0, 128:192] *= 1e-30
    x[0, 192:256] = torch.finfo(torch.float32).tiny / 4  # subnormals
    x[0, 256:320] = -3.0  # every value at the block's max magnitude
    x[0, 320] = torch.finfo(torch.float32).max / 2**20  # one huge value among normal ones
    y = pn.gemm_4bit(x, p, a, (N, K), b, compute="int16")
    r = ref.gemm_4bit_int16(x, p, a, (N, K), b)
    assert torch.isfinite(y).all()
    assert _rel(y, r) <= 1e-6
    # All-zero x (every scale 0): y is exactly the bias.
    z = torch.zeros(1, K)
    assert torch.equal(pn.gemm_4bit(z, p, a, (N, K), b, compute="int16"), b.view(1, N))


@each_int16_isa
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_non_finite_x_takes_float32(cpu_isa, bad, dtype):
    # An inf or NaN must not be rounded into a finite integer: the op computes
    # that call in float32, which propagates it exactly as compute="float32".
    x, p, a, b = _problem(2, 256, 9, dtype)
    x[1, 100] = bad
    y16 = pn.gemm_4bit(x, p, a, (9, 256), b, compute="int16")
    y32 = pn.gemm_4bit(x, p, a, (9, 256), b)
    assert torch.equal(y16.isnan(), y32.isnan()) and y16[1].isfinite().sum() == 0
    torch.testing.assert_close(y16, y32, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "M,K,N,blocksize",
    [(INT16_MAX_M + 1, 256, 7, 64),  # M above the int16 GEMV: the float32 tiles
     (1, 200, 7, 64),  # K % 128 != 0
     (2, 192, 7, 64),  # K % 128 == 64
     (1, 256, 7, 32),  # blocksize below 64
     (300, 128, 7, 64)],  # large M: the float32 panels
)
@each_int16_isa
def test_where_int16_does_not_apply_float32_runs(cpu_isa, M, K, N, blocksize):
    x, p, a, b = _problem(M, K, N, torch.float32, blocksize=blocksize)
    assert torch.equal(pn.gemm_4bit(x, p, a, (N, K), b, blocksize, compute="int16"),
                       pn.gemm_4bit(x, p, a, (N, K), b, blocksize))


@each_int16_isa
def test_each_isa_runs_its_int16_kernel(cpu_isa):
    # The kernel the forced ISA takes, as build_info reports it, and proof that
    # it ran: int16's result is not float32's, and is within its own error.
    info = pn.build_info()
    # Under avx512 (the best ISA, or the fixture skips): VNNI's kernel where the CPU has it.
    assert info["cpu_gemv_int16_kernel"] == (info["cpu_gemv_int16_best"] if cpu_isa == "avx512" else "avx2")
    assert info["cpu_gemv_int16_kernel"] in ("avx512_vnni", "avx2")
    x, p, a, b = _problem(1, 768, 64, torch.float32)
    y16, y32 = pn.gemm_4bit(x, p, a, (64, 768), b, compute="int16"), pn.gemm_4bit(x, p, a, (64, 768), b)
    assert not torch.equal(y16, y32)
    assert _rel(y16, y32) <= 3e-4


@pytest.mark.parametrize("cpu_isa", [i for i in CPU_ISAS if i not in I16_ISAS], indirect=True)
def test_other_isas_compute_float32(cpu_isa):
    assert pn.build_info()["cpu_gemv_int16_kernel"] == "none"
    x, p, a, b = _problem(1, 768, 64, torch.float32)
    assert torch.equal(pn.gemm_4bit(x, p, a, (64, 768), b, compute="int16"), pn.gemm_4bit(x, p, a, (64, 768), b))


@each_int16_isa
def test_noncontiguous_and_leading_dims(cpu_isa):
    x, p, a, b = _problem(4, 256, 33, torch.float32)
    wide = torch.zeros(4, 512)
    wide[:, ::2] = x
    xs = wide[:, ::2]
    assert not xs.is_contiguous()
    y = pn.gemm_4bit(x, p, a, (33, 256), b, compute="int16")
    assert torch.equal(pn.gemm_4bit(xs, p, a, (33, 256), b, compute="int16"), y)
    assert torch.equal(pn.gemm_4bit(x.view(2, 2, 256), p, a, (33, 256), b, compute="int16").view(4, 33), y)
    # Rows of x are quantized one by one: row 2 alone gives row 2's result.
    assert torch.equal(pn.gemm_4bit(x[2:3], p, a, (33, 256), b, compute="int16"), y[2:3])


@each_int16_isa
def test_rows_of_x_do_not_depend_on_their_batch(cpu_isa):
    # M = 13: rows in groups of 4, 4, 4 and 1; each row's sums run in the same
    # order in any group, so each equals the row computed alone.
    x, p, a, b = _problem(13, 384, 29, torch.float32)
    y = pn.gemm_4bit(x, p, a, (29, 384), b, compute="int16")
    for m in range(13):
        assert torch.equal(y[m : m + 1], pn.gemm_4bit(x[m : m + 1], p, a, (29, 384), b, compute="int16")), m


@each_int16_isa
def test_thread_split_does_not_change_bits(cpu_isa):
    x, p, a, b = _problem(1, 768, 2304, torch.float32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = pn.gemm_4bit(x, p, a, (2304, 768), b, compute="int16")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, pn.gemm_4bit(x, p, a, (2304, 768), b, compute="int16"))


def test_bad_compute_names_the_argument():
    x, p, a, b = _problem(1, 128, 3, torch.float32)
    with pytest.raises(RuntimeError, match=r"gemm_4bit: compute must be 'float32' or 'int16', got 'int8'"):
        pn.gemm_4bit(x, p, a, (3, 128), b, compute="int8")
    with pytest.raises(ValueError, match="compute"):
        ref.gemm_4bit(x, p, a, (3, 128), b, compute="int8")


def test_reference_definition_by_hand():
    # One 128-element row, one output: the definition written out in scalars.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 128, generator=g)
    w = torch.randn(1, 128, generator=g)
    p, a = pn.quantize_4bit(w)
    idx = ref.unpack_indices(p, 128)
    code = pn.code_table("nf4")
    total = 0.0
    for j in range(2):
        blk = x[0, 64 * j : 64 * (j + 1)]
        s = (blk.abs().max() / 32767).item()
        xq = torch.round(blk / s).tolist()
        cq = [round(code[i].item() * 8192) for i in idx[64 * j : 64 * (j + 1)].tolist()]
        total += a[j].item() * (s / 8192) * sum(q * c for q, c in zip(xq, cq))
    r = ref.gemm_4bit_int16(x, p, a, (1, 128)).item()
    assert abs(r - total) <= 1e-6 * abs(total)
