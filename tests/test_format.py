"""quantize_4bit / dequantize_4bit / dequantize_absmax: identical to the
reference and to bitsandbytes (FORMAT.md), on every device."""
import math

import pytest
import torch

import pythia_native as pn
from conftest import CPU_ISAS
from pythia_native import reference as ref
from pythia_native.format import code_table, dynamic_map, quantize_absmax

# (3, 96): rows of 1.5 blocks, an even row length (see test_matches_bitsandbytes).
SHAPES = [(1, 1), (3, 50), (5, 7), (64,), (1, 65), (3, 96), (768, 2304), (3072, 768), (50304, 8)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    if w.numel() >= 128:
        w.view(-1)[:64] = 0.0  # an all-zero block
        w.view(-1)[64] = 0.05  # a block whose absmax sits on one element
    return w.to(dtype).to(device)


def test_code_tables_are_formats_values():
    # FORMAT.md, index order; the one table lives in csrc/common/codebook.h.
    assert code_table("nf4")[[0, 7, 8, 15]].tolist() == [-1.0, 0.0, 0.07958029955625534, 1.0]
    fp4 = code_table("fp4")
    assert fp4[3].item() == 1.0 and fp4[11].item() == -1.0 and fp4[1].item() == pytest.approx(0.0052083335)
    assert torch.signbit(fp4[8]) and not torch.signbit(fp4[0])


def test_packing_example_from_format_md():
    # NF4 indices [15, 0, 7, 8, 1, 14, 3, 12] -> bytes f0 78 1e 3c: quantize the code values themselves.
    idx = [15, 0, 7, 8, 1, 14, 3, 12]
    w = code_table("nf4")[idx].view(1, -1)
    packed, absmax = pn.quantize_4bit(w, 64, "nf4")
    assert packed.view(-1).tolist() == [0xF0, 0x78, 0x1E, 0x3C]
    assert absmax.tolist() == [1.0]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_quantize_matches_reference(shape, dtype, quant_type, blocksize, device):
    w = _weight(shape, dtype, device)
    packed, absmax = pn.quantize_4bit(w, blocksize, quant_type)
    r_packed, r_absmax = ref.quantize_4bit(w.cpu(), blocksize, quant_type)
    n = math.prod(shape)
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    assert absmax.shape == (math.ceil(n / blocksize),) and absmax.dtype == torch.float32
    assert torch.equal(packed.cpu(), r_packed)
    assert torch.equal(absmax.cpu(), r_absmax)
    out = pn.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
    assert out.dtype == dtype and out.shape == tuple(shape)
    assert torch.equal(out.cpu(), ref.dequantize_4bit(r_packed, r_absmax, shape, blocksize, quant_type, dtype))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_non_finite_blocks_match_bitsandbytes(quant_type, bnb_functional):
    # A block holding +inf / -inf (absmax inf: its values scale to inf * 0 = NaN)
    # and one holding a NaN: the same bytes and values as bitsandbytes.
    w = torch.randn(4, 64)
    w[0, 1], w[0, 2], w[1, 7], w[2, 0] = float("inf"), 1.0, -float("inf"), float("nan")
    packed, absmax = pn.quantize_4bit(w, 64, quant_type)
    b_packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    torch.testing.assert_close(absmax, state.absmax, rtol=0, atol=0, equal_nan=True)
    if quant_type == "nf4":
        assert torch.equal(packed, b_packed)
    ours = pn.dequantize_4bit(packed, absmax, w.shape, 64, quant_type)
    theirs = bnb_functional.dequantize_4bit(b_packed, state).reshape(ours.shape)
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours[~ours.isnan()], theirs[~theirs.isnan()])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_matches_bitsandbytes(shape, dtype, quant_type, blocksize, bnb_functional):
    F = bnb_functional
    w = _weight(shape, dtype, "cpu", seed=1)
    packed, absmax = pn.quantize_4bit(w, blocksize, quant_type)
    b_packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(absmax, state.absmax)
    if quant_type == "nf4":
        assert torch.equal(packed, b_packed)  # NF4: byte for byte
    # Both: our dequantization of our bytes equals bitsandbytes' of its bytes.
    ours = pn.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
    theirs = F.dequantize_4bit(b_packed, state).reshape(ours.shape)  # bitsandbytes returns 1-D shapes as [1, n]
    # bitsandbytes 0.50's CPU dequantize_4bit misreads some shapes whose
    # blocks run across rows (a row length that is a multiple of 32 but not
    # of the blocksize, over several rows: its vectorized kernel restarts the
    # blocks at each row). 3 x 96 and 160 x 160 at blocksize 64 came back 0.40
    # and 0.51 of max |w| off its own input, against 0.12 for the format's
    # rounding. The bytes and absmax above are identical; ours follow the
    # format's flat blocks (FORMAT.md, the reference), theirs do not. Only
    # such a shape may differ, and only where theirs is not the format's.
    bnb_cpu_bug = len(shape) > 1 and math.prod(shape[:-1]) > 1 and shape[-1] % 32 == 0 and shape[-1] % blocksize
    if bnb_cpu_bug and not torch.equal(ours, theirs):
        defined = ref.dequantize_4bit(b_packed, state.absmax, shape, blocksize, quant_type, dtype)
        assert torch.equal(ours, defined) and not torch.equal(theirs, defined)
        pytest.xfail("bitsandbytes' CPU dequantize_4bit reads this shape's blocks per row (its bug, not the format)")
    assert torch.equal(ours, theirs)
    # And bitsandbytes reads our bytes to the same values.
    assert torch.equal(F.dequantize_4bit(packed, state).reshape(ours.shape), ours)


