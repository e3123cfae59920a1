"""Checkpoint sweeps (pythia_native.sweep, Pythia.load_revision) and the quantized cache
(pythia_native.quantized_cache). No network: a fake hub cache of pythia-14m holds a different tiny
random fp16 checkpoint per branch, in the huggingface_hub layout (test_hub.add_snapshot), and any
online hub call fails the test (test_hub.no_network)."""
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from neox import hf_model, tokenizer_path, trained_tokenizer
from test_hub import add_snapshot, commit_hash, no_network  # noqa: F401  (no_network: autouse fixture)

import pythia_native
from pythia_native import loading, quantized_cache, suite
from pythia_native.cli import main
from pythia_native.errors import CheckpointError, GenerationError, QuantizedCacheWarning, RevisionError
from pythia_native.loading import load
from pythia_native.sweep import select_revisions, sweep

REPO = "EleutherAI/pythia-14m"
# branch(es) -> (commit, seed of its random weights); main and step143000 are one commit, as on the hub.
BRANCHES = {("step1000",): (1, 1), ("step2000",): (2, 2), ("step4000",): (4, 4), ("main", "step143000"): (9, 9)}
IDS = torch.tensor([[12092, 13, 309, 717, 50, 11, 7, 1000, 2]])


def checkpoint_files(tmp: Path, seed: int, tok: Path, **overrides) -> dict:
    d = tmp / f"src-{seed}-{len(overrides)}"
    hf_model("tiny", seed, vocab_size=50304, **overrides).half().save_pretrained(d)  # fp16, as the hub serves
    shutil.copyfile(tok, d / "tokenizer.json")
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_path() or trained_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tok):
    tmp = tmp_path_factory.mktemp("sources")
    seeds = sorted({seed for _, seed in BRANCHES.values()})
    files = {seed: checkpoint_files(tmp, seed, tok) for seed in seeds}
    files["wide"] = checkpoint_files(tmp, 5, tok, hidden_size=128)
    return files


@pytest.fixture
def hub_cache(tmp_path, sources):
    cache = tmp_path / "hub"
    for refs, (commit, seed) in BRANCHES.items():
        add_snapshot(cache, REPO, sources[seed], refs=refs, commit=commit_hash(commit))
    add_snapshot(cache, REPO, sources["wide"], refs=("step8000",), commit=commit_hash(8))
    return cache


def logits(engine):
    model = engine.model
    pos = torch.arange(IDS.shape[1]).view(1, -1)
    return model(IDS, pos, engine.cache, span=IDS.shape[1], last_only=False)


def storage(engine):
    ptrs = {n: t.data_ptr() for n, t in engine.model.named_parameters()}
    ptrs.update({n: t.data_ptr() for n, t in engine.model.named_buffers()})
    return ptrs, id(engine.cache), engine.cache.k.data_ptr(), engine.cache.v.data_ptr(), id(engine.tokenizer)


OPTS = dict(device="cpu", local_files_only=True)


def test_sweep_matches_fresh_loads_in_the_same_storage(hub_cache):
    revs = ["step1000", "step2000", "step4000"]
    seen, layouts = {}, set()
    for rev, engine in sweep("pythia-14m", revs, cache_dir=hub_cache, **OPTS):
        seen[rev] = logits(engine)
        layouts.add(repr(storage(engine)))
        assert engine.source[1] == rev
    assert list(seen) == revs
    assert len(layouts) == 1  # every data_ptr, the KV cache and the tokenizer: the same objects throughout
    for rev in revs:
        assert torch.equal(seen[rev], logits(load("pythia-14m", rev, cache_dir=hub_cache, **OPTS))), rev
    assert not torch.equal(seen["step1000"], seen["step2000"])  # the branches really differ


def test_load_revision_keeps_generating(hub_cache, device):
    # On CUDA the first generate captures the decode step as a graph; after load_revision the same
    # graph object must replay with the new weights.
    opts = dict(cache_dir=hub_cache, local_files_only=True, device=device)
    engine = load("pythia-14m", "step1000", **opts)
    out_1000 = engine.generate_ids([5, 6, 7], 6, ignore_eos=True)
    graphs = dict(engine._graphs)
    before = storage(engine)
    out_2000 = load("pythia-14m", 2000, **opts).generate_ids([5, 6, 7], 6, ignore_eos=True)
    assert out_2000 != out_1000
    assert engine.load_revision(2000) is engine
    assert engine.generate_ids([5, 6, 7], 6, ignore_eos=True) == out_2000
    assert storage(engine) == before and engine._graphs == graphs
    assert (len(graphs) == 1) == (device == "cuda")
    with pytest.raises(CheckpointError, match=r"architecture differs.*hidden_size 128 \(loaded: 64\)"):
        engine.load_revision("step8000")
    with pytest.raises(pythia_native.errors.PythiaNativeError, match="made by pythia_native.load"):
        pythia_native.Pythia(engine.model).load_revision("step1000")


