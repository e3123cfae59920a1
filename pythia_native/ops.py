"""Python wrappers of the native ops, and their fake (meta) kernels.

Every op is declared once in csrc/ops.cpp (``TORCH_LIBRARY(pythia_native)``)
and has a CPU and a CUDA kernel (``dequantize_absmax``: one device-generic
implementation; ``neox_block_`` on CUDA: the composition in block.py); the
wrappers here only give them defaults and documentation. Python never
branches on the device: the dispatcher does.

The 4-bit weight format is bitsandbytes' (../shared/docs/FORMAT.md): a weight
``W`` of shape ``[N, K]`` is stored as ``packed`` (uint8 ``[(N*K + 1) // 2, 1]``,
flattened row-major, element ``2j`` in the high nibble of byte ``j``) and
``absmax`` (float32 ``[ceil(N*K / blocksize)]``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _C  # noqa: F401  (registers torch.ops.pythia_native.*)
from .errors import OptionError
from .format import DEFAULT_BLOCKSIZE, DEFAULT_QUANT_TYPE

_ops = torch.ops.pythia_native

# gemm_4bit's arithmetic modes (see gemm_4bit's docstring); the C++ side
# (parse_compute in csrc/ops.cpp) accepts the same two names.
COMPUTE_MODES = ("float32", "int16")


def set_cpu_isa(isa: str, *, _source: str = "set_cpu_isa") -> None:
    """Run the CPU kernels on one instruction set: ``"avx512"``, ``"avx2"``,
    ``"scalar"``, or ``"auto"`` (the best this CPU has: the default).

    The kernels pick the best ISA at run time; forcing a lower one reproduces
    on this machine what a CPU without AVX-512 (or AVX2) computes and how fast.
    Process-wide, for every thread. ``PYTHIA_NATIVE_CPU_ISA`` sets it at import
    (the command line too). An ISA this CPU lacks raises :class:`DeviceError`.
    """
    from .errors import DeviceError

    names = (*reversed(_C.build_info()["cpu_isas_compiled"]), "auto")  # the C++ side's names
    if isa not in names:
        raise DeviceError(f"{_source}: expected one of {', '.join(map(repr, names))}, got {isa!r}")
    try:
        _C.set_cpu_isa(isa)
    except ValueError as e:  # the C++ check: this CPU does not support it
        raise DeviceError(f"{_source}={isa!r}: {e}") from None


def check_compute(compute: str) -> str:
    """``compute`` if it is one of :data:`COMPUTE_MODES`, else an OptionError (a ValueError) that names it."""
    if compute not in COMPUTE_MODES:
        raise OptionError(f"compute must be one of {', '.join(map(repr, COMPUTE_MODES))}, got {compute!r}")
    return compute


def quantize_4bit(
    weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, quant_type: str = DEFAULT_QUANT_TYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (any shape, float32/float16/bfloat16) to 4 bits.

    Returns ``(packed, absmax)``: packed uint8 ``[(numel + 1) // 2, 1]`` and
    absmax float32 ``[ceil(numel / blocksize)]``. NF4 bytes are identical to
    ``bitsandbytes.functional.quantize_4bit`` on the CPU; FP4 dequantizes to
    the same values (the two zero codes may differ, see codebook.h).
    """
    return _ops.quantize_4bit(weight, blocksize, quant_type)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    blocksize: int = DEFAULT_BLOCKSIZE,
    quant_type: str = DEFAULT_QUANT_TYPE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight of ``shape`` back from 4 bits: ``code[index] * absmax[block]``
    computed in float32, then cast to ``dtype``. ``absmax`` must be float32; a
    double-quantized absmax is decoded with :func:`dequantize_absmax` first."""
    return _ops.dequantize_4bit(packed, absmax, blocksize, quant_type, list(shape), dtype)


def dequantize_absmax(
    absmax_q: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: float,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Decode double-quantized block scales (bitsandbytes ``compress_statistics``):
    ``absmax[i] = nested_code[absmax_q[i]] * nested_absmax[i // nested_blocksize] + offset``.

    absmax_q uint8 ``[n_blocks]``, nested_absmax float32
    ``[ceil(n_blocks / nested_blocksize)]``, nested_code float32 ``[256]``.
    """
    return _ops.dequantize_absmax(absmax_q, nested_absmax, nested_code, float(offset), nested_blocksize)


