"""QuantizedLinear: an ``nn.Linear`` whose weight is stored in the bitsandbytes
4-bit format and multiplied by the native ``gemm_4bit``.

Its ``state_dict()`` is the layout transformers + bitsandbytes serialize
(FORMAT.md), so a layer saved here loads in bitsandbytes and the other way
round, without re-quantization:

    <p>.weight                                   uint8   [(out*in + 1) // 2, 1]
    <p>.weight.absmax                            float32 [n_blocks] (uint8 if double-quantized)
    <p>.weight.quant_map                         float32 [16]
    <p>.weight.nested_absmax                     float32 [ceil(n_blocks / 256)]  (double quant)
    <p>.weight.nested_quant_map                  float32 [256]                   (double quant)
    <p>.weight.quant_state.bitsandbytes__<qt>    uint8   UTF-8 JSON record
    <p>.bias                                     the model dtype [out]
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import ops
from .format import DEFAULT_BLOCKSIZE, DEFAULT_QUANT_TYPE, NestedAbsmax, QuantState, check_blocksize, check_quant_type, code_table, quantize_absmax


class QuantizedLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` ``[out_features, in_features]`` in 4 bits.

    Buffers: ``weight`` (packed uint8) and ``absmax`` (float32, decoded once
    if the checkpoint double-quantized it; the compressed form is kept in
    ``nested`` for saving). ``bias`` is a frozen parameter in the compute dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = DEFAULT_BLOCKSIZE,
        quant_type: str = DEFAULT_QUANT_TYPE,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
        compute: str = "float32",
    ):
        super().__init__()
        # gemm_4bit's arithmetic (ops.gemm_4bit): "float32", or "int16" (x
        # rounded to int16 per 64 elements in the CPU GEMV: 1.6-2.4x faster at
        # M = 1 with AVX-512 VNNI, 2.4-4.4x with AVX2 only; README, Arithmetic).
        self.compute = ops.check_compute(compute)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype (the weight's before quantization), got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = check_blocksize(blocksize)
        self.quant_type = check_quant_type(quant_type)
        self.weight_dtype = dtype  # the dtype the weight had before quantization
        numel = self.in_features * self.out_features
        self.register_buffer("weight", torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(math.ceil(numel / self.blocksize), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.nested: Optional[NestedAbsmax] = None

    # ------------------------------------------------------------ builders --

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        blocksize: int = DEFAULT_BLOCKSIZE,
        quant_type: str = DEFAULT_QUANT_TYPE,
        compress_statistics: bool = False,
    ) -> "QuantizedLinear":
        """Quantize an ``nn.Linear`` (its weight's device and dtype are kept)."""
        w = linear.weight.detach()
        check_blocksize(blocksize)
        q = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=w.dtype,
            device=w.device,
        )
        packed, absmax = ops.quantize_4bit(w, blocksize, quant_type)
        q.weight.copy_(packed)
        if compress_statistics:
            q.nested = quantize_absmax(absmax)
            absmax = q.nested.decode()
        q.absmax.copy_(absmax)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, torch.Tensor],
        prefix: str = "",
        *,
        device: Optional[torch.device | str] = None,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "QuantizedLinear":
        """Build from a bitsandbytes-format state dict (keys ``prefix + 'weight'``,
        ``prefix + 'weight.absmax'``, ...), using the packed bytes as they are.
        The bias (if ``prefix + 'bias'`` is there) is kept in ``compute_dtype``,
        by default its own dtype; the record's dtype stays the weight's (what
        ``dequantize()`` and a saved state dict give)."""
        state = parse_quant_state(state_dict, prefix)
        if len(state.shape) != 2:
            raise ValueError(f"{prefix}weight: a Linear weight must be 2-D, quant_state says shape {state.shape}")
        out_f, in_f = state.shape
        bias = state_dict.get(prefix + "bias")
        if bias is not None:
            _check_bias(bias, out_f, prefix)
        dtype = compute_dtype or (bias.dtype if bias is not None else state.dtype)
        q = cls(in_f, out_f, bias is not None, blocksize=state.blocksize, quant_type=state.quant_type, dtype=dtype, device=device)
        q._commit(state, *q._read_quantized(state_dict, prefix, state))
        if bias is not None:
            q.bias.data.copy_(bias.to(dtype))
        return q

    @torch.no_grad()
    def quantize_(
        self,
        weight: torch.Tensor,
        *,
        compress_statistics: bool = False,
        blocksize: Optional[int] = None,
        quant_type: Optional[str] = None,
    ) -> "QuantizedLinear":
        """Quantize a dense ``[out_features, in_features]`` weight into this layer,
        in place (the buffers keep their storage, so a captured CUDA graph stays
        valid). ``blocksize`` / ``quant_type``: the format to quantize to, by
        default the layer's own; a bitsandbytes layer taken as it is
        (``load_quantized_``) may have left another one there, and a new blocksize
        reallocates absmax."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight: expected shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}"
            )
        blocksize = self.blocksize if blocksize is None else check_blocksize(blocksize)
        quant_type = self.quant_type if quant_type is None else check_quant_type(quant_type)
        packed, absmax = ops.quantize_4bit(weight.to(self.weight.device), blocksize, quant_type)
        if compress_statistics:
            nested = quantize_absmax(absmax)
            absmax = nested.decode()
        else:
            nested = None
        self.weight.copy_(packed)
        _assign(self, "absmax", absmax)
        self.blocksize, self.quant_type, self.nested = blocksize, quant_type, nested
        self.weight_dtype = weight.dtype
        return self

    @torch.no_grad()
    def load_quantized_(self, state_dict: dict[str, torch.Tensor], prefix: str = "") -> "QuantizedLinear":
        """Take a bitsandbytes-format layer (``prefix + 'weight'``, ``'weight.absmax'``,
        ``'weight.quant_state.bitsandbytes__*'``, ...) as it is, without re-quantizing.
        The bias, if any, is not read here (it is a plain parameter)."""
        state = parse_quant_state(state_dict, prefix)
        if state.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"{prefix}weight: quant_state shape {state.shape} does not match this layer "
                f"({self.out_features}, {self.in_features})"
            )
        self._commit(state, *self._read_quantized(state_dict, prefix, state))
        return self

    # ------------------------------------------------------------- compute --

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bind()(x)

    def bind(self, compute: Optional[str] = None):
        """``forward`` as a plain function with this layer's tensors looked up once
        (``compute``: gemm_4bit's mode for it, None for ``self.compute``).

        For loops that call the layer many times while its tensors stay the same
        objects (an in-place load keeps them; ``.to()`` or a new state dict does
        not): the generate loop binds the model once per call, which spares
        ``nn.Module`` call and attribute overhead on every decode step.
        """
        gemm = torch.ops.pythia_native.gemm_4bit
        weight, absmax, bias = self.weight, self.absmax, self.bias
        n, k, blocksize, quant_type = self.out_features, self.in_features, self.blocksize, self.quant_type
        mode = ops.check_compute(self.compute if compute is None else compute)

        def linear(x: torch.Tensor) -> torch.Tensor:
            b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
            return gemm(x, weight, absmax, b, n, k, blocksize, quant_type, mode)

        return linear

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]``."""
        return ops.dequantize_4bit(
            self.weight,
            self.absmax,
            (self.out_features, self.in_features),
            self.blocksize,
            self.quant_type,
            dtype or self.weight_dtype,
        )

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq}"
        )

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .bfloat16() cast every floating buffer
        # (.type(dtype): every one), but the packed bytes (uint8) and absmax
        # (float32) are the 4-bit format: gemm_4bit refuses anything else, and a
        # cast would reinterpret or round them. Only the bias follows a dtype
        # cast. The format's tensors take fn's result where it keeps their dtype
        # (a device move; to_empty's fresh memory), else move device with their
        # own values. The compressed statistics (double quant) go alike.
        def keep_format(t: torch.Tensor) -> torch.Tensor:
            new = fn(t)
            return new if new.dtype == t.dtype else t.to(new.device)

        weight, absmax = self.weight, self.absmax
        super()._apply(fn, recurse)
        if self.weight.dtype != weight.dtype:
            self.weight = weight.to(self.weight.device)
        if self.absmax.dtype != absmax.dtype:
            self.absmax = absmax.to(self.absmax.device)
        if self.nested is not None:
            n = self.nested
            self.nested = NestedAbsmax(keep_format(n.absmax_q), keep_format(n.nested_absmax),
                                       keep_format(n.nested_quant_map), n.offset)
        return self

    # ------------------------------------------------- bitsandbytes layout --

    def _quant_state(self) -> QuantState:
        return QuantState(
            self.quant_type,
            self.blocksize,
            self.weight_dtype,
            (self.out_features, self.in_features),
            self.nested.offset if self.nested is not None else None,
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        def put(name, t):
            destination[prefix + name] = t if keep_vars else t.detach()

        put("weight", self.weight)
        if self.nested is not None:
            put("weight.absmax", self.nested.absmax_q)
        else:
            put("weight.absmax", self.absmax)
        put("weight.quant_map", code_table(self.quant_type, self.weight.device))
        if self.nested is not None:
            put("weight.nested_absmax", self.nested.nested_absmax)
            put("weight.nested_quant_map", self.nested.nested_quant_map)
        state = self._quant_state()
        put("weight." + state.key_suffix, state.to_tensor().to(self.weight.device))
        if self.bias is not None:
            put("bias", self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Everything is checked before anything is assigned: a state dict that
        # fails leaves the layer as it was (and usable).
        # Keys of a child module (torch.nn.utils.parametrize adds one) are its own.
        children = tuple(prefix + name + "." for name, _ in self.named_children())
        present = {k for k in state_dict if k.startswith(prefix) and not k.startswith(children)}
        expected = weight_keys(prefix, present, nested=False)
        if self.bias is not None:
            expected.add(prefix + "bias")
        state = None
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
        else:
            try:
                state = parse_quant_state(state_dict, prefix)
            except (KeyError, ValueError) as e:
                error_msgs.append(str(e).strip("'\""))
        if state is not None and state.nested_offset is not None:
            expected |= weight_keys(prefix, present, nested=True)
        if strict:
            # A key under its prefix that it does not read (a bias it has no
            # place for, a stray weight.* entry), outside its children, is unexpected.
            unexpected_keys.extend(sorted(present - expected))
        if state is None:
            return
        if state.shape != (self.out_features, self.in_features):
            error_msgs.append(
                f"{prefix}weight: quant_state shape {state.shape} does not match this layer "
                f"({self.out_features}, {self.in_features})"
            )
            return
        if prefix + "weight.absmax" not in state_dict:
            missing_keys.append(prefix + "weight.absmax")
            return
        bias = None
        if self.bias is not None:
            bias = state_dict.get(prefix + "bias")
            if bias is None:
                missing_keys.append(prefix + "bias")
            else:
                try:
                    _check_bias(bias, self.out_features, prefix)
                except ValueError as e:
                    error_msgs.append(str(e))
                    return
        # load_state_dict(assign=True): take the state dict's tensors, on their
        # device (a module built on meta gets real ones), as nn.Linear does.
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        try:
            loaded = self._read_quantized(state_dict, prefix, state,
                                          device=state_dict[prefix + "weight"].device if assign else None)
        except (KeyError, ValueError) as e:
            error_msgs.append(str(e).strip("'\""))
            return
        self._commit(state, *loaded, assign=assign)
        if bias is not None:
            if assign:
                self.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)
            else:
                self.bias.data.copy_(bias)

    def _read_quantized(
        self, sd: dict[str, torch.Tensor], prefix: str, state: QuantState, device: Optional[torch.device] = None
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[NestedAbsmax]]:
        """The packed bytes ``[(numel + 1) // 2, 1]``, the float32 block scales
        and the double-quantized form (or None) of a bitsandbytes-format layer,
        on ``device`` (None: this layer's), checked against ``state``; nothing is assigned."""
        numel = math.prod(state.shape)
        n_blocks = math.ceil(numel / state.blocksize)
        packed = _entry(sd, prefix + "weight")
        if packed.dtype != torch.uint8:
            # quant_storage other than uint8 (bnb_4bit_quant_storage): same bytes.
            packed = packed.contiguous().view(torch.uint8)
        if packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"{prefix}weight: expected {(numel + 1) // 2} packed bytes for shape {state.shape}, got {packed.numel()}"
            )
        qmap = sd.get(prefix + "weight.quant_map")
        if qmap is not None and not torch.equal(qmap.float().cpu().reshape(-1), code_table(state.quant_type)):
            raise ValueError(f"{prefix}weight.quant_map: not the standard {state.quant_type} table")
        absmax = _entry(sd, prefix + "weight.absmax")
        if absmax.numel() != n_blocks:
            raise ValueError(f"{prefix}weight.absmax: expected {n_blocks} block scales, got {absmax.numel()}")
        dev = self.weight.device if device is None else device
        nested = None
        if state.nested_offset is not None:
            if absmax.dtype != torch.uint8:
                raise ValueError(f"{prefix}weight.absmax: double-quantized absmax must be uint8, got {absmax.dtype}")
            nested = NestedAbsmax(
                absmax.reshape(-1).to(dev, copy=True),
                _entry(sd, prefix + "weight.nested_absmax").float().reshape(-1).to(dev, copy=True),
                _entry(sd, prefix + "weight.nested_quant_map").float().reshape(-1).to(dev, copy=True),
                state.nested_offset,
            )
            try:
                absmax = nested.decode()
            except RuntimeError as e:  # dequantize_absmax's checks (sizes of the nested tensors)
                raise ValueError(f"{prefix}weight: the double-quantized absmax does not decode: {e}") from None
        else:
            if not absmax.is_floating_point():
                raise ValueError(f"{prefix}weight.absmax: expected float32 block scales, got {absmax.dtype}")
            absmax = absmax.float().reshape(-1)
        return packed.reshape(-1, 1), absmax.to(dev), nested

    def _commit(self, state: QuantState, packed: torch.Tensor, absmax: torch.Tensor, nested: Optional[NestedAbsmax],
                assign: bool = False) -> None:
        """Take what _read_quantized checked. In place when the sizes match (a
        captured CUDA graph keeps pointing at these buffers); with ``assign``,
        the tensors themselves."""
        self.quant_type = state.quant_type
        self.blocksize = state.blocksize
        self.weight_dtype = state.dtype
        if assign:
            self.weight, self.absmax = packed, absmax.to(packed.device)
        else:
            _assign(self, "weight", packed)
            _assign(self, "absmax", absmax)
        self.nested = nested


