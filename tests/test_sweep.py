"""Checkpoint sweeps (pythia_native.sweep, Pythia.load_revision) and the quantized cache
(pythia_native.quantized_cache). No network: a fake hub cache of pythia-14m holds a different tiny
random fp16 checkpoint per branch, in the huggingface_hub layout (test_hub.add_snapshot), and any
online hub call fails the test (test_hub.no_network)."""
import json
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
from pythia_native.errors import CheckpointError, QuantizedCacheWarning, RevisionError
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

