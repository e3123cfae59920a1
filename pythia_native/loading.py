"""``load()``: a name or directory and a revision in, a :class:`Pythia` ready to generate out.

Steps: resolve the name and revision (``suite``; an invalid step fails before
any network access), fetch only the needed files (``hub``; cache, offline),
read ``config.json``, build the model, stream the weights into it one tensor at
a time (``weights``): dense checkpoints are quantized as they arrive,
bitsandbytes 4-bit checkpoints are taken as they are. With
``quantized_cache``, a revision quantized before is read from its 4-bit
entry instead (``quantized_cache``), with no download and no quantization.

``load_revision_`` (``Pythia.load_revision``) loads another revision of the
same model into an engine's existing tensors (see ``sweep``).

Peak memory of loading a dense checkpoint: the model's own tensors plus the
one tensor in hand (read, quantized, dropped), measured in
``benchmarks/results/sweep_cache_cpu.md``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import PythiaConfig
from .errors import CheckpointError, ConfigError, DeviceError, LoadInProgressError, PythiaNativeError
from .format import DEFAULT_QUANT_TYPE, check_quant_type
from .ops import check_compute
from .generate import Pythia
from .hub import download_checkpoint
from .model import PythiaModel, _block_linear_prefixes, tensor_addresses
from .quantized_cache import QuantSettings
from .quantized_linear import QuantizedLinear
from .suite import ModelRef, resolve_model, resolve_revision, warn_known_data_problems
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
    if not isinstance(q, dict):
        raise ConfigError(f"config.json: quantization_config must be an object, got {type(q).__name__} {q!r:.60}")
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ConfigError(f"config.json: quantization method {method!r} is not supported (bitsandbytes 4-bit only)")
    if q.get("load_in_8bit"):
        raise ConfigError("config.json: a bitsandbytes 8-bit checkpoint (load_in_8bit) is not supported; use the fp16/fp32 "
                          "checkpoint or a 4-bit one")
    if q.get("load_in_4bit") is not True:
        raise ConfigError("config.json: quantization_config without load_in_4bit; not a bitsandbytes 4-bit checkpoint")
    quant_type = q.get("bnb_4bit_quant_type", "fp4")
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"config.json: bnb_4bit_quant_type {quant_type!r} is not supported (expected 'nf4' or 'fp4')")
    if not isinstance(q.get("bnb_4bit_use_double_quant", False), bool):
        raise ConfigError(f"config.json: bnb_4bit_use_double_quant must be true or false, got {q['bnb_4bit_use_double_quant']!r}")
    return q


def load(
    name_or_path: Union[str, os.PathLike],
    revision: Optional[str] = None,
    *,
    quant_type: str = DEFAULT_QUANT_TYPE,
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
    quantized_cache: Optional[Union[str, os.PathLike]] = None,
    compute: str = "float32",
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
            settings and bytes (never re-quantized); these are then ignored. The
            Linears it holds dense (``llm_int8_skip_modules``) stay dense.
        device: "cpu", "cuda", "cuda:N" or None (CUDA when visible).
        dtype: activation dtype: float32 (default) or bfloat16 on the CPU;
            bfloat16 (default), float16 or float32 on CUDA.
        cache_dir, local_files_only, token: passed to huggingface_hub
            (``HF_HUB_OFFLINE=1`` is honoured when ``local_files_only`` is None).
        max_batch, max_len, cuda_graphs: see :class:`Pythia`.
        quantized_cache: a directory for 4-bit copies of hub checkpoints
            (``pythia_native.quantized_cache``): a revision quantized before is
            read from there (no download, works offline); a new one is written
            there after loading. None: no such cache.
        compute: the 4-bit Linears' arithmetic (:class:`PythiaModel`'s
            ``compute``): "float32" (default) or "int16" (faster CPU decode
            steps, ~1e-4 relative error per Linear). Changeable later through
            ``engine.model.compute``.

    The engine remembers these options: ``engine.load_revision(rev)`` loads
    another revision into the same tensors (see :func:`pythia_native.sweep`).
    """
    dev = resolve_device(device)
    dt = check_dtype(dtype, dev)
    check_quant_type(quant_type)  # before any download
    check_compute(compute)
    for name, path in (("cache_dir", cache_dir), ("quantized_cache", quantized_cache)):
        # An empty path is the current directory to os and huggingface_hub: an unset
        # $VAR in a command line would fill the working directory with checkpoints.
        if path is not None and not str(path).strip():
            raise ConfigError(f"{name} is an empty path (an unset variable?); give a directory or leave it out")
    ref = resolve_model(name_or_path)
    rev = resolve_revision(ref, revision)
    options = LoadOptions(ref, QuantSettings(quant_type, double_quant, quantize_embed_out), cache_dir,
                          local_files_only, token, quantized_cache)
    directory, entry = _locate(options, rev, options.settings)
    model = None
    if entry is not None:
        try:
            model = build_model(entry, device=dev, dtype=dt)
            tokenizer = Tokenizer.from_file(Path(entry) / "tokenizer.json")
            directory = entry
        except PythiaNativeError as e:
            from . import quantized_cache as qc

            model = None
            qc.discard(entry, str(e))
            directory = _download(options, rev)
    if model is None:
        model = build_model(directory, quant_type=quant_type, double_quant=double_quant,
                            quantize_embed_out=quantize_embed_out, device=dev, dtype=dt)
        tokenizer = Tokenizer.from_file(Path(directory) / "tokenizer.json")
        _maybe_store(options, rev, model, directory)  # only once the whole load worked
    model.compute = compute
    engine = Pythia(model, tokenizer, max_batch=max_batch, max_len=max_len, cuda_graphs=cuda_graphs)
    engine.source = (str(name_or_path), rev, str(directory))
    engine.load_options = options
    return engine


