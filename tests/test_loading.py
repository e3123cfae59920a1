"""load() from checkpoint directories: dense (quantized while loading),
bitsandbytes 4-bit written by transformers itself (used as is), and our export
read back by transformers + bitsandbytes and by us."""
import json
import shutil

import pytest
import torch

from neox import hf_model, tokenizer_path, trained_tokenizer
from pythia_native.errors import CheckpointError, ConfigError, OptionError, PythiaNativeError
from pythia_native.loading import DeviceError, fill_model_, load, resolve_device
from pythia_native.model import PythiaModel
from pythia_native.quantized_linear import QuantizedLinear

transformers = pytest.importorskip("transformers")


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    return tokenizer_path() or trained_tokenizer(tmp_path_factory.mktemp("tok"))


def save_dense(hf, directory, tok_file, **kw):
    hf.save_pretrained(directory, **kw)
    shutil.copyfile(tok_file, directory / "tokenizer.json")
    return directory


def exact_bnb(model):
    """bitsandbytes' CPU Linear4bit multiplies in bf16 on AVX512-BF16 CPUs; the
    float32 path is the one our float32 model must match to 1e-4."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def logits_of(engine_or_model, ids):
    model = getattr(engine_or_model, "model", engine_or_model)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return model(ids, pos, model.new_cache(ids.shape[0], 64), span=ids.shape[1], last_only=False)


def test_load_dense_checkpoint_quantizes_like_from_hf(tmp_path, tok_file):
    hf = hf_model("tiny", vocab_size=50304)
    d = save_dense(hf, tmp_path / "ckpt", tok_file)
    engine = load(d, device="cpu")
    ref = PythiaModel.from_hf(hf)
    ids = torch.randint(0, 50000, (2, 9))
    assert torch.equal(logits_of(engine, ids), logits_of(ref, ids))
    assert engine.tokenizer is not None and isinstance(engine.generate("Hello", 4, ignore_eos=True), str)


def test_load_bin_checkpoint(tmp_path, tok_file):
    hf = hf_model("tiny", vocab_size=50304)
    d = tmp_path / "bin"
    d.mkdir()
    hf.config.save_pretrained(d)
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf.state_dict().items()}
    torch.save(sd, d / "pytorch_model.bin")
    shutil.copyfile(tok_file, d / "tokenizer.json")
    ids = torch.randint(0, 50000, (1, 7))
    assert torch.equal(logits_of(load(d, device="cpu"), ids), logits_of(PythiaModel.from_hf(hf), ids))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_checkpoint_from_transformers_is_used_as_is(tmp_path, tok_file, quant_type, double_quant):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    hf = hf_model("tiny", vocab_size=50304)
    dense = save_dense(hf, tmp_path / "dense", tok_file)
    q = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    bnb_model = transformers.GPTNeoXForCausalLM.from_pretrained(dense, quantization_config=q).eval()
    exact_bnb(bnb_model)
    qdir = tmp_path / "bnb"
    bnb_model.save_pretrained(qdir)
    shutil.copyfile(tok_file, qdir / "tokenizer.json")

    engine = load(qdir, device="cpu")
    layer = engine.model.gpt_neox.layers[1].mlp.dense_h_to_4h
    assert isinstance(layer, QuantizedLinear) and layer.quant_type == quant_type
    assert (layer.nested is not None) == double_quant
    # The packed bytes are the file's: never re-quantized.
    from safetensors import safe_open

    with safe_open(qdir / "model.safetensors", "pt") as f:
        assert torch.equal(layer.weight.reshape(-1), f.get_tensor("gpt_neox.layers.1.mlp.dense_h_to_4h.weight").reshape(-1))
    ids = torch.randint(0, 50000, (2, 11))
    with torch.no_grad():
        ref = bnb_model(ids).logits
    assert rel_err(logits_of(engine, ids), ref) <= 1e-4


def test_a_config_whose_quant_type_is_not_the_weights_is_refused(tmp_path, tok_file):
    # fp4 layers under a config saying nf4 loaded as an "nf4" model (each layer
    # computing fp4), which load_revision, the quantized cache and an export
    # then went by: the export wrote nf4 again.
    hf = hf_model("tiny", vocab_size=50304)
    engine = load(save_dense(hf, tmp_path / "dense", tok_file), device="cpu", quant_type="fp4")
    out = engine.save_pretrained(tmp_path / "fp4")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "nf4"
    (out / "config.json").write_text(json.dumps(cfg))
    match = r"bnb_4bit_quant_type 'nf4', but gpt_neox\.layers\..*bitsandbytes__fp4 \(and \d+ more\) holds another type"
    with pytest.raises(CheckpointError, match=match):
        load(out, device="cpu")
    nf4 = load(save_dense(hf, tmp_path / "dense2", tok_file), device="cpu")
    with pytest.raises(CheckpointError, match=match):
        fill_model_(nf4.model, out)


@pytest.mark.parametrize("double_quant", [False, True])
def test_export_loads_in_transformers_and_back_without_requantizing(tmp_path, tok_file, double_quant):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    hf = hf_model("tiny", vocab_size=50304)
    engine = load(save_dense(hf, tmp_path / "dense", tok_file), device="cpu", double_quant=double_quant)
    out = engine.save_pretrained(tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (out / "tokenizer.json").is_file()

    ids = torch.randint(0, 50000, (2, 10))
    ours = logits_of(engine, ids)
    theirs = exact_bnb(transformers.GPTNeoXForCausalLM.from_pretrained(out).eval())
    with torch.no_grad():
        assert rel_err(theirs(ids).logits, ours) <= 1e-4

    back = load(out, device="cpu")
    for a, b in zip(engine.model.gpt_neox.layers, back.model.gpt_neox.layers):
        assert torch.equal(a.attention.query_key_value.weight, b.attention.query_key_value.weight)
        assert torch.equal(a.attention.query_key_value.absmax, b.attention.query_key_value.absmax)
    assert torch.equal(logits_of(back, ids), ours)


def test_export_with_quantized_embed_out_loads_in_transformers(tmp_path, tok_file):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    hf = hf_model("tiny", vocab_size=50304)
    engine = load(save_dense(hf, tmp_path / "dense", tok_file), device="cpu", quantize_embed_out=True)
    out = engine.save_pretrained(tmp_path / "export")
    ids = torch.randint(0, 50000, (1, 8))
    theirs = exact_bnb(transformers.GPTNeoXForCausalLM.from_pretrained(out).eval())
    with torch.no_grad():
        assert rel_err(theirs(ids).logits, logits_of(engine, ids)) <= 1e-4
    back = load(out, device="cpu")
    assert isinstance(back.model.embed_out, QuantizedLinear)
    assert torch.equal(logits_of(back, ids), logits_of(engine, ids))


def test_export_of_dense_model_is_refused(tmp_path):
    model = PythiaModel.from_hf(hf_model("tiny"), quant_type=None)
    from pythia_native.export import save_pretrained

    with pytest.raises(ValueError, match="dense model"):
        save_pretrained(model, tmp_path)


def test_load_errors_name_the_problem(tmp_path, tok_file):
    hf = hf_model("tiny", vocab_size=50304)
    d = save_dense(hf, tmp_path / "ok", tok_file)
    # Truncated weights.
    bad = tmp_path / "truncated"
    shutil.copytree(d, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(bad, device="cpu")
    # Not GPT-NeoX.
    other = tmp_path / "llama"
    shutil.copytree(d, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="llama"):
        load(other, device="cpu")
    # No tokenizer.
    notok = tmp_path / "notok"
    shutil.copytree(d, notok)
    (notok / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load(notok, device="cpu")
    # A config whose shapes do not fit the weights.
    wrong = tmp_path / "wrong"
    shutil.copytree(d, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp.dense_h_to_4h.bias has shape \(256,\), but config.json says "
                                              r"intermediate_size = \(128,\)"):
        load(wrong, device="cpu")
    # Checked against the file headers before the model is allocated: a
    # vocab_size of 2**40 asked the allocator for 256 TiB; 10**9 layers ran
    # out of memory.
    for key, value, match in (("vocab_size", 2**40, r"embed_in.weight has shape \(50304, 64\), but config.json says "
                                                      r"vocab_size x hidden_size = \(1099511627776, 64\)"),
                              ("num_hidden_layers", 10**9, "the weights hold 2 layers, but config.json says "
                                                            "num_hidden_layers = 1000000000")):
        cfg = json.loads((d / "config.json").read_text())
        (wrong / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(CheckpointError, match=match):
            load(wrong, device="cpu")
    # 8-bit bitsandbytes checkpoints are refused by name.
    eight = tmp_path / "eight"
    shutil.copytree(d, eight)
    cfg = json.loads((eight / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (eight / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="8-bit"):
        load(eight, device="cpu")
    assert issubclass(DeviceError, PythiaNativeError)


def test_unknown_options_are_the_package_s_errors(tmp_path, tok_file):
    # errors.py: every error raised on purpose derives from PythiaNativeError
    # (the command line prints those in one line). These were plain ValueErrors.
    d = save_dense(hf_model("tiny", vocab_size=50304), tmp_path / "ok", tok_file)
    for kw, match in ((dict(quant_type="nf8"), "quant_type must be one of"),
                      (dict(compute="int8"), "compute must be one of")):
        with pytest.raises(OptionError, match=match) as info:
            load(d, device="cpu", **kw)
        assert isinstance(info.value, PythiaNativeError) and isinstance(info.value, ValueError)
    engine = load(d, device="cpu")
    engine.model.compute = "int8"  # a plain attribute: checked when the model runs
    with pytest.raises(OptionError, match="compute must be one of"):
        engine.generate_ids([5, 6], 2)
    with pytest.raises(OptionError, match="blocksize must be a power of two"):
        QuantizedLinear.from_linear(torch.nn.Linear(64, 8), blocksize=48)


def test_devices_are_checked():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(DeviceError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(DeviceError, match="cpu' and 'cuda' only"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float16_checkpoint_keeps_a_float16_head_on_cpu(tmp_path, tok_file, dtype):
    """Pythia's files are float16: on the CPU the dense head stays float16 (half
    the bytes per decode step) and computes what the widened head computes."""
    hf = hf_model("tiny", vocab_size=50304).half()
    d = save_dense(hf, tmp_path / "ckpt", tok_file)
    raw = json.loads((d / "config.json").read_text())
    assert raw.get("torch_dtype", raw.get("dtype")) == "float16"
    engine = load(d, device="cpu", dtype=dtype)
    assert engine.model.embed_out.weight.dtype == torch.float16
    ref = PythiaModel.from_hf(hf.float(), dtype=dtype)  # head widened to the activation dtype
    assert ref.embed_out.weight.dtype == dtype
    ids = torch.randint(0, 50000, (2, 9))
    ours, theirs = logits_of(engine, ids), logits_of(ref, ids)
    if dtype == torch.float32:
        assert rel_err(ours, theirs) <= 1e-6  # same values, only the summation order differs
    else:
        # bf16 rounds the widened head; the float16 head is exact, so compare both to float32.
        exact = logits_of(PythiaModel.from_hf(hf.float()), ids)
        assert rel_err(ours, exact) <= rel_err(theirs, exact)
    prompt = [[5, 6, 7]]
    assert engine.generate_ids(prompt, 8, ignore_eos=True) == load(d, device="cpu", dtype=dtype).generate_ids(prompt, 8, ignore_eos=True)


def test_head_that_float16_cannot_hold_stays_in_the_activation_dtype(tmp_path, tok_file):
    hf = hf_model("tiny", vocab_size=50304)  # float32 values, not float16 numbers
    m = PythiaModel(PythiaModel.from_hf(hf).config, head_dtype=torch.float16)
    assert m.embed_out.weight.dtype == torch.float16
    m.load_tensors(hf.state_dict().items())
    assert m.embed_out.weight.dtype == torch.float32
    assert torch.equal(m.embed_out.weight, hf.get_output_embeddings().weight)
    ids = torch.randint(0, 50000, (1, 5))
    assert torch.equal(logits_of(m, ids), logits_of(PythiaModel.from_hf(hf), ids))


def test_head_dtype_is_checked():
    config = PythiaModel.from_hf(hf_model("tiny")).config
    with pytest.raises(ValueError, match="head_dtype must be None, the activation dtype or torch.float16"):
        PythiaModel(config, head_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="is for the CPU"):
        PythiaModel(config, dtype=torch.bfloat16, head_dtype=torch.float16, device="meta")


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_bitsandbytes_checkpoint_with_float_quant_storage(tmp_path, tok_file, storage):
    """bnb_4bit_quant_storage bf16/fp16/fp32: the packed bytes are stored viewed as that dtype,
    shape [bytes / itemsize, 1]; the quant_state entries say 4-bit, not the dtype."""
    from safetensors.torch import load_file, save_file

    hf = hf_model("tiny", vocab_size=50304)
    engine = load(save_dense(hf, tmp_path / "dense", tok_file), device="cpu")
    out = engine.save_pretrained(tmp_path / "uint8")
    sd = load_file(out / "model.safetensors")
    packed = [k for k in sd if k.endswith(".weight") and (k + ".absmax") in sd]
    assert len(packed) == 8
    for k in packed:
        sd[k] = sd[k].reshape(-1).view(storage).reshape(-1, 1)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_storage"] = str(storage).removeprefix("torch.")
    other = tmp_path / "other"
    shutil.copytree(out, other)
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    (other / "config.json").write_text(json.dumps(cfg))
    back = load(other, device="cpu")
    layer = back.model.gpt_neox.layers[1].mlp.dense_h_to_4h
    assert layer.weight.dtype == torch.uint8
    assert torch.equal(layer.weight, engine.model.gpt_neox.layers[1].mlp.dense_h_to_4h.weight)
    ids = torch.randint(0, 50000, (2, 9))
    assert torch.equal(logits_of(back, ids), logits_of(engine, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quantize_embed_out", [False, True])
def test_export_of_a_float16_checkpoint_reloads_to_the_same_logits(tmp_path, tok_file, dtype, quantize_embed_out):
    hf = hf_model("tiny", vocab_size=50304).half()
    kw = dict(device="cpu", dtype=dtype, quantize_embed_out=quantize_embed_out)
    engine = load(save_dense(hf, tmp_path / "ckpt", tok_file), **kw)
    back = load(engine.save_pretrained(tmp_path / "export"), **kw)
    assert back.model.embed_out.weight.dtype == engine.model.embed_out.weight.dtype
    ids = torch.randint(0, 50000, (2, 9))
    assert torch.equal(logits_of(back, ids), logits_of(engine, ids))
    assert back.generate_ids([[5, 6, 7]], 8, ignore_eos=True) == engine.generate_ids([[5, 6, 7]], 8, ignore_eos=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_export_of_a_float16_checkpoint_runs_in_transformers(tmp_path, tok_file, dtype):
    # What every Pythia hub checkpoint is. transformers keeps each tensor in the
    # file's dtype: a mix (the CPU engine's float16 head beside float32 LayerNorms)
    # failed its forward. One dtype for every dense tensor, the narrowest exact one.
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from safetensors import safe_open

    engine = load(save_dense(hf_model("tiny", vocab_size=50304).half(), tmp_path / "ckpt", tok_file), device="cpu",
                  dtype=dtype)
    out = engine.save_pretrained(tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as f:
        dense = {f.get_slice(k).get_dtype() for k in f.keys()
                 if not any(s in k for s in ("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight",
                                             "dense_4h_to_h.weight"))}
    assert dense == {{"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[cfg["dtype"]]}
    assert cfg["torch_dtype"] == cfg["dtype"]
    ids = torch.randint(0, 50000, (1, 8))
    theirs = exact_bnb(transformers.GPTNeoXForCausalLM.from_pretrained(out).eval())
    with torch.no_grad():
        got = theirs(ids).logits.float()
    assert torch.isfinite(got).all()
    # transformers in the file's dtype (float16 here): its own float16 arithmetic, not a bound on ours.
    assert rel_err(got, logits_of(engine, ids)) <= 2e-2


def test_bnb_checkpoint_keeps_the_linears_it_left_dense(tmp_path, tok_file):
    # transformers + bitsandbytes with llm_int8_skip_modules stores those Linears
    # dense; quantizing them on load gave another model (6e-2 off), silently.
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from pythia_native.loading import IncompatibleCheckpointError, fill_model_

    dense_dir = save_dense(hf_model("tiny", vocab_size=50304), tmp_path / "dense", tok_file)
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32,
                                          llm_int8_skip_modules=["lm_head", "attention.dense"])
    bnb_model = exact_bnb(transformers.GPTNeoXForCausalLM.from_pretrained(dense_dir, quantization_config=cfg).eval())
    bnb_dir = tmp_path / "bnb"
    bnb_model.save_pretrained(bnb_dir)
    shutil.copyfile(tok_file, bnb_dir / "tokenizer.json")
    engine = load(bnb_dir, device="cpu")
    layers = engine.model.gpt_neox.layers
    assert all(type(layer.attention.dense) is torch.nn.Linear for layer in layers)
    assert all(isinstance(layer.attention.query_key_value, QuantizedLinear) for layer in layers)
    ids = torch.randint(0, 50000, (2, 11))
    with torch.no_grad():
        ref = bnb_model(ids).logits
    ours = logits_of(engine, ids)
    assert rel_err(ours, ref) <= 1e-4
    # Decoding through those blocks (unfused: not every Linear is 4-bit) agrees with a full forward.
    # generate picks among the tokenizer's ids only (the fallback tokenizer has ~400).
    want = ref[0, -1, : engine.vocab_size].argmax().item()
    assert engine.generate_ids(ids[0].tolist(), 1, ignore_eos=True) == [want]
    # Exported, they stay dense for transformers too, and reload alike.
    out = engine.save_pretrained(tmp_path / "export")
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert skip == sorted(f"gpt_neox.layers.{i}.attention.dense" for i in range(len(layers))) + ["embed_out", "lm_head"]
    theirs = exact_bnb(transformers.GPTNeoXForCausalLM.from_pretrained(out).eval())
    with torch.no_grad():
        assert rel_err(theirs(ids).logits, ours) <= 1e-4
    assert torch.equal(logits_of(load(out, device="cpu"), ids), ours)
    # A 4-bit checkpoint with another set of dense Linears does not go into this engine.
    other = engine.save_pretrained(tmp_path / "other")
    plain = load(dense_dir, device="cpu").save_pretrained(tmp_path / "plain")
    fill_model_(engine.model, other)
    with pytest.raises(IncompatibleCheckpointError, match="dense \\(not quantized\\) Linears differ"):
        fill_model_(engine.model, plain)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn], ids=str)
def test_checkpoint_in_an_unsupported_dtype_is_a_clear_error(tmp_path, tok_file, dtype):
    from safetensors.torch import load_file, save_file

    d = save_dense(hf_model("tiny", vocab_size=50304), tmp_path / "ckpt", tok_file)
    sd = {k: v.to(dtype) for k, v in load_file(d / "model.safetensors").items()}
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"weight: dtype {dtype} is not supported \(expected torch.float32"):
        load(d, device="cpu")


@pytest.mark.parametrize("change, match", [
    ({"quantization_config": [1]}, "quantization_config must be an object, got list"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"}},
     "bnb_4bit_quant_type 'int4' is not supported"),
    ({"rope_parameters": [1, 2]}, "rope_parameters must be an object"),
    ({"rope_parameters": None, "rotary_pct": "abc"}, "rotary_pct must be a number, got 'abc'"),
    ({"eos_token_id": []}, "eos_token_id is an empty list"),
    ({"bos_token_id": -1}, r"bos_token_id must be a token id in \[0, vocab_size=50304\), got -1"),
    ({"use_parallel_residual": "false"}, "use_parallel_residual must be true or false, got 'false'"),
])
def test_malformed_config_values_are_config_errors(tmp_path, tok_file, change, match):
    d = save_dense(hf_model("tiny", vocab_size=50304), tmp_path / "ckpt", tok_file)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        load(d, device="cpu")


def test_export_to_an_unusable_path_is_a_clear_error_before_writing(tmp_path, tok_file, monkeypatch):
    import os

    from pythia_native import export

    engine = load(save_dense(hf_model("tiny", vocab_size=50304), tmp_path / "ckpt", tok_file), device="cpu")
    monkeypatch.setattr(export, "save_file", lambda *a, **k: pytest.fail("the path should be checked first"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CheckpointError, match=r"afile: it is a file; choose a directory"):
        engine.save_pretrained(afile)
    with pytest.raises(CheckpointError, match=r"it is under .*afile, which is a file"):
        engine.save_pretrained(afile / "sub" / "out")
    assert export.check_output_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # root writes into read-only directories
        ro.chmod(0o555)
        try:
            with pytest.raises(CheckpointError, match=r"ro is not writable \(Permission denied\)"):
                engine.save_pretrained(ro / "out")
        finally:
            ro.chmod(0o755)

    def read_only(*args, **kwargs):  # a read-only mount, for root too
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(export.tempfile, "TemporaryFile", read_only)
    with pytest.raises(CheckpointError, match=r"ro is not writable \(Read-only file system\)"):
        engine.save_pretrained(ro / "out")


def test_broken_4bit_entries_are_named(tmp_path, tok_file):
    from safetensors.torch import load_file, save_file

    engine = load(save_dense(hf_model("tiny", vocab_size=50304), tmp_path / "ckpt", tok_file), device="cpu")
    out = engine.save_pretrained(tmp_path / "export")
    p = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    sd = load_file(out / "model.safetensors")
    del sd[p + ".absmax"]
    save_file(sd, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"^{p}\.absmax: missing from the state dict$"):
        load(out, device="cpu")
    sd = load_file(engine.save_pretrained(tmp_path / "export2") / "model.safetensors")
    key = p + ".quant_state.bitsandbytes__nf4"
    record = json.loads(bytes(sd[key].tolist()))
    record["dtype"] = "Tensor"
    sd[key] = torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8)
    save_file(sd, tmp_path / "export2" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown dtype 'Tensor'\)?$"):  # the closing quote kept
        load(tmp_path / "export2", device="cpu")