def test_fp4_tie_rule_documented():
    # A scaled value exactly on the midpoint between two codes takes the lower code,
    # and the two zeros: s == 0 -> +0 (index 0), small positive -> -0 (index 8).
    code = code_table("fp4")
    w = torch.tensor([[1.0, 0.0, 0.001, -0.001, (0.5 + 0.6666667) / 2]])
    packed, _ = pn.quantize_4bit(w, 64, "fp4")
    idx = ref.unpack_indices(packed, 5).tolist()
    assert idx[:4] == [3, 0, 8, 0]
    assert code[idx[4]].item() == 0.5


def test_odd_numel_pad_nibble_is_code_of_zero():
    for qt, zero_idx in (("nf4", 7), ("fp4", 0)):
        packed, _ = pn.quantize_4bit(torch.ones(3), 64, qt)
        assert packed.view(-1)[-1].item() & 0xF == zero_idx


def test_zero_blocks():
    # A full zero block stores absmax 0, a partial one the 1e-38 floor (as bitsandbytes).
    _, absmax = pn.quantize_4bit(torch.zeros(100), 64, "nf4")
    assert absmax[0].item() == 0.0 and absmax[1].item() == pytest.approx(1e-38, rel=1e-6)
    out = pn.dequantize_4bit(*pn.quantize_4bit(torch.zeros(100), 64, "nf4"), (100,))
    assert torch.equal(out, torch.zeros(100))


def test_empty_weight(device):
    packed, absmax = pn.quantize_4bit(torch.zeros(0, 8, device=device))
    assert packed.shape == (0, 1) and absmax.shape == (0,)
    assert pn.dequantize_4bit(packed, absmax, (0, 8)).shape == (0, 8)


def test_noncontiguous_weight(device):
    w = _weight((64, 96), torch.float32, device).t()  # [96, 64], not contiguous
    assert not w.is_contiguous()
    assert torch.equal(pn.quantize_4bit(w)[0], pn.quantize_4bit(w.contiguous())[0])


