"""The Pythia name and revision table (pythia_native.suite). No network."""
import warnings

import numpy as np
import pytest

from pythia_native import suite
from pythia_native.errors import (
    CheckpointDataWarning,
    ModelNotFoundError,
    PythiaNativeError,
    RenamedModelWarning,
    RevisionError,
)

CURRENT = ["pythia-14m", "pythia-31m"] + [
    f"pythia-{s}{d}" for s in ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b") for d in ("", "-deduped")
]
V0 = [f"pythia-{s}{d}-v0" for s in ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b") for d in ("", "-deduped")]
SEEDED = [f"pythia-{s}-seed{i}" for s in ("14m", "31m", "70m", "160m", "410m") for i in range(1, 10)]
OLD = {"19m": "70m", "125m": "160m", "350m": "410m", "800m": "1b", "1.3b": "1.4b", "2.7b": "2.8b", "6.7b": "6.9b", "13b": "12b"}


def test_table_has_exactly_the_suite():
    decoupled = [f"pythia-160m-{k}-seed{i}" for k in ("data", "weight") for i in (1, 2, 3)]
    assert sorted(suite.model_names()) == sorted(CURRENT + V0 + SEEDED + decoupled)
    assert len(CURRENT) == 18 and len(V0) == 16 and len(SEEDED) == 45
    for name in CURRENT + SEEDED:
        assert suite.MODELS[name].suite == "current"
    for name in V0:
        assert suite.MODELS[name].suite == "v0"
    assert "pythia-14m-deduped" not in suite.MODELS and "pythia-31m-v0" not in suite.MODELS


@pytest.mark.parametrize("name", CURRENT + SEEDED)
def test_current_revisions(name):
    revs = suite.revisions(name)
    assert len(revs) == 154 == len(set(revs))
    assert revs[:12] == ["step0", "step1", "step2", "step4", "step8", "step16", "step32", "step64", "step128",
                         "step256", "step512", "step1000"]
    assert revs[-1] == "step143000"
    assert revs[11:] == [f"step{s}" for s in range(1000, 143001, 1000)]


@pytest.mark.parametrize("name", V0)
def test_v0_revisions(name):
    revs = suite.revisions(name)
    assert len(revs) == 143
    assert revs == [f"step{s}" for s in range(1000, 143001, 1000)]


def test_main_is_step143000():
    assert suite.resolve_revision("pythia-160m", None) == "main"
    assert suite.resolve_revision("pythia-160m", "main") == "main"
    assert suite.canonical_revision("pythia-160m", "main") == "step143000"
    assert suite.canonical_revision("pythia-160m-v0", "main") == "step143000"
    assert suite.canonical_revision("pythia-160m", "step143000") == "step143000"
    assert suite.revision_step("pythia-70m", "main") == 143000
    assert suite.revision_step("pythia-70m", "step0") == 0


@pytest.mark.parametrize("given", ["step1000", "Step1000", "STEP1000", 1000, "1000", " step1000 ", "step01000",
                                   np.int64(1000), np.int32(1000)])  # numpy ints: a sweep over np.arange
def test_step_spellings_normalize(given):
    assert suite.resolve_revision("pythia-410m", given) == "step1000"


def test_invalid_step_lists_nearest():
    with pytest.raises(RevisionError, match=r"no branch step1500; nearest: step512, step1000, step2000"):
        suite.resolve_revision("pythia-160m", "step1500")
    with pytest.raises(RevisionError, match=r"nearest: step141000, step142000, step143000"):
        suite.resolve_revision("pythia-160m", "step150000")
    with pytest.raises(RevisionError, match=r"no branch step3; nearest: step1, step2, step4"):
        suite.resolve_revision("pythia-160m", 3)
    # v0 has no early branches
    with pytest.raises(RevisionError, match=r"pythia-160m-v0 has no branch step512; nearest: step1000, step2000, step3000"):
        suite.resolve_revision("pythia-160m-v0", "step512")
    with pytest.raises(RevisionError, match=r"no earlier branches"):
        suite.resolve_revision("pythia-1b-deduped-v0", "step0")


@pytest.mark.parametrize("bad", ["latest", "step-1", "v1.0", "refs/heads/main", "abc123", "", True, 1.5, np.float64(1000.0)])
def test_invalid_revision_strings(bad):
    with pytest.raises(RevisionError) as info:
        suite.resolve_revision("pythia-160m", bad)
    assert isinstance(info.value, PythiaNativeError) and isinstance(info.value, ValueError)


def test_commit_hashes():
    h = "A1B2C3D4E5F60718293A4B5C6D7E8F9012345678"
    assert suite.resolve_revision("pythia-160m", h) == h.lower()
    assert suite.resolve_revision("someone/neox-4bit", h) == h.lower()
    assert suite.revision_step("pythia-160m", h) is None
    assert suite.canonical_revision("pythia-160m", h) == h.lower()
    with pytest.raises(RevisionError):
        suite.resolve_revision("pythia-160m", h[:39])  # not a hash, not a branch


def test_third_party_repos_take_any_revision():
    ref = suite.resolve_model("RichardErkhov/EleutherAI_-_pythia-160m-v0-4bits")
    assert (ref.repo_id, ref.is_pythia, ref.suite, ref.local_path) == (
        "RichardErkhov/EleutherAI_-_pythia-160m-v0-4bits", False, None, None)
    assert suite.resolve_revision(ref, None) == "main"
    assert suite.resolve_revision(ref, "v1.0") == "v1.0"
    assert suite.resolve_revision(ref, "step1500") == "step1500"
    with pytest.raises(RevisionError, match="branch name"):
        suite.resolve_revision(ref, 1000)
    with pytest.raises(RevisionError, match="not a repo of the Pythia suite"):
        suite.revisions(ref)
    assert suite.known_data_problems(ref, "main") == []
    # EleutherAI repos that are not Pythia are third-party GPT-NeoX too
    assert suite.resolve_model("EleutherAI/gpt-neox-20b").is_pythia is False


@pytest.mark.parametrize("given, repo", [
    ("pythia-160m", "EleutherAI/pythia-160m"),
    ("EleutherAI/pythia-160m", "EleutherAI/pythia-160m"),
    ("eleutherai/PYTHIA-160M", "EleutherAI/pythia-160m"),
    ("Pythia-1.4B-Deduped", "EleutherAI/pythia-1.4b-deduped"),
    ("pythia-12b-deduped-v0", "EleutherAI/pythia-12b-deduped-v0"),
    ("pythia-160m-seed1", "EleutherAI/pythia-160m-seed1"),
    ("pythia-160m-data-seed2", "EleutherAI/pythia-160m-data-seed2"),
])
def test_names_resolve(given, repo):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = suite.resolve_model(given)
    assert ref.repo_id == repo and ref.is_pythia and ref.renamed_from is None and ref.local_path is None
    assert ref.suite == ("v0" if repo.endswith("-v0") else "current")


@pytest.mark.parametrize("old, new", list(OLD.items()))
@pytest.mark.parametrize("dedup", ["", "-deduped"])
def test_old_names_map_with_warning(old, new, dedup):
    with pytest.warns(RenamedModelWarning, match=rf"pythia-{new}{dedup}-v0"):
        ref = suite.resolve_model(f"EleutherAI/pythia-{old}{dedup}")
    assert ref.repo_id == f"EleutherAI/pythia-{new}{dedup}"
    assert ref.renamed_from == f"pythia-{old}{dedup}"
    assert ref.suite == "current"


@pytest.mark.parametrize("name, suggestion", [
    ("pythia-160m-dedup", "pythia-160m-deduped"),
    ("pythia-14m-deduped", "pythia-14m"),
    ("pythia-160m-v0-deduped", "pythia-160m-deduped-v0"),
    ("EleutherAI/pythia-410", "pythia-410m"),
    ("pythia-160m-seed10", "pythia-160m-seed1"),
    ("pythia-1.3bb", "pythia-1.4b"),  # near an old name: its current one
])
def test_unknown_pythia_names_suggest(name, suggestion):
    with pytest.raises(ModelNotFoundError, match="Did you mean") as info:
        suite.resolve_model(name)
    suggestions = str(info.value).split("Did you mean: ")[1].split("?")[0].split(", ")
    assert suggestions[0] == suggestion
    assert not set(suggestions) & set(suite.RENAMED)  # never an old name (they load with a warning)


@pytest.mark.parametrize("bad", ["gpt2", "", "  ", "a/b/c", "org/", "org/na me", "pythia-1b-seed1"])
def test_not_a_model(bad):
    with pytest.raises(ModelNotFoundError):
        suite.resolve_model(bad)


def test_local_directories(tmp_path):
    ref = suite.resolve_model(tmp_path)
    assert ref.is_local and ref.local_path == tmp_path.resolve() and ref.repo_id is None and not ref.is_pythia
    assert suite.resolve_model(str(tmp_path)).local_path == tmp_path.resolve()
    assert suite.resolve_revision(ref, None) == "main"
    with pytest.raises(RevisionError, match="local directory"):
        suite.resolve_revision(ref, "step1000")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        suite.resolve_model(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        suite.resolve_model("./no-such-checkpoint")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        suite.resolve_model(str(tmp_path / "f.bin"))


def test_local_directory_named_like_a_repo_wins(tmp_path, monkeypatch):
    (tmp_path / "EleutherAI" / "pythia-160m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    ref = suite.resolve_model("EleutherAI/pythia-160m")
    assert ref.is_local and ref.local_path == (tmp_path / "EleutherAI" / "pythia-160m").resolve()


def test_optimizer_steps_and_tokens():
    # v0 160m/410m/1.4b: branch steps count 2M-token steps, the optimizer took half as many
    for size in ("160m", "410m", "1.4b"):
        assert suite.optimizer_step(f"pythia-{size}-v0", "step1000") == 500
        assert suite.optimizer_step(f"pythia-{size}-deduped-v0", "main") == 71500
        assert suite.optimizer_step(f"pythia-{size}", "step1000") == 1000
    assert suite.optimizer_step("pythia-70m-v0", "step1000") == 1000
    assert suite.tokens_seen("pythia-160m-v0", "step1000") == 1000 * 2_097_152
    assert suite.tokens_seen("pythia-70m", "main") == 143000 * 2_097_152


def test_known_data_problems():
    assert suite.known_data_problems("pythia-160m", "step1000") == []
    assert suite.known_data_problems("pythia-160m", "main") == []
    assert "identical" in suite.known_data_problems("pythia-70m", "step1")[0]
    assert suite.known_data_problems("pythia-70m", "step4") == []
    assert any("#205" in p for p in suite.known_data_problems("pythia-2.8b", "step30000"))
    assert any("#205" in p for p in suite.known_data_problems("pythia-2.8b", "step54000"))
    assert any("main == step143000 does not hold" in p for p in suite.known_data_problems("pythia-2.8b", "main"))
    assert suite.known_data_problems("pythia-2.8b", "step66000") == []
    assert suite.known_data_problems("pythia-2.8b-deduped", "step30000") == []
    assert any("#206" in p for p in suite.known_data_problems("pythia-12b", "step58000"))
    assert suite.known_data_problems("pythia-12b", "step57000") == []
    assert suite.known_data_problems("pythia-12b", "a" * 40) == []
    with pytest.warns(CheckpointDataWarning, match="#206"):
        messages = suite.warn_known_data_problems("EleutherAI/pythia-12b", 50000)
    assert len(messages) == 1
    with pytest.raises(RevisionError):  # still validated
        suite.known_data_problems("pythia-12b", "step50001")