@dataclass(frozen=True)
class LoadOptions:
    """What ``load()`` was asked for, kept on the engine so ``load_revision_`` fetches alike."""

    ref: ModelRef
    settings: QuantSettings
    cache_dir: Optional[Union[str, os.PathLike]] = None
    local_files_only: Optional[bool] = None
    token: Union[str, bool, None] = None
    quantized_cache: Optional[Union[str, os.PathLike]] = None

    @property
    def caches(self) -> bool:
        """Whether the quantized cache applies: one was given and the model is a hub repo."""
        return self.quantized_cache is not None and self.ref.repo_id is not None


def _download(options: LoadOptions, rev: str) -> Path:
    return download_checkpoint(options.ref, rev, cache_dir=options.cache_dir,
                               local_files_only=options.local_files_only, token=options.token)


def _locate(options: LoadOptions, rev: str, settings: Optional[QuantSettings]) -> tuple[Optional[Path], Optional[Path]]:
    """``(checkpoint directory, None)``, or ``(None, quantized-cache entry)`` on a
    cache hit (no download) for an entry written with ``settings`` (None: the
    cache does not apply)."""
    if options.caches and settings is not None:
        from . import quantized_cache as qc

        entry = qc.find(options.quantized_cache, options.ref, rev, settings)
        if entry is not None:
            warn_known_data_problems(options.ref, rev)  # download_checkpoint would have
            return None, entry
    return _download(options, rev), None


def held_settings(model: PythiaModel) -> Optional[QuantSettings]:
    """The quantized-cache settings of the format ``model`` holds (its dense
    revisions are quantized to it); None when the cache's settings cannot say
    it (Linears a bitsandbytes checkpoint left dense), so no entry applies."""
    if model.dense_linears:
        return None
    return QuantSettings(quant_type=model.quant_type, double_quant=bool(model.double_quant),
                         quantize_embed_out=isinstance(model.embed_out, QuantizedLinear), blocksize=model.blocksize)


def _maybe_store(options: LoadOptions, rev: str, model: PythiaModel, directory: Path,
                 generation: Optional[int] = None) -> None:
    """Write the quantized-cache entry of a dense checkpoint just loaded (a failed write only warns).
    ``generation``: the model's weights_generation after that load; when another
    engine's load has changed the weights since (or does while the entry is
    written), no entry is kept: it would hold that other revision's weights."""
    settings = held_settings(model)
    if not options.caches or model.source_quantization is not None or settings is None:
        return
    if generation is not None and model.weights_generation != generation:
        return
    import warnings

    from . import quantized_cache as qc
    from .errors import QuantizedCacheWarning

    # The entry is labelled by what the model holds, which after a bitsandbytes
    # revision in the same engine (its quant type) can differ from what load()
    # was asked for: a lookup under the asked-for tag then misses, never hits
    # weights of another format.
    try:
        entry = qc.store(options.quantized_cache, options.ref, rev, settings, model, directory)
        if generation is not None and (model.weights_generation != generation or model.loading):
            qc.discard(entry, "the model's weights changed while the entry was written")
    except Exception as e:  # a full disk (safetensors' own error type), a read-only cache: never fail the load
        warnings.warn(f"could not write the quantized cache entry of {options.ref}@{rev} under "
                      f"{options.quantized_cache} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); the model is loaded, the next load quantizes again",
                      QuantizedCacheWarning, stacklevel=3)


