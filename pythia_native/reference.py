"""Pure-PyTorch twins of the native ops: the readable definition of what each
kernel computes, and the oracle of the tests. Slow by design; never used on a
hot path.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .format import ABSMAX_FLOOR, DEFAULT_BLOCKSIZE, DEFAULT_QUANT_TYPE, check_quant_type, code_table


def _bounds_and_order(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = code_table(quant_type)
    order = torch.argsort(code, stable=True)  # FP4: +0 (index 0) sorts before -0 (index 8)
    s = code[order]
    return (s[:-1] + s[1:]) / 2, order


def quantize_4bit(weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, quant_type: str = DEFAULT_QUANT_TYPE):
    """Twin of ``ops.quantize_4bit``: bitsandbytes' CPU quantizer, step by step."""
    bounds, order = _bounds_and_order(check_quant_type(quant_type))
    w = weight.detach().reshape(-1).float().cpu()
    n = w.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    absmax = w[:full].view(blocks, blocksize).abs().amax(dim=1) if blocks else w.new_empty(0)
    # Full blocks: multiply by the float32 reciprocal of absmax.
    scaled = (w[:full].view(blocks, blocksize) * (1.0 / absmax.clamp(min=ABSMAX_FLOOR)).unsqueeze(1)).reshape(-1)
    if full < n:
        # The partial last block: divide, and store the floored absmax.
        am = w[full:].abs().amax().clamp(min=ABSMAX_FLOOR)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, w[full:] / am])
    if n % 2:
        # The pad nibble is the code of a scaled 0.0 (7 in NF4), as bitsandbytes pads.
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = order[torch.bucketize(scaled.clamp(-1, 1), bounds)].to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed.view(-1, 1).to(weight.device), absmax.to(weight.device)


