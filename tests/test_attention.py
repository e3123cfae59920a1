"""rotary_kv_cache_ and decode_attention against their twins in reference.py:
every Pythia head dim, dtype, batch/token count, left padding, odd and long
caches, decode with existing cache content, strided qkv, every CPU ISA."""
import contextlib
import math

import pytest
import torch

import pythia_native as pn
from conftest import CPU_ISAS, isa_supported
from pythia_native import reference as ref

# (head_dim, rotary_ndims) of the Pythia configs (rotary_pct 0.25).
HEAD_DIMS = [(32, 8), (64, 16), (80, 20), (128, 32), (256, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
THETA = 10000.0


def _rel_err(y, y_ref):
    return ((y.double() - y_ref.double()).abs().max() / y_ref.double().abs().max().clamp_min(1e-30)).item()


def _positions(B, T, L, seed, pad=True):
    """[B, T] positions: sequence b's new tokens end at a slot somewhere in the
    cache (decode over existing content); with pad, sequence 1 is left-padded
    (its first tokens negative) and, when T > 1, sequence 2 starts at 0."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.empty(B, T, dtype=torch.int64)
    for b in range(B):
        end = int(torch.randint(T - 1, L, (1,), generator=g))  # last token's slot
        pos[b] = torch.arange(end - T + 1, end + 1)
    if pad and B > 1:
        n_pad = max(1, T // 2)
        pos[1] = torch.arange(T) - n_pad  # -n_pad .. T - 1 - n_pad
    if pad and B > 2 and T > 1:
        pos[2] = torch.arange(T)
    return pos


def _caches(Bc, H, L, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(Bc, H, L, D, generator=g).to(dtype).to(device)
    v = torch.randn(Bc, H, L, D, generator=g).to(dtype).to(device)
    return k, v


# ----------------------------------------------------- low-precision twins ---
# The same computations done by plain PyTorch in the low-precision dtype: the
# yardstick of the bf16/fp16 tolerances (as test_gemm_4bit.py does).


def _rotary_q_plain(qkv, positions, H, D, R):
    """q of rotary_kv_cache_ computed in qkv's dtype throughout."""
    B, T, _ = qkv.shape
    q = qkv.reshape(B, T, H, 3, D)[:, :, :, 0]
    half = R // 2
    ang = positions.clamp(min=0).float()[..., None] * ref.rope_inv_freq(R, THETA).to(qkv.device)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, :, None, :].to(qkv.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, :, None, :].to(qkv.dtype)
    r = q[..., :R]
    rot = torch.cat([r * cos + torch.cat([-r[..., half:], r[..., :half]], -1) * sin, q[..., R:]], -1)
    return torch.where((positions >= 0)[..., None, None], rot, q)


def _attention_plain(q, k_cache, v_cache, positions, scale):
    """decode_attention computed in q's dtype throughout."""
    B, T, H, D = q.shape
    L = k_cache.shape[2]
    scores = torch.einsum("bthd,bhld->bhtl", q, k_cache[:B]) * scale
    visible = torch.arange(L, device=q.device)[None, None, :] <= positions[:, :, None]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhtl,bhld->bthd", probs, v_cache[:B])


def _check_close(y, exact, plain):
    """fp32: ~1e-5 relative to the reference; fp16/bf16: within 2x the error of
    plain PyTorch in that dtype (plus a hair for the all-exact cases)."""
    if y.dtype == torch.float32:
        assert _rel_err(y, exact) <= 1e-5, _rel_err(y, exact)
    else:
        assert _rel_err(y, exact) <= 2 * _rel_err(plain, exact) + 1e-6, (_rel_err(y, exact), _rel_err(plain, exact))


# ----------------------------------------------------------- rotary_kv_cache_


def _run_rotary(B, T, H, D, R, L, dtype, device, seed=0, Bc=None, qkv=None, pos=None):
    Bc = B + 1 if Bc is None else Bc
    g = torch.Generator().manual_seed(seed)
    if qkv is None:
        qkv = torch.randn(B, T, H * 3 * D, generator=g).to(dtype).to(device)
    if pos is None:
        pos = _positions(B, T, L, seed)
    pos = pos.to(device)
    k, v = _caches(Bc, H, L, D, dtype, device, seed + 1)
    k_ref, v_ref = k.clone(), v.clone()
    q = pn.rotary_kv_cache_(qkv, pos, k, v, R, THETA)
    # The twin, computed in float32 on the same inputs.
    q_ref = ref.rotary_kv_cache_(qkv, pos, k_ref, v_ref, R, THETA)
    assert q.shape == (B, T, H, D) and q.dtype == dtype and q.device == qkv.device
    return qkv, pos, q, q_ref, (k, v), (k_ref, v_ref)


@pytest.mark.parametrize("T", [1, 4, 17])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("D,R", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_kv_cache(dtype, D, R, B, T, device):
    H, L = 3, 37
    qkv, pos, q, q_ref, (k, v), (k_ref, v_ref) = _run_rotary(B, T, H, D, R, L, dtype, device, seed=D + B + T)
    # v and untouched slots are copies: bit-exact. k: rotated like q.
    assert torch.equal(v, v_ref)
    if dtype == torch.float32:
        _check_close(q, q_ref, None)
        _check_close(k, k_ref, None)
    else:
        exact = ref.rotary_kv_cache_(qkv.double(), pos, k_ref.double().clone(), v_ref.double().clone(), R, THETA)
        plain = _rotary_q_plain(qkv, pos, H, D, R)
        _check_close(q, exact, plain)
        # k is rounded once from the same float32 value: at most one step from the twin.
        assert _rel_err(k, k_ref) <= 2 * _rel_err(plain, exact) + 1e-6
    # Slots no token wrote are untouched (compare against the original caches).
    k0, v0 = _caches(B + 1, H, L, D, dtype, device, D + B + T + 1)
    written = torch.zeros(B + 1, L, dtype=torch.bool)
    for b in range(B):
        for p in pos[b].tolist():
            if p >= 0:
                written[b, p] = True
    keep = ~written.to(device)[:, None, :, None].expand_as(k)
    assert torch.equal(k[keep], k0[keep]) and torch.equal(v[keep], v0[keep])


@pytest.mark.parametrize("R", [0, 2, 80])
def test_rotary_ndims_edges(R, device):
    # No rotation (R = 0), the smallest, and the whole head (R = D).
    qkv, pos, q, q_ref, (k, v), (k_ref, v_ref) = _run_rotary(2, 3, 2, 80, R, 11, torch.float32, device)
    _check_close(q, q_ref, None)
    _check_close(k, k_ref, None)
    assert torch.equal(v, v_ref)
    if R == 0:
        assert torch.equal(q, qkv.view(2, 3, 2, 3, 80)[:, :, :, 0])


@pytest.mark.parametrize("layout", ["row_slice", "transposed", "strided_elements"])
def test_rotary_noncontiguous_qkv(layout, device):
    B, T, H, D, R, L = 3, 4, 2, 64, 16, 19
    g = torch.Generator().manual_seed(3)
    base = torch.randn(B, T, H * 3 * D, generator=g).to(device)
    if layout == "row_slice":  # a view of a wider activation: rows strided, elements not
        wide = torch.randn(B, T, H * 3 * D + 40, device=device)
        wide[..., 5 : 5 + H * 3 * D] = base
        qkv = wide[..., 5 : 5 + H * 3 * D]
    elif layout == "transposed":  # [T, B, W] storage viewed as [B, T, W]
        qkv = base.transpose(0, 1).contiguous().transpose(0, 1)
    else:  # every other element: the entry point makes it contiguous
        wide = torch.zeros(B, T, 2 * H * 3 * D, device=device)
        wide[..., ::2] = base
        qkv = wide[..., ::2]
    assert not qkv.is_contiguous()
    _, _, q, _, (k, v), _ = _run_rotary(B, T, H, D, R, L, torch.float32, device, qkv=qkv)
    _, _, q2, _, (k2, v2), _ = _run_rotary(B, T, H, D, R, L, torch.float32, device, qkv=base)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)


def test_rotary_frequencies_are_the_references_for_pythias_base():
    # The kernels' inv_freq (libm powf) against reference.rope_inv_freq (torch's
    # float32 pow, as transformers): bit for bit at base 10000 for every
    # rotary_ndims the suite has (0.25 x head dims 32..256); elsewhere an entry
    # may differ by an ulp or two (documented: R = 96 at base 10000, say), never more.
    from pythia_native.suite import SIZES
    from pythia_native.config import PythiaConfig

    suite = {PythiaConfig.for_size(s).rotary_ndims for s in SIZES}
    assert suite == {8, 16, 20, 32, 64}
    for R in sorted(suite):
        assert torch.equal(torch.tensor(pn._C.rope_inv_freq(R, 10000.0)), ref.rope_inv_freq(R, 10000.0)), R
    for theta in (1.5, 2.0, 5000.0, 10000.0, 20000.0, 50000.0, 500000.0, 1e6):
        for R in (2, 8, 16, 20, 24, 32, 48, 64, 96, 128, 256):
            got, want = torch.tensor(pn._C.rope_inv_freq(R, theta)), ref.rope_inv_freq(R, theta)
            ulps = (got.view(torch.int32) - want.view(torch.int32)).abs()
            assert ulps.max() <= 2, (theta, R)


def test_rotary_matches_transformers_rope():
    """The rotary angles and layout agree with transformers' GPT-NeoX code."""
    modeling = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")
    B, T, H, D, R, L = 1, 5, 2, 64, 16, 8
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(B, T, H * 3 * D, generator=g)
    pos = torch.arange(T)[None]
    k, v = torch.zeros(1, H, L, D), torch.zeros(1, H, L, D)
    q = pn.rotary_kv_cache_(qkv, pos, k, v, R, THETA)
    x = qkv.view(B, T, H, 3 * D).transpose(1, 2)  # [B, H, T, 3D]
    q0, k0 = x[..., :D], x[..., D : 2 * D]
    ang = pos.float()[..., None] * ref.rope_inv_freq(R, THETA)
    emb = torch.cat([ang, ang], -1)
    q_rot, k_rot = modeling.apply_rotary_pos_emb(q0[..., :R], k0[..., :R], emb.cos(), emb.sin())
    torch.testing.assert_close(q.transpose(1, 2)[..., :R], q_rot, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k[:, :, :T, :R], k_rot, rtol=1e-6, atol=1e-6)
    assert torch.equal(q.transpose(1, 2)[..., R:], q0[..., R:])


def test_rotary_empty(device):
    k, v = _caches(2, 2, 5, 32, torch.float32, device, 0)
    k0 = k.clone()
    q = pn.rotary_kv_cache_(torch.zeros(0, 3, 2 * 3 * 32, device=device), torch.zeros(0, 3, dtype=torch.int64, device=device), k, v, 8)
    assert q.shape == (0, 3, 2, 32) and torch.equal(k, k0)


def test_rotary_refuses_arguments_that_share_memory_with_a_cache(device):
    # The kernel writes k and v while it reads qkv, token by token and across
    # threads: k_cache passed as v_cache, overlapping views of one buffer, or a
    # qkv that is a view of a cache gave order-dependent garbage, silently.
    B, T, H, D, L = 1, 2, 2, 32, 5
    n_cache, n_qkv = B * H * L * D, B * T * H * 3 * D
    pos = torch.tensor([[0, 1]], device=device)
    qkv = torch.randn(B, T, H * 3 * D, device=device)
    k, v = _caches(B, H, L, D, torch.float32, device, 0)
    buf = torch.randn(2 * n_cache, device=device)
    flat = torch.randn(n_qkv + n_cache, device=device)
    cases = [
        ("k_cache and v_cache share memory", qkv, k, k),
        ("k_cache and v_cache share memory", qkv, buf[:n_cache].view(B, H, L, D),
         buf[n_cache // 2 :][:n_cache].view(B, H, L, D)),  # half of each overlaps
        ("qkv shares memory with k_cache", flat[:n_qkv].view(B, T, H * 3 * D),
         flat[n_qkv - 1 :][:n_cache].view(B, H, L, D), v),  # one element in common
        # The same memory through separate storages (as torch.from_numpy twice on
        # one array, or torch.frombuffer, makes them): passed the check, and v
        # overwrote k.
        ("k_cache and v_cache share memory", qkv, k, torch.from_dlpack(k)),
        ("qkv shares memory with k_cache", torch.from_dlpack(flat)[:n_qkv].view(B, T, H * 3 * D),
         flat[n_qkv - 1 :][:n_cache].view(B, H, L, D), v),
    ]
    for msg, q_, k_, v_ in cases:
        before = flat.clone(), buf.clone(), k.clone()
        with pytest.raises(RuntimeError, match=f"rotary_kv_cache_: {msg}"):
            pn.rotary_kv_cache_(q_, pos, k_, v_, 8)
        assert all(torch.equal(a, b) for a, b in zip((flat, buf, k), before))  # refused before any write
    # Separate views of one buffer are fine.
    pn.rotary_kv_cache_(qkv, pos, buf[:n_cache].view(B, H, L, D), buf[n_cache:].view(B, H, L, D), 8)


def test_rotary_cache_shape_product_is_overflow_checked():
    # A cache with no elements can claim any H and D: H * 3 * D wrapped around
    # int64 to qkv's width (2**64 + 2 -> 2), and the op took a qkv of 2
    # columns as 3e18 heads (UBSan: signed overflow); with an L = 0 cache
    # torch's allocator refused, naming no argument.
    H, D = 3074457345618258603, 2
    for B, L, pos in ((0, 1, torch.zeros(0, 1, dtype=torch.long)), (1, 0, torch.tensor([[-1]]))):
        k, v = torch.zeros(B, H, L, D), torch.zeros(B, H, L, D)
        with pytest.raises(RuntimeError, match=r"rotary_kv_cache_: k_cache's H \* 3 \* D overflows int64"):
            torch.ops.pythia_native.rotary_kv_cache_(torch.randn(B, 1, 2), pos, k, v, 2, 1e4)


def test_rotary_positions_beyond_cache_cpu():
    k, v = _caches(1, 2, 5, 32, torch.float32, "cpu", 0)
    k0 = k.clone()
    qkv = torch.randn(1, 2, 2 * 3 * 32)
    with pytest.raises(RuntimeError, match=r"positions must be < L = 5 \(the cache length\), got 5"):
        pn.rotary_kv_cache_(qkv, torch.tensor([[4, 5]]), k, v, 8)
    assert torch.equal(k, k0)  # refused before anything was written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rotary_positions_beyond_cache_cuda_skip_write():
    # Documented CUDA behaviour: no host check, the token's k/v are not written.
    B, H, L, D, R = 1, 2, 5, 32, 8
    k = torch.zeros(B + 1, H, L, D, device="cuda")
    v = torch.zeros_like(k)
    qkv = torch.randn(1, 2, H * 3 * D, device="cuda")
    q = pn.rotary_kv_cache_(qkv, torch.tensor([[4, 5]], device="cuda"), k, v, R)
    k_ref, v_ref = torch.zeros_like(k), torch.zeros_like(v)
    q_ref = ref.rotary_kv_cache_(qkv[:, :1], torch.tensor([[4]], device="cuda"), k_ref, v_ref, R)
    torch.testing.assert_close(q[:, :1], q_ref)
    # Slot 5 does not exist; nothing else moved. k within rounding (the GPU's
    # sincosf / powf are not the CPU's); v is a copy.
    torch.testing.assert_close(k, k_ref)
    assert torch.equal(v, v_ref)


# ----------------------------------------------------------- decode_attention


def _run_decode(B, T, H, D, L, dtype, device, seed=0, pos=None, Bc=None):
    Bc = B + 1 if Bc is None else Bc
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype).to(device)
    k, v = _caches(Bc, H, L, D, dtype, device, seed + 1)
    pos = (_positions(B, T, L, seed) if pos is None else pos).to(device)
    scale = 1 / math.sqrt(D)
    out = pn.decode_attention(q, k, v, pos, scale)
    assert out.shape == (B, T, H, D) and out.dtype == dtype and out.device == q.device
    exact = ref.decode_attention(q.double(), k.double(), v.double(), pos, scale)
    plain = None if dtype == torch.float32 else _attention_plain(q, k, v, pos, scale)
    _check_close(out, exact, plain)
    # Padding queries give exact zeros.
    assert torch.all(out[pos < 0] == 0)
    return out


@pytest.mark.parametrize("T", [1, 4, 17])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("D,R", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention(dtype, D, R, B, T, device):
    _run_decode(B, T, 3, D, 37, dtype, device, seed=D + B + T)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_long_cache(dtype, D, T, device):
    # 1000 slots: many key blocks (CPU) and 8 splits, the last one partial (CUDA).
    L = 1000
    pos = torch.stack([torch.arange(L - T, L), torch.arange(500, 500 + T)])
    _run_decode(2, T, 4, D, L, dtype, device, seed=D + T, pos=pos)


@pytest.mark.parametrize("L", [1, 2, 15, 16, 17, 127, 128, 129, 257])
def test_decode_attention_block_edges(L, device):
    # Every position of caches around the CPU key block (16) and CUDA split (128).
    T = min(L, 5)
    pos = torch.stack([torch.arange(L - T, L), torch.arange(T) - 2, torch.arange(T) + max(0, L // 2 - T)])
    _run_decode(3, T, 2, 64, L, torch.float32, device, seed=L, pos=pos)


def test_decode_attention_positions_beyond_cache(device):
    # The twin's definition: a position >= L sees all L slots.
    pos = torch.tensor([[36, 37, 100]])
    _run_decode(1, 3, 2, 32, 37, torch.float32, device, pos=pos)


def test_decode_attention_largest_position(device):
    # 2**63 - 1 sees all L slots like any position >= L (pos + 1 overflowed to
    # a negative slot count: NaN on the CPU, zeros on CUDA).
    pos = torch.tensor([[2**63 - 1, 36]])
    _run_decode(1, 2, 2, 32, 37, torch.float32, device, pos=pos)


@contextlib.contextmanager
def _on_isa_or_gpu(cpu_isa, device):
    """The body on one CPU ISA (those cases run on the CPU) or on the GPU (the
    "cuda" case); the CPU's best ISA again afterwards."""
    if (cpu_isa == "cuda") != (device == "cuda"):
        pytest.skip("the ISA cases run on the CPU, the cuda case on a GPU")
    if cpu_isa != "cuda":
        if not isa_supported(cpu_isa):
            pytest.skip(f"this CPU has no {cpu_isa}")
        pn._C.set_cpu_isa(cpu_isa)
    try:
        yield
    finally:
        if cpu_isa != "cuda":
            pn._C.set_cpu_isa("auto")


@pytest.mark.parametrize("cpu_isa", CPU_ISAS + ["cuda"], indirect=False)
def test_decode_attention_scores_of_minus_inf_first(cpu_isa, device):
    # Scores that are -inf (a -inf key element, or q . k * scale overflowing)
    # for every slot of the first key blocks (CPU 8-16 keys, CUDA split 128):
    # softmax gives them weight 0 and the other slots the rest, as torch does;
    # the running max stayed -inf through those blocks and exp(-inf - -inf) made
    # the row NaN. A query that sees nothing but -inf scores is NaN (torch's).
    with _on_isa_or_gpu(cpu_isa, device):
        B, T, H, D, L = 2, 2, 2, 64, 300
        q = torch.randn(B, T, H, D, device=device)
        q[..., 0] = 1.0
        k, v = _caches(B, H, L, D, torch.float32, device, 5)
        k[:, :, :140, 0] = -float("inf")
        pos = torch.tensor([[139, 140], [-1, 299]], device=device)
        out = pn.decode_attention(q, k, v, pos)
        want = ref.decode_attention(q, k, v, pos, D**-0.5)
        assert out[0, 0].isnan().all() and want[0, 0].isnan().all()
        assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))  # padding
        # Position 140 sees exactly one slot with a finite score: its value.
        torch.testing.assert_close(out[0, 1], v[0, :, 140], rtol=0, atol=0)
        assert _rel_err(out[0, 1:], want[0, 1:]) <= 1e-6 and _rel_err(out[1, 1], want[1, 1]) <= 1e-5
        # An overflowing product instead of a -inf key: scores -8e38 -> -inf for
        # slots 0-15, 0 for slots 16-23, so the mean of those values.
        q1 = torch.ones(1, 1, 1, 8, device=device)
        k1 = torch.zeros(1, 1, 24, 8, device=device)
        k1[:, :, :16] = 1.0
        v1 = torch.randn(1, 1, 24, 8, device=device)
        out = pn.decode_attention(q1, k1, v1, torch.tensor([[23]], device=device), -1e38)
        torch.testing.assert_close(out[0, 0, 0], v1[0, 0, 16:].mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cpu_isa", CPU_ISAS + ["cuda"], indirect=False)
def test_decode_attention_far_below_the_max_weighs_zero(cpu_isa, device):
    # A key scoring ~200 below the row's max (or -inf, a -inf key element) has
    # weight exp(-200) = 0 in float32. The AVX2/AVX-512 kernels' exp clamps its
    # argument at -87.3 (~1.2e-38): with such a key's value at 3e38 the output
    # was 2.83, not 1.0, and +inf there gave inf, not NaN (0 * inf, as torch).
    with _on_isa_or_gpu(cpu_isa, device):
        D, L = 8, 20
        q = torch.zeros(1, 1, 1, D, device=device)
        q[..., 0] = 1.0
        k = torch.zeros(1, 1, L, D, device=device)
        k[0, 0, 0, 0] = -200.0  # slot 0 scores -200, the others 0
        k[0, 0, 17, 0] = -float("inf")  # slot 17: -inf
        v = torch.ones(1, 1, L, D, device=device)
        v[0, 0, 0] = v[0, 0, 17] = 3e38
        pos = torch.tensor([[L - 1]], device=device)
        out = pn.decode_attention(q, k, v, pos, 1.0)
        assert torch.equal(out, torch.ones_like(out))
        v[0, 0, 0] = float("inf")
        out = pn.decode_attention(q, k, v, pos, 1.0)
        want = ref.decode_attention(q, k, v, pos, 1.0)
        assert out.isnan().all() and want.isnan().all()


def test_decode_attention_default_scale_of_a_bad_q_names_q():
    # The default scale 1 / sqrt(D) was computed before the op's checks: D = 0 was a
    # ZeroDivisionError, a 0-d q an IndexError.
    k = torch.zeros(1, 1, 4, 8)
    pos = torch.tensor([[0]])
    with pytest.raises(RuntimeError, match="decode_attention"):
        pn.decode_attention(torch.zeros(1, 1, 1, 0), k, k, pos)
    with pytest.raises(RuntimeError, match="decode_attention"):
        pn.decode_attention(torch.tensor(1.0), k, k, pos)


def test_decode_attention_bc_equals_b_and_noncontiguous_q(device):
    B, T, H, D, L = 2, 3, 4, 64, 21
    q = torch.randn(B, H, T, D, device=device).transpose(1, 2)  # [B, T, H, D] view
    assert not q.is_contiguous()
    k, v = _caches(B, H, L, D, torch.float32, device, 1)
    pos = _positions(B, T, L, 2).to(device)
    out = pn.decode_attention(q, k, v, pos)
    exact = ref.decode_attention(q.double(), k.double(), v.double(), pos, D**-0.5)
    assert _rel_err(out, exact) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_never_reads_slots_it_cannot_see(dtype, device):
    # Slots past a query's position hold whatever an earlier sequence left
    # (inf or NaN after an overflow): they must not reach its output, not even
    # as 0 * NaN. A NaN in a slot the query sees is not hidden either.
    B, T, H, D, L = 3, 2, 2, 64, 150  # past one CUDA split (128 keys)
    pos = torch.tensor([[3, 4], [-1, 0], [130, 131]], device=device)
    q = torch.randn(B, T, H, D, device=device).to(dtype)
    k, v = _caches(B, H, L, D, dtype, device, 3)
    clean = pn.decode_attention(q, k, v, pos)
    clean_ref = ref.decode_attention(q, k, v, pos, D**-0.5)
    seen = torch.arange(L, device=device)[None, :] <= pos[:, -1:]  # [B, L] slots any query sees
    for poison in (float("nan"), float("inf"), -float("inf")):
        kp = k.masked_fill(~seen[:, None, :, None], poison)
        vp = v.masked_fill(~seen[:, None, :, None], poison)
        assert torch.equal(pn.decode_attention(q, kp, vp, pos), clean)
        assert torch.equal(ref.decode_attention(q, kp, vp, pos, D**-0.5), clean_ref)  # the oracle too
    # Query (0, 0) at position 3 does not see slot 4, which query (0, 1) does.
    vp = v.clone()
    vp[0, 0, 4, 5] = float("nan")
    out = pn.decode_attention(q, k, vp, pos)
    assert torch.equal(out[0, 0], clean[0, 0]) and torch.equal(out[1:], clean[1:])
    nan = torch.zeros_like(out, dtype=torch.bool)
    nan[0, 1, 0, 5] = True  # v's element 5 of that slot reaches element 5 of the output only
    assert torch.equal(out.isnan(), nan) and torch.equal(out[~nan], clean[~nan])
    want = ref.decode_attention(q, k, vp, pos, D**-0.5)
    assert torch.equal(want.isnan(), out.isnan())
    # A NaN key makes its score NaN, and a softmax over a NaN score is NaN in
    # every dim (as torch's): the key must not be dropped as a ~0 weight.
    kp = k.clone()
    kp[2, 1, 129, 7] = float("nan")  # sequence 2, head 1, the slot both its queries see
    out = pn.decode_attention(q, kp, v, pos)
    nan = torch.zeros_like(nan)
    nan[2, :, 1] = True
    assert torch.equal(out.isnan(), nan) and torch.equal(out[~nan], clean[~nan])
    assert torch.equal(ref.decode_attention(q, kp, v, pos, D**-0.5).isnan(), nan)


def test_decode_attention_default_scale_and_empty(device):
    B, T, H, D, L = 1, 2, 2, 32, 9
    q = torch.randn(B, T, H, D, device=device)
    k, v = _caches(B, H, L, D, torch.float32, device, 0)
    pos = torch.tensor([[3, 4]], device=device)
    torch.testing.assert_close(pn.decode_attention(q, k, v, pos), pn.decode_attention(q, k, v, pos, D**-0.5), rtol=0, atol=0)
    empty = pn.decode_attention(q[:0], k, v, pos[:0])
    assert empty.shape == (0, T, H, D)


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("D", [8, 32, 80, 256])
@pytest.mark.parametrize("L", [1, 37, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_every_cpu_isa(cpu_isa, dtype, D, L):
    T = min(L, 6)
    pos = torch.stack([torch.arange(L - T, L), torch.arange(T) - 3])
    _run_decode(2, T, 2, D, L, dtype, "cpu", seed=D + L, pos=pos)


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_unseen_slots_every_cpu_isa(cpu_isa, dtype):
    test_decode_attention_never_reads_slots_it_cannot_see(dtype, "cpu")


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
def test_rotary_every_cpu_isa(cpu_isa):
    # The rotary kernel is scalar on every ISA; this pins that the ISA switch
    # does not change it.
    qkv, pos, q, q_ref, (k, v), (k_ref, v_ref) = _run_rotary(3, 4, 2, 80, 20, 37, torch.float32, "cpu")
    _check_close(q, q_ref, None)
    _check_close(k, k_ref, None)


def test_decode_attention_respects_thread_count():
    B, T, H, D, L = 2, 3, 6, 64, 200
    q = torch.randn(B, T, H, D)
    k, v = _caches(B, H, L, D, torch.float32, "cpu", 0)
    pos = _positions(B, T, L, 1)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = pn.decode_attention(q, k, v, pos)
    finally:
        torch.set_num_threads(n)
    # Each row is computed whole by one thread: the result does not depend on the split.
    assert torch.equal(y1, pn.decode_attention(q, k, v, pos))


# ------------------------------------------------------- the two together ---


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_then_decode_steps(dtype, device):
    """A left-padded batch: prefill 6 tokens, then 3 decode steps, each step
    rotating and caching its token and attending over the cache. The same loop
    on the twins gives the same outputs."""
    B, H, D, R, L, P = 3, 4, 80, 20, 16, 6
    n_pad = torch.tensor([0, 2, 5])
    k, v = torch.zeros(B, H, L, D, dtype=dtype, device=device), torch.zeros(B, H, L, D, dtype=dtype, device=device)
    k_ref, v_ref = k.clone(), v.clone()
    pos = (torch.arange(P)[None] - n_pad[:, None]).to(device)  # [B, P], negative = padding
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        qkv = torch.randn(B, pos.shape[1], H * 3 * D, generator=g).to(dtype).to(device)
        q = pn.rotary_kv_cache_(qkv, pos, k, v, R)
        out = pn.decode_attention(q, k, v, pos)
        q_r = ref.rotary_kv_cache_(qkv, pos, k_ref, v_ref, R, THETA)
        out_r = ref.decode_attention(q_r, k_ref, v_ref, pos, D**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert _rel_err(out, out_r) <= tol, (step, _rel_err(out, out_r))
        pos = pos[:, -1:] + 1  # next token of every sequence


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_step_in_cuda_graph():
    """One capture, replays with advancing positions: the launch configuration
    does not depend on the positions."""
    B, H, D, R, L = 2, 4, 64, 16, 300
    dev = "cuda"
    k = torch.zeros(B, H, L, D, device=dev, dtype=torch.float16)
    v = torch.zeros_like(k)
    qkv = torch.randn(B, 1, H * 3 * D, device=dev, dtype=torch.float16)
    pos = torch.zeros(B, 1, dtype=torch.int64, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph
        pn.decode_attention(pn.rotary_kv_cache_(qkv, pos, k, v, R), k, v, pos)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pn.decode_attention(pn.rotary_kv_cache_(qkv, pos, k, v, R), k, v, pos)
    # The warm-up wrote slot 0 of both sequences (capture runs nothing): the
    # reference caches start from that state.
    k_ref, v_ref = k.clone(), v.clone()
    for step in range(0, 260, 37):
        qkv.copy_(torch.randn_like(qkv))
        pos.copy_(torch.tensor([[step], [max(step - 40, -1)]], device=dev))
        graph.replay()
        q_r = ref.rotary_kv_cache_(qkv, pos, k_ref, v_ref, R, THETA)
        out_r = ref.decode_attention(q_r, k_ref, v_ref, pos, D**-0.5)
        # fp16 storage of q and of the caches on both sides: a few ulps apart.
        assert _rel_err(out, out_r) <= 1e-2, step
        assert _rel_err(k, k_ref) <= 1e-3 and torch.equal(v, v_ref), step
