"""ops.gelu: the exact (erf) GELU against float64, torch, and itself across ISAs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pythia_native as pn
from pythia_native import reference

from conftest import CPU_ISAS


def _grid() -> torch.Tensor:
    # 2.4 M points over [-13, 10], denser near 0.
    return torch.cat([torch.linspace(-13, 10, 2_300_001), torch.linspace(-0.01, 0.01, 100_001)])


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    ulp = torch.from_numpy(np.spacing(np.abs(exact.float().numpy()))).double()
    return (got.double() - exact).abs() / ulp


# Max ulp error per range, measured on this grid (float32; the formulas are
# in csrc/cpu/activation.cpp): 7.1 ulp on [-13, -0.7], 2.8 on [-0.7, 0],
# 1.5 on [0, 10] (7.35 and 1.53 on 20M uniform points of [-13, 10], 2026-12-07).
# torch's float32 F.gelu on the same grid, for scale:
# 1.7-4.9 ulp for x > -0.7, 11 ulp on [-1.5, -0.7], ~2,100 on [-3, -1.5], and
# no correct digit below -5 (its 1 + erf cancels).
ERROR_BOUNDS = [(-13, -0.7, 8), (-0.7, 0, 4), (0, 10, 2)]  # (lo, hi, max ulp)


def test_float32_error_against_float64():
    x = _grid()
    got = pn.gelu(x)
    exact = reference.gelu(x.double())
    for lo, hi, max_ulp in ERROR_BOUNDS:
        m = (x >= lo) & (x < hi)
        assert _ulps(got[m], exact[m]).max() <= max_ulp, (lo, hi)


def test_the_denormal_tail_is_flushed():
    # From x ~ -13.13 down, |GELU(x)| < ~1.4e-38 (the last normal float32s,
    # then denormals): the result is (-)0; just above, it is not yet flushed.
    x = torch.linspace(-20, -13.135, 1001)
    assert (pn.gelu(x) == 0).all()
    assert (reference.gelu(x.double()).abs() < 1.4e-38).all()
    assert (pn.gelu(torch.linspace(-13.13, -13.0, 101)) != 0).all()


def test_more_exact_than_torch_where_torch_cancels():
    # The reason for the erfc form: torch's float32 GELU computes 1 + erf(x / sqrt 2),
    # which cancels for negative x.
    x = torch.tensor([-3.0, -4.0, -5.0, -6.0])
    exact = reference.gelu(x.double())
    ours = (pn.gelu(x).double() - exact).abs() / exact.abs()
    theirs = (F.gelu(x).double() - exact).abs() / exact.abs()
    assert (ours < 1e-6).all()
    # torch's error depends on its kernel: 1e-4 to 1 with AVX-512, 4e-5 at
    # x = -3 (then 3e-4 to 1) with AVX2 (an AMD EPYC, 2026-12-08).
    assert (theirs > 1e-5).all() and (theirs[1:] > 1e-4).all()


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_isa_writes_the_same_bits(cpu_isa, dtype):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(4099) * 4, torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -30.0])])
    x = x.to(dtype)
    # NaNs with a sign and a payload, at a vector lane and in the scalar tail.
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    nans = [0xFFC00000, 0x7FC00123, 0x7F800001] if dtype == torch.float32 else [0xFE00, 0x7F01, 0x7C01]
    if dtype == torch.bfloat16:
        nans = [0xFFC0, 0x7FC1, 0x7F81]
    raw = x.view(bits)
    for i, n in zip((5, 1000, 4102), nans):
        raw[i] = n - (1 << (32 if bits == torch.int32 else 16)) if n >= (1 << (31 if bits == torch.int32 else 15)) else n
    got = pn.gelu(x)
    pn._C.set_cpu_isa("scalar")
    want = pn.gelu(x)
    pn._C.set_cpu_isa(cpu_isa)
    assert got[[5, 1000, 4102]].isnan().all()
    assert torch.equal(got.view(bits), want.view(bits))  # NaNs included


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_types_are_the_float64_value_rounded_once(dtype):
    # float32 math is accurate enough that rounding to 8 or 11 bits lands where
    # float64 does, on every value of the grid.
    x = _grid().to(dtype)
    torch.testing.assert_close(pn.gelu(x), reference.gelu(x), rtol=0, atol=0)


def test_specials_follow_torch():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, 1e-30, -1e-40, -13.0, -30.0, 88.0])
    got = pn.gelu(x)
    assert got[0] == float("inf")
    assert got[1].isnan() and got[2].isnan()  # -inf: 0 * -inf, as torch's ATen kernel
    assert got[3] == 0 and got[4] == 5e-31 and got[5] == x[5] / 2
    assert -1e-36 < got[6] < 0  # -13 Phi(-13) = -8e-38, which torch's 1 + erf rounds to -0
    assert got[7] == 0 and got[8] == 88.0


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_zero_result_has_the_sign_of_x(cpu_isa, dtype):
    # -0, and negatives so small that x / 2 rounds to -0, give -0 as torch's
    # GELU does (the erf series' FMA gave 0 + -0 = +0); positives give +0.
    tiny = torch.finfo(dtype).smallest_normal
    x = torch.tensor([-0.0, 0.0, -1e-45, 1e-45, -tiny, tiny, -30.0, -60000.0], dtype=torch.float32).to(dtype)
    x = x.repeat(5)  # vector lanes and the scalar tail
    got, want = pn.gelu(x), F.gelu(x.float()).to(dtype)
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(x)), (got, x)


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (2, 1, 3072), (1, 17, 8192), (70_001,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shapes_dtypes_and_torch(shape, dtype, device):
    torch.manual_seed(1)
    x = (torch.randn(shape) * 3).to(device=device, dtype=dtype)
    y = pn.gelu(x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    # Against float64 rounded to x's dtype, and against torch's own GELU, whose
    # float32 1 + erf leaves an absolute error of up to ~3e-7 |x| for negative x.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(y.cpu(), reference.gelu(x.cpu()), **tol)
    torch_tol = dict(rtol=1e-5, atol=5e-6) if dtype == torch.float32 else tol
    torch.testing.assert_close(y, F.gelu(x), **torch_tol)


def test_non_contiguous_input(device):
    x = torch.randn(64, 48, device=device).t()[5:, ::2]
    assert not x.is_contiguous()
    y = pn.gelu(x)
    torch.testing.assert_close(y, pn.gelu(x.contiguous()), rtol=0, atol=0)
    assert y.is_contiguous()


def test_threaded_split_gives_the_same_bits():
    x = torch.randn(300_000) * 3  # past the one-thread grain: split between threads
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pn.gelu(x)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, pn.gelu(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=str)
def test_wrong_dtype_names_x(dtype):
    with pytest.raises(RuntimeError, match=r"pythia_native.gelu: x must be float32, float16 or bfloat16"):
        pn.gelu(torch.zeros(4, dtype=dtype))
