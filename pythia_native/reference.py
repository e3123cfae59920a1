"""Pure-PyTorch twins of the native ops: the readable definition of what each
kernel computes, and the oracle of the tests. Slow by design; never used on a
hot path.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .format import check_quant_type, code_table

ABSMAX_FLOOR = 1e-38


def _bounds_and_order(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = code_table(quant_type)
    order = torch.argsort(code, stable=True)  # FP4: +0 (index 0) sorts before -0 (index 8)
    s = code[order]
    return (s[:-1] + s[1:]) / 2, order


def quantize_4bit(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
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
    blocksize: int = 64,
    quant_type: str = "nf4",
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
    blocksize: int = 64,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """Twin of ``ops.gemm_4bit``: dequantize to float32, matmul in float32
    (float64 would hide nothing the tolerance cares about), cast to x's dtype."""
    w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
