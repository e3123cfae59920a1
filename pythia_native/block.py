"""One GPT-NeoX block, written once, and the fused op ``neox_block_``.

:func:`compose_block` is the block's math from callables for its parts
(LayerNorms, the four Linears, the activation); the model builds every layer
with it (pythia_native/model.py), for prefill and decode alike:

    parallel residual:   x + attention(ln1(x)) + mlp(ln2(x))
    sequential residual: h = x + attention(ln1(x)); h + mlp(ln2(h))
    attention(h) = dense(attend(rotary_kv_cache_(qkv(h))))
    mlp(h)       = down(act(up(h)))

``torch.ops.pythia_native.neox_block_`` runs one such block with 4-bit
Linears and the exact GELU for tokens that attend through the KV cache (a
decode step), updating x in place. Its CPU kernel (csrc/block.cpp) is one
native call per block on preallocated scratch: the same kernels in the same
order, without ~15 Python-level op calls per block (on a 2-vCPU Xeon,
pythia-160m decode: ~1.4 of ~6.5 ms per step went there). Its CUDA kernel is
the composition below over the per-op CUDA kernels, registered here: on
CUDA the decode step is a CUDA graph, which already removes that overhead.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from . import _C, ops

Fn = Callable[[torch.Tensor], torch.Tensor]


def layer_norm_fn(weight: torch.Tensor, bias: torch.Tensor, eps: float) -> Fn:
    """x -> LayerNorm(x) in float32 whatever the activation dtype (fp16 Pythia
    overflows otherwise), rounded back to x's dtype."""
    shape = (weight.shape[0],)

    def layer_norm(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), shape, weight, bias, eps).to(x.dtype)

    return layer_norm


class _Causal:
    """The mask of a prefill whose every row holds positions 0..T-1 (no padding,
    nothing in the cache before): SDPA's own causal masking (``is_causal``),
    which skips the masked half that an explicit mask makes it compute (2x at
    T = 2000 on the CPU) and gives the same bits (checked, float32 and
    bfloat16, T 1 to 2000)."""

    def __repr__(self) -> str:
        return "CAUSAL"


CAUSAL = _Causal()


def prefill_mask(positions: torch.Tensor, span: int) -> Union[torch.Tensor, _Causal]:
    """Which cache slots each query may see: bool ``[B, 1, T, span]``, slot ``s``
    visible to token ``(b, t)`` iff ``s <= positions[b, t]``; :data:`CAUSAL`
    where that is the plain causal mask (every row 0..T-1, span T: a single
    prompt, prompts of one length, a scored window). A padding query is
    pointed at slot 0 (every real sequence has written it) so no softmax row is
    empty; its output is garbage that nothing reads. Built once per forward and
    shared by every layer (the CAUSAL test reads positions: one host sync per
    prefill on CUDA, where sampling its first token syncs anyway)."""
    T = positions.shape[1]
    slots = torch.arange(span, device=positions.device)
    if span == T and torch.equal(positions, slots.expand_as(positions)):
        return CAUSAL
    return (slots[None, None, :] <= positions.clamp(min=0)[:, :, None])[:, None]


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: Union[torch.Tensor, _Causal], scale: float
) -> torch.Tensor:
    """Several new tokens per sequence against the cache, with torch's SDPA.

    q ``[B, T, H, D]``; caches ``[Bc, H, L, D]``; mask: :func:`prefill_mask`
    ``[B, 1, T, span]``, or :data:`CAUSAL` (span T). Same contract as
    ``ops.decode_attention`` (query ``(b, t)`` sees slots ``0..positions[b, t]``)
    but through a library kernel built for many queries. Returns ``[B, T, H, D]``.
    """
    B, T = q.shape[:2]
    span, masking = (T, dict(is_causal=True)) if mask is CAUSAL else (mask.shape[-1], dict(attn_mask=mask))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache[:B, :, :span], v_cache[:B, :, :span], scale=scale, **masking
    )
    return out.transpose(1, 2)


