"""``load()``: a name or directory and a revision in, a :class:`Pythia` ready to generate out.

Steps: resolve the name and revision (``suite``; an invalid step fails before
any network access), fetch only the needed files (``hub``; cache, offline),
read ``config.json``, build the model, stream the weights into it one tensor at
a time (``weights``): dense checkpoints are quantized as they arrive,
bitsandbytes 4-bit checkpoints are taken as they are.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import PythiaConfig
from .errors import CheckpointError, ConfigError, DeviceError
from .generate import Pythia
from .hub import download_checkpoint
from .model import PythiaModel
from .tokenizer import Tokenizer
from .weights import CheckpointReader, read_config


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``None``: CUDA when a GPU is visible, else the CPU. A named CUDA device must exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {device!r} is not a device name (use 'cpu', 'cuda' or 'cuda:N')") from None
    if dev.type == "cuda":
        from . import _C

        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' asked for, but no CUDA GPU is visible (use --device cpu)")
        if not _C.build_info().get("cuda", False):
            raise DeviceError("device 'cuda' asked for, but pythia-native was built without CUDA (rebuild with PYTHIA_NATIVE_CUDA=1)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise DeviceError(f"device {device!r}: pythia-native runs on 'cpu' and 'cuda' only")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU; bfloat16 on CUDA (fp16 residual streams of small Pythia models can overflow)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def check_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise DeviceError(f"dtype {dtype!r}: expected one of {sorted(names)}")
        dtype = names[dtype]
    allowed = (torch.float32, torch.bfloat16) if device.type == "cpu" else (torch.float16, torch.bfloat16, torch.float32)
    if dtype not in allowed:
        raise DeviceError(f"dtype {dtype} is not supported on {device.type} (use one of {[str(d) for d in allowed]})")
    return dtype


def bnb_quantization(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The ``quantization_config`` of a bitsandbytes 4-bit checkpoint, else None.
    An 8-bit or non-bitsandbytes quantized checkpoint is refused by name."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ConfigError(f"config.json: quantization method {method!r} is not supported (bitsandbytes 4-bit only)")
    if q.get("load_in_8bit"):
        raise ConfigError("config.json: a bitsandbytes 8-bit checkpoint (load_in_8bit) is not supported; use the fp16/fp32 "
                          "checkpoint or a 4-bit one")
    if not q.get("load_in_4bit"):
        raise ConfigError("config.json: quantization_config without load_in_4bit; not a bitsandbytes 4-bit checkpoint")
    return q


def load(
    name_or_path: Union[str, os.PathLike],
    revision: Optional[str] = None,
    *,
    quant_type: str = "nf4",
    double_quant: bool = False,
    quantize_embed_out: bool = False,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    local_files_only: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    max_batch: int = 1,
    max_len: Optional[int] = None,
    cuda_graphs: bool = True,
) -> Pythia:
    """Load a Pythia (or any GPT-NeoX) checkpoint with 4-bit Linear layers.

    Args:
        name_or_path: ``pythia-160m``, ``EleutherAI/pythia-160m-deduped``, an old
            name (``pythia-125m``, renamed, with a warning), another hub repo id
            holding a GPT-NeoX checkpoint, or a local directory.
        revision: ``main`` (default), ``stepN`` (checked against the suite before any
            download), a commit hash, or any branch of a non-EleutherAI repo.
        quant_type, double_quant, quantize_embed_out: how a dense checkpoint is
            quantized while loading. A bitsandbytes 4-bit checkpoint keeps its own
            settings and bytes (never re-quantized); these are then ignored.
        device: "cpu", "cuda", "cuda:N" or None (CUDA when visible).
        dtype: activation dtype (float32/bfloat16 on CPU, float16/bfloat16 on CUDA).
        cache_dir, local_files_only, token: passed to huggingface_hub
            (``HF_HUB_OFFLINE=1`` is honoured when ``local_files_only`` is None).
        max_batch, max_len, cuda_graphs: see :class:`Pythia`.
    """
    dev = resolve_device(device)
    dt = check_dtype(dtype, dev)
    directory = download_checkpoint(name_or_path, revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                    token=token)
    model = build_model(directory, quant_type=quant_type, double_quant=double_quant,
                        quantize_embed_out=quantize_embed_out, device=dev, dtype=dt)
    tokenizer = Tokenizer.from_file(Path(directory) / "tokenizer.json")
    engine = Pythia(model, tokenizer, max_batch=max_batch, max_len=max_len, cuda_graphs=cuda_graphs)
    engine.source = (str(name_or_path), revision or "main", str(directory))
    return engine


def build_model(
    directory: Union[str, os.PathLike],
    *,
    quant_type: str = "nf4",
    double_quant: bool = False,
    quantize_embed_out: bool = False,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> PythiaModel:
    """The model of a checkpoint directory, weights streamed in one tensor at a time."""
    raw = read_config(directory)
    config = PythiaConfig.from_dict(raw)
    q = bnb_quantization(raw)
    with CheckpointReader(directory) as reader:
        keys = reader.keys()
        if q is not None:
            quant_type = q.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default is fp4
            double_quant = bool(q.get("bnb_4bit_use_double_quant", False))
            # transformers leaves embed_out dense unless told otherwise; the file says which.
            quantize_embed_out = "embed_out.weight.absmax" in keys or "lm_head.weight.absmax" in keys
            if not any(k.endswith(".weight.absmax") for k in keys):
                raise CheckpointError(
                    f"{directory}: config.json says bitsandbytes 4-bit but no weight has 4-bit statistics "
                    "(weight.absmax); the checkpoint files do not match the config"
                )
        model = PythiaModel(config, quant_type=quant_type, double_quant=double_quant,
                            quantize_embed_out=quantize_embed_out, dtype=dtype, device=device)
        model.load_tensors(reader)
    model.source_quantization = q
    return model