def test_invalid_revisions_fail_before_anything_loads(hub_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(loading, "download_checkpoint", lambda *a, **k: calls.append(a))
    with pytest.raises(RevisionError, match=r"'step1500'.*nearest: step512, step1000, step2000.*Also invalid: 'stepx'"):
        sweep("pythia-14m", ["step1000", "step1500", "stepx"], cache_dir=hub_cache, **OPTS)
    with pytest.raises(RevisionError, match="exactly one of"):
        sweep("pythia-14m", ["step1000"], every=1000)
    with pytest.raises(RevisionError, match="positive"):
        sweep("pythia-14m", every=0)
    with pytest.raises(RevisionError, match="not a repo of the Pythia suite"):
        sweep("someone/neox", steps=[1000])
    with pytest.raises(ValueError, match="quant_type"):
        sweep("pythia-14m", ["step1000"], quant_type="nf5", cache_dir=hub_cache, **OPTS)
    with pytest.raises(loading.DeviceError, match="tpu"):
        sweep("pythia-14m", ["step1000"], device="tpu")
    assert calls == []


def test_select_revisions_sugar():
    assert select_revisions("pythia-160m", every=50000) == ["step0", "step50000", "step100000"]
    assert select_revisions("pythia-160m-v0", every=50000) == ["step50000", "step100000"]
    assert select_revisions("pythia-410m", steps=range(1000, 4000, 1000)) == ["step1000", "step2000", "step3000"]
    assert select_revisions("pythia-410m", "step1, 2,main") == ["step1", "step2", "main"]
    assert select_revisions("someone/neox", ["v1", "main"]) == ["v1", "main"]
    assert len(select_revisions("pythia-14m", every=1)) == 154
    # numpy / torch integers, as numpy and torch ranges give them (were refused).
    import numpy as np

    assert select_revisions("pythia-160m", every=np.int64(50000)) == ["step0", "step50000", "step100000"]
    assert select_revisions("pythia-410m", steps=torch.arange(1000, 4000, 1000)) == ["step1000", "step2000", "step3000"]
    assert select_revisions("pythia-410m", steps=np.arange(1000, 3000, 1000)) == ["step1000", "step2000"]


def entry(root, rev, tag="nf4-b64"):
    return Path(root) / "EleutherAI--pythia-14m" / rev / tag


def test_quantized_cache_written_once_then_used_offline_without_the_hub_cache(hub_cache, tmp_path, monkeypatch):
    q = tmp_path / "q4"
    revs = ["step1000", "main", "step143000"]
    first = {rev: logits(e) for rev, e in sweep("pythia-14m", revs, cache_dir=hub_cache, quantized_cache=q, **OPTS)}
    # main and step143000 are one checkpoint: one entry, under the canonical name
    assert sorted(p.name for p in (q / "EleutherAI--pythia-14m").iterdir()) == ["step1000", "step143000"]
    assert torch.equal(first["main"], first["step143000"])
    stamps = {p: p.stat().st_mtime_ns for p in q.rglob("model.safetensors")}
    assert len(stamps) == 2
    # the dense tensors are the checkpoint's fp16, not the model's float32
    from safetensors import safe_open

    with safe_open(str(entry(q, "step1000") / "model.safetensors"), "pt") as f:
        assert f.get_tensor("gpt_neox.embed_in.weight").dtype == torch.float16
        assert f.get_tensor("gpt_neox.layers.0.attention.dense.weight").dtype == torch.uint8
    # one entry serves any model dtype exactly as a fresh load of the hub checkpoint does
    bf16 = dict(OPTS, dtype="bfloat16")
    assert torch.equal(logits(load("pythia-14m", "step1000", cache_dir=hub_cache, quantized_cache=q, **bf16)),
                       logits(load("pythia-14m", "step1000", cache_dir=hub_cache, **bf16)))

    hub_cache.rename(tmp_path / "hub-gone")  # nothing left to download from or read
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "download_checkpoint", lambda *a, **k: pytest.fail("hub cache used"))
    again = {rev: logits(e) for rev, e in sweep("pythia-14m", revs, cache_dir=hub_cache, quantized_cache=q,
                                                 device="cpu")}
    assert all(torch.equal(first[r], again[r]) for r in revs)
    assert {p: p.stat().st_mtime_ns for p in q.rglob("model.safetensors")} == stamps  # not rewritten
    assert not list(q.rglob("*.tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no-marker"])
def test_corrupt_entry_is_rebuilt_with_a_warning(hub_cache, tmp_path, damage):
    q = tmp_path / "q4"
    good = logits(load("pythia-14m", "step2000", cache_dir=hub_cache, quantized_cache=q, **OPTS))
    weights = entry(q, "step2000") / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":  # same size, so only loading it finds out
        weights.write_bytes(b"\x07" * len(data))
    else:
        (entry(q, "step2000") / quantized_cache.ENTRY_FILE).unlink()
    with pytest.warns(QuantizedCacheWarning, match="unusable"):
        engine = load("pythia-14m", "step2000", cache_dir=hub_cache, quantized_cache=q, **OPTS)
    assert torch.equal(logits(engine), good)
    assert weights.read_bytes() == data  # rebuilt, byte for byte
    # the same inside a sweep (load_revision path)
    weights.write_bytes(b"\x07" * len(data))
    with pytest.warns(QuantizedCacheWarning):
        out = {r: logits(e) for r, e in sweep("pythia-14m", ["step1000", "step2000"], cache_dir=hub_cache,
                                              quantized_cache=q, **OPTS)}
    assert torch.equal(out["step2000"], good)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizedCacheWarning)
        load("pythia-14m", "step2000", cache_dir=hub_cache, quantized_cache=q, **OPTS)


def test_entry_names_follow_the_suite(tmp_path):
    tag = quantized_cache.QuantSettings("fp4", True, True).tag
    assert tag == "fp4-b64-dq-qhead"
    s = quantized_cache.QuantSettings()
    ref = suite.resolve_model("pythia-160m")
    assert quantized_cache.entry_dir(tmp_path, ref, "main", s) == quantized_cache.entry_dir(tmp_path, ref, "step143000", s)
    big = suite.resolve_model("pythia-2.8b")  # its main is another file than step143000 (pythia#205)
    assert suite.canonical_revision(big, "main") == "main"
    assert quantized_cache.entry_dir(tmp_path, big, "main", s) != quantized_cache.entry_dir(tmp_path, big, "step143000", s)
    other = suite.resolve_model("someone/neox")
    assert quantized_cache.entry_dir(tmp_path, other, "feat/x", s).parent.name == "feat--x"


