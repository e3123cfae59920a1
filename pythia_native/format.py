"""The bitsandbytes 4-bit format at the Python level: code tables (read from the
compiled core, the single source), double quantization of the block scales,
and the serialized quant-state record. ../shared/docs/FORMAT.md is the spec.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import _C

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # double quantization always uses 256-value blocks


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return quant_type


@functools.lru_cache(maxsize=None)
def _code_table_cpu(quant_type: str) -> torch.Tensor:
    return torch.tensor(_C.code_table(check_quant_type(quant_type)), dtype=torch.float32)


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 code values of ``quant_type`` in index order (a fresh tensor)."""
    return _code_table_cpu(quant_type).to(device, copy=True)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes' signed 8-bit "dynamic" map (Dettmers, 8-bit approximations):
    # for exponent e = 0..6 the magnitudes 10^(e-6) * (midpoints of an even grid
    # of 2^e + 1 points on [0.1, 1]), both signs, plus 0 and 1.0; padded with
    # zeros to 256 and sorted. Values are computed in float32 like the original.
    values: list[float] = []
    for e in range(7):
        grid = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (e - 6)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry signed dynamic map used for double-quantized absmax."""
    return _dynamic_map_cpu().to(device, copy=True)


@dataclass
class NestedAbsmax:
    """Double-quantized block scales: uint8 codes, their own float32 scales, the
    256-entry map and the subtracted mean."""

    absmax_q: torch.Tensor  # uint8 [n_blocks]
    nested_absmax: torch.Tensor  # float32 [ceil(n_blocks / 256)]
    nested_quant_map: torch.Tensor  # float32 [256]
    offset: float

    def decode(self) -> torch.Tensor:
        from .ops import dequantize_absmax

        return dequantize_absmax(
            self.absmax_q, self.nested_absmax, self.nested_quant_map, self.offset, NESTED_BLOCKSIZE
        )


def quantize_absmax(absmax: torch.Tensor) -> NestedAbsmax:
    """Double-quantize float32 block scales as bitsandbytes does on the CPU:
    subtract the mean, then blockwise (256) quantize to the dynamic map,
    rounding to the nearest code (a value on a midpoint takes the lower code).
    """
    absmax = absmax.float().reshape(-1)
    offset = absmax.mean()
    centered = absmax - offset
    n = centered.numel()
    blocks = math.ceil(n / NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(centered, (0, blocks * NESTED_BLOCKSIZE - n))
    nested = padded.view(blocks, NESTED_BLOCKSIZE).abs().amax(dim=1)
    scaled = (padded.view(blocks, -1) / nested.clamp(min=1e-38).unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
    code = dynamic_map(absmax.device)
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, bounds).to(torch.uint8)
    return NestedAbsmax(q, nested, code, float(offset))


@dataclass
class QuantState:
    """The non-tensor part of a serialized 4-bit weight
    (``<prefix>.weight.quant_state.bitsandbytes__<quant_type>``, UTF-8 JSON)."""

    quant_type: str
    blocksize: int
    dtype: torch.dtype  # the dtype the weight had before quantization
    shape: tuple[int, ...]
    nested_offset: Optional[float] = None  # set when double-quantized

    @property
    def key_suffix(self) -> str:
        return f"quant_state.bitsandbytes__{self.quant_type}"

    def to_tensor(self) -> torch.Tensor:
        record = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if self.nested_offset is not None:
            record.update(
                {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": self.nested_offset}
            )
        return torch.tensor(list(json.dumps(record).encode("utf-8")), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, name: str = "quant_state") -> "QuantState":
        try:
            record = json.loads(bytes(t.cpu().to(torch.uint8).tolist()).decode("utf-8"))
            quant_type = check_quant_type(record["quant_type"])
            blocksize = int(record["blocksize"])
            dtype = getattr(torch, record.get("dtype", "float32"))
            shape = tuple(int(s) for s in record["shape"])
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{name}: not a valid bitsandbytes quant_state record ({e})") from None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{name}: unknown dtype {record.get('dtype')!r}")
        if blocksize < 2 or blocksize & (blocksize - 1):
            raise ValueError(f"{name}: blocksize must be a power of two >= 2, got {blocksize}")
        if any(s < 0 for s in shape):
            raise ValueError(f"{name}: negative dimension in shape {list(shape)}")
        nested_offset = None
        if "nested_offset" in record:
            nb = int(record.get("nested_blocksize", NESTED_BLOCKSIZE))
            if nb != NESTED_BLOCKSIZE:
                raise ValueError(f"{name}: nested_blocksize {nb} is not supported (bitsandbytes uses 256)")
            nested_offset = float(record["nested_offset"])
        return cls(quant_type, blocksize, dtype, shape, nested_offset)
