"""Reading a Hugging Face GPT-NeoX checkpoint directory: config and tensors.

Weight files, in the order of preference (the same order ``hub`` downloads in):

1. ``model.safetensors``
2. ``model.safetensors.index.json`` + the shards its ``weight_map`` names
3. ``pytorch_model.bin``
4. ``pytorch_model.bin.index.json`` + its shards (pythia-12b on the hub)

Tensors are read one at a time: safetensors through ``safe_open`` (the header
is parsed once, each ``get`` reads one tensor), ``.bin`` files with
``torch.load(weights_only=True, mmap=True)`` (``mmap`` needs the zip format
every torch >= 1.6 writes; a legacy file is read whole, one file at a time).
Peak memory is about one tensor for safetensors and one mapped file for
``.bin``.

The non-weight buffers ``attention.bias``, ``attention.masked_bias`` and
``attention.rotary_emb.inv_freq`` that older transformers saved are skipped.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch

from .errors import CheckpointError, ConfigError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
#: the weight entry points, most preferred first
WEIGHT_ENTRY_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX)
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

#: buffers (not weights) that old GPT-NeoX checkpoints carry, matched as a dotted suffix
SKIPPED_BUFFERS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")

PathLike = Union[str, os.PathLike]


def is_skipped_buffer(name: str) -> bool:
    """True for ``[prefix.]attention.bias``, ``attention.masked_bias``, ``attention.rotary_emb.inv_freq``."""
    return any(name == suffix or name.endswith("." + suffix) for suffix in SKIPPED_BUFFERS)


def select_weight_entry(filenames: Iterable[str]) -> str:
    """The weight entry file to use among a repo's or a directory's file names (see the module docstring).

    Raises ``CheckpointError`` when there is none.
    """
    present = set(filenames)
    for name in WEIGHT_ENTRY_FILES:
        if name in present:
            return name
    raise CheckpointError(
        f"No weights found: expected one of {', '.join(WEIGHT_ENTRY_FILES)}. Point at a Hugging Face "
        "GPT-NeoX checkpoint (saved with save_pretrained) that includes its weights."
    )


def read_index(path: PathLike) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded-checkpoint index.

    Raises ``CheckpointError`` naming the index when it is not JSON, has no
    ``weight_map``, maps nothing, or names a shard outside its directory.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint index {path} does not exist; download the checkpoint again.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"Checkpoint index {path} is not valid JSON ({error}); the file is corrupt or truncated: delete it "
            "and download the checkpoint again."
        ) from error
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"Checkpoint index {path} has no 'weight_map' entries, so it points at no weights; download the "
            "checkpoint again."
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(
                f"Checkpoint index {path} maps {name!r} to {shard!r}, which is not a file name in its directory."
            )
    return weight_map


def index_shards(path: PathLike) -> list[str]:
    """The distinct shard file names an index names, in first-use order."""
    return list(dict.fromkeys(read_index(path).values()))


def weight_files(directory: PathLike) -> list[Path]:
    """The weight files of a checkpoint directory that will be read, in order (shards checked to exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"Checkpoint directory {directory} does not exist.")
    entry = select_weight_entry(p.name for p in directory.iterdir() if p.is_file())
    if entry not in (SAFETENSORS_INDEX, BIN_INDEX):
        return [directory / entry]
    shards = [directory / shard for shard in index_shards(directory / entry)]
    missing = [str(s.relative_to(directory)) for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(
            f"Checkpoint {directory}: the index {entry} names shard(s) that are missing: {', '.join(missing)}. "
            "The download was interrupted or incomplete: download this revision again."
        )
    return shards


# safetensors header dtype names
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _SafetensorsFile:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._handle.keys())
        except Exception as error:  # SafetensorError, OSError: header missing, truncated, not safetensors
            raise CheckpointError(
                f"Cannot read {path}: not a valid safetensors file ({error}). It is corrupt or truncated: delete it "
                "and download the checkpoint again."
            ) from error

    def keys(self) -> list[str]:
        return self._keys

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype from the header (no tensor data read)."""
        try:
            info = self._handle.get_slice(name)
            shape, dtype = tuple(info.get_shape()), _SAFETENSORS_DTYPES.get(info.get_dtype())
        except Exception as error:
            raise CheckpointError(f"Cannot read tensor {name!r} from {self.path}: {error}") from error
        if dtype is None:  # a dtype this table does not name: ask torch
            t = self.get(name)
            return tuple(t.shape), t.dtype
        return shape, dtype

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as error:
            raise CheckpointError(f"Cannot read tensor {name!r} from {self.path}: {error}") from error

    def close(self) -> None:
        self._handle = None


class _TorchBinFile:
    def __init__(self, path: Path):
        self.path = path
        mmap = zipfile.is_zipfile(path)  # the zip format (torch >= 1.6) can be memory-mapped
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"Refusing to load {path}: it holds objects other than tensors, and .bin files are only read with "
                f"torch.load(weights_only=True) ({error}). Convert the checkpoint to safetensors."
            ) from error
        except Exception as error:  # RuntimeError from the zip reader, EOFError, OSError
            raise CheckpointError(
                f"Cannot read {path}: not a valid PyTorch checkpoint ({type(error).__name__}: {error}). It is "
                "corrupt or truncated: delete it and download the checkpoint again."
            ) from error
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError(f"{path} is not a state dict (a dict of name -> tensor).")
        for name, t in state.items():
            # A model saved from the meta device (no data), or sparse / other layouts.
            if t.is_meta:
                raise CheckpointError(f"{path}: {name} is a meta tensor, with no data: the checkpoint was saved "
                                      "from a model that did not hold its weights. Save it again from one that does.")
            if t.layout != torch.strided:
                raise CheckpointError(f"{path}: {name} is a {t.layout} tensor; a checkpoint holds dense tensors "
                                      "(save it with .to_dense() on each).")
        self._state: Optional[dict[str, torch.Tensor]] = state

    def keys(self) -> list[str]:
        assert self._state is not None
        return list(self._state)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.get(name)  # mapped, not read
        return tuple(t.shape), t.dtype

    def get(self, name: str) -> torch.Tensor:
        assert self._state is not None
        return self._state[name]

    def close(self) -> None:
        self._state = None


def _open_weight_file(path: Path):
    if path.name.endswith(".safetensors"):
        return _SafetensorsFile(path)
    return _TorchBinFile(path)


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint directory, one tensor at a time.

    ``keys()`` lists every weight (skipped buffers excluded), ``spec(name)``
    gives one's shape and dtype from the header, ``get(name)`` reads one,
    iterating yields ``(name, tensor)`` file by file. A sharded checkpoint's
    tensors are read from the shards its index names, nothing else. At most
    one weight file is open at a time. Use as a context manager or call
    ``close()``.

    Raises ``CheckpointError`` naming the file for a missing, truncated or
    corrupt file, a shard the index names but that is absent, and a tensor the
    index promises that its shard lacks.
    """

    def __init__(self, directory: PathLike):
        self.directory = Path(directory)
        self.files = weight_files(self.directory)
        entry = select_weight_entry(p.name for p in self.directory.iterdir() if p.is_file())
        self._weight_map: Optional[dict[str, str]] = None
        if entry in (SAFETENSORS_INDEX, BIN_INDEX):
            self._weight_map = read_index(self.directory / entry)
        self._open: Optional[tuple[Path, object]] = None
        self._key_to_file: Optional[dict[str, Path]] = None

    def _file(self, path: Path):
        if self._open is None or self._open[0] != path:
            self.close()
            self._open = (path, _open_weight_file(path))
        return self._open[1]

    def _file_keys(self, path: Path) -> list[str]:
        """The weights read from ``path``: with an index, only those it maps to this shard
        (a stale copy of a tensor in another shard, or one the index does not list, is ignored)."""
        keys = self._file(path).keys()
        if self._weight_map is not None:
            listed = {k for k, shard in self._weight_map.items() if self.directory / shard == path}
            absent = sorted(listed - set(keys))
            if absent:
                raise CheckpointError(
                    f"{path} lacks {len(absent)} tensor(s) its index maps to it (e.g. {absent[0]!r}); the shard "
                    "does not belong to this checkpoint: download the revision again."
                )
            keys = [k for k in keys if k in listed]
        return [k for k in keys if not is_skipped_buffer(k)]

    def keys(self) -> list[str]:
        """All weight names, in file order (opens each file's header; reads no tensor data for safetensors)."""
        if self._key_to_file is None:
            mapping: dict[str, Path] = {}
            for path in self.files:
                for key in self._file_keys(path):
                    mapping.setdefault(key, path)
            self._key_to_file = mapping
        return list(self._key_to_file)

    def __contains__(self, name: str) -> bool:
        self.keys()
        assert self._key_to_file is not None
        return name in self._key_to_file

    def _file_of(self, name: str) -> Path:
        self.keys()
        assert self._key_to_file is not None
        if name not in self._key_to_file:
            raise KeyError(f"{name!r} is not a weight of the checkpoint in {self.directory}")
        return self._key_to_file[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor by name (``KeyError`` if the checkpoint has no such weight)."""
        return self._file(self._file_of(name)).get(name)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """``(shape, dtype)`` of one tensor, from the safetensors header (no data read;
        a ``.bin`` file is mapped, not read)."""
        return self._file(self._file_of(name)).spec(name)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        seen: set[str] = set()
        for path in self.files:
            for key in self._file_keys(path):
                if key in seen:
                    continue
                seen.add(key)
                yield key, self._file(path).get(key)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_checkpoint_tensors(directory: PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every weight of a checkpoint directory, one at a time, buffers skipped."""
    with CheckpointReader(directory) as reader:
        yield from reader


def read_config(directory: PathLike) -> dict:
    """The ``config.json`` of a checkpoint directory, as a dict, checked to be a GPT-NeoX causal LM.

    Raises ``ConfigError`` when the file is missing, not a JSON object, has a
    ``model_type`` other than ``"gpt_neox"``, or lists ``architectures``
    without ``GPTNeoXForCausalLM`` (a checkpoint without the ``embed_out`` head).
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: a checkpoint directory needs the config.json that save_pretrained writes "
            "(download the full checkpoint, or point at the directory that holds it)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}): delete it and download the checkpoint again.") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds a JSON {type(config).__name__}, not an object: it is not a model config.")
    model_type = config.get("model_type")
    if model_type != "gpt_neox":
        raise ConfigError(
            f"{path} has model_type {model_type!r}, but pythia-native runs only GPT-NeoX models "
            "(model_type 'gpt_neox': Pythia and its fine-tunes or quantized copies)."
        )
    architectures = config.get("architectures")
    if architectures is not None and "GPTNeoXForCausalLM" not in architectures:
        raise ConfigError(
            f"{path} lists architectures {architectures}, not GPTNeoXForCausalLM: the checkpoint has no language "
            "model head (embed_out); use the causal-LM checkpoint."
        )
    return config