def test_free_hub_files_deletes_each_snapshot_after_loading(hub_cache):
    snaps = hub_cache / "models--EleutherAI--pythia-14m" / "snapshots"
    keep = commit_hash(4)
    for rev, engine in sweep("pythia-14m", ["step1000", "step2000"], cache_dir=hub_cache, free_hub_files=True,
                             **OPTS):
        assert not Path(engine.source[2]).exists()
        assert logits(engine).isfinite().all()
    names = {p.name for p in snaps.iterdir()}
    assert commit_hash(1) not in names and commit_hash(2) not in names and keep in names
    assert not (hub_cache / "models--EleutherAI--pythia-14m" / "refs" / "step1000").exists()


def test_free_hub_files_never_deletes_a_local_directory(hub_cache, tmp_path):
    # A local model directory laid out like a hub snapshot is the user's own files.
    src = hub_cache / "models--EleutherAI--pythia-14m" / "snapshots" / commit_hash(1)
    local = tmp_path / "mine" / "models--me--mine" / "snapshots" / "v1"
    shutil.copytree(src, local)
    for rev, engine in sweep(str(local), ["main"], free_hub_files=True, device="cpu"):
        assert logits(engine).isfinite().all()
    assert (local / "config.json").is_file() and (local / "model.safetensors").is_file()


def test_free_hub_files_keeps_what_the_sweep_still_needs(hub_cache, tmp_path):
    # main and step143000 are one commit: freed after the last of them, so the
    # sweep runs offline to the end; a repeated revision likewise.
    snaps = hub_cache / "models--EleutherAI--pythia-14m" / "snapshots"
    revs = ["step1000", "main", "step1000", "step143000"]
    got = [rev for rev, engine in sweep("pythia-14m", revs, cache_dir=hub_cache, free_hub_files=True, **OPTS)]
    assert got == revs
    names = {p.name for p in snaps.iterdir()}
    assert commit_hash(1) not in names and commit_hash(9) not in names


def test_free_hub_files_keeps_a_commit_a_later_name_of_it_needs(hub_cache):
    # A branch, then its commit hash: the snapshot was deleted after the
    # branch and the sweep stopped offline at the hash ("not in the cache").
    revs = ["step1000", commit_hash(1), "step2000"]
    got = [rev for rev, engine in sweep("pythia-14m", revs, cache_dir=hub_cache, free_hub_files=True, **OPTS)]
    assert got == revs
    names = {p.name for p in (hub_cache / "models--EleutherAI--pythia-14m" / "snapshots").iterdir()}
    assert commit_hash(1) not in names and commit_hash(2) not in names


def test_free_hub_files_deletes_every_snapshot_of_a_checkpoint_at_its_last_use(hub_cache, sources, tmp_path):
    # main as its own commit (as on the hub, where main got later commits)
    # beside step143000: main's snapshot was never deleted. With a quantized
    # cache the last use of a checkpoint comes from its 4-bit entry, and its
    # snapshot was never deleted either.
    snaps = hub_cache / "models--EleutherAI--pythia-14m" / "snapshots"
    add_snapshot(hub_cache, REPO, sources[9], refs=("main",), commit=commit_hash(0x90))
    revs = ["main", "step1000", "step143000"]
    list(sweep("pythia-14m", revs, cache_dir=hub_cache, free_hub_files=True, **OPTS))
    names = {p.name for p in snaps.iterdir()}
    assert not {commit_hash(0x90), commit_hash(9), commit_hash(1)} & names, names
    # A commit hash, then its branch served from the quantized cache: kept for
    # the branch, then (its last use coming from the cache) never deleted.
    q = tmp_path / "q"
    add_snapshot(hub_cache, REPO, sources[1], refs=("step1000",), commit=commit_hash(1))  # freed above
    load("pythia-14m", "step1000", cache_dir=hub_cache, quantized_cache=q, **OPTS)
    list(sweep("pythia-14m", [commit_hash(1), "step1000"], cache_dir=hub_cache, free_hub_files=True,
               quantized_cache=q, **OPTS))
    assert commit_hash(1) not in {p.name for p in snaps.iterdir()}
    revs = ["step2000", "step4000", "step2000"]
    got = [(rev, Path(engine.source[2]).parent.name) for rev, engine in
           sweep("pythia-14m", revs, cache_dir=hub_cache, free_hub_files=True, quantized_cache=tmp_path / "q", **OPTS)]
    assert got[2][1] != "snapshots"  # the repeat came from the 4-bit entry
    names = {p.name for p in snaps.iterdir()}
    assert not {commit_hash(2), commit_hash(4)} & names, names


def test_free_hub_files_keeps_the_only_copy_when_the_4bit_entry_was_not_written(hub_cache, tmp_path):
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    snaps = hub_cache / "models--EleutherAI--pythia-14m" / "snapshots"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rev, engine in sweep("pythia-14m", ["step1000", "step2000"], cache_dir=hub_cache, free_hub_files=True,
                                 quantized_cache=not_a_dir, **OPTS):
            pass
    assert {commit_hash(1), commit_hash(2)} <= {p.name for p in snaps.iterdir()}
    assert any("kept in the hub cache" in str(w.message) for w in caught)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps="1000"), "steps must be step numbers"),
    (dict(steps=1000), "steps must be step numbers"),
    (dict(revisions=1000), "revisions must be a list of revisions or a comma-separated string"),
    (dict(revisions=b"step1000"), "revisions must be a list of revisions or a comma-separated string"),
])
def test_revision_lists_of_the_wrong_type_are_named(kwargs, match):
    # "1000" was read as the steps 1, 0, 0, 0; 1000 and b"step1000" failed obscurely.
    with pytest.raises(RevisionError, match=match):
        select_revisions("pythia-14m", **kwargs)