def load_revision_(engine: Pythia, revision: Union[str, int, None]) -> Pythia:
    """Load ``revision`` of the engine's model into the engine's existing tensors.

    The engine must come from :func:`load` (it remembers the model name, the
    quantization settings and the cache options). Every parameter and buffer is
    written in place (same storage, same ``data_ptr``); the KV cache, the
    tokenizer and captured CUDA graphs are kept, and the graphs replay with
    the new weights. The revision is validated (``suite``) before any
    download. Raises ``CheckpointError`` when the revision's architecture
    differs from the loaded one, or when it is a bitsandbytes 4-bit checkpoint
    with another quant type or ``embed_out`` layout (load it with :func:`load`
    instead); one with another blocksize loads, but its buffers are
    reallocated and captured CUDA graphs are dropped (recaptured on next use).
    Every tensor's name, shape and dtype is checked before anything is written:
    a revision that does not fit leaves the engine as it was. A failure while
    writing (an I/O error reading the data, NaN or infinite values) leaves the model unusable
    (``PythiaModel.partial_load``): generate and score refuse to run until a
    revision loads.
    """
    options: Optional[LoadOptions] = getattr(engine, "load_options", None)
    if options is None:
        raise PythiaNativeError(
            "load_revision needs an engine made by pythia_native.load() (it reloads from the same model name); "
            "load the checkpoint with load()"
        )
    rev = resolve_revision(options.ref, revision)
    before = tensor_addresses(engine.model)
    loaded = None  # weights_generation after this load, once it succeeded
    try:
        # The entry of the format the engine holds, which after a bitsandbytes
        # revision can differ from what load() was asked for: an entry under the
        # asked-for settings would be quantized otherwise than a fresh load here.
        directory, entry = _locate(options, rev, held_settings(engine.model))
        if entry is not None:
            try:
                loaded = fill_model_(engine.model, entry)
                engine.source = (engine.source[0], rev, str(entry))
                return engine
            except (IncompatibleCheckpointError, LoadInProgressError):
                raise  # the entry is fine (the engine is another architecture, or busy): keep it
            except PythiaNativeError as e:
                from . import quantized_cache as qc

                qc.discard(entry, str(e))
                directory = _download(options, rev)
        loaded = fill_model_(engine.model, directory)
        _maybe_store(options, rev, engine.model, directory, loaded)
        engine.source = (engine.source[0], rev, str(directory))
        return engine
    finally:
        # Its own stream may go on over this load's weights (Pythia._check_weights);
        # not over another thread's load, nor a failed one.
        engine._own_generation = loaded
        if tensor_addresses(engine.model) != before or engine.model.partial_load is not None:
            # A buffer had to be reallocated (a 4-bit checkpoint with another blocksize): graphs
            # captured on the old storage would read freed memory; they are recaptured on next use.
            # Half-written weights: a replay would skip the model's refusal to run (bind).
            engine._drop_graphs()


class IncompatibleCheckpointError(CheckpointError):
    """A readable checkpoint that does not fit the loaded engine (another architecture or
    4-bit layout): not a reason to discard a quantized-cache entry."""


def fill_model_(model: PythiaModel, directory: Union[str, os.PathLike]) -> int:
    """Stream the checkpoint in ``directory`` into ``model``'s existing tensors (in place).

    A dense checkpoint is quantized with the model's settings; a bitsandbytes
    4-bit one must have the model's quant type and the same ``embed_out``
    layout. Raises ``CheckpointError`` when the architecture differs. Returns
    the model's ``weights_generation`` after the load (``load_tensors``).
    """
    raw = read_config(directory)
    config = PythiaConfig.from_dict(raw)
    if config != model.config:
        diff = [f"{f.name} {getattr(config, f.name)!r} (loaded: {getattr(model.config, f.name)!r})"
                for f in fields(config) if getattr(config, f.name) != getattr(model.config, f.name)]
        raise IncompatibleCheckpointError(
            f"{directory}: this checkpoint's architecture differs from the loaded model's ({'; '.join(diff)}); "
            "one engine holds one architecture: load() this checkpoint on its own"
        )
    q = bnb_quantization(raw)
    with CheckpointReader(directory) as reader:
        if q is not None:
            keys = reader.keys()
            quant_type = q.get("bnb_4bit_quant_type", "fp4")
            head_4bit = "embed_out.weight.absmax" in keys or "lm_head.weight.absmax" in keys
            if quant_type != model.quant_type or head_4bit != isinstance(model.embed_out, QuantizedLinear):
                raise IncompatibleCheckpointError(
                    f"{directory}: a bitsandbytes 4-bit checkpoint ({quant_type}, embed_out "
                    f"{'4-bit' if head_4bit else 'dense'}) that does not match the loaded model ({model.quant_type}, "
                    f"embed_out {'4-bit' if isinstance(model.embed_out, QuantizedLinear) else 'dense'}); load() it on its own"
                )
            check_layer_quant_types(directory, quant_type, keys)
            dense = bnb_dense_linears(config, reader)
            if dense != model.dense_linears:
                differ = sorted(dense ^ model.dense_linears)
                raise IncompatibleCheckpointError(
                    f"{directory}: a bitsandbytes 4-bit checkpoint whose dense (not quantized) Linears differ from "
                    f"the loaded model's ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}); "
                    "load() it on its own"
                )
        generation = model.load_tensors(reader)
    model.source_quantization = q
    return generation


