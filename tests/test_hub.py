"""Downloads and the hub cache (pythia_native.hub). No network: caches are built on disk in the
huggingface_hub layout, and the online calls are replaced by fakes that record what was asked."""
import inspect
import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from pythia_native import hub
from pythia_native.errors import (
    CheckpointDataWarning,
    CheckpointError,
    ConfigError,
    HubConnectionError,
    HubFallbackWarning,
    ModelNotFoundError,
    OfflineError,
    PythiaNativeError,
    RenamedModelWarning,
    RevisionError,
)

# The HTTP library huggingface_hub talks through: 2.x the httpx2 fork, 1.x
# httpx (the GPU image has 1.x). Not a hard import of either: a module that
# fails to import stops the collection of the whole suite.
http = pytest.importorskip("httpx2" if int(huggingface_hub.__version__.split(".")[0]) >= 2 else "httpx")

REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download
CONFIG = json.dumps({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}).encode()


def commit_hash(n: int) -> str:
    return f"{n:040x}"


def add_snapshot(cache: Path, repo_id: str, files: dict, refs=("main",), commit=None, tree=None) -> Path:
    """Write ``files`` into ``cache`` exactly as huggingface_hub lays them out:
    ``models--org--name/blobs/<id>``, ``snapshots/<commit>/<file>`` (a symlink to the blob) and
    ``refs/<branch>`` holding the commit hash (no newline). ``tree``: file names for the cached
    tree listing ``trees/<commit>.json`` that huggingface_hub 2.x writes after listing a repo."""
    commit = commit or commit_hash(abs(hash((repo_id, tuple(refs)))) % 10**12)
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / f"{abs(hash((commit, name))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    snapshot.mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    if tree is not None:
        (storage / "trees").mkdir(exist_ok=True)
        entries = {name: {"size": 1, "blob_id": "0" * 40} for name in tree}
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": entries}))
    return snapshot


def http_error(cls, status):
    response = http.Response(status, request=http.Request("GET", "https://huggingface.co/api/models/x"))
    return cls(f"{status} error", response=response)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any network call fails the test; snapshot_download may only read the cache."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def forbidden(*args, **kwargs):
        raise AssertionError(f"network call in a test: {args} {kwargs}")

    def cache_only(*args, **kwargs):
        assert kwargs.get("local_files_only") is True, "snapshot_download would go online"
        return REAL_SNAPSHOT_DOWNLOAD(*args, **kwargs)

    monkeypatch.setattr(hub, "model_info", forbidden)
    monkeypatch.setattr(hub, "list_repo_files", forbidden)
    monkeypatch.setattr(hub, "hf_hub_download", forbidden)
    monkeypatch.setattr(hub, "snapshot_download", cache_only)
    monkeypatch.setattr(hub, "LISTING_RETRY_WAITS_S", (0.0, 0.0))  # the tries, without their waits