def test_cli_scores_each_revision(hub_cache, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Hello, I am a language model.\nOnce upon a time.\n")
    code = main(["score", "--model", "pythia-14m", "--revisions", "step1000,step4000", "--cache-dir", str(hub_cache),
                 "--offline", "--device", "cpu", "--quantized-cache", str(tmp_path / "q"), str(text)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.strip().split("\n")
    assert lines[0].split("\t") == ["revision", "tokens", "logprob", "mean", "perplexity"]
    assert [line.split("\t")[0] for line in lines[1:]] == ["step1000", "step4000"]
    for line in lines[1:]:
        rev, _, lp, _, ppl = line.split("\t")
        score = load("pythia-14m", rev, cache_dir=hub_cache, **OPTS).score(text.read_text())
        assert float(ppl) == pytest.approx(score.perplexity, rel=1e-4) and float(lp) == pytest.approx(score.total, abs=1e-3)
    assert entry(tmp_path / "q", "step4000").is_dir()
    code = main(["score", "--model", "pythia-14m", "--revisions", "step1000,step1234", "--cache-dir", str(hub_cache),
                 "--offline", "--device", "cpu", str(text)])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "step1234" in err and "nearest" in err and out == ""


def test_cache_entry_keeps_double_quant_and_4bit_head(hub_cache, tmp_path):
    q = tmp_path / "q4"
    kw = dict(OPTS, cache_dir=hub_cache, quant_type="fp4", double_quant=True, quantize_embed_out=True)
    fresh = load("pythia-14m", "step4000", quantized_cache=q, **kw)
    assert entry(q, "step4000", "fp4-b64-dq-qhead").is_dir()
    cached = load("pythia-14m", "step4000", quantized_cache=q, **kw)
    assert Path(cached.source[2]) == entry(q, "step4000", "fp4-b64-dq-qhead")
    assert torch.equal(logits(cached), logits(fresh))
    assert all(m.nested is not None for m in cached.model.modules() if hasattr(m, "nested"))
    # another setting is another entry, never a wrong hit
    nf4 = load("pythia-14m", "step4000", quantized_cache=q, **OPTS, cache_dir=hub_cache)
    assert nf4.model.quant_type == "nf4" and entry(q, "step4000").is_dir()


def add_blocksize_128_revision(hub_cache, tmp_path, tok):
    """Branch step16 of the fake hub: a bitsandbytes 4-bit checkpoint quantized with
    blocksize 128 (the other revisions load as blocksize 64)."""
    from pythia_native.export import save_pretrained
    from pythia_native.model import PythiaModel

    src = tmp_path / "bs128"
    save_pretrained(PythiaModel.from_hf(hf_model("tiny", 3, vocab_size=50304), blocksize=128), src, tokenizer_dir=None)
    shutil.copyfile(tok, src / "tokenizer.json")
    add_snapshot(hub_cache, REPO, {p.name: p.read_bytes() for p in src.iterdir()}, refs=("step16",),
                 commit=commit_hash(16))


def test_4bit_revision_with_another_blocksize_reallocates_and_drops_graphs(hub_cache, tmp_path, tok):
    # a bitsandbytes checkpoint quantized with blocksize 128 on a branch: its absmax has another
    # shape, so that buffer cannot be written in place; captured graphs must not survive it.
    add_blocksize_128_revision(hub_cache, tmp_path, tok)
    engine = load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS)
    engine._graphs[engine._graph_key(1)] = "captured on the old buffers"  # stands in for a CUDA graph (CPU engines capture none)
    ptrs = storage(engine)[0]
    engine.load_revision("step16")
    assert engine._graphs == {}
    assert storage(engine)[0] != ptrs
    assert torch.equal(logits(engine), logits(load("pythia-14m", "step16", cache_dir=hub_cache, **OPTS)))


def test_load_revision_in_the_middle_of_a_stream(hub_cache, tmp_path, tok):
    # The decode loop binds the model once per call (PythiaModel.bind); a revision
    # loaded between two of its steps -- here one whose absmax is reallocated (another
    # blocksize) -- must be what the next steps compute with, as when every step
    # called the modules.
    from pythia_native.sampling import SamplingParams

    add_blocksize_128_revision(hub_cache, tmp_path, tok)

    def run(engine):
        steps = engine._token_stream([[5, 6, 7]], 10, SamplingParams(0.0), None, [False])
        first = [next(steps) for _ in range(4)]
        engine.load_revision("step16")
        return first + list(steps)

    bound = run(load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS))
    # The same with every decode step through the modules (no binding at all).
    per_step = load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS)
    per_step._graphed = lambda: True
    per_step._graph_step = lambda ids, pos: per_step.model(ids, pos, per_step.cache)
    assert bound == run(per_step)


@pytest.mark.parametrize("argv, match", [
    (["--every", "0"], "positive"),
    (["--every", "1000", "--revisions", "step1000"], "not both"),
    (["--revision", "step1000", "--revisions", "step2000"], "list them all there"),
])
def test_cli_sweep_argument_errors_are_one_line(capsys, tmp_path, argv, match):
    text = tmp_path / "t.txt"
    text.write_text("Hello.")
    code = main(["score", "--model", "pythia-14m", "--offline", "--device", "cpu", *argv, str(text)])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("pythia-native: error:") and match in err, err



# ------------------------------------------------- failed loads, cache entries --


