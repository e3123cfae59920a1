"""Checkpoint sweeps: many revisions of one model, loaded one after another into the same tensors.

    for rev, engine in pythia_native.sweep("pythia-160m", every=10000, quantized_cache="~/.cache/pn-4bit"):
        print(rev, engine.score(text).perplexity)

The first revision is loaded with :func:`pythia_native.load`; each next one
is streamed into the same parameters, buffers and KV cache
(``Pythia.load_revision``): nothing is reallocated, every ``data_ptr`` stays
the same, captured CUDA graphs stay valid, and peak memory stays that of one
model plus one tensor in hand. The tokenizer is loaded once. Every revision
is validated against the suite before anything is downloaded.

Disk: by default each revision's files stay in the Hugging Face cache (as
``load()`` leaves them). ``free_hub_files=True`` deletes each revision's
snapshot from the hub cache once it is loaded (and, with
``quantized_cache``, written there as 4 bits: a revision whose entry could
not be written keeps its snapshot), so a sweep holds one dense checkpoint on
disk at a time; without ``quantized_cache`` a second sweep then downloads
again. A snapshot is deleted after the last revision of the list that is
the same checkpoint (a repeat, ``main`` and ``step143000``, or any name the
hub cache's refs give the same commit), even when that last one is served
from ``quantized_cache``. A local directory is never deleted.

An error (a revision missing from an offline cache, a corrupt file) ends
the sweep: the iterator raises it and stops (a generator cannot resume).
The engine keeps the revision it held when the bad one was refused before
any weight was written (a missing revision, another architecture, names,
shapes or dtypes that do not fit); data found bad while being written
(NaN or infinite values, an I/O error) leaves it unusable until a revision
loads (``PythiaModel.partial_load``). To skip bad revisions instead,
loop yourself::

    revs = pythia_native.select_revisions("pythia-160m", every=10000)
    engine = pythia_native.load("pythia-160m", revs[0])
    for rev in revs:
        try:
            engine.load_revision(rev)
        except pythia_native.LoadInProgressError:
            raise  # another engine over this model is loading: not the revision's fault
        except pythia_native.PythiaNativeError as e:
            print(rev, "skipped:", e)
            continue
        ...
"""
from __future__ import annotations

import numbers
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from .errors import RevisionError
from .format import DEFAULT_QUANT_TYPE
from .generate import Pythia
from .sampling import int_scalar
from .suite import ModelRef, resolve_model, resolve_revision
from .suite import revisions as suite_revisions


def select_revisions(
    model: Union[str, os.PathLike, ModelRef],
    revisions: Union[str, Sequence[Union[str, int]], None] = None,
    *,
    every: Optional[int] = None,
    steps: Optional[Iterable[int]] = None,
) -> list[str]:
    """The revisions a sweep visits, each validated and normalized (``suite.resolve_revision``); no network.

    Exactly one of:
        revisions: a list (``["step1000", 2000, "main"]``) or a comma-separated string;
        every: the suite branches whose step is a multiple of ``every``, in training order
            (``every=10000``: step0, step10000, ..., step140000 for the current suite;
            add ``"step143000"`` through ``revisions`` if you want the last one);
        steps: step numbers (``range(1000, 11000, 1000)``), each a branch of the suite.
    Raises ``RevisionError`` naming every invalid entry (and the nearest valid steps of the first).
    """
    given = sum(x is not None for x in (revisions, every, steps))
    if given != 1:
        raise RevisionError("pass exactly one of revisions=[...], every=N or steps=range(...) to choose the revisions")
    ref = resolve_model(model)
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise RevisionError(f"every must be a positive number of steps, got {every!r}")
        every = int(every)
        chosen = [r for r in suite_revisions(ref) if int(r[4:]) % every == 0]
        if not chosen:
            raise RevisionError(f"{ref} has no branch whose step is a multiple of {every}; see suite.revisions()")
        return chosen
    if steps is not None:
        # A string or bytes is iterable too: "1000" would be the steps 1, 0, 0, 0.
        if isinstance(steps, (str, bytes, bytearray)) or not hasattr(steps, "__iter__"):
            raise RevisionError(f"steps must be step numbers (a list or a range), got {steps!r}")
        # 0-d tensors / numpy scalars (torch.arange, np.arange) as Python ints.
        wanted: list[Union[str, int]] = [int_scalar(s) for s in steps]
        if ref.model is None:
            raise RevisionError(f"{ref} is not a repo of the Pythia suite: pass its branch names as revisions=[...]")
    elif isinstance(revisions, str):
        wanted = [r.strip() for r in revisions.split(",")]
    elif isinstance(revisions, (bytes, bytearray)) or not hasattr(revisions, "__iter__"):
        raise RevisionError(
            f"revisions must be a list of revisions or a comma-separated string, got {revisions!r}"
        )
    else:
        wanted = list(revisions)
    if not wanted:
        raise RevisionError("no revisions to sweep: the list is empty")
    out, errors = [], []
    for r in wanted:
        try:
            out.append(resolve_revision(ref, r))
        except RevisionError as e:
            errors.append((r, e))
    if errors:
        first, error = errors[0]
        more = f" Also invalid: {', '.join(repr(r) for r, _ in errors[1:])}." if len(errors) > 1 else ""
        raise RevisionError(f"revision {first!r}: {error}{more} Nothing was loaded.")
    return out