def _entry(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """``sd[key]``, or a KeyError that says what is missing."""
    if key not in sd:
        raise KeyError(f"{key}: missing from the state dict")
    return sd[key]


def _check_bias(bias: torch.Tensor, out_features: int, prefix: str) -> None:
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise ValueError(f"{prefix}bias: expected a floating-point tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{prefix}bias: expected shape ({out_features},), got {tuple(bias.shape)}")


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set buffer ``name`` to ``value``: copied into the existing storage when
    shape and dtype agree, else replaced by a copy on the module's device."""
    current = getattr(module, name)
    if current.shape == value.shape and current.dtype == value.dtype:
        current.copy_(value)
    else:
        setattr(module, name, value.to(current.device, copy=True))


def weight_keys(prefix: str, present, nested: bool) -> set[str]:
    """The ``weight*`` keys a bitsandbytes 4-bit layer at ``prefix`` reads:
    the packed weight, absmax, quant_map, the quant_state entries among
    ``present`` and, when ``nested`` (double quant), the nested pair. Any
    other ``weight.*`` key under the prefix is unexpected."""
    keys = {prefix + "weight", prefix + "weight.absmax", prefix + "weight.quant_map"}
    keys |= {k for k in present if k.startswith(prefix + "weight.quant_state.bitsandbytes__")}
    if nested:
        keys |= {prefix + "weight.nested_absmax", prefix + "weight.nested_quant_map"}
    return keys


def parse_quant_state(state_dict: dict[str, torch.Tensor], prefix: str) -> QuantState:
    """The quant_state record of ``prefix + 'weight'``; errors name the key."""
    keys = [k for k in state_dict if k.startswith(prefix + "weight.quant_state.bitsandbytes__")]
    if len(keys) != 1:
        raise KeyError(
            f"{prefix}weight: expected one '{prefix}weight.quant_state.bitsandbytes__nf4' or '__fp4' entry, "
            f"found {keys or 'none'}"
        )
    state = QuantState.from_tensor(state_dict[keys[0]], keys[0])
    if not keys[0].endswith(state.quant_type):
        raise ValueError(f"{keys[0]}: the key says {keys[0].rsplit('__', 1)[1]} but the record says {state.quant_type}")
    if state.nested_offset is not None:
        for k in ("weight.nested_absmax", "weight.nested_quant_map"):
            if prefix + k not in state_dict:
                raise KeyError(f"{prefix}{k}: missing (the quant_state says the absmax is double-quantized)")
    return state