def compose_block(
    *,
    ln1: Fn,
    ln2: Fn,
    qkv: Fn,
    dense: Fn,
    up: Fn,
    down: Fn,
    act: Fn,
    rotary_ndims: int,
    rope_theta: float,
    scale: float,
    parallel_residual: bool,
):
    """The block as ``layer(x, positions, k_cache, v_cache, mask) -> new x``.

    x ``[B, T, hidden]``; positions int64 ``[B, T]`` (negative = padding);
    caches ``[Bc, H, L, D]``, written at the tokens' positions; mask: None for
    tokens that attend through ``decode_attention`` (a decode step), else
    :func:`prefill_mask` for SDPA (a prefill).
    """

    def attention(h, positions, k_cache, v_cache, mask):
        B, T, hidden = h.shape
        q = ops.rotary_kv_cache_(qkv(h), positions, k_cache, v_cache, rotary_ndims, rope_theta)
        if mask is None:
            a = ops.decode_attention(q, k_cache, v_cache, positions, scale)
        else:
            a = prefill_attention(q, k_cache, v_cache, mask, scale)
        return dense(a.reshape(B, T, hidden))

    if parallel_residual:

        def layer(x, positions, k_cache, v_cache, mask):
            a = attention(ln1(x), positions, k_cache, v_cache, mask)
            return x + a + down(act(up(ln2(x))))

    else:

        def layer(x, positions, k_cache, v_cache, mask):
            x = x + attention(ln1(x), positions, k_cache, v_cache, mask)
            return x + down(act(up(ln2(x))))

    return layer


def _composed(x, positions, k_cache, v_cache, *rest) -> torch.Tensor:
    """``neox_block_``'s result as a new tensor (the op's arguments, in its
    order), through :func:`compose_block` and the per-op kernels of x's device."""
    ln1_w, ln1_b, ln2_w, ln2_b, eps, *linears = rest[:17]
    inter, blocksize, quant_type, rotary_ndims, rope_theta, scale, parallel_residual, compute = rest[17:]
    hidden = x.shape[-1]
    shapes = [(3 * hidden, hidden), (hidden, hidden), (inter, hidden), (hidden, inter)]

    def linear(i):
        packed, absmax, bias = linears[3 * i : 3 * i + 3]
        n, k = shapes[i]
        return lambda h: ops._ops.gemm_4bit(h, packed, absmax, bias, n, k, blocksize, quant_type, compute)

    layer = compose_block(
        ln1=layer_norm_fn(ln1_w, ln1_b, eps), ln2=layer_norm_fn(ln2_w, ln2_b, eps),
        qkv=linear(0), dense=linear(1), up=linear(2), down=linear(3), act=ops.gelu,
        rotary_ndims=rotary_ndims, rope_theta=rope_theta, scale=scale, parallel_residual=parallel_residual,
    )
    return layer(x, positions, k_cache, v_cache, None)


def _with_defaults(op, args: tuple) -> tuple:
    """``args`` of ``op`` with the schema's defaults appended for those left
    out: the dispatcher hands a Python kernel only the arguments its caller
    gave (keyword ones made positional)."""
    missing = op._schema.arguments[len(args):]
    return (*args, *(a.default_value for a in missing))


def composed_block_(*args) -> None:
    """``neox_block_`` (the op's arguments, in its order; trailing ones with a
    default may be left out) through :func:`compose_block` on the per-op
    kernels of x's device, after the op's own argument checks
    (csrc/block.cpp): the op's CUDA kernel, and on the CPU the oracle the
    fused kernel is tested against."""
    args = _with_defaults(torch.ops.pythia_native.neox_block_.default, args)
    _C.check_neox_block_call(*args)  # the argument checks, and x and the caches apart from the rest
    x = args[0]
    # An x made under inference_mode may be updated outside it, as the fused
    # kernel (and rotary_kv_cache_ on the caches) does: torch refuses an
    # in-place op on an inference tensor outside that mode, so the copy runs in it.
    with torch.inference_mode(x.is_inference()):
        x.copy_(_composed(*args))
    # The fused kernel bumps x's version counter (the caches' come from
    # rotary_kv_cache_); this copy_, inside a kernel, is below the dispatch
    # key that would. Inference tensors have none.
    if not x.is_inference():
        torch.autograd.graph.increment_version(x)


@torch.library.impl("pythia_native::neox_block_", "CUDA")
def _neox_block_cuda(*args) -> None:
    composed_block_(*args)
