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
from .errors import OptionError

QUANT_TYPES = ("nf4", "fp4")
# The defaults of every signature here that takes them (bitsandbytes'
# quantize_4bit and Linear4bit default to fp4; this package to nf4).
DEFAULT_QUANT_TYPE = "nf4"
DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # double quantization always uses 256-value blocks
# What a block's absmax is floored at before it divides (1e-38; the C++
# kernels' kAbsmaxFloor, csrc/common/codebook.h).
ABSMAX_FLOOR = float(_C.absmax_floor)


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise OptionError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return quant_type


def check_blocksize(blocksize, name: str = "blocksize") -> int:
    """``blocksize`` as an int if the kernels take it (a power of two in
    ``_C.blocksize_range()``), else an OptionError (a ValueError) that names it."""
    lo, hi = _C.blocksize_range()
    if (
        not isinstance(blocksize, int)
        or isinstance(blocksize, bool)
        or not lo <= blocksize <= hi
        or blocksize & (blocksize - 1)
    ):
        raise OptionError(f"{name} must be a power of two in [{lo}, {hi}], got {blocksize!r}")
    return blocksize


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
    """Double-quantize float32 block scales as bitsandbytes does: subtract the
    mean, then blockwise (256) quantize to the dynamic map, rounding to the
    nearest code (a value on a midpoint takes the lower code).

    The same codes as bitsandbytes' pure-PyTorch back end. Its CPU library
    (bitsandbytes 0.50) picks a farther code for some values (849 of 298,189
    log-uniform scales, up to a whole code step); both decode through the
    same stored map, so either file loads, ours the nearer to the scales.
    """
    absmax = absmax.float().reshape(-1)
    n = absmax.numel()
    code = dynamic_map(absmax.device)
    if n == 0:  # a weight with no elements: no blocks, no scales
        return NestedAbsmax(torch.empty(0, dtype=torch.uint8, device=absmax.device), absmax.new_empty(0), code, 0.0)
    offset = absmax.mean()
    centered = absmax - offset
    blocks = math.ceil(n / NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(centered, (0, blocks * NESTED_BLOCKSIZE - n))
    nested = padded.view(blocks, NESTED_BLOCKSIZE).abs().amax(dim=1)
    scaled = (padded.view(blocks, -1) / nested.clamp(min=ABSMAX_FLOOR).unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
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
            if not isinstance(record, dict):
                raise TypeError(f"expected a JSON object, got {type(record).__name__}")
            quant_type = check_quant_type(record["quant_type"])
            blocksize = _json_int(record["blocksize"], "blocksize")
            dtype = getattr(torch, record.get("dtype", "float32"))
            if not isinstance(record["shape"], list):
                raise TypeError(f"shape must be a list, got {record['shape']!r}")
            shape = tuple(_json_int(s, "shape") for s in record["shape"])
            nested_offset = None
            if "nested_offset" in record:
                nb = _json_int(record.get("nested_blocksize", NESTED_BLOCKSIZE), "nested_blocksize")
                if nb != NESTED_BLOCKSIZE:
                    raise ValueError(f"nested_blocksize {nb} is not supported (bitsandbytes uses 256)")
                nested_offset = record["nested_offset"]
                if not isinstance(nested_offset, (int, float)) or isinstance(nested_offset, bool) \
                        or not math.isfinite(nested_offset):
                    raise ValueError(f"nested_offset must be a finite number, got {nested_offset!r}")
                nested_offset = float(nested_offset)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{name}: not a valid bitsandbytes quant_state record ({e})") from None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{name}: unknown dtype {record.get('dtype')!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):  # the weight's own dtype
            raise ValueError(f"{name}: dtype must be float32, float16 or bfloat16, got {record.get('dtype')!r}")
        check_blocksize(blocksize, f"{name}: blocksize")
        if any(s < 0 for s in shape):
            raise ValueError(f"{name}: negative dimension in shape {list(shape)}")
        return cls(quant_type, blocksize, dtype, shape, nested_offset)


def _json_int(v, what: str) -> int:
    """An integer field of a quant_state record (JSON: an int, not 48.5 or "64")."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{what} must hold integers, got {v!r}")
    return v