def unpack_indices(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit indices of the first ``numel`` elements (high nibble first)."""
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel]


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    blocksize: int = DEFAULT_BLOCKSIZE,
    quant_type: str = DEFAULT_QUANT_TYPE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Twin of ``ops.dequantize_4bit``: ``code[index] * absmax[block]`` in float32."""
    numel = math.prod(shape)
    idx = unpack_indices(packed, numel)
    code = code_table(check_quant_type(quant_type), packed.device)
    scale = absmax.float().repeat_interleave(blocksize)[:numel]
    return (code[idx] * scale).to(dtype).reshape(tuple(shape))


def dequantize_absmax(absmax_q, nested_absmax, nested_code, offset, nested_blocksize=256):
    """Twin of ``ops.dequantize_absmax``."""
    n = absmax_q.numel()
    scale = nested_absmax.float().repeat_interleave(nested_blocksize)[:n]
    return nested_code.float()[absmax_q.reshape(-1).long()] * scale + offset


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
    """Twin of ``ops.gemm_4bit``: dequantize to float32, matmul in float32
    (float64 would hide nothing the tolerance cares about), cast to x's dtype.
    ``compute="int16"``: :func:`gemm_4bit_int16`, what the int16 GEMV computes."""
    if compute == "int16":
        return gemm_4bit_int16(x, packed, absmax, shape, bias, blocksize, quant_type)
    if compute != "float32":
        raise ValueError(f"compute must be 'float32' or 'int16', got {compute!r}")
    w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


I16_X_MAX = 32767  # x's integer range per 64-element block: [-32767, 32767]
I16_CODE_SCALE = 8192  # the codes as multiples of 2^-13: |round(code * 8192)| <= 8192


def quantize_x_int16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[..., K]`` (K % 64 == 0) -> ``(xq, s)``: per 64-element block,
    ``s = max|x| / 32767`` (float32) and ``xq = round_half_even(x / s)``
    (int64, 0 where s = 0), so that ``x ~ xq * s`` within ``s / 2``."""
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // 64, 64)
    s = xb.abs().amax(dim=-1) / I16_X_MAX
    q = torch.where(s[..., None] > 0, torch.round(xb / s.clamp_min(1e-45)[..., None]), 0.0)
    return q.clamp(-I16_X_MAX, I16_X_MAX).to(torch.int64), s


def gemm_4bit_int16(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    bias: Optional[torch.Tensor] = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    quant_type: str = DEFAULT_QUANT_TYPE,
) -> torch.Tensor:
    """The definition of ``gemm_4bit(..., compute="int16")``'s int16 GEMV
    (csrc/cpu/gemv_i16.cpp): x rounded per 64 elements by
    :func:`quantize_x_int16`, the codes rounded to ``cq = round(code * 8192)``,
    then ``y[m, n] = bias + sum_j absmax[n, j] * (s[m, j] / 8192) * sum_{k in j}
    cq[idx[n, k]] * xq[m, k]``, the inner sums exact (int64 here, int32 in the
    kernel, where they cannot overflow), the rest in float64 here (float32 in
    the kernel). K % 128 == 0 and blocksize % 64 == 0, as the kernel needs;
    x finite (the op computes in float32 otherwise)."""
    n, k = (int(v) for v in shape)
    if k % 128 or blocksize % 64:
        raise ValueError(f"the int16 GEMV needs K % 128 == 0 and blocksize % 64 == 0, got K={k}, blocksize={blocksize}")
    if not torch.isfinite(x).all():
        raise ValueError("the int16 GEMV is defined for finite x only")
    xq, s = quantize_x_int16(x.reshape(-1, k).cpu())
    cq = torch.round(code_table(check_quant_type(quant_type)).double() * I16_CODE_SCALE).to(torch.int64)
    idx = unpack_indices(packed.cpu(), n * k).view(n, k // 64, 64)
    w_int = cq[idx]  # [n, k/64, 64]
    inner = torch.einsum("mjk,njk->mnj", xq.view(-1, k // 64, 64), w_int)  # exact in int64
    a = absmax.cpu().double().repeat_interleave(blocksize // 64)[: n * (k // 64)].view(n, k // 64)
    y = (inner.double() * a[None] * (s.double() / I16_CODE_SCALE)[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.cpu().double()
    return y.to(x.dtype).reshape(*x.shape[:-1], n).to(x.device)


def gemm_f16w(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Twin of ``ops.gemm_f16w``: widen the float16 weight (exact), matmul in
    float32, cast to x's dtype."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rope_inv_freq(rotary_ndims: int, rope_theta: float) -> torch.Tensor:
    """GPT-NeoX rotary frequencies, float32 ``[rotary_ndims // 2]``:
    ``1 / theta ** (2i / rotary_ndims)``, computed as transformers does."""
    exponent = torch.arange(0, rotary_ndims, 2, dtype=torch.int64).float() / rotary_ndims
    return 1.0 / (rope_theta**exponent)


def rotary_kv_cache_(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rotary_ndims: int,
    rope_theta: float,
) -> torch.Tensor:
    """Twin of ``ops.rotary_kv_cache_``.

    qkv: ``[B, T, H * 3 * D]``, the fused ``query_key_value`` output, viewed per
    head as ``[H, 3, D]`` (q, k, v interleaved per head, GPT-NeoX order).
    positions: int64 ``[B, T]``, the position of each token, which is both its
    rotary angle and its slot in the cache; a negative position marks padding.
    k_cache, v_cache: ``[Bc >= B, H, L, D]`` in qkv's dtype, written in place.

    Rotate-half rotary (non-interleaved) on the first ``rotary_ndims`` dims of
    q and k, in float32; k and v of every non-padding token are written at
    ``cache[b, :, positions[b, t]]``. Returns q ``[B, T, H, D]`` (rotated; left
    as it is for padding tokens) in qkv's dtype.
    """
    B, T, _ = qkv.shape
    H, D = k_cache.shape[1], k_cache.shape[3]
    x = qkv.reshape(B, T, H, 3, D).float()
    q, k, v = x.unbind(3)
    half = rotary_ndims // 2
    ang = positions.clamp(min=0).float()[..., None] * rope_inv_freq(rotary_ndims, rope_theta).to(qkv.device)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, :, None, :]  # [B, T, 1, R]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, :, None, :]

    def rotate(t: torch.Tensor) -> torch.Tensor:
        r = t[..., :rotary_ndims]
        rotated = torch.cat([-r[..., half:], r[..., :half]], -1)
        return torch.cat([r * cos + rotated * sin, t[..., rotary_ndims:]], -1)

    valid = positions >= 0
    q = torch.where(valid[..., None, None], rotate(q), q)
    k = rotate(k)
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    slots = positions[b_idx, t_idx]
    k_cache[b_idx, :, slots] = k[b_idx, t_idx].to(k_cache.dtype)  # [n, H, D]
    v_cache[b_idx, :, slots] = v[b_idx, t_idx].to(v_cache.dtype)
    return q.to(qkv.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Twin of ``ops.decode_attention``.

    q: ``[B, T, H, D]``; k_cache, v_cache: ``[Bc >= B, H, L, D]``; positions:
    int64 ``[B, T]``. The query of token ``(b, t)`` attends to cache slots
    ``0 .. positions[b, t]`` of sequence ``b`` (inclusive: its own key is
    there already), so one call serves decode (T = 1), several new tokens and a
    left-padded prefill alike. Scores, softmax and the weighted sum in float32;
    a padding query (negative position) gets zeros. Returns ``[B, T, H, D]`` in
    q's dtype.
    """
    B, T, H, D = q.shape
    L = k_cache.shape[2]
    k = k_cache[:B].float()
    v = v_cache[:B].float()
    slots = torch.arange(L, device=q.device)
    out = torch.zeros(B, T, H, D, dtype=torch.float32, device=q.device)
    # One query per sequence at a time, over the slots it sees only: a masked
    # slot must not reach the result. Its score is overwritten by -inf below,
    # but its value would be multiplied by a zero probability, and 0 * (a NaN
    # or inf left there) is NaN: masked values are zeroed first.
    for t in range(T):
        visible = slots[None, :] <= positions[:, t, None]  # [B, L]
        vt = v.masked_fill(~visible[:, None, :, None], 0.0)
        scores = torch.einsum("bhd,bhld->bhl", q[:, t].float(), k) * scale
        probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        has_slots = visible.any(-1)[:, None, None]  # a padding query sees none: zeros
        out[:, t] = torch.where(has_slots, torch.einsum("bhl,bhld->bhd", probs, vt), 0.0)
    return out.to(q.dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Twin of ``ops.gelu``: ``x * Phi(x) = 0.5 x erfc(-x / sqrt(2))`` in float64,
    rounded once to x's dtype (the erfc form: no ``1 + erf`` cancellation for
    negative x). +inf gives +inf, -inf NaN (``0 * -inf``), as the kernels."""
    xd = x.detach().double()
    return (0.5 * xd * torch.special.erfc(-xd * 0.7071067811865476)).to(x.dtype)


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
) -> None:
    """Twin of ``ops.neox_block_`` (same arguments): one GPT-NeoX block of a
    decode step from the twins above, updating x and the caches in place.

    Every intermediate is rounded to x's dtype where the op rounds it: after
    each LayerNorm (computed in float32), each Linear, the rotary, the
    attention, the GELU and each residual add.
    """
    hidden = x.shape[-1]
    B, T = x.shape[0], x.shape[1]
    shapes = [(3 * hidden, hidden), (hidden, hidden), (intermediate_size, hidden), (hidden, intermediate_size)]
    qkv, dense, up, down = (
        (lambda h, p=p, a=a, b=b, s=s: gemm_4bit(h, p, a, s, b, blocksize, quant_type))
        for (p, a, b), s in zip(linears, shapes)
    )

    def layer_norm(h, w_b):
        return torch.nn.functional.layer_norm(h.float(), (hidden,), w_b[0], w_b[1], eps).to(h.dtype)

    def attention(h):
        q = rotary_kv_cache_(qkv(h), positions, k_cache, v_cache, rotary_ndims, rope_theta)
        return dense(decode_attention(q, k_cache, v_cache, positions, scale).reshape(B, T, hidden))

    def mlp(h):
        return down(gelu(up(h)))

    if parallel_residual:
        a = attention(layer_norm(x, ln1))
        out = x + a + mlp(layer_norm(x, ln2))
    else:
        h = x + attention(layer_norm(x, ln1))
        out = h + mlp(layer_norm(h, ln2))
    x.copy_(out)
