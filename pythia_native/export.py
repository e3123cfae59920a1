"""Writing a bitsandbytes-format 4-bit checkpoint that transformers + bitsandbytes load.

Layout (FORMAT.md): ``config.json`` with a ``quantization_config`` as
transformers writes it, ``model.safetensors`` with each 4-bit Linear as
``weight`` (packed uint8), ``weight.absmax``, ``weight.quant_map``,
``weight.quant_state.bitsandbytes__<nf4|fp4>`` (plus ``nested_*`` with double
quantization), everything else dense, and the tokenizer files copied along.
pythia-native reloads it without re-quantizing.

bitsandbytes 0.50's CPU kernels misread a layer whose input width is a
multiple of 32 but not of the blocksize (they restart the blocks at each row;
its own quantization of such a layer too): such an export of a non-Pythia
shape is right, but transformers + bitsandbytes on the CPU compute it wrong.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from safetensors.torch import save_file

from .errors import CheckpointError
from .model import PythiaModel, fits
from .quantized_linear import QuantizedLinear
from .weights import TOKENIZER_FILES

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def quantization_config(model: PythiaModel) -> dict:
    """The ``quantization_config`` transformers' BitsAndBytesConfig serializes for this model."""
    if model.quant_type is None:
        raise ValueError("a dense model (quant_type=None) has no 4-bit checkpoint to export")
    # None lets transformers keep the output head dense, as it does by default (it
    # finds the head under its own module name, lm_head or embed_out); a list is
    # exactly the modules it leaves dense: the block Linears the model holds dense
    # (from a checkpoint that skipped them), and the head unless it is 4-bit,
    # under both its names (transformers 4.x: embed_out, 5.x: lm_head).
    head = [] if isinstance(model.embed_out, QuantizedLinear) else ["embed_out", "lm_head"]
    skip = sorted(model.dense_linears) + head if model.dense_linears else (None if head else [])
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": model.quant_type,
        "bnb_4bit_use_double_quant": bool(model.double_quant),
        "bnb_4bit_compute_dtype": _DTYPE_NAMES[model.dtype],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def _unify_dense_dtype(tensors: dict[str, torch.Tensor], model: PythiaModel) -> torch.dtype:
    """Cast the dense floating tensors (embeddings, LayerNorms, biases, dense
    Linears and head; not the 4-bit layers' statistics) to one dtype, in place
    in ``tensors``, and return it: float16 if it holds every value exactly,
    else bfloat16 if that does, else float32. transformers keeps each tensor
    in the file's dtype, and a mix (the CPU's float16 head beside float32
    LayerNorms) fails its forward; the exact choice keeps every value, so a
    reload gives the same logits (a float16-exact head is kept float16 again).
    The only full-size copies made are the cast tensors themselves (save_file
    needs them all at once); one already in the chosen dtype is not copied."""
    four_bit = tuple(p + "weight" for p in model._quantized_prefixes())
    keys = [k for k, v in tensors.items() if v.is_floating_point() and not k.startswith(four_bit)]
    target = next(dt for dt in (torch.float16, torch.bfloat16, torch.float32)
                  if dt == torch.float32 or all(fits(tensors[k], dt) for k in keys))
    for k in keys:
        tensors[k] = tensors[k].to(target)
    return target