def add_revision(hub_cache, files, branch, commit, repo=REPO):
    """Another branch of the fake hub holding ``files`` (a name -> bytes dict)."""
    refs = hub_cache / ("models--" + repo.replace("/", "--")) / "refs"
    (refs / branch).parent.mkdir(parents=True, exist_ok=True)  # a branch name may hold a /
    add_snapshot(hub_cache, repo, files, refs=(branch,), commit=commit_hash(commit))


def with_tensors(files, change):
    """``files`` with model.safetensors rewritten by ``change(state_dict)``."""
    from safetensors.torch import load as read, save

    sd = read(files["model.safetensors"])
    change(sd)
    return {**files, "model.safetensors": save(sd, metadata={"format": "pt"})}


def as_bin(files, change=lambda sd: None):
    """``files`` with the weights as a pytorch_model.bin, changed by ``change(state_dict)``."""
    import io

    from safetensors.torch import load as read

    sd = read(files["model.safetensors"])
    change(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    out = {k: v for k, v in files.items() if k != "model.safetensors"}
    out["pytorch_model.bin"] = buf.getvalue()
    return out


def bad_quant_state(files, tmp_path):
    """A bitsandbytes 4-bit copy whose last layer's absmax has the wrong size."""
    from safetensors.torch import load as read, save

    src = tmp_path / "bnb-src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    out = load(src, device="cpu").save_pretrained(tmp_path / "bnb")
    sd = read((out / "model.safetensors").read_bytes())
    key = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight.absmax"
    sd[key] = sd[key][:-1].clone()
    got = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    got["model.safetensors"] = save(sd, metadata={"format": "pt"})
    return got


LAST = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"  # late in the file: earlier tensors would be written first


@pytest.mark.parametrize("damage", ["missing", "shape", "dtype", "bin-shape", "4bit-absmax"])
def test_failed_load_revision_leaves_the_engine_as_it_was(hub_cache, sources, tmp_path, damage):
    files = sources[2]
    if damage == "missing":
        files = with_tensors(files, lambda sd: sd.pop(LAST))
    elif damage == "shape":
        files = with_tensors(files, lambda sd: sd.__setitem__(LAST, sd[LAST][:, :-1].clone()))
    elif damage == "dtype":
        files = with_tensors(files, lambda sd: sd.__setitem__(LAST, sd[LAST].double()))
    elif damage == "bin-shape":
        files = as_bin(files, lambda sd: sd.__setitem__(LAST, sd[LAST][:, :-1].clone()))
    else:
        files = bad_quant_state(files, tmp_path)
    add_revision(hub_cache, files, "step32", 32)
    engine = load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS)
    before, source, layout = logits(engine), engine.source, storage(engine)
    out = engine.generate_ids([5, 6, 7], 6, ignore_eos=True)
    with pytest.raises(CheckpointError, match=r"dense_4h_to_h\.weight"):
        engine.load_revision("step32")
    assert engine.source == source and storage(engine) == layout
    assert torch.equal(logits(engine), before)  # not one tensor of step32 written
    assert engine.generate_ids([5, 6, 7], 6, ignore_eos=True) == out
    assert engine.model.partial_load is None


def test_load_revision_failing_while_writing_refuses_to_run_until_reloaded(hub_cache, monkeypatch, device):
    from pythia_native import weights

    opts = dict(cache_dir=hub_cache, local_files_only=True, device=device)
    engine = load("pythia-14m", "step1000", **opts)
    engine.generate_ids([5, 6, 7], 3, ignore_eos=True)  # on CUDA: a captured decode graph, which must not replay
    real_get, calls = weights._SafetensorsFile.get, []

    def failing_get(self, name):  # an I/O error once some tensors are written
        calls.append(name)
        if len(calls) == 10:
            raise CheckpointError(f"Cannot read tensor {name!r} from {self.path}: Input/output error")
        return real_get(self, name)

    monkeypatch.setattr(weights._SafetensorsFile, "get", failing_get)
    with pytest.raises(CheckpointError, match="Input/output error"):
        engine.load_revision("step2000")
    monkeypatch.setattr(weights._SafetensorsFile, "get", real_get)
    assert engine.source[1] == "step1000"
    for run in (lambda: engine.generate("Hello", 3), lambda: engine.score("Hello world"),
                lambda: engine.generate_ids([5, 6, 7], 3)):
        with pytest.raises(GenerationError, match=r"partly overwritten.*Input/output error.*load a revision again"):
            run()
    with pytest.raises(CheckpointError, match="partly overwritten"):
        engine.save_pretrained(Path(engine.source[2]).parents[2] / "nope")
    engine.load_revision("step2000")
    fresh = load("pythia-14m", "step2000", **opts)
    assert torch.equal(logits(engine), logits(fresh))
    assert engine.generate_ids([5, 6, 7], 6, ignore_eos=True) == fresh.generate_ids([5, 6, 7], 6, ignore_eos=True)


def test_architecture_mismatch_keeps_the_cache_entry(hub_cache, tmp_path):
    q = tmp_path / "q4"
    load("pythia-14m", "step8000", cache_dir=hub_cache, quantized_cache=q, **OPTS)  # the wide revision's entry
    weights = entry(q, "step8000") / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    engine = load("pythia-14m", "step1000", cache_dir=hub_cache, quantized_cache=q, **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizedCacheWarning)
        with pytest.raises(CheckpointError, match="architecture differs"):
            engine.load_revision("step8000")
    assert weights.stat().st_mtime_ns == stamp and quantized_cache.find(
        q, suite.resolve_model("pythia-14m"), "step8000", quantized_cache.QuantSettings()) is not None
    assert engine.source[1] == "step1000"