def check_layer_quant_types(directory, quant_type: str, keys) -> None:
    """config.json's bnb_4bit_quant_type against every 4-bit layer's
    quant-state record, whose key names its type
    (``weight.quant_state.bitsandbytes__<type>``). Each layer computes with its
    own record, but the model's type is config.json's, and load_revision, the
    quantized cache and an export go by it: fp4 weights under an nf4 config
    loaded as an "nf4" model and exported as one."""
    marker = ".weight.quant_state.bitsandbytes__"
    other = sorted(k for k in keys if marker in k and k.rsplit("__", 1)[1] != quant_type)
    if other:
        raise CheckpointError(
            f"{directory}: config.json says bnb_4bit_quant_type {quant_type!r}, but {other[0]}"
            f"{f' (and {len(other) - 1} more)' if len(other) > 1 else ''} holds another type; "
            "the config does not belong to these weights"
        )


def bnb_dense_linears(config: PythiaConfig, reader: CheckpointReader) -> frozenset[str]:
    """The block Linears a bitsandbytes 4-bit checkpoint holds dense (a
    floating-point weight without 4-bit statistics: ``llm_int8_skip_modules``),
    by full name. They stay dense: quantizing them would give another model
    than the file's. (A packed uint8 weight without its absmax is a broken
    4-bit layer, reported as such.)"""
    keys = set(reader.keys())
    return frozenset(p[:-1] for p in _block_linear_prefixes(config)
                     if p + "weight" in keys and p + "weight.absmax" not in keys
                     and reader.spec(p + "weight")[1].is_floating_point)


def build_model(
    directory: Union[str, os.PathLike],
    *,
    quant_type: str = DEFAULT_QUANT_TYPE,
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
            check_layer_quant_types(directory, quant_type, keys)
        # A dense head whose values float16 holds stays float16 on the CPU (the same
        # values, half the bytes per decode step; see PythiaModel's head_dtype):
        # one stored in float16, or in float32 with float16 values (an export
        # writes one dtype for every dense tensor, float32 when some other tensor
        # needs it); a float32 head that does not fit is widened while loading
        # (PythiaModel.load_tensors). The file's dtype, not config.json's
        # torch_dtype: an export must reload to the same logits.
        dense_linears = bnb_dense_linears(config, reader) if q is not None else ()
        head_dtype = None
        head = next((k for k in ("embed_out.weight", "lm_head.weight") if k in keys), None)
        if (torch.device(device).type == "cpu" and not quantize_embed_out and head is not None
                and reader.spec(head)[1] in (torch.float16, torch.float32)):
            head_dtype = torch.float16
        check_sizes(directory, config, reader)
        model = PythiaModel(config, quant_type=quant_type, double_quant=double_quant,
                            quantize_embed_out=quantize_embed_out, dtype=dtype, device=device, head_dtype=head_dtype,
                            dense_linears=dense_linears)
        model.load_tensors(reader)
    model.source_quantization = q
    return model


def check_sizes(directory, config: PythiaConfig, reader: CheckpointReader) -> None:
    """config.json's sizes against the file headers before the model is
    allocated: a config of another Pythia size (or a corrupt one, vocab_size
    2**40) allocated that model first, then failed (or ran out of memory).
    The embedding and an MLP bias (dense in every format) and the layer
    count; load_tensors checks every tensor afterwards."""
    keys = set(reader.keys())
    want = {
        "gpt_neox.embed_in.weight": ((config.vocab_size, config.hidden_size), "vocab_size x hidden_size"),
        "gpt_neox.layers.0.mlp.dense_h_to_4h.bias": ((config.intermediate_size,), "intermediate_size"),
    }
    for name, (shape, what) in want.items():
        if name in keys and tuple(reader.spec(name)[0]) != shape:
            raise CheckpointError(f"{directory}: {name} has shape {tuple(reader.spec(name)[0])}, but config.json "
                                  f"says {what} = {shape}; the config does not belong to these weights")
    layers = {int(k.split(".")[2]) for k in keys if k.startswith("gpt_neox.layers.") and k.split(".")[2].isdigit()}
    if layers and max(layers) + 1 != config.num_hidden_layers:
        raise CheckpointError(f"{directory}: the weights hold {max(layers) + 1} layers, but config.json says "
                              f"num_hidden_layers = {config.num_hidden_layers}; the config does not belong to these weights")