def check_output_dir(directory: Union[str, os.PathLike], source: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Raise ``CheckpointError`` unless a checkpoint can be written into ``directory``
    (an existing directory, or one that can be made): cheap, so callers can check
    before a long load. Leaves nothing behind. Refused too: an empty path (an
    unset variable would write into the working directory), a directory in a
    Hugging Face cache snapshot (huggingface_hub's files, shared by revisions
    through symbolic links) and ``source``, the checkpoint being exported."""
    if not str(directory).strip():
        raise CheckpointError("the output directory is an empty path (an unset variable?); give a directory")
    out = Path(directory).expanduser()
    try:
        resolved = out.resolve()
    except (RuntimeError, OSError) as e:  # a symbolic link loop (RuntimeError on Python < 3.13)
        raise CheckpointError(f"cannot write a checkpoint to {out}: {e}") from None
    for p in (resolved, *resolved.parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
            raise CheckpointError(f"cannot write a checkpoint to {out}: it is inside a Hugging Face cache snapshot "
                                  f"({p}); choose a directory of your own")
    if source is not None and resolved == Path(os.path.realpath(Path(source).expanduser())):
        raise CheckpointError(f"cannot write a checkpoint to {out}: it is the directory the model was loaded from, "
                              "whose checkpoint the export would overwrite; choose another directory")
    existing = out
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise CheckpointError(f"cannot write a checkpoint to {out}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is under {existing}, which is a file"
        raise CheckpointError(f"cannot write a checkpoint to {out}: it {where}; choose a directory")
    try:  # os.access is no help here (root, read-only mounts, ACLs): try a file
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot write a checkpoint to {out}: {existing} is not writable ({e.strerror or e})") from None
    return out


def _move_into_place(out: Path, names: list[str]) -> None:
    """Move each written ``out/<name>.tmp`` over ``out/<name>``, all or none.

    The files of a checkpoint must change together: load() refuses a config
    whose quant type is not its layers' (loading.check_layer_quant_types), but
    the weights of one export beside the config and tokenizer of another of
    the same format would load as one checkpoint without an error. Hence the
    order: the previous files are first moved aside to ``<name>.old``,
    config.json first, and the new ones moved in with config.json last. A
    process killed in between (a few renames) leaves a directory without
    config.json, which load() refuses with an error, never an old and a new
    file together; the previous files are still there as ``*.old`` (and
    save_pretrained refuses to write there until they are dealt with). An
    error or an interrupt in between moves the previous files back. Each
    name is recorded before its rename, and the rollback looks at what is on
    disk: an interrupt right after a rename is rolled back too."""
    order = ["config.json"] + [n for n in names if n != "config.json"]
    aside, moved = [], []
    try:
        for name in order:
            if os.path.lexists(out / name):  # lexists: a symbolic link is moved, not followed
                aside.append(name)
                os.replace(out / name, out / (name + ".old"))
        for name in reversed(order):
            moved.append(name)
            os.replace(out / (name + ".tmp"), out / name)
    except BaseException:
        try:
            for name in moved:
                if not os.path.lexists(out / (name + ".tmp")):  # it was moved in
                    (out / name).unlink(missing_ok=True)
            for name in reversed(aside):  # config.json back last
                if os.path.lexists(out / (name + ".old")):  # it was moved aside
                    os.replace(out / (name + ".old"), out / name)
        except OSError:  # the error to report is the first one; no config.json is left in place
            pass
        raise
    for name in aside:
        try:
            (out / (name + ".old")).unlink(missing_ok=True)
        except OSError:  # the checkpoint is complete; the next export names the .old left
            pass


def save_pretrained(
    model: PythiaModel,
    directory: Union[str, os.PathLike],
    tokenizer_dir: Optional[Union[str, os.PathLike]] = None,
    *,
    dense: Optional[Mapping[str, torch.Tensor]] = None,
) -> Path:
    """Write ``model`` as a 4-bit checkpoint into ``directory`` (created if needed).

    ``tokenizer_dir``: where to copy the tokenizer files from (the source checkpoint).
    ``dense``: tensors to write instead of the model's own for the same keys
    (the dense ones: embeddings, LayerNorms, biases), e.g. the source
    checkpoint's fp16 values, so that they are not stored widened to the
    model's float32 nor rounded through its bfloat16. Shapes must match.
    Raises ``CheckpointError`` for a directory that cannot be written
    (checked before anything is written) or a write that fails. A checkpoint
    already in ``directory`` is replaced whole or, when the export fails or
    is interrupted, kept as it was (see ``_move_into_place``); a directory
    the export made is removed again.
    """
    out = check_output_dir(directory, source=tokenizer_dir)
    # Moved aside by an export that was killed while replacing its files: they
    # may be the only copy of the checkpoint that was there (replacing them
    # would lose it; _move_into_place).
    stale = [n + ".old" for n in ("model.safetensors", "config.json", *TOKENIZER_FILES) if os.path.lexists(out / (n + ".old"))]
    if stale and not os.path.lexists(out / "config.json"):
        raise CheckpointError(
            f"{out} holds {', '.join(stale)} and no config.json: the files of the checkpoint that was there, moved "
            "aside by an export that was interrupted; move them back (without the .old) or delete them, then export again"
        )
    if stale:
        raise CheckpointError(
            f"{out} holds {', '.join(stale)}: an export moves the files it replaces aside under those names "
            "(and would overwrite, then delete them); rename or delete them first"
        )
    if getattr(model, "partial_load", None) is not None:
        raise CheckpointError(f"not exporting: the model's weights are partly overwritten by a load that failed "
                              f"({model.partial_load}); load a revision again first")
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model)
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    for k, v in (dense or {}).items():
        if k not in tensors or tuple(tensors[k].shape) != tuple(v.shape):
            raise ValueError(f"dense tensor {k!r} {tuple(v.shape)} does not replace a model tensor of that shape")
        tensors[k] = v.detach()
    # transformers 5 reads "dtype", 4.x "torch_dtype".
    config["dtype"] = config["torch_dtype"] = _DTYPE_NAMES[_unify_dense_dtype(tensors, model)]
    # safetensors stores each tensor once, contiguous, on the CPU; moved after
    # the cast, so a GPU model's float32 tensors are not copied to the CPU whole.
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    # Every file is written under <name>.tmp beside its name (never through a
    # symbolic link into a file another checkpoint shares, never half-written
    # under its name), and moved into place only once all are written.
    names = ["model.safetensors", "config.json"]
    made = []  # the directories mkdir makes, deepest first: removed again if the export fails
    parent = out
    while not os.path.lexists(parent):
        made.append(parent)
        parent = parent.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "model.safetensors.tmp"), metadata={"format": "pt"})
        with open(out / "config.json.tmp", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file() and src.resolve() != (out / name).resolve():
                    shutil.copyfile(src, out / (name + ".tmp"))
                    names.append(name)
        _move_into_place(out, names)
    # BaseException: an interrupt (Ctrl-C in save_file) must not leave a
    # checkpoint-sized .tmp file behind either; it is re-raised as it is.
    except BaseException as e:
        for name in ("model.safetensors", "config.json", *TOKENIZER_FILES):
            try:
                (out / (name + ".tmp")).unlink(missing_ok=True)
            except OSError:
                pass
        for d in made:
            try:
                d.rmdir()  # only while empty: never what someone else put there meanwhile
            except OSError:
                break
        if not isinstance(e, Exception):
            raise
        # OSError, or safetensors' own error for a full disk
        raise CheckpointError(f"cannot write the checkpoint to {out}: {e}") from e
    return out