@pytest.mark.parametrize("error", ["safetensors", "other"])
def test_a_failed_cache_write_only_warns(hub_cache, tmp_path, monkeypatch, error):
    from safetensors import SafetensorError

    from pythia_native import export

    q = tmp_path / "q4"
    if error == "safetensors":  # what safetensors raises on a full disk (not an OSError)
        def full(*args, **kwargs):
            Path(args[1]).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  "message: \"No space left on device\" })")
        monkeypatch.setattr(export, "save_file", full)
    else:
        monkeypatch.setattr(quantized_cache, "_source_dense_tensors",
                            lambda *a: (_ for _ in ()).throw(RuntimeError("unexpected")))
    with pytest.warns(QuantizedCacheWarning, match="could not write the quantized cache entry"):
        engine = load("pythia-14m", "step1000", cache_dir=hub_cache, quantized_cache=q, **OPTS)
    assert torch.equal(logits(engine), logits(load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS)))
    assert not entry(q, "step1000").exists()
    assert list((q / "EleutherAI--pythia-14m" / "step1000").iterdir()) == []  # no temporary directory left
    with pytest.warns(QuantizedCacheWarning):  # the same through load_revision
        engine.load_revision("step2000")
    assert engine.source[1] == "step2000"


def test_no_cache_entry_without_a_tokenizer(hub_cache, sources, tmp_path):
    q = tmp_path / "q4"
    add_revision(hub_cache, {k: v for k, v in sources[2].items() if k != "tokenizer.json"}, "step32", 32)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load("pythia-14m", "step32", cache_dir=hub_cache, quantized_cache=q, **OPTS)
    assert not entry(q, "step32").exists()
    # an entry that lost its tokenizer (written before this was checked) is rebuilt, not a dead end
    good = logits(load("pythia-14m", "step2000", cache_dir=hub_cache, quantized_cache=q, **OPTS))
    (entry(q, "step2000") / "tokenizer.json").unlink()
    with pytest.warns(QuantizedCacheWarning, match="tokenizer.json is missing"):
        engine = load("pythia-14m", "step2000", cache_dir=hub_cache, quantized_cache=q, **OPTS)
    assert torch.equal(logits(engine), good) and (entry(q, "step2000") / "tokenizer.json").is_file()


def test_entry_names_never_collide(hub_cache, sources, tmp_path):
    s = quantized_cache.QuantSettings()
    other = suite.resolve_model("someone/neox")
    names = ["feature/x", "feature--x", "a b", "a-b", "a/-b", "a-/b", "..", ".", "x" * 300]
    dirs = [quantized_cache.entry_dir(tmp_path, other, n, s).parent for n in names]
    assert len(set(dirs)) == len(names) and all(d.parent == dirs[0].parent for d in dirs)
    assert all(len(d.name) < 100 for d in dirs)
    # the names of plain revisions and repos are kept (README: DIR/<org>--<name>/<revision>/nf4-b64/)
    pythia = suite.resolve_model("pythia-14m")
    for rev in ("step1000", "main", commit_hash(7)):
        want = tmp_path / "EleutherAI--pythia-14m" / suite.canonical_revision(pythia, rev) / "nf4-b64"
        assert quantized_cache.entry_dir(tmp_path, pythia, rev, s) == want
    # end to end: two branches that used to share an entry each get their own weights
    repo = "someone/neox"
    add_revision(hub_cache, sources[1], "feature/x", 41, repo=repo)
    add_revision(hub_cache, sources[2], "feature--x", 42, repo=repo)
    q = tmp_path / "q4"
    for branch in ("feature/x", "feature--x", "feature/x"):
        cached = load(repo, branch, cache_dir=hub_cache, quantized_cache=q, **OPTS)
        assert torch.equal(logits(cached), logits(load(repo, branch, cache_dir=hub_cache, **OPTS))), branch


def test_stale_temporary_directories_of_dead_writers_are_removed(hub_cache, tmp_path):
    import subprocess
    import sys

    q = tmp_path / "q4"
    parent = q / "EleutherAI--pythia-14m" / "step1000"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = quantized_cache._host()
    stale = [parent / f"nf4-b64.tmp-{host}-{dead.pid}-0123abcd", parent / f"nf4-b64.del-{host}-{dead.pid}-4567cdef"]
    alive = parent / f"nf4-b64.tmp-{host}-{os.getppid()}-89abcdef"  # a live process: maybe writing
    # Another machine's writer on a shared file system: its pid means nothing here.
    elsewhere = parent / f"nf4-b64.tmp-another.host-{dead.pid}-0123abcd"
    for d in stale + [alive, elsewhere]:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    load("pythia-14m", "step1000", cache_dir=hub_cache, quantized_cache=q, **OPTS)
    assert not any(d.exists() for d in stale) and alive.is_dir() and elsewhere.is_dir()
    assert entry(q, "step1000").is_dir()


def bnb_step16(hub_cache, tmp_path, sources, **quant) -> None:
    """step16 of the fake hub as a bitsandbytes 4-bit checkpoint (sources[4]
    quantized with ``quant``: quant_type, double_quant), exported by us."""
    from pythia_native.export import save_pretrained
    from pythia_native.model import PythiaModel
    from pythia_native.weights import CheckpointReader

    seed_dir = tmp_path / "seed4"
    seed_dir.mkdir()
    for name, data in sources[4].items():
        (seed_dir / name).write_bytes(data)
    with CheckpointReader(seed_dir) as reader:
        held = PythiaModel(pythia_native.config.PythiaConfig.from_dict(json.loads((seed_dir / "config.json").read_text())),
                           **quant)
        held.load_tensors(reader)
    src = tmp_path / "src-bnb"
    save_pretrained(held, src, tokenizer_dir=seed_dir)
    add_snapshot(hub_cache, REPO, {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}, refs=("step16",),
                 commit=commit_hash(16))


