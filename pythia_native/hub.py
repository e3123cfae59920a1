"""Fetching a checkpoint revision from the Hugging Face hub into its cache.

``download_checkpoint(model, revision)`` returns a local directory (the hub
cache's snapshot folder, ``<cache>/models--<org>--<name>/snapshots/<commit>``)
that holds only what pythia-native needs:

- ``config.json``;
- one set of weights, chosen from the repo listing (online) or the snapshot
  folder (offline) in the order of ``weights.WEIGHT_ENTRY_FILES``:
  ``model.safetensors``, ``model.safetensors.index.json`` + its shards,
  ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` + its shards;
- the tokenizer files that exist (``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``).

Nothing else in a repo (other weight formats, optimizer states) is fetched,
so iterating over many revisions costs one set of weights each. Downloads go
through ``huggingface_hub`` (its cache layout, ``refs/<branch>`` files,
progress bars, ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_ENDPOINT`` / token
handling). Network use is off when ``local_files_only=True`` or the
environment sets ``HF_HUB_OFFLINE=1``; then only the cache is read. When the
hub cannot be reached, a complete cached snapshot is used with a warning.

Revisions are validated by ``suite.resolve_revision`` before any network
access. Failures raise the ``errors`` classes with messages that say what to do.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import huggingface_hub
from huggingface_hub import hf_hub_download, list_repo_files, model_info, snapshot_download

from .errors import (
    CheckpointError,
    ConfigError,
    HubConnectionError,
    HubFallbackWarning,
    ModelNotFoundError,
    OfflineError,
    PythiaNativeError,
    RevisionError,
)
from .suite import FINAL_STEP, ModelRef, canonical_revision, resolve_model, resolve_revision, warn_known_data_problems
from .weights import (
    BIN_INDEX,
    CONFIG_FILE,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    index_shards,
    select_weight_entry,
)

try:  # huggingface_hub >= 0.24 keeps its exceptions in .errors; older versions in .utils
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
except ImportError:  # pragma: no cover - old huggingface_hub
    from huggingface_hub.utils import (  # type: ignore[no-redef]
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )


def _connection_error_types() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x/2.x talks HTTP through httpx (2.x: the `httpx2` fork), 0.x through requests;
    # their transport errors are not builtin ConnectionErrors.
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, attrs in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests.exceptions", ("ConnectionError", "Timeout")),
    ):
        try:
            module = __import__(module_name, fromlist=list(attrs))
        except ImportError:
            continue
        types += [getattr(module, a) for a in attrs if hasattr(module, a)]
    return tuple(types)


CONNECTION_ERRORS = _connection_error_types()


def hub_offline() -> bool:
    """True when the environment disables network access (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    Read at call time as well as at ``huggingface_hub`` import time, so a
    variable set after import counts too.
    """
    return _offline_setting() is not None


def _offline_setting() -> Optional[str]:
    """The setting that turns the network off, as a user would write it, or None when it is on.

    The first of ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` that is set
    decides, as in ``huggingface_hub``; its import-time value counts too.
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:
            if value.upper() in ("1", "ON", "YES", "TRUE"):  # huggingface_hub's test, no stripping
                return f"{name}={value}"
            break
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set when huggingface_hub was imported"
    return None


def _cache_location(cache_dir: Optional[Union[str, os.PathLike]]) -> str:
    return str(cache_dir) if cache_dir is not None else str(huggingface_hub.constants.HF_HUB_CACHE)


def _fetch_hint(repo_id: str, revision: str) -> str:
    return (
        f"run the same pythia-native command once with network access (without --offline, HF_HUB_OFFLINE=1 "
        f"or local_files_only=True), or fetch it with "
        f"`hf download {repo_id} --revision {revision}`"
    )


def _status_code(error: BaseException) -> Optional[int]:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _translate_hub_error(error: BaseException, repo_id: str, revision: str) -> PythiaNativeError:
    """Map a huggingface_hub / transport exception to one of ours, with a message that says what to do."""
    if isinstance(error, GatedRepoError):
        return ModelNotFoundError(
            f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and log in "
            "(`hf auth login`, or set HF_TOKEN)."
        )
    if isinstance(error, RepositoryNotFoundError) or _status_code(error) in (401, 403):
        return ModelNotFoundError(
            f"{repo_id} was not found on the Hugging Face hub (or it is private and no valid token was sent): "
            "check the repo id (Pythia repos are EleutherAI/pythia-<size>[-deduped][-v0]), or log in with "
            "`hf auth login` for a private repo."
        )
    if isinstance(error, RevisionNotFoundError):
        return RevisionError(
            f"{repo_id} has no revision {revision!r} on the hub: check the branch name or commit hash "
            f"(its branches: https://huggingface.co/{repo_id}/tree/main, or huggingface_hub.list_repo_refs)."
        )
    if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
        return CheckpointError(
            f"{repo_id}@{revision}: a file listed for download is missing on the hub ({error}); the repo changed "
            "while downloading: try again."
        )
    return HubConnectionError(
        f"Could not reach the Hugging Face hub for {repo_id}@{revision} ({type(error).__name__}: {error}). "
        "Check the network connection, proxy and HF_ENDPOINT; or, with a cache filled earlier, set "
        "HF_HUB_OFFLINE=1."
    )


def _needed_files(filenames: list[str], repo: str, revision: str, tokenizer: bool) -> tuple[list[str], Optional[str]]:
    """``config.json``, the weight entry file and the tokenizer files present; also the index name if sharded."""
    names = set(filenames)
    if CONFIG_FILE not in names:
        raise ConfigError(
            f"{repo}@{revision} has no config.json, so it is not a transformers checkpoint; pick a revision or "
            "repo that has one."
        )
    try:
        entry = select_weight_entry(names)
    except CheckpointError as error:
        raise CheckpointError(f"{repo}@{revision}: {error}") from None
    needed = [CONFIG_FILE, entry]
    if tokenizer:
        needed += [name for name in TOKENIZER_FILES if name in names]
    return needed, entry if entry in (SAFETENSORS_INDEX, BIN_INDEX) else None


def _missing_in(snapshot: Path, files: list[str]) -> list[str]:
    # `is_file` follows the snapshot's symlinks into blobs/: a dangling link counts as missing.
    return [name for name in files if not (snapshot / name).is_file()]


def _from_cache(
    repo_id: str, revision: str, cache_dir: Optional[Union[str, os.PathLike]], tokenizer: bool, why: str
) -> Path:
    """The cached snapshot of ``repo_id@revision`` with every needed file, or ``OfflineError``."""
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True, allow_patterns=[CONFIG_FILE]
        )
    except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError) as error:
        raise OfflineError(
            f"{repo_id} revision {revision!r} is not in the Hugging Face cache ({_cache_location(cache_dir)}) and "
            f"{why}.{_cached_twin_hint(repo_id, revision, cache_dir)} To fetch it, {_fetch_hint(repo_id, revision)}."
        ) from error
    snapshot = Path(folder)
    present = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    try:
        needed, index = _needed_files(present, repo_id, revision, tokenizer)
    except (ConfigError, CheckpointError) as error:
        raise OfflineError(
            f"The cached snapshot of {repo_id} revision {revision!r} ({snapshot}) is incomplete ({error}) and "
            f"{why}. To complete it, {_fetch_hint(repo_id, revision)}."
        ) from None
    if index is not None:
        needed += index_shards(snapshot / index)
    missing = _missing_in(snapshot, needed)
    if missing:
        raise OfflineError(
            f"The cached snapshot of {repo_id} revision {revision!r} ({snapshot}) is incomplete: missing "
            f"{', '.join(missing)}, and {why}. To complete it, {_fetch_hint(repo_id, revision)}."
        )
    return snapshot


def _cached_twin_hint(repo_id: str, revision: str, cache_dir) -> str:
    """For a Pythia ``main`` / ``step143000`` missing from the cache while the other
    name of that checkpoint is cached: a sentence naming it; else ""."""
    try:
        final = f"step{FINAL_STEP}"
        if revision not in ("main", final) or canonical_revision(repo_id, "main") != final:
            return ""
        twin = final if revision == "main" else "main"
        snapshot_download(repo_id, revision=twin, cache_dir=cache_dir, local_files_only=True,
                          allow_patterns=[CONFIG_FILE])
    except Exception:  # noqa: BLE001 - not a suite repo, or the twin is not cached either
        return ""
    return f" Its {twin!r}, the same checkpoint, is cached: pass revision={twin!r}."


# Waits before the 2nd and 3rd try of the repo listing. huggingface_hub's own
# list_repo_files retries 5 times over ~23 s (1, 2, 4, 8, 8 s), so a machine
# without network waited that long for its error (or for the cached snapshot
# it falls back to); three tries over ~3 s still ride out a transient 503.
LISTING_RETRY_WAITS_S = (1.0, 2.0)
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def repo_files(repo_id: str, revision: str, token) -> list[str]:
    """The file names of ``repo_id`` at ``revision``: one ``model_info`` request
    (its ``siblings``; huggingface_hub does not retry it), tried again after
    each of ``LISTING_RETRY_WAITS_S`` on a transport error or a 408/429/5xx answer."""
    for attempt in range(len(LISTING_RETRY_WAITS_S) + 1):
        try:
            info = model_info(repo_id, revision=revision, token=token)
            break
        except (HfHubHTTPError, *CONNECTION_ERRORS) as error:
            retry = isinstance(error, CONNECTION_ERRORS) or _status_code(error) in _RETRY_STATUS
            if not retry or attempt == len(LISTING_RETRY_WAITS_S):
                raise
            time.sleep(LISTING_RETRY_WAITS_S[attempt])
    if info.siblings is None:  # not expected without `expand`; the paginated tree listing then
        return list_repo_files(repo_id, revision=revision, token=token)
    return [s.rfilename for s in info.siblings]


def _download(
    repo_id: str, revision: str, cache_dir: Optional[Union[str, os.PathLike]], token, tokenizer: bool
) -> Path:
    filenames = repo_files(repo_id, revision, token)
    needed, index = _needed_files(filenames, repo_id, revision, tokenizer)
    if index is not None:
        index_path = hf_hub_download(repo_id, index, revision=revision, cache_dir=cache_dir, token=token)
        shards = index_shards(index_path)
        absent = [s for s in shards if s not in set(filenames)]
        if absent:
            raise CheckpointError(
                f"{repo_id}@{revision}: {index} names shard(s) the repo does not have ({', '.join(absent)}); the "
                "checkpoint is broken upstream: pick another revision."
            )
        needed += shards
    folder = snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=needed
    )
    snapshot = Path(folder)
    missing = _missing_in(snapshot, needed)
    if missing:
        raise CheckpointError(
            f"{repo_id}@{revision}: the download finished without {', '.join(missing)} in {snapshot}; "
            "run it again (interrupted download)."
        )
    return snapshot


def download_checkpoint(
    model: Union[str, os.PathLike, ModelRef],
    revision: Union[str, int, None] = None,
    *,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    local_files_only: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    tokenizer: bool = True,
    warn: bool = True,
) -> Path:
    """A local directory holding ``model`` at ``revision``, downloading only the needed files.

    ``model`` is anything ``suite.resolve_model`` accepts; a local directory is
    returned as it is (``revision`` must then be ``None`` or ``"main"``).
    ``revision`` is validated by ``suite.resolve_revision`` before any network
    access (``None`` means ``main``). ``local_files_only=None`` follows
    ``HF_HUB_OFFLINE``. With ``warn``, known data problems of the branch
    (``suite.known_data_problems``) are issued as ``CheckpointDataWarning``.

    Raises ``ModelNotFoundError``, ``RevisionError``, ``OfflineError``,
    ``HubConnectionError``, ``ConfigError`` (no ``config.json``) or
    ``CheckpointError`` (no weights, an index naming absent shards).
    """
    ref = resolve_model(model, warn=warn)
    rev = resolve_revision(ref, revision)
    if ref.local_path is not None:
        return ref.local_path
    assert ref.repo_id is not None
    if warn:
        warn_known_data_problems(ref, rev)
    # HF_HUB_OFFLINE wins over local_files_only=False, as in huggingface_hub (which then
    # refuses every request): the cache is all there is, and the error says why.
    offline = bool(local_files_only) or hub_offline()
    if offline:
        why = "local_files_only=True" if local_files_only else f"network access is off ({_offline_setting()})"
        return _from_cache(ref.repo_id, rev, cache_dir, tokenizer, why)
    try:
        return _download(ref.repo_id, rev, cache_dir, token, tokenizer)
    except PythiaNativeError:
        raise
    except (HfHubHTTPError, EntryNotFoundError, *CONNECTION_ERRORS) as error:
        if not _hub_unreachable(error):
            raise _translate_hub_error(error, ref.repo_id, rev) from error
        # Unreachable hub or a server error: a complete cached snapshot still serves, as in huggingface_hub.
        network_error = _translate_hub_error(error, ref.repo_id, rev)
        try:
            snapshot = _from_cache(ref.repo_id, rev, cache_dir, tokenizer, "the hub could not be reached")
        except OfflineError:
            raise network_error from error
        warnings.warn(
            f"The Hugging Face hub could not be reached ({type(error).__name__}); using the cached snapshot "
            f"{snapshot} of {ref.repo_id}@{rev}.",
            HubFallbackWarning,
            stacklevel=2,
        )
        return snapshot


def _hub_unreachable(error: BaseException) -> bool:
    """A transport failure or a server-side error (not an answer about the repo, revision or access)."""
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        return False
    if isinstance(error, LocalEntryNotFoundError):  # huggingface_hub fell back to its cache and found nothing
        return True
    if isinstance(error, EntryNotFoundError):
        return False
    if isinstance(error, CONNECTION_ERRORS):
        return True
    return _status_code(error) not in (401, 403, 404)
