"""Reading checkpoint directories (pythia_native.weights): tiny files written here, no network."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import PYTHIA_160M_CONFIG
from pythia_native.errors import CheckpointError, ConfigError, PythiaNativeError
from pythia_native.weights import CheckpointReader, is_skipped_buffer, iter_checkpoint_tensors, read_config


BUFFERS = {
    "gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool),
    "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
    "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.rand(8),
}


class NotATensor:  # pickled into a .bin to check that weights_only=True refuses it
    pass


def tiny_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "gpt_neox.embed_in.weight": torch.randn(11, 8, generator=g),
        "gpt_neox.layers.0.attention.query_key_value.weight": torch.randn(24, 8, generator=g).half(),
        "gpt_neox.layers.0.attention.query_key_value.bias": torch.randn(24, generator=g),
        "gpt_neox.layers.0.attention.dense.weight.quant_state.bitsandbytes__nf4": torch.arange(5, dtype=torch.uint8),
        "gpt_neox.final_layer_norm.weight": torch.ones(8),
        "embed_out.weight": torch.randn(11, 8, generator=g).bfloat16(),
    }


def check_read(directory, expected):
    got = dict(iter_checkpoint_tensors(directory))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    with CheckpointReader(directory) as reader:
        assert sorted(reader.keys()) == sorted(expected)
        assert "gpt_neox.layers.0.attention.bias" not in reader
        last = sorted(expected)[-1]
        assert torch.equal(reader.get(last), expected[last])
        with pytest.raises(KeyError):
            reader.get("gpt_neox.layers.0.attention.bias")


def write_sharded(directory, weights, kind):
    names = sorted(weights)
    half = len(names) // 2
    shards = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        sub = {n: weights[n] for n in part}
        if kind == "safetensors":
            fname = f"model-{i:05d}-of-00002.safetensors"
            save_file(sub, str(directory / fname))
        else:
            fname = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save(sub, directory / fname)
        shards.update({n: fname for n in sub})
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": shards}))
    return index, sorted(set(shards.values()))


def test_is_skipped_buffer():
    for name in BUFFERS:
        assert is_skipped_buffer(name)
    assert is_skipped_buffer("attention.bias")
    for name in ("gpt_neox.layers.0.attention.dense.bias", "gpt_neox.layers.0.attention.query_key_value.bias",
                 "x.cross_attention.bias_extra", "gpt_neox.layers.0.mlp.dense_4h_to_h.bias"):
        assert not is_skipped_buffer(name)


def test_single_safetensors(tmp_path):
    w = tiny_weights()
    save_file({**w, **BUFFERS}, str(tmp_path / "model.safetensors"))
    check_read(tmp_path, w)


def test_single_bin(tmp_path):
    w = tiny_weights()
    torch.save({**w, **BUFFERS}, tmp_path / "pytorch_model.bin")
    check_read(tmp_path, w)


def test_legacy_bin_format(tmp_path):
    w = tiny_weights()
    torch.save(w, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    check_read(tmp_path, w)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded(tmp_path, kind):
    w = {**tiny_weights(), **BUFFERS}
    write_sharded(tmp_path, w, kind)
    check_read(tmp_path, tiny_weights())


def test_prefers_safetensors_over_bin(tmp_path):
    save_file(tiny_weights(0), str(tmp_path / "model.safetensors"))
    torch.save(tiny_weights(1), tmp_path / "pytorch_model.bin")
    check_read(tmp_path, tiny_weights(0))
    assert [p.name for p in CheckpointReader(tmp_path).files] == ["model.safetensors"]


def test_one_file_open_at_a_time(tmp_path):
    write_sharded(tmp_path, tiny_weights(), "safetensors")
    reader = CheckpointReader(tmp_path)
    opened = []
    for name, _ in reader:
        opened.append(reader._open[0].name)
    assert opened == sorted(opened) and len(set(opened)) == 2
    reader.close()
    assert reader._open is None


def test_truncated_safetensors(tmp_path):
    save_file(tiny_weights(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*download the checkpoint again"):
        list(iter_checkpoint_tensors(tmp_path))


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("content", [b"", b"garbage" * 100])
def test_garbage_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as info:
        list(iter_checkpoint_tensors(tmp_path))
    assert isinstance(info.value, PythiaNativeError)


def test_truncated_bin(tmp_path):
    torch.save(tiny_weights(), tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        CheckpointReader(tmp_path).keys()


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_bin_with_meta_or_sparse_tensors_is_refused(tmp_path):
    # A state dict saved from a meta-device model, or with a sparse tensor:
    # torch's bare NotImplementedError / RuntimeError came from the copy.
    w = tiny_weights()
    name = next(iter(w))
    for bad, match in ((w[name].to("meta"), "is a meta tensor, with no data"),
                       (w[name].to_sparse(), "is a torch.sparse_coo tensor")):
        torch.save({**w, name: bad}, tmp_path / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match=rf"pytorch_model\.bin: {name} {match}"):
            CheckpointReader(tmp_path).keys()


def test_bin_with_objects_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "evil": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"Refusing to load .*pytorch_model\.bin.*weights_only=True"):
        list(iter_checkpoint_tensors(tmp_path))


def test_bin_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        list(iter_checkpoint_tensors(tmp_path))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_missing_shard(tmp_path, kind):
    _, shards = write_sharded(tmp_path, tiny_weights(), kind)
    (tmp_path / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=rf"missing: {shards[1]}"):
        CheckpointReader(tmp_path)


def test_index_pointing_at_nothing(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json has no 'weight_map' entries"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a file name in its directory"):
        CheckpointReader(tmp_path)


def test_shard_lacking_a_tensor_its_index_promises(tmp_path):
    index, shards = write_sharded(tmp_path, tiny_weights(), "safetensors")
    data = json.loads((tmp_path / index).read_text())
    data["weight_map"]["gpt_neox.extra.weight"] = shards[0]
    (tmp_path / index).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"{shards[0]} lacks 1 tensor.*gpt_neox\.extra\.weight"):
        list(iter_checkpoint_tensors(tmp_path))


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PYTHIA_160M_CONFIG))
    with pytest.raises(CheckpointError, match="No weights found: expected one of model.safetensors"):
        CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")


def test_read_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PYTHIA_160M_CONFIG))
    assert read_config(tmp_path) == PYTHIA_160M_CONFIG
    v5 = {k: v for k, v in PYTHIA_160M_CONFIG.items() if k not in ("rotary_pct", "rotary_emb_base")}
    v5["rope_parameters"] = {"partial_rotary_factor": 0.25, "rope_theta": 10000, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(v5))
    assert read_config(tmp_path)["rope_parameters"]["rope_theta"] == 10000


@pytest.mark.parametrize("content, message", [
    (None, "config.json is missing"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    (json.dumps({**PYTHIA_160M_CONFIG, "model_type": "llama"}), "model_type 'llama'"),
    (json.dumps({k: v for k, v in PYTHIA_160M_CONFIG.items() if k != "model_type"}), "model_type None"),
    (json.dumps({**PYTHIA_160M_CONFIG, "architectures": ["GPTNeoXModel"]}), "not GPTNeoXForCausalLM"),
])
def test_read_config_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_config(tmp_path)


def test_sharded_reads_each_tensor_from_the_shard_its_index_names(tmp_path):
    weights = tiny_weights()
    index, shards = write_sharded(tmp_path, weights, "safetensors")
    # a stale copy of a second-shard tensor (and one the index does not list) in the first shard
    name = sorted(weights)[-1]
    data = json.loads((tmp_path / index).read_text())
    assert data["weight_map"][name] == shards[1]
    first = {n: weights[n] for n, s in data["weight_map"].items() if s == shards[0]}
    save_file({**first, name: torch.zeros_like(weights[name]), "stray.weight": torch.ones(2)},
              str(tmp_path / shards[0]))
    check_read(tmp_path, weights)
    with CheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.get(name), weights[name])


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_spec_gives_shape_and_dtype_without_reading(tmp_path, kind):
    weights = tiny_weights()
    if kind == "safetensors":
        save_file(weights, str(tmp_path / "model.safetensors"))
    else:
        torch.save(weights, tmp_path / "pytorch_model.bin")
    with CheckpointReader(tmp_path) as reader:
        for name, t in weights.items():
            assert reader.spec(name) == (tuple(t.shape), t.dtype), name
        with pytest.raises(KeyError):
            reader.spec("gpt_neox.layers.0.attention.bias")