def test_entries_are_labelled_by_the_format_the_model_holds(hub_cache, tmp_path, sources):
    # A sweep that starts at a bitsandbytes fp4 revision holds an fp4 model, and
    # quantizes the dense revisions after it in fp4: their entries must say fp4,
    # so that a later load asking for nf4 does not get fp4 weights from an
    # entry labelled nf4 (it quantizes anew instead).
    bnb_step16(hub_cache, tmp_path, sources, quant_type="fp4")
    q = tmp_path / "q"
    for rev, engine in sweep("pythia-14m", ["step16", "step2000"], cache_dir=hub_cache, quantized_cache=q,
                             quant_type="nf4", **OPTS):
        assert engine.model.quant_type == "fp4"
    entry = quantized_cache.entry_dir(q, suite.resolve_model("pythia-14m"), "step2000",
                                      quantized_cache.QuantSettings(quant_type="fp4"))
    assert (entry / "model.safetensors").is_file()
    assert not quantized_cache.entry_dir(q, suite.resolve_model("pythia-14m"), "step2000",
                                         quantized_cache.QuantSettings()).exists()
    fresh = load("pythia-14m", "step2000", cache_dir=hub_cache, quantized_cache=q, quant_type="nf4", **OPTS)
    assert fresh.model.quant_type == "nf4"
    assert torch.equal(logits(fresh), logits(load("pythia-14m", "step2000", cache_dir=hub_cache, **OPTS)))


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_load_revision_looks_up_the_cache_under_the_format_the_model_holds(hub_cache, tmp_path, sources, quant_type,
                                                                          double_quant):
    # An engine from a bitsandbytes revision holds its format, not what load()
    # was asked for; load_revision of a dense revision must not take the entry
    # a plain load wrote (nf4, no double quant): with nf4 + double quant that
    # gave single-quantized weights, with fp4 an IncompatibleCheckpointError.
    bnb_step16(hub_cache, tmp_path, sources, quant_type=quant_type, double_quant=double_quant)
    q = tmp_path / "q"
    load("pythia-14m", "step2000", cache_dir=hub_cache, quantized_cache=q, **OPTS)  # writes the nf4 entry
    want = load("pythia-14m", "step16", cache_dir=hub_cache, **OPTS).load_revision("step2000")
    engine = load("pythia-14m", "step16", cache_dir=hub_cache, quantized_cache=q, **OPTS).load_revision("step2000")
    assert torch.equal(logits(engine), logits(want))
    layers = [m for m in engine.model.modules() if isinstance(m, pythia_native.QuantizedLinear)]
    assert all(m.quant_type == quant_type and (m.nested is not None) == double_quant for m in layers)
    # It wrote (and a second engine now reads) the entry of the held format.
    assert quantized_cache.find(q, suite.resolve_model("pythia-14m"), "step2000",
                                loading.held_settings(engine.model)) is not None
    again = load("pythia-14m", "step16", cache_dir=hub_cache, quantized_cache=q, **OPTS).load_revision("step2000")
    assert torch.equal(logits(again), logits(want))


def test_a_request_of_another_engine_over_the_model_fails_rather_than_mix_revisions(hub_cache):
    # Engines over one model (the README's recipe for concurrent requests) share
    # its weights but not their guard: a load_revision through one of them gave
    # the others' requests a mix of two revisions (a stream went on with the new
    # weights over the old cache; a score that overlapped the load used half of
    # each), and a failed load's half-written model kept streaming. Now such a
    # request raises; the loading engine's own stream may go on (its load ran
    # between two of its steps).
    from pythia_native.generate import Pythia

    engine = load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS)
    sibling = Pythia(engine.model, engine.tokenizer)
    own, other = engine.stream([10, 11, 12], 8, ignore_eos=True), sibling.stream([10, 11, 12], 8, ignore_eos=True)
    next(own), next(other)
    engine.load_revision("step2000")  # between two steps of its own stream
    assert len(list(own)) > 0
    with pytest.raises(GenerationError, match="weights were reloaded during this request"):
        list(other)
    # A request that starts while a load is writing, or overlaps one.
    real = engine.model._write_tensors
    seen = []

    def write_and_score(*args, **kwargs):
        with pytest.raises(GenerationError, match="another engine over this model is loading a revision"):
            sibling.score([10, 11, 12])
        seen.append(True)
        return real(*args, **kwargs)

    engine.model._write_tensors = write_and_score
    try:
        engine.load_revision("step1000")
    finally:
        del engine.model._write_tensors
    assert seen
    # Idle siblings are unaffected: their next request runs on the new revision.
    fresh = load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS)
    assert sibling.generate_ids([5, 6], 4, ignore_eos=True) == fresh.generate_ids([5, 6], 4, ignore_eos=True)


