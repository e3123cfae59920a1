"""An on-disk cache of quantized checkpoints: quantize a revision once, load its 4 bits after.

``load(..., quantized_cache=dir)`` and ``sweep(..., quantized_cache=dir)``
look for an entry before downloading anything; on a miss they load the hub
checkpoint as usual (read + quantize) and then write the entry. Layout::

    <dir>/<org>--<name>/<revision>/<tag>/
        config.json              with the bitsandbytes ``quantization_config``
        model.safetensors        the layout ``export.save_pretrained`` writes (FORMAT.md)
        tokenizer.json, ...      copied from the checkpoint
        pythia-native-cache.json written last: what the entry holds and its file size

- ``<revision>``: ``suite.canonical_revision``, so ``main`` and ``step143000``
  of a Pythia repo share one entry (not for pythia-2.8b, whose ``main`` is
  another file: ``suite.MAIN_IS_NOT_FINAL_STEP``); commit hashes as given;
  branch names of other repos with ``/`` written ``--``, and a name that
  could be confused with another (``a--b``, ``a b``) with ``@`` and a hash of
  the exact name appended (``_safe_part``). A branch name is
  trusted to name fixed weights (Pythia branches are never rewritten); for a
  third-party repo whose ``main`` moves, delete its entry to refresh it.
- ``<tag>``: ``<quant_type>-b<blocksize>`` plus ``-dq`` (double quantization)
  and ``-qhead`` (``quantize_embed_out``), e.g. ``nf4-b64``.

Dense tensors (embeddings, LayerNorms, biases) are stored as the source
checkpoint holds them (float16 for the hub's Pythia files), not in the model's
dtype: an entry is the same for float32 and bfloat16 models and loads into
either exactly as a fresh ``load()`` of the hub checkpoint would (the 4-bit
bytes do not depend on the model's dtype). Checkpoints that are already
bitsandbytes 4-bit are not cached (they would be copied byte for byte), and
neither are local directories (they have no repo and revision to key by).

Writes are atomic: the entry is written into ``<tag>.tmp-<host>-<pid>-<random>``
next to it and renamed into place, so a reader never sees half an entry; a
writer that loses a race to another one discards its copy. An entry that
fails its check (marker missing or unreadable, ``config.json``,
``model.safetensors`` or ``tokenizer.json`` missing, file size not the
recorded one) or fails to load is reported with a ``QuantizedCacheWarning``,
removed, and rebuilt. An entry is written only once its load (tokenizer
included) has worked; a failed write only warns. Temporary directories of
writers that died (their process is gone) are removed by the next write
beside them.
There is no checksum of the tensor bytes (safetensors has none): a flipped
bit inside the data is not detected.

What it saves (``benchmarks/results/sweep_cache_cpu.md``, shared 2-core VM):
random fp16 checkpoints of the Pythia shapes, float32 CPU model: a
pythia-160m entry is 193 MiB vs 310 MiB for the fp16 checkpoint (0.62x: the
dense fp16 embeddings are 147 MiB of it) and loaded in 0.49 s vs 0.60 s; a
pythia-1.4b entry is 1,042 MiB vs 2,698 MiB (0.39x) and loaded in 1.62 s vs
3.73 s (2.3x; 7x before the CPU quantizer was vectorized). Besides the time,
an entry spares the download and 60% of the disk of each revision.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import QuantizedCacheWarning
from .format import DEFAULT_BLOCKSIZE, DEFAULT_QUANT_TYPE
from .suite import ModelRef, canonical_revision
from .weights import CONFIG_FILE, CheckpointReader

ENTRY_FILE = "pythia-native-cache.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantSettings:
    """How a dense checkpoint is quantized; one cache entry per distinct value."""

    quant_type: str = DEFAULT_QUANT_TYPE
    double_quant: bool = False
    quantize_embed_out: bool = False
    blocksize: int = DEFAULT_BLOCKSIZE

    @property
    def tag(self) -> str:
        return (f"{self.quant_type}-b{self.blocksize}" + ("-dq" if self.double_quant else "")
                + ("-qhead" if self.quantize_embed_out else ""))


_PLAIN_PART = re.compile(r"[A-Za-z0-9._]+(?:-[A-Za-z0-9._]+)*")


def _safe_part(text: str) -> str:
    """A directory name for a repo id or revision, distinct for distinct texts.

    A plain name (``/``-separated parts of ``[A-Za-z0-9._-]`` with no ``--``
    and no ``-`` at a part's ends) keeps its readable form, ``/`` written
    ``--`` (``EleutherAI/pythia-14m`` -> ``EleutherAI--pythia-14m``,
    ``step1000``, ``feat/x`` -> ``feat--x``): each ``--`` there stands for a
    ``/``, so no two plain names meet. Any other text (``feat--x`` itself,
    ``a b``, ``..``, a very long name) is written as a readable part, ``@`` and
    a hash of the exact text; ``@`` never appears in a plain name. (Names that
    differ only in case still meet on a case-insensitive file system.)"""
    parts = text.split("/")
    if all(_PLAIN_PART.fullmatch(p) and p not in (".", "..") for p in parts) and len(text) <= 200:
        return "--".join(parts)
    readable = re.sub(r"[^A-Za-z0-9._-]", "-", text.replace("/", "--"))[:64].strip(".") or "-"
    return f"{readable}@{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"


def entry_dir(root: Union[str, os.PathLike], ref: ModelRef, revision: str, settings: QuantSettings) -> Path:
    """Where the entry of ``ref@revision`` quantized with ``settings`` lives (whether or not it exists)."""
    if ref.repo_id is None:
        raise ValueError("a local directory has no quantized-cache entry (no repo and revision to key it by)")
    rev = canonical_revision(ref, revision) if ref.is_pythia else revision
    return Path(root).expanduser() / _safe_part(ref.repo_id) / _safe_part(rev) / settings.tag


def _check(entry: Path) -> Optional[str]:
    """None if ``entry`` is complete, else what is wrong with it."""
    try:
        marker = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{ENTRY_FILE} is missing (an interrupted or foreign write)"
    except (OSError, ValueError) as e:
        return f"{ENTRY_FILE} is unreadable ({e})"
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_VERSION:
        return f"{ENTRY_FILE} is not format {FORMAT_VERSION}"
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if not (entry / name).is_file():
            return f"{name} is missing"
    weights = entry / WEIGHTS_FILE
    if not weights.is_file():
        return f"{WEIGHTS_FILE} is missing"
    if weights.stat().st_size != marker.get("weights_bytes"):
        return f"{WEIGHTS_FILE} is {weights.stat().st_size} bytes, the entry recorded {marker.get('weights_bytes')}"
    return None


def discard(entry: Path, reason: str) -> None:
    """Warn that ``entry`` is unusable and remove it (it is rebuilt from the checkpoint)."""
    warnings.warn(
        f"quantized cache entry {entry} is unusable ({reason}); removing it and rebuilding it from the checkpoint.",
        QuantizedCacheWarning,
        stacklevel=3,
    )
    _remove(entry)


def _remove(path: Path) -> None:
    # Renamed first, so a concurrent reader sees the entry either whole or absent.
    if not path.exists():
        return
    trash = path.with_name(f"{path.name}.del-{_writer_id()}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    _delete(trash)


def _delete(path: Path) -> None:
    """A directory tree, or a file (or link) where an entry was expected; errors ignored."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) is no probe elsewhere: assume alive, delete nothing
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _writer_id() -> str:
    """``<host>-<pid>``: a process id means something on its own machine only, and
    a cache directory may be shared by several (a cluster's network file system)."""
    return f"{_host()}-{os.getpid()}"


def _remove_dead_writers(entry: Path) -> None:
    """Remove ``<tag>.tmp-<host>-<pid>-*`` / ``.del-<host>-<pid>-*`` beside ``entry``
    left by a process of this machine that is gone (killed mid-write): nobody
    else ever removes them. Another machine's are left alone (its pid cannot be
    probed from here)."""
    pattern = re.compile(re.escape(entry.name) + r"\.(?:tmp|del)-(.+)-(\d+)-[0-9a-f]+")
    try:
        siblings = list(entry.parent.iterdir())
    except OSError:
        return
    host = _host()
    for path in siblings:
        m = pattern.fullmatch(path.name)
        if m and m.group(1) == host and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            _delete(path)


def find(root, ref: ModelRef, revision: str, settings: QuantSettings) -> Optional[Path]:
    """The complete entry for ``ref@revision`` and ``settings``, or None. An
    incomplete one is discarded with a ``QuantizedCacheWarning``."""
    entry = entry_dir(root, ref, revision, settings)
    if not entry.exists():
        return None
    problem = _check(entry)
    if problem is None:
        return entry
    discard(entry, problem)
    return None


def _source_dense_tensors(model, source_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's own values of the model's dense tensors (in the checkpoint's dtype)."""
    wanted = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    out: dict[str, torch.Tensor] = {}
    with CheckpointReader(source_dir) as reader:
        for key in reader.keys():  # file order: each file opened once
            name = "embed_out." + key[len("lm_head."):] if key.startswith("lm_head.") else key
            target = wanted.get(name)
            if target is None:
                continue
            t = reader.get(key)
            if t.is_floating_point() and tuple(t.shape) == tuple(target.shape):
                out[name] = t
    return out


def store(root, ref: ModelRef, revision: str, settings: QuantSettings, model, source_dir: Union[str, os.PathLike]) -> Path:
    """Write ``model`` (just loaded from the dense checkpoint in ``source_dir``) as the entry of
    ``ref@revision``; atomically. Returns the entry directory."""
    from .export import save_pretrained

    if not (Path(source_dir) / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{source_dir} has no {TOKENIZER_FILE} to copy (an entry without one cannot be loaded)")
    entry = entry_dir(root, ref, revision, settings)
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(entry)
    tmp = entry.with_name(f"{entry.name}.tmp-{_writer_id()}-{uuid.uuid4().hex[:8]}")
    try:
        save_pretrained(model, tmp, tokenizer_dir=source_dir, dense=_source_dense_tensors(model, Path(source_dir)))
        marker = {
            "format": FORMAT_VERSION,
            "repo_id": ref.repo_id,
            "revision": revision,
            "entry_revision": entry.parent.name,
            "settings": asdict(settings),
            "source": str(source_dir),
            "weights_bytes": (tmp / WEIGHTS_FILE).stat().st_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / ENTRY_FILE).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:
            if _check(entry) is not None:  # not a complete entry from a concurrent writer: replace it
                _remove(entry)
                os.rename(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
