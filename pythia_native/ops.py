"""Python wrappers of the native ops, and their fake (meta) kernels.

Every op is declared once in csrc/ops.cpp (``TORCH_LIBRARY(pythia_native)``)
and has a CPU and a CUDA kernel; the wrappers here only give them defaults and
documentation. Python never branches on the device: the dispatcher does.

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

_ops = torch.ops.pythia_native


def quantize_4bit(
    weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
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
    blocksize: int = 64,
    quant_type: str = "nf4",
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
    blocksize: int = 64,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` (``shape = (N, K)``) in 4 bits.

    x: ``[..., K]`` float32/float16/bfloat16 (any leading shape, including an
    empty one); bias: ``[N]`` in x's dtype or None. Returns ``[..., N]`` in x's
    dtype, accumulated in float32. No dequantized copy of W is kept: the CPU
    kernel streams the packed rows for small M and dequantizes cache-sized
    panels for a BLAS call for large M; the CUDA kernel is a GEMV for M <= 16
    and dequantize + cuBLAS above.
    """
    n, k = (int(s) for s in shape)
    return _ops.gemm_4bit(x, packed, absmax, bias, n, k, blocksize, quant_type)


# ----------------------------------------------------------- fake kernels ---
# Shapes only, for torch.compile / FakeTensor / meta tracing.


@torch.library.register_fake("pythia_native::quantize_4bit")
def _quantize_4bit_fake(weight, blocksize, quant_type):
    numel = weight.numel()
    packed = weight.new_empty(((numel + 1) // 2, 1), dtype=torch.uint8)
    absmax = weight.new_empty((math.ceil(numel / blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("pythia_native::dequantize_4bit")
def _dequantize_4bit_fake(packed, absmax, blocksize, quant_type, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("pythia_native::dequantize_absmax")
def _dequantize_absmax_fake(absmax_q, nested_absmax, nested_code, offset, nested_blocksize):
    return nested_absmax.new_empty((absmax_q.numel(),), dtype=torch.float32)


@torch.library.register_fake("pythia_native::gemm_4bit")
def _gemm_4bit_fake(x, packed, absmax, bias, n, k, blocksize, quant_type):
    torch._check(x.shape[-1] == k, lambda: f"gemm_4bit: x must have shape [..., {k}], got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], n))