def test_loads_into_one_model_do_not_overlap_and_a_score_sees_one_revision(hub_cache, monkeypatch):
    # Two engines over one model loading at once interleaved their writes into a
    # mix of both revisions that nothing could see afterwards; a score whose
    # head (or whose second text) came after another engine's load mixed two.
    from pythia_native.errors import LoadInProgressError
    from pythia_native.generate import Pythia

    a = load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS)
    b = Pythia(a.model, a.tokenizer)
    b.load_options, b.source = a.load_options, a.source  # as load() made it, over a's model
    real = a.model._write_tensors
    seen = []

    def write_while_b_loads(*args, **kwargs):
        with pytest.raises(LoadInProgressError, match="another load into this model is under way"):
            b.load_revision("step2000")
        seen.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(a.model, "_write_tensors", write_while_b_loads)
    a.load_revision("step4000")
    monkeypatch.undo()
    assert seen and a.model.partial_load is None
    assert torch.equal(logits(a), logits(load("pythia-14m", "step4000", cache_dir=hub_cache, **OPTS)))
    # b's load between a's score computing its hidden states and its head.
    real_logits = a.model.logits
    calls = []

    def head_after_a_load(h):
        if not calls:
            calls.append(True)
            b.load_revision("step1000")
        return real_logits(h)

    monkeypatch.setattr(a.model, "logits", head_after_a_load)
    with pytest.raises(GenerationError, match="weights were reloaded during this request"):
        a.score([10, 11, 12])
    monkeypatch.undo()
    # ... and between the two texts of one score call.
    real_one = a._score_one

    def then_load(*args):
        out = real_one(*args)
        b.load_revision("step2000" if b.source[1] == "step1000" else "step1000")
        return out

    monkeypatch.setattr(a, "_score_one", then_load)
    with pytest.raises(GenerationError, match="weights were reloaded during this request"):
        a.score([[10, 11, 12], [13, 14, 15]])


def test_a_load_overlapping_a_step_of_the_engines_own_stream_is_an_error(hub_cache, monkeypatch):
    # The stream's last resumer saw it suspended and loaded at once, as another
    # thread resumed it: the load overlapped that step's model call, and the
    # step's check took it for the engine's own load between two steps. Only
    # the check before a model call accepts the engine's own load now.
    import threading

    engine = load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS)
    s = engine.stream([10, 11, 12], 8, ignore_eos=True)
    next(s)
    real = engine._check_weights
    about_to_call, loaded = threading.Event(), threading.Event()

    def check(seen, *args, **kwargs):
        g = real(seen, *args, **kwargs)
        if threading.current_thread() is worker and kwargs.get("own_load_allowed") and not about_to_call.is_set():
            about_to_call.set()  # the step's model call comes next: the load lands "during" it
            loaded.wait(60)
        return g

    monkeypatch.setattr(engine, "_check_weights", check)
    errors = []

    def run():
        try:
            list(s)
        except GenerationError as e:
            errors.append(str(e))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert about_to_call.wait(60)
    monkeypatch.setattr(engine, "_held_here", lambda: "stream()")  # the race: it looked suspended a moment ago
    engine.load_revision("step2000")
    loaded.set()
    worker.join(timeout=60)
    assert not worker.is_alive() and errors and "weights were reloaded during this request" in errors[0]


def test_load_revision_from_another_thread_waits_for_the_request_in_flight(hub_cache):
    # A score or stream running when another thread loads a revision used half of
    # each revision's weights; now the load waits for it. The stream's own thread
    # may still load between two of its steps (test_generate.py, test_load_revision_between_two_steps_of_a_stream_is_allowed).
    import threading

    engine = load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS)
    want = list(load("pythia-14m", "step1000", cache_dir=hub_cache, **OPTS).stream([10, 11, 12], 16, ignore_eos=True))
    s = engine.stream([10, 11, 12], 16, ignore_eos=True)
    pieces = [next(s)]
    t = threading.Thread(target=lambda: engine.load_revision("step2000"))
    t.start()
    t.join(timeout=1.0)
    assert t.is_alive() and engine.source[1] == "step1000"
    pieces += list(s)
    t.join(timeout=60)
    assert not t.is_alive() and engine.source[1] == "step2000"
    assert pieces == want
    assert torch.equal(logits(engine), logits(load("pythia-14m", "step2000", cache_dir=hub_cache, **OPTS)))


def test_an_empty_cache_path_is_an_error_not_the_working_directory(hub_cache, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for kwargs, name in ((dict(quantized_cache=""), "quantized_cache"), (dict(cache_dir=" "), "cache_dir")):
        with pytest.raises(pythia_native.errors.ConfigError, match=f"{name} is an empty path"):
            load("pythia-14m", "step1000", **dict(dict(cache_dir=hub_cache), **kwargs), **OPTS)
    text = tmp_path / "t.txt"
    text.write_text("Hello there.\n")
    code = main(["score", "--model", "pythia-14m", "--revision", "step1000", "--cache-dir", str(hub_cache),
                 "--offline", "--device", "cpu", "--quantized-cache", "", str(text)])
    assert code == 2 and "quantized_cache is an empty path" in capsys.readouterr().err
    assert list(work.iterdir()) == []


def test_sweep_takes_compute_and_free_hub_files_needs_a_sweep(hub_cache, tmp_path, capsys):
    for rev, engine in sweep("pythia-14m", ["step1000"], cache_dir=hub_cache, compute="int16", **OPTS):
        assert engine.model.compute == "int16"
    text = tmp_path / "t.txt"
    text.write_text("Hello there.\n")
    code = main(["score", "--model", "pythia-14m", "--revision", "step1000", "--cache-dir", str(hub_cache),
                 "--offline", "--device", "cpu", "--free-hub-files", str(text)])
    assert code == 2 and "--free-hub-files applies to a sweep" in capsys.readouterr().err


def test_removing_an_entry_that_is_a_file_leaves_nothing(tmp_path):
    # A file where an entry directory belongs (a damaged cache) was renamed to
    # <entry>.del-<host>-<pid>-<id> and then never deleted (rmtree takes directories only).
    for make in (lambda p: p.write_bytes(b"x"), lambda p: (p.mkdir(), (p / "f").write_bytes(b"x"))):
        entry = tmp_path / "nf4-b64"
        make(entry)
        quantized_cache._remove(entry)
        assert list(tmp_path.iterdir()) == []