def gemm_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    bias: Optional[torch.Tensor] = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    quant_type: str = DEFAULT_QUANT_TYPE,
    compute: str = "float32",
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` (``shape = (N, K)``) in 4 bits.

    x: ``[..., K]`` float32/float16/bfloat16 (any leading shape, including an
    empty one); bias: ``[N]`` in x's dtype or None. Returns ``[..., N]`` in x's
    dtype, accumulated in float32. No dequantized copy of W is kept: the CPU
    kernel streams the packed rows for M <= 4, multiplies groups of 4
    dequantized rows by register tiles of x up to M = 64 (AVX-512; 16 with
    AVX2), and dequantizes panels of at least max(512, M) rows of W (and 2 MB;
    all of W, for the call, once M >= N) for BLAS calls above (in bfloat16 for
    a bfloat16 x, W rounded to bf16 once as a bf16 ``F.linear`` would; float32
    otherwise); the CUDA kernel is a GEMV for M <= 16 and
    dequantize to x's dtype + cuBLAS above. cuBLAS multiplies float16/bfloat16
    in float32, but torch lets it combine split-K partial sums in the input
    dtype unless ``torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction``
    (``..._bf16_...``) is False; the op follows those global settings, as
    ``F.linear`` does. Likewise for a float32 x: below ``"highest"`` (the
    default), ``torch.set_float32_matmul_precision`` lets the BLAS calls above
    (the CPU panels, CUDA's cuBLAS; also taken when K is not a multiple of
    blocksize) multiply in bf16 (oneDNN: 2.4e-3 relative error at M = 300 on
    a Xeon with AMX) or TF32; the GEMVs and the CPU tiles stay float32.
    The GEMVs (CPU AVX2 / AVX-512, CUDA) sum ``code * x`` over a block before
    scaling by its absmax; no such sum overflows for a finite x (up to the
    float32 maximum): the CPU ones hold the codes scaled by a power of two
    when x's largest |value| could make one pass it (at blocksize 64: above
    ~1.7e38 with AVX-512, ~8.5e37 with AVX2),
    else they run unscaled; CUDA's always hold them times 2^-5, which changes
    no rounding unless a product falls below float32's normal range (|x| <
    ~1e-36).

    ``compute="int16"`` lets a kernel round x to 16-bit integers per 64
    elements (``s = max|x| / 32767``, ``x ~ s * round(x / s)``) and the codes to
    multiples of 2^-13, and sum each 64-weight block exactly in int32
    (:func:`pythia_native.reference.gemm_4bit` with the same argument is the
    definition of what the int16 GEMV computes; where that GEMV does not run,
    the op computes in float32). The relative error of y is ~1e-4 on Pythia-shaped layers
    (6.7e-5 to 1.1e-4 at M = 1),
    against ~1e-7 for float32 and ~4e-3 for bitsandbytes' CPU kernel. The CPU
    GEMV (M <= 16, K % 128 == 0, a blocksize that is a multiple of 64 and
    divides K, a CPU with AVX2) takes it: with AVX-512 VNNI 1.6-2.4x the float32 kernels' speed at
    M = 1 on the Pythia shapes and 1.2-2.0x at M = 5-16 (a 2-vCPU AMD EPYC,
    one thread), on AVX2 alone 2.4-4.4x at M = 1 and 1.3-3.0x at M = 4-16 (a
    Xeon held to AVX2, one thread: the results table and an alternated A/B). The two kernels agree to float32 rounding
    (``build_info()["cpu_gemv_int16_kernel"]`` names the one in use). Every
    other path, and an x holding an inf or NaN, computes in float32, which is
    within the bound.
    """
    n, k = (int(s) for s in shape)
    return _ops.gemm_4bit(x, packed, absmax, bias, n, k, blocksize, quant_type, compute)


def gemm_f16w(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` with ``weight`` kept in float16 and the sums in float32.

    x: ``[..., K]`` float32/float16/bfloat16; weight: float16 ``[N, K]``
    contiguous; bias: ``[N]`` in x's dtype or None. Returns ``[..., N]`` in x's
    dtype. Widening float16 to float32 is exact, so for a float32 x this is the
    float32 layer on the widened weight while reading half the bytes: the CPU
    models keep a float16 checkpoint's dense embed_out this way. CPU: a
    vectorized GEMV for small M, widened panels + BLAS above; CUDA: cuBLAS
    (float16 x: its float16 GEMM, with the split-K caveat of :func:`gemm_4bit`;
    other dtypes: x and W widened to float32 per call, so not for decoding).
    """
    return _ops.gemm_f16w(x, weight, bias)


def rotary_kv_cache_(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rotary_ndims: int,
    rope_theta: float = 10000.0,
) -> torch.Tensor:
    """Rotary embedding of q and k, and the write of k and v into the KV cache,
    in one pass over the fused QKV activation. Returns q.

    qkv: ``[B, T, H * 3 * D]`` float32/float16/bfloat16, the ``query_key_value``
    output viewed per head as ``[H, 3, D]`` (GPT-NeoX order); rows may be
    strided. positions: int64 ``[B, T]``, each token's rotary position and cache
    slot; negative marks padding (left padding). k_cache, v_cache:
    ``[Bc >= B, H, L, D]`` contiguous in qkv's dtype, **written in place**:
    ``cache[b, :, positions[b, t]] = k / v of token (b, t)`` for every
    non-padding token; nothing else changes.

    Rotate-half (non-interleaved) rotary on the first ``rotary_ndims`` dims
    (even, ``0 <= rotary_ndims <= D``), angles ``pos * inv_freq`` with
    ``inv_freq = rope_inv_freq(rotary_ndims, rope_theta)``, in float32 (the
    same bits for every Pythia model's base and rotary_ndims; otherwise an
    entry may be an ulp or two off, libm's powf against torch's pow:
    csrc/common/attention_kernels.h).
    Returns q ``[B, T, H, D]`` in qkv's dtype (left unrotated for padding).

    Positions must be < L. The CPU kernel raises otherwise; the CUDA kernel
    cannot look without a host sync (it would break graph capture), so it
    writes nothing for such a token and still returns its rotated q. Within a
    sequence they should be distinct: of tokens sharing a slot, which one's k
    and v the slot keeps is unspecified (threads decide, as for index_put_).
    The caches must share no memory with each other, qkv or positions (the
    op refuses that); with grad mode on, no argument may require grad (the
    op has no backward).
    """
    return _ops.rotary_kv_cache_(qkv, positions, k_cache, v_cache, rotary_ndims, float(rope_theta))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of new queries over the KV cache (decode, or a chunk of new
    tokens, or a left-padded prefill whose keys are already in the cache).

    q: ``[B, T, H, D]``; k_cache, v_cache: ``[Bc >= B, H, L, D]`` contiguous in
    q's dtype (float32/float16/bfloat16); ``D % 8 == 0`` and ``D <= 256``.
    positions: int64 ``[B, T]``. Query ``(b, t)`` attends to slots
    ``0 .. positions[b, t]`` (inclusive) of sequence b; for positions 4 and 6
    of one sequence (``x`` visible, ``.`` masked)::

        slot      0 1 2 3 4 5 6 7 ... L-1
        pos = 4   x x x x x . . .      .
        pos = 6   x x x x x x x .      .

    A negative position (padding) gives a zero output row; a position >= L
    sees all L slots. ``scale`` defaults to ``1 / sqrt(D)``. Scores, softmax
    and the weighted sum are float32; returns ``[B, T, H, D]`` in q's dtype.
    """
    if scale is None:
        # 1 / sqrt(D) where there is a D > 0; otherwise the op names what is wrong with q.
        scale = q.shape[-1] ** -0.5 if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    return _ops.decode_attention(q, k_cache, v_cache, positions, float(scale))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact (erf) GELU, ``x * Phi(x)``, of a float32/float16/bfloat16 tensor
    of any shape; returns a new contiguous tensor of x's shape and dtype.

    Computed in float32 and rounded once: on the CPU within 7.5 ulp of the
    float64 value on [-13, 10] (1.6 ulp for x >= 0), also where ``F.gelu``'s
    float32 ``1 + erf`` cancels (thousands of ulp between -3.5 and -2.5, no
    correct digit below -5); from x ~ -13.13 down (|GELU| < ~1.4e-38, the last normal
    floats and the subnormals) the CPU result is flushed to (-)0. csrc/cpu/activation.cpp has the formulas, tests/test_gelu.py the
    measured bounds. CPU: vectorized, the same bits on every ISA; CUDA:
    ``x * normcdff(x)``. Specials: +inf -> +inf, -inf -> NaN, NaN -> NaN,
    as torch's float64 and one-element GELU (torch 2.14's vectorized
    float32 / bfloat16 CPU GELU returns NaN for +inf).
    """
    return _ops.gelu(x)


def neox_block_(
    x: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ln1: tuple[torch.Tensor, torch.Tensor],
    ln2: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    linears: Sequence[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
    intermediate_size: int,
    blocksize: int = DEFAULT_BLOCKSIZE,
    quant_type: str = DEFAULT_QUANT_TYPE,
    rotary_ndims: int = 0,
    rope_theta: float = 10000.0,
    scale: float = 1.0,
    parallel_residual: bool = True,
    compute: str = "float32",
) -> None:
    """One GPT-NeoX block for tokens that attend through the KV cache (a
    decode step), in place: ``x`` becomes the block's output and the tokens'
    keys and values are written to the caches at their positions.

    x: contiguous ``[B, T, hidden]`` (float32/bfloat16 on the CPU,
    float16/bfloat16 on CUDA); positions int64 ``[B, T]`` (negative =
    padding: no cache write, attention output 0); caches ``[Bc >= B, H, L, D]``
    in x's dtype with ``H * D = hidden``; ln1, ln2: float32 ``(weight, bias)``
    of ``[hidden]``; linears: four ``(packed, absmax, bias)``, for qkv
    ``[3 hidden, hidden]``, dense ``[hidden, hidden]``, up
    ``[intermediate_size, hidden]`` and down ``[hidden, intermediate_size]``
    (absmax float32, bias in x's dtype or None).

    The result is the block of pythia_native/block.py (``compose_block``)
    with these 4-bit Linears, the exact GELU and ``decode_attention``: the
    same kernels, roundings and order of the residual adds. Only the
    LayerNorm differs on the CPU, whose fused kernel sums in its own fixed
    order with a corrected mean: within a few float32 ulp of a float64
    LayerNorm plus one ulp of the mean's worth (torch's float32 LayerNorm
    is 2-4x further from it when |mean| >> std, e.g. 1.6e-3 against 4.9e-4
    at mean 1e4, std 1, H 768), so the two differ by about torch's error
    there. On the CPU one native call
    on preallocated scratch: nothing is allocated for a decode-sized block.
    ``compute``: the four Linears' mode, as :func:`gemm_4bit`'s. x and the
    caches must share no memory with each other or any other argument, and
    with grad mode on no argument may require grad (both are refused).
    """
    if len(linears) != 4:
        raise ValueError(f"neox_block_: linears must be 4 (packed, absmax, bias) triples (qkv, dense, up, down), got {len(linears)}")
    (qp, qa, qb), (dp, da, db), (up, ua, ub), (wp, wa, wb) = linears
    _ops.neox_block_(
        x, positions, k_cache, v_cache, ln1[0], ln1[1], ln2[0], ln2[1], float(eps),
        qp, qa, qb, dp, da, db, up, ua, ub, wp, wa, wb,
        int(intermediate_size), int(blocksize), quant_type, int(rotary_ndims), float(rope_theta),
        float(scale), bool(parallel_residual), compute,
    )


# ----------------------------------------------------------- fake kernels ---
# Shapes for torch.compile / FakeTensor / meta tracing, after the op's own
# argument checks (csrc/ops.cpp, _C.check_<op>_args: they read metadata only),
# so that a traced call fails where the eager one would, with its message: a
# meta or fake argument among real ones lands here, and was once given an
# uninitialized result without the device check. Under dynamic-shape
# tracing (symbolic sizes, which the C++ checks cannot take) the Python
# checks below stand in for what they can.


def _static(*args) -> bool:
    """No symbolic size or number among ``args`` (tensor shapes, ints, lists of ints)."""
    sym = (torch.SymInt, torch.SymFloat, torch.SymBool)
    for a in args:
        if isinstance(a, torch.Tensor):
            if any(isinstance(d, sym) for d in a.shape):
                return False
        elif isinstance(a, sym) or (isinstance(a, (list, tuple)) and any(isinstance(d, sym) for d in a)):
            return False
    return True

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _fake_check(cond, op: str, msg: str) -> None:
    torch._check(cond, lambda: f"pythia_native.{op}: {msg}")


def _fake_check_float(t: torch.Tensor, name: str, op: str) -> None:
    _fake_check(t.dtype in _FLOATS, op, f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _fake_check_format(blocksize: int, quant_type: str, op: str) -> None:
    lo, hi = _C.blocksize_range()
    _fake_check(lo <= blocksize <= hi and blocksize & (blocksize - 1) == 0, op,
                f"blocksize must be a power of two in [{lo}, {hi}], got {blocksize}")
    _fake_check(quant_type in ("nf4", "fp4"), op, f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _fake_check_weight(packed, absmax, numel: int, blocksize: int, op: str) -> None:
    _fake_check(packed.dtype == torch.uint8, op, f"packed must be uint8, got {packed.dtype}")
    _fake_check(packed.numel() == (numel + 1) // 2, op,
                f"packed must hold {(numel + 1) // 2} bytes, got shape {list(packed.shape)}")
    _fake_check(absmax.dtype == torch.float32, op, f"absmax must be float32, got {absmax.dtype}")
    _fake_check(absmax.numel() == -(-numel // blocksize), op,
                f"absmax must hold {-(-numel // blocksize)} block scales, got shape {list(absmax.shape)}")


def _fake_check_bias(bias, x, n: int, op: str) -> None:
    if bias is not None:
        _fake_check(bias.dim() == 1 and bias.shape[0] == n, op, f"bias must have shape [{n}], got {list(bias.shape)}")
        _fake_check(bias.dtype == x.dtype, op, f"bias must have x's dtype {x.dtype}, got {bias.dtype}")


@torch.library.register_fake("pythia_native::quantize_4bit")
def _quantize_4bit_fake(weight, blocksize, quant_type):
    if _static(weight, blocksize):
        _C.check_quantize_4bit_args(weight, blocksize, quant_type)
    _fake_check_float(weight, "weight", "quantize_4bit")
    _fake_check_format(blocksize, quant_type, "quantize_4bit")
    numel = weight.numel()
    packed = weight.new_empty(((numel + 1) // 2, 1), dtype=torch.uint8)
    absmax = weight.new_empty((-(-numel // blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("pythia_native::dequantize_4bit")
def _dequantize_4bit_fake(packed, absmax, blocksize, quant_type, shape, dtype):
    if _static(packed, absmax, blocksize, shape):
        _C.check_dequantize_4bit_args(packed, absmax, blocksize, quant_type, list(shape), dtype)
    _fake_check_format(blocksize, quant_type, "dequantize_4bit")
    _fake_check(dtype in _FLOATS, "dequantize_4bit", f"dtype must be float32, float16 or bfloat16, got {dtype}")
    _fake_check_weight(packed, absmax, math.prod(shape), blocksize, "dequantize_4bit")
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("pythia_native::dequantize_absmax")
def _dequantize_absmax_fake(absmax_q, nested_absmax, nested_code, offset, nested_blocksize):
    if _static(absmax_q, nested_absmax, nested_code, offset, nested_blocksize):
        _C.check_dequantize_absmax_args(absmax_q, nested_absmax, nested_code, offset, nested_blocksize)
    _fake_check(absmax_q.dtype == torch.uint8, "dequantize_absmax", f"absmax_q must be uint8, got {absmax_q.dtype}")
    return nested_absmax.new_empty((absmax_q.numel(),), dtype=torch.float32)


@torch.library.register_fake("pythia_native::gemm_4bit")
def _gemm_4bit_fake(x, packed, absmax, bias, n, k, blocksize, quant_type, compute="float32"):
    if _static(x, packed, absmax, bias, n, k, blocksize):
        _C.check_gemm_4bit_args(x, packed, absmax, bias, n, k, blocksize, quant_type, compute)
    _fake_check(x.dim() >= 1, "gemm_4bit", f"x must have shape [..., k] with k = {k}, got {tuple(x.shape)}")
    _fake_check_float(x, "x", "gemm_4bit")
    _fake_check(n > 0 and k > 0, "gemm_4bit", f"the weight shape (n, k) must be positive, got ({n}, {k})")
    _fake_check_format(blocksize, quant_type, "gemm_4bit")
    _fake_check(compute in COMPUTE_MODES, "gemm_4bit", f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
    _fake_check_weight(packed, absmax, n * k, blocksize, "gemm_4bit")
    _fake_check_bias(bias, x, n, "gemm_4bit")
    torch._check(x.shape[-1] == k, lambda: f"gemm_4bit: x must have shape [..., {k}], got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("pythia_native::gemm_f16w")
def _gemm_f16w_fake(x, weight, bias):
    if _static(x, weight, bias):
        _C.check_gemm_f16w_args(x, weight, bias)
    _fake_check(x.dim() >= 1, "gemm_f16w", f"x must have shape [..., k], got {tuple(x.shape)}")
    _fake_check_float(x, "x", "gemm_f16w")
    _fake_check(weight.dim() == 2 and weight.dtype == torch.float16, "gemm_f16w",
                f"weight must be a 2-D float16 tensor, got {weight.dim()}-D {weight.dtype}")
    n, k = weight.shape
    _fake_check_bias(bias, x, n, "gemm_f16w")
    torch._check(x.shape[-1] == k, lambda: f"gemm_f16w: x must have shape [..., {k}], got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("pythia_native::rotary_kv_cache_")
def _rotary_kv_cache_fake(qkv, positions, k_cache, v_cache, rotary_ndims, rope_theta):
    # The caches are mutated in place (shapes unchanged); the result is a new q.
    if _static(qkv, positions, k_cache, v_cache, rotary_ndims, rope_theta):
        _C.check_rotary_kv_cache_args(qkv, positions, k_cache, v_cache, rotary_ndims, rope_theta)
    _fake_check(qkv.dim() == 3, "rotary_kv_cache_", f"qkv must have shape [B, T, H * 3 * D], got {tuple(qkv.shape)}")
    B, T = qkv.shape[0], qkv.shape[1]
    _fake_check_float(qkv, "qkv", "rotary_kv_cache_")
    _fake_check_cache_pair(k_cache, v_cache, qkv.dtype, "rotary_kv_cache_")
    _fake_check(positions.dtype == torch.int64, "rotary_kv_cache_", f"positions must be int64, got {positions.dtype}")
    H, D = k_cache.shape[1], k_cache.shape[3]
    _fake_check(0 <= rotary_ndims <= D and rotary_ndims % 2 == 0, "rotary_kv_cache_",
                f"rotary_ndims must be even and in [0, D = {D}], got {rotary_ndims}")
    torch._check(qkv.shape[2] == H * 3 * D, lambda: f"rotary_kv_cache_: qkv must have shape [B, T, {H * 3 * D}], got {tuple(qkv.shape)}")
    return qkv.new_empty((B, T, H, D))


@torch.library.register_fake("pythia_native::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, positions, scale):
    if _static(q, k_cache, v_cache, positions, scale):
        _C.check_decode_attention_args(q, k_cache, v_cache, positions, scale)
    _fake_check_float(q, "q", "decode_attention")
    _fake_check(q.dim() == 4, "decode_attention", f"q must have shape [B, T, H, D], got {list(q.shape)}")
    _fake_check_cache_pair(k_cache, v_cache, q.dtype, "decode_attention")
    _fake_check(positions.dtype == torch.int64, "decode_attention", f"positions must be int64, got {positions.dtype}")
    _fake_check(k_cache.shape[1] == q.shape[2] and k_cache.shape[3] == q.shape[3], "decode_attention",
                f"k_cache must have shape [Bc, H, L, D] with q's H = {q.shape[2]} and D = {q.shape[3]}, "
                f"got {list(k_cache.shape)}")
    return q.new_empty(q.shape)


def _fake_check_cache_pair(k_cache, v_cache, dtype, op: str) -> None:
    _fake_check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape, op,
                f"k_cache and v_cache must be [Bc, H, L, D] of one shape, got {list(k_cache.shape)} and {list(v_cache.shape)}")
    _fake_check(k_cache.dtype == dtype and v_cache.dtype == dtype, op,
                f"k_cache and v_cache must have the activations' dtype {dtype}, got {k_cache.dtype} and {v_cache.dtype}")


@torch.library.register_fake("pythia_native::gelu")
def _gelu_fake(x):
    if _static(x):
        _C.check_gelu_args(x)
    _fake_check_float(x, "x", "gelu")
    return x.new_empty(x.shape)


@torch.library.register_fake("pythia_native::neox_block_")
def _neox_block_fake(*args):
    # x and the caches are updated in place (shapes unchanged); no result.
    x = args[0]
    torch._check(x.dim() == 3, lambda: f"neox_block_: x must have shape [B, T, hidden], got {tuple(x.shape)}")
    if _static(*args):
        # The dispatcher passes only the arguments the caller gave: add the defaults.
        missing = _ops.neox_block_.default._schema.arguments[len(args):]
        _C.check_neox_block_args(*args, *(a.default_value for a in missing))
    return None