def test_dynamic_map_matches_bitsandbytes(bnb_functional):
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("n_blocks", [1, 255, 256, 257, 12 * 2304])
def test_double_quant_decode(n_blocks, bnb_functional, device):
    F = bnb_functional
    w = torch.randn(n_blocks * 64) * 0.02
    b_packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = F.dequantize_4bit(b_packed, state)
    absmax = pn.dequantize_absmax(
        state.absmax.to(device), state.state2.absmax.to(device), state.state2.code.to(device), state.offset.item(), 256
    )
    r = ref.dequantize_absmax(state.absmax, state.state2.absmax, state.state2.code, state.offset.item(), 256)
    assert torch.allclose(absmax.cpu(), r, rtol=1e-6, atol=0)
    ours = pn.dequantize_4bit(b_packed.to(device), absmax, (w.numel(),), 64, "nf4")
    assert torch.allclose(ours.cpu(), theirs, rtol=1e-6, atol=1e-9)


def test_double_quant_encode_close_to_bitsandbytes(bnb_functional):
    F = bnb_functional
    absmax = torch.rand(3000) * 0.1 + 0.01
    ours = quantize_absmax(absmax)
    q, state = F.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert ours.offset == pytest.approx(absmax.mean().item())
    assert torch.equal(ours.nested_absmax, state.absmax)
    # Round-to-nearest on the same map: on these (uniform) scales the codes
    # differ at most at exact ties. (bitsandbytes' CPU library picks a farther
    # code for a few log-uniform scales: the next test holds ours to the nearest.)
    assert (ours.absmax_q.int() - q.int()).abs().max().item() <= 1
    err = (ours.decode() - absmax).abs().max().item()
    assert err <= 0.01 * absmax.max().item()


def test_double_quant_takes_the_nearest_code():
    # Scales over four decades (as a model's layers have), a partial last block.
    g = torch.Generator().manual_seed(0)
    absmax = torch.rand(3000, generator=g) * 10 ** (torch.rand(3000, generator=g) * 4 - 3)
    ours = quantize_absmax(absmax)
    centered = absmax - ours.offset
    nested = ours.nested_absmax.repeat_interleave(256)[: absmax.numel()]
    scaled = (centered / nested).clamp(-1, 1)
    code = ours.nested_quant_map
    dist = (code.unsqueeze(0) - scaled.unsqueeze(1)).abs()  # [n, 256]
    assert torch.equal(dist.gather(1, ours.absmax_q.long().unsqueeze(1)).squeeze(1), dist.min(dim=1).values)


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_quantize_identical_under_every_cpu_isa(cpu_isa, quant_type, blocksize):
    """The AVX-512 quantizer (full blocks) and the scalar one give the same bytes
    as the reference, including zeros, -0.0, values on the midpoints, clamping,
    a partial last block, an odd count, and a block holding a NaN (scalar path)."""
    g = torch.Generator().manual_seed(blocksize)
    w = torch.randn(5 * blocksize + 7, generator=g)
    w[3] = 0.0
    w[4] = -0.0
    w[blocksize : 2 * blocksize] = 0.0  # an all-zero full block (absmax 0 stored)
    bounds = (code_table(quant_type).sort().values[:-1] + code_table(quant_type).sort().values[1:]) / 2
    w[2 * blocksize : 2 * blocksize + 15] = bounds  # exactly on the midpoints (absmax 1 below)
    w[2 * blocksize + 15] = 1.0
    w[3 * blocksize + 1] = float("nan")
    w[4 * blocksize + 2] = float("inf")  # an inf block: its values scale to inf * 0 = NaN
    w[4 * blocksize + 5] = -float("inf")
    packed, absmax = pn.quantize_4bit(w, blocksize, quant_type)
    rp, ra = ref.quantize_4bit(w, blocksize, quant_type)
    # Every byte, the NaN and inf blocks' too (a NaN scaled value takes the top code, as
    # bitsandbytes' bucketize puts it; an ordered compare gave the bottom one: +inf -> -inf).
    assert torch.equal(packed, rp)
    assert torch.equal(absmax[torch.arange(len(absmax)) != 3], ra[torch.arange(len(ra)) != 3])
    assert torch.isnan(absmax[3]) and absmax[4] == float("inf")
    deq = pn.dequantize_4bit(packed, absmax, (w.numel(),), blocksize, quant_type)
    assert deq[4 * blocksize + 2] == float("inf")