class FakeHub:
    """Stands in for the hub: a repo listing per (repo, revision); downloads write into the cache."""

    def __init__(self, cache: Path, listing: list, contents: dict = None):
        self.cache, self.listing, self.contents = cache, listing, contents or {}
        self.calls = []

    def data(self, name):
        return self.contents.get(name, b"weights")

    @staticmethod
    def check_signature(real, *args, **kwargs):
        inspect.signature(real).bind(*args, **kwargs)  # the call must also be valid for the real function

    def model_info(self, repo_id, revision=None, token=None):
        self.check_signature(huggingface_hub.model_info, repo_id, revision=revision, token=token)
        self.calls.append(("list", repo_id, revision))
        return SimpleNamespace(sha=commit_hash(7), siblings=[SimpleNamespace(rfilename=n) for n in self.listing])

    def hf_hub_download(self, repo_id, filename, revision=None, cache_dir=None, token=None):
        self.check_signature(huggingface_hub.hf_hub_download, repo_id, filename, revision=revision,
                             cache_dir=cache_dir, token=token)
        self.calls.append(("file", repo_id, filename, revision))
        folder = add_snapshot(Path(cache_dir), repo_id, {filename: self.data(filename)}, refs=(revision,),
                              commit=commit_hash(7))
        return str(folder / filename)

    def snapshot_download(self, repo_id, revision=None, cache_dir=None, token=None, allow_patterns=None,
                          local_files_only=False):
        if local_files_only:
            return REAL_SNAPSHOT_DOWNLOAD(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                          allow_patterns=allow_patterns)
        self.check_signature(REAL_SNAPSHOT_DOWNLOAD, repo_id, revision=revision, cache_dir=cache_dir, token=token,
                             allow_patterns=allow_patterns)
        self.calls.append(("snapshot", repo_id, revision, tuple(allow_patterns)))
        files = {n: self.data(n) for n in self.listing if n in allow_patterns}
        storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit_hash(7)
        files = {n: d for n, d in files.items() if not (storage / n).exists()}
        return str(add_snapshot(Path(cache_dir), repo_id, files, refs=(revision,), commit=commit_hash(7)))

    def install(self, monkeypatch):
        monkeypatch.setattr(hub, "model_info", self.model_info)
        monkeypatch.setattr(hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(hub, "snapshot_download", self.snapshot_download)
        return self


REPO_EXTRAS = [".gitattributes", "README.md", "generation_config.json", "flax_model.msgpack"]
TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# ---- offline: the cache only -------------------------------------------------------------------


def test_offline_finds_branch_snapshots(tmp_path, monkeypatch):
    main = add_snapshot(tmp_path, "EleutherAI/pythia-160m", {"config.json": CONFIG, "model.safetensors": b"m"},
                        refs=("main", "step143000"), commit=commit_hash(1))
    step = add_snapshot(tmp_path, "EleutherAI/pythia-160m", {"config.json": CONFIG, "model.safetensors": b"s"},
                        refs=("step1000",), commit=commit_hash(2))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_checkpoint("pythia-160m", cache_dir=tmp_path) == main
    assert hub.download_checkpoint("EleutherAI/pythia-160m", "step143000", cache_dir=tmp_path) == main
    assert hub.download_checkpoint("pythia-160m", 1000, cache_dir=tmp_path) == step
    assert hub.download_checkpoint("pythia-160m", commit_hash(2), cache_dir=tmp_path) == step
    assert (step / "model.safetensors").read_bytes() == b"s"


def test_local_files_only_without_env(tmp_path):
    snap = add_snapshot(tmp_path, "EleutherAI/pythia-70m-v0", {"config.json": CONFIG, "pytorch_model.bin": b"w"},
                        refs=("step2000",))
    assert hub.download_checkpoint("pythia-70m-v0", "step2000", cache_dir=tmp_path, local_files_only=True) == snap


def test_offline_missing_revision_is_one_clear_error(tmp_path, monkeypatch):
    add_snapshot(tmp_path, "EleutherAI/pythia-160m", {"config.json": CONFIG, "model.safetensors": b"m"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        hub.download_checkpoint("pythia-160m", "step2000", cache_dir=tmp_path)
    message = str(info.value)
    assert "EleutherAI/pythia-160m revision 'step2000' is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "hf download EleutherAI/pythia-160m --revision step2000" in message
    # The fix names the command line's switch too (its --offline is local_files_only).
    assert "with network access (without --offline, HF_HUB_OFFLINE=1 or local_files_only=True)" in message
    assert isinstance(info.value, PythiaNativeError)
    with pytest.raises(OfflineError, match="local_files_only=True"):
        hub.download_checkpoint("pythia-410m", cache_dir=tmp_path, local_files_only=True)  # repo never cached
    # The message names the variable that turned the network off.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    with pytest.raises(OfflineError, match=r"network access is off \(TRANSFORMERS_OFFLINE=yes\)"):
        hub.download_checkpoint("pythia-160m", "step2000", cache_dir=tmp_path)


def test_offline_env_wins_over_local_files_only_false(tmp_path, monkeypatch):
    # huggingface_hub refuses every request under HF_HUB_OFFLINE=1: with
    # local_files_only=False the listing was tried 3 times (3 s) and the error
    # advised setting HF_HUB_OFFLINE=1. The cache serves, or the error says why.
    snap = add_snapshot(tmp_path, "EleutherAI/pythia-160m", {"config.json": CONFIG, "model.safetensors": b"m"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_checkpoint("pythia-160m", cache_dir=tmp_path, local_files_only=False) == snap
    with pytest.raises(OfflineError, match=r"not in the Hugging Face cache .* network access is off \(HF_HUB_OFFLINE=1\)"):
        hub.download_checkpoint("pythia-160m", "step2000", cache_dir=tmp_path, local_files_only=False)


def test_offline_missing_main_names_its_cached_twin(tmp_path, monkeypatch):
    # main is the same checkpoint as step143000 (PYTHIA.md); offline, the one
    # missing is pointed to the one cached. Not for a repo whose main differs.
    add_snapshot(tmp_path, "EleutherAI/pythia-160m", {"config.json": CONFIG, "model.safetensors": b"m"},
                 refs=("step143000",), commit=commit_hash(1))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="Its 'step143000', the same checkpoint, is cached: pass revision='step143000'"):
        hub.download_checkpoint("pythia-160m", "main", cache_dir=tmp_path)
    add_snapshot(tmp_path, "EleutherAI/pythia-2.8b", {"config.json": CONFIG, "model.safetensors": b"m"},
                 refs=("step143000",), commit=commit_hash(2))
    with pytest.raises(OfflineError) as info:
        hub.download_checkpoint("pythia-2.8b", "main", cache_dir=tmp_path, warn=False)
    assert "the same checkpoint" not in str(info.value)


def test_a_cached_snapshot_without_a_tokenizer_says_how_to_fetch_it(tmp_path):
    # A sweep fetches later revisions without tokenizer.json; loading one of
    # them alone once said "copy it into the model directory" (the hub cache).
    from pythia_native.errors import CheckpointError
    from pythia_native.tokenizer import Tokenizer

    snap = add_snapshot(tmp_path, "EleutherAI/pythia-14m", {"config.json": CONFIG}, refs=("step1000",),
                        commit=commit_hash(3))
    with pytest.raises(CheckpointError, match=rf"cache snapshot of EleutherAI/pythia-14m has no tokenizer.json .*"
                                              rf"hf download EleutherAI/pythia-14m tokenizer.json --revision {commit_hash(3)}"):
        Tokenizer.from_file(snap)
    with pytest.raises(CheckpointError, match="copy it into the model directory"):
        Tokenizer.from_file(tmp_path)  # any other directory


def test_offline_incomplete_snapshot(tmp_path, monkeypatch):
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                       "b": "model-00002-of-00002.safetensors"}}).encode()
    add_snapshot(tmp_path, "EleutherAI/pythia-12b", {"config.json": CONFIG, "model.safetensors.index.json": index,
                                                      "model-00001-of-00002.safetensors": b"1"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match=r"incomplete: missing model-00002-of-00002\.safetensors.*hf download"):
        hub.download_checkpoint("pythia-12b", cache_dir=tmp_path, warn=False)
    add_snapshot(tmp_path, "EleutherAI/pythia-1b", {"config.json": CONFIG}, refs=("step1000",))
    with pytest.raises(OfflineError, match=r"incomplete \(.*No weights found"):
        hub.download_checkpoint("pythia-1b", "step1000", cache_dir=tmp_path)


def test_offline_partial_download_with_tree_listing(tmp_path, monkeypatch):
    # huggingface_hub 2.x caches the full repo listing; we fetched only some files, which must still serve.
    snap = add_snapshot(tmp_path, "EleutherAI/pythia-160m", {"config.json": CONFIG, "model.safetensors": b"m"},
                        tree=["config.json", "model.safetensors", "pytorch_model.bin", "README.md"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_checkpoint("pythia-160m", cache_dir=tmp_path) == snap


def test_invalid_revision_rejected_before_any_hub_call(tmp_path):
    # the autouse fixture fails the test on any hub call
    with pytest.raises(RevisionError, match="nearest: step1000, step2000, step3000"):
        hub.download_checkpoint("pythia-160m-v0", "step16", cache_dir=tmp_path)


def test_local_directory_passes_through(tmp_path):
    assert hub.download_checkpoint(tmp_path) == tmp_path.resolve()
    with pytest.raises(RevisionError, match="local directory"):
        hub.download_checkpoint(tmp_path, "step1000")


# ---- online: fakes record what is requested ----------------------------------------------------


def test_fetches_only_needed_files_safetensors(tmp_path, monkeypatch):
    listing = ["config.json", "model.safetensors", "pytorch_model.bin"] + TOKENIZER + REPO_EXTRAS
    fake = FakeHub(tmp_path, listing).install(monkeypatch)
    path = hub.download_checkpoint("pythia-160m", "step1000", cache_dir=tmp_path)
    assert fake.calls == [
        ("list", "EleutherAI/pythia-160m", "step1000"),
        ("snapshot", "EleutherAI/pythia-160m", "step1000", ("config.json", "model.safetensors", *TOKENIZER)),
    ]
    assert path == tmp_path / "models--EleutherAI--pythia-160m" / "snapshots" / commit_hash(7)
    assert sorted(p.name for p in path.iterdir()) == sorted(["config.json", "model.safetensors", *TOKENIZER])
    # the branch ref was written, so the same revision now works offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_checkpoint("pythia-160m", "step1000", cache_dir=tmp_path) == path


def test_fetches_index_and_its_shards(tmp_path, monkeypatch):
    shards = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    index = json.dumps({"weight_map": {"a": shards[0], "b": shards[1], "c": shards[0]}}).encode()
    listing = ["config.json", "pytorch_model.bin.index.json", *shards, "tokenizer.json"] + REPO_EXTRAS
    fake = FakeHub(tmp_path, listing, {"pytorch_model.bin.index.json": index}).install(monkeypatch)
    path = hub.download_checkpoint("EleutherAI/pythia-12b", "step57000", cache_dir=tmp_path, tokenizer=False)
    assert fake.calls == [
        ("list", "EleutherAI/pythia-12b", "step57000"),
        ("file", "EleutherAI/pythia-12b", "pytorch_model.bin.index.json", "step57000"),
        ("snapshot", "EleutherAI/pythia-12b", "step57000", ("config.json", "pytorch_model.bin.index.json", *shards)),
    ]
    assert all((path / s).is_file() for s in shards)


def test_prefers_sharded_safetensors_over_bin(tmp_path, monkeypatch):
    shards = ["model-00001-of-00001.safetensors"]
    index = json.dumps({"weight_map": {"a": shards[0]}}).encode()
    listing = ["config.json", "model.safetensors.index.json", *shards, "pytorch_model.bin"]
    fake = FakeHub(tmp_path, listing, {"model.safetensors.index.json": index}).install(monkeypatch)
    hub.download_checkpoint("someone/neox-4bit", cache_dir=tmp_path)
    assert fake.calls[-1][3] == ("config.json", "model.safetensors.index.json", *shards)


def test_third_party_repo_any_revision(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path, ["config.json", "model.safetensors", "tokenizer.json"]).install(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hub.download_checkpoint("someone/pythia-160m-v0-bnb-4bit", "v1.0", cache_dir=tmp_path)
    assert fake.calls[0] == ("list", "someone/pythia-160m-v0-bnb-4bit", "v1.0")


def test_warnings_for_renamed_names_and_known_data_problems(tmp_path, monkeypatch):
    FakeHub(tmp_path, ["config.json", "model.safetensors"]).install(monkeypatch)
    with pytest.warns(RenamedModelWarning):
        with pytest.warns(CheckpointDataWarning, match="#205"):
            hub.download_checkpoint("pythia-2.7b", "step1000", cache_dir=tmp_path)


def test_index_naming_absent_shard(tmp_path, monkeypatch):
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                       "b": "model-00002-of-00002.safetensors"}}).encode()
    listing = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"]
    FakeHub(tmp_path, listing, {"model.safetensors.index.json": index}).install(monkeypatch)
    with pytest.raises(CheckpointError, match=r"names shard\(s\) the repo does not have \(model-00002-of-00002"):
        hub.download_checkpoint("pythia-160m", cache_dir=tmp_path)


def test_repo_without_config_or_weights(tmp_path, monkeypatch):
    FakeHub(tmp_path, ["model.safetensors", "README.md"]).install(monkeypatch)
    with pytest.raises(ConfigError, match=r"EleutherAI/pythia-160m@main has no config\.json"):
        hub.download_checkpoint("pythia-160m", cache_dir=tmp_path)
    FakeHub(tmp_path, ["config.json", "README.md", "flax_model.msgpack"]).install(monkeypatch)
    with pytest.raises(CheckpointError, match=r"EleutherAI/pythia-160m@main: No weights found"):
        hub.download_checkpoint("pythia-160m", cache_dir=tmp_path)


@pytest.mark.parametrize("error, expected, message", [
    (http_error(RepositoryNotFoundError, 404), ModelNotFoundError, "was not found on the Hugging Face hub"),
    (http_error(GatedRepoError, 403), ModelNotFoundError, "is gated"),
    (http_error(HfHubHTTPError, 401), ModelNotFoundError, "private"),
    (http_error(RevisionNotFoundError, 404), RevisionError, "has no revision 'main' on the hub"),
    (http.ConnectError("name resolution failed"), HubConnectionError, "Could not reach the Hugging Face hub"),
    (http.ReadTimeout("timed out"), HubConnectionError, "ReadTimeout"),
    (http_error(HfHubHTTPError, 503), HubConnectionError, "503"),
])
def test_hub_errors_become_clear_errors(tmp_path, monkeypatch, error, expected, message):
    tries = []

    def failing_listing(*args, **kwargs):
        tries.append(1)
        raise error

    monkeypatch.setattr(hub, "model_info", failing_listing)
    with pytest.raises(expected, match=message) as info:
        hub.download_checkpoint("someone/model", cache_dir=tmp_path)
    assert "someone/model" in str(info.value)
    assert info.value.__cause__ is error
    # An answer about the repo is final; the network or a server error gets three tries.
    assert len(tries) == (3 if expected is HubConnectionError else 1)


def test_listing_retries_briefly_then_succeeds(tmp_path, monkeypatch):
    """A transient 503 or dropped connection is tried again after 1 s and 2 s, not
    huggingface_hub's ~23 s of backoff before a machine without network hears why."""
    fake = FakeHub(tmp_path, ["config.json", "model.safetensors"]).install(monkeypatch)
    answers = [http_error(HfHubHTTPError, 503), http.ConnectError("connection reset")]

    def flaky(*args, **kwargs):
        if answers:
            raise answers.pop(0)
        return fake.model_info(*args, **kwargs)

    waits = []
    monkeypatch.setattr(hub, "model_info", flaky)
    monkeypatch.setattr(hub, "LISTING_RETRY_WAITS_S", (1.0, 2.0))
    monkeypatch.setattr(hub, "time", SimpleNamespace(sleep=waits.append))
    folder = hub.download_checkpoint("someone/model", cache_dir=tmp_path, tokenizer=False)
    assert (folder / "model.safetensors").is_file() and waits == [1.0, 2.0]


def test_unreachable_hub_falls_back_to_a_complete_cache(tmp_path, monkeypatch):
    snap = add_snapshot(tmp_path, "EleutherAI/pythia-70m", {"config.json": CONFIG, "model.safetensors": b"m"},
                        refs=("step4",))

    def offline_listing(*args, **kwargs):
        raise http.ConnectError("no route to host")

    monkeypatch.setattr(hub, "model_info", offline_listing)
    # The package's own warning class: the command line prints those in one line.
    with pytest.warns(HubFallbackWarning, match="could not be reached"):
        assert hub.download_checkpoint("pythia-70m", "step4", cache_dir=tmp_path, warn=False) == snap
    with pytest.raises(HubConnectionError, match="no route to host"):
        hub.download_checkpoint("pythia-70m", "step8", cache_dir=tmp_path, warn=False)


def test_hub_offline_reads_the_environment(monkeypatch):
    assert hub.hub_offline() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_offline() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub.hub_offline() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")  # as in huggingface_hub, HF_HUB_OFFLINE (even "0") wins when set
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub.hub_offline() is True