def sweep(
    model: Union[str, os.PathLike, ModelRef],
    revisions: Union[str, Sequence[Union[str, int]], None] = None,
    *,
    every: Optional[int] = None,
    steps: Optional[Iterable[int]] = None,
    quant_type: str = DEFAULT_QUANT_TYPE,
    double_quant: bool = False,
    quantize_embed_out: bool = False,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    quantized_cache: Optional[Union[str, os.PathLike]] = None,
    local_files_only: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    free_hub_files: bool = False,
    max_batch: int = 1,
    max_len: Optional[int] = None,
    cuda_graphs: bool = True,
    compute: str = "float32",
) -> Iterator[tuple[str, Pythia]]:
    """Yield ``(revision, engine)`` for each revision of ``model``, in the order given.

    The revisions (``select_revisions``: a list, ``every=N`` or ``steps=...``)
    are all validated when ``sweep`` is called, before any download: a typo
    raises ``RevisionError`` at once. The same :class:`Pythia` object is
    yielded every time, holding the revision just loaded (use it before
    advancing the iterator). The other arguments are those of
    :func:`pythia_native.load`; ``free_hub_files`` deletes each revision's
    snapshot from the Hugging Face cache after loading it (off by default).
    """
    from .format import check_quant_type
    from .loading import check_dtype, resolve_device

    chosen = select_revisions(model, revisions, every=every, steps=steps)
    check_dtype(dtype, resolve_device(device))  # fail now, not at the first next()
    check_quant_type(quant_type)
    ref = resolve_model(model, warn=False)
    load_kwargs = dict(quant_type=quant_type, double_quant=double_quant, quantize_embed_out=quantize_embed_out,
                       device=device, dtype=dtype, cache_dir=cache_dir, local_files_only=local_files_only,
                       token=token, max_batch=max_batch, max_len=max_len, cuda_graphs=cuda_graphs,
                       quantized_cache=quantized_cache, compute=compute)
    return _sweep(ref, chosen, load_kwargs, free_hub_files)


def _sweep(ref: ModelRef, chosen: list[str], load_kwargs: dict, free_hub_files: bool) -> Iterator[tuple[str, Pythia]]:
    from .loading import load

    engine: Optional[Pythia] = None
    # Hub snapshots loaded for each checkpoint (canonical_revision) and not yet
    # deleted: the last revision of a checkpoint may come from the quantized
    # cache, or be another commit of it (main and step143000 can be two).
    held: dict[str, list[Path]] = {}
    for i, rev in enumerate(chosen):
        if engine is None:
            engine = load(ref, rev, **load_kwargs)
        else:
            engine.load_revision(rev)
        if free_hub_files and not ref.is_local and ref.repo_id is not None:
            source = Path(engine.source[2])
            group = held.setdefault(_checkpoint(ref, rev), [])
            if _is_snapshot(source) and source not in group:
                group.append(source)
            if _may_free(ref, chosen, i, engine, load_kwargs):
                for snapshot in held.pop(_checkpoint(ref, rev)):
                    # A later revision whose ref in the hub cache names this commit
                    # needs it: it goes with that revision's checkpoint instead.
                    later = next((r for r in chosen[i + 1 :] if _commit_of(snapshot, r) == snapshot.name), None)
                    if later is None:
                        _free_snapshot(snapshot)
                    else:
                        held.setdefault(_checkpoint(ref, later), []).append(snapshot)
        yield rev, engine


def _checkpoint(ref: ModelRef, rev: str) -> str:
    """One name per checkpoint (main -> step143000); ``rev`` is validated already."""
    from .suite import canonical_revision

    return canonical_revision(ref, rev)


def _is_snapshot(directory: Path) -> bool:
    """A hub-cache snapshot (``.../models--org--name/snapshots/<commit>``), not a
    local directory or a quantized-cache entry."""
    return directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--")


def _commit_of(snapshot: Path, rev: str) -> Optional[str]:
    """The commit ``rev`` names in the hub cache that holds ``snapshot``: itself
    for a commit hash, else what ``refs/<rev>`` says (None when not cached)."""
    if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
        return rev
    try:
        return (snapshot.parents[1] / "refs" / rev).read_text().strip()
    except (OSError, ValueError):
        return None


def _may_free(ref: ModelRef, chosen: list[str], i: int, engine: Pythia, load_kwargs: dict) -> bool:
    """Whether revision ``chosen[i]``'s hub snapshot may go now: never a local
    directory's files; not while a later revision of the list is the same
    checkpoint (a repeat, or ``main`` and ``step143000``: deleted after the
    last); and with a quantized cache, only once the 4-bit entry exists (a
    failed write keeps the only copy on disk)."""
    if ref.is_local or ref.repo_id is None:
        return False
    if any(_checkpoint(ref, chosen[i]) == _checkpoint(ref, later) for later in chosen[i + 1 :]):
        return False
    if load_kwargs.get("quantized_cache") is not None:
        from . import quantized_cache as qc
        from .loading import held_settings

        model = engine.model
        settings = held_settings(model)
        if getattr(model, "source_quantization", None) is None and settings is None:
            warnings.warn(f"{ref}@{chosen[i]}: kept in the hub cache: the quantized cache cannot hold this "
                          "model's format (Linears its bitsandbytes checkpoint left dense)", stacklevel=3)
            return False
        if getattr(model, "source_quantization", None) is None and qc.find(
            load_kwargs["quantized_cache"], ref, chosen[i], settings
        ) is None:
            warnings.warn(f"{ref}@{chosen[i]}: kept in the hub cache, its 4-bit copy was not written "
                          "(see the warning before)", stacklevel=3)
            return False
    return True


def _free_snapshot(directory: Path) -> None:
    """Delete a hub-cache snapshot (``.../models--org--name/snapshots/<commit>``), its blobs
    and the refs naming it, through huggingface_hub; anything else (a local directory, a
    quantized-cache entry) is left alone."""
    if not _is_snapshot(directory):
        return
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(directory.parents[2])  # the cache root holding models--org--name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info.delete_revisions(directory.name).execute()


