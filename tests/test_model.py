"""The engine against transformers' GPT-NeoX, on random checkpoints.

Our model quantizes; transformers gets the same weights dequantized, so the
comparisons isolate our arithmetic: rotary, the KV cache, attention, the
4-bit GEMM, LayerNorm, GELU and the parallel residual.
"""
import dataclasses
import gc
import json

import numpy as np
import pytest
import torch

from conftest import PYTHIA_160M_CONFIG
from neox import SHAPES, hf_model, pair
from pythia_native.config import PythiaConfig
from pythia_native.errors import CheckpointError, ConfigError, GenerationError
from pythia_native.generate import Pythia
from pythia_native.model import KVCache, PythiaModel


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def full_positions(B, T):
    return torch.arange(T).expand(B, T)


@pytest.mark.parametrize("shape", ["tiny", "14m", "hd80", "hd256", "160m"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_prefill_logits_match_transformers(shape, quant_type):
    if shape == "160m" and quant_type == "fp4":
        pytest.skip("one quant type is enough for the large shape")
    hf, model = pair(shape, quant_type=quant_type)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
    cache = model.new_cache(2, 64)
    ours = model(ids, full_positions(2, 37), cache, span=37, last_only=False)
    assert rel_err(ours, ref) <= 1e-4


def test_rotary_dims_and_head_dim_read_from_config():
    hf, model = pair("hd80")
    assert model.config.head_dim == 80 and model.config.rotary_ndims == 20
    hf, model = pair("hd256")
    assert model.config.head_dim == 256 and model.config.rotary_ndims == 64


def test_sequential_residual_variant():
    hf, model = pair("tiny", hf_overrides=dict(use_parallel_residual=False))
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = model(ids, full_positions(1, 9), model.new_cache(1, 16), span=9, last_only=False)
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("shape", ["tiny", "hd80"])
def test_incremental_decode_equals_full_forward(shape):
    _, model = pair(shape)
    vocab = SHAPES[shape]["vocab_size"]
    ids = torch.randint(0, vocab, (2, 24))
    cache = model.new_cache(2, 32)
    logits = model(ids[:, :8], full_positions(2, 8), cache, span=8)
    for t in range(8, 24):
        full = model(ids[:, : t], full_positions(2, t), model.new_cache(2, 32), span=t)
        assert rel_err(logits, full) <= 1e-5, f"step {t}"
        logits = model(ids[:, t : t + 1], torch.full((2, 1), t), cache)


@pytest.mark.parametrize("shape", ["tiny", "14m", "hd80", "hd256", "160m"])
def test_greedy_generation_matches_transformers(shape):
    hf, model = pair(shape)
    prompt = torch.randint(2, SHAPES[shape]["vocab_size"], (1, 11))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=1)[0, 11:]
    engine = Pythia(model, max_len=128)
    ours = engine.generate_ids(prompt[0].tolist(), 64, ignore_eos=True)
    assert ours == ref.tolist()


def test_each_generate_call_sees_the_weights_of_that_moment():
    # The generate loop binds the model once per call (PythiaModel.bind): a layer
    # whose tensors are replaced between calls (not copied in place) must be seen
    # by the next call, in its prefill and in its decode steps alike.
    _, model = pair("14m")
    engine = Pythia(model, max_len=64)
    prompt = list(range(3, 12))
    before = engine.generate_ids(prompt, 8, ignore_eos=True)
    layer = model.gpt_neox.layers[0].mlp.dense_4h_to_h
    shift = torch.randn(layer.bias.shape, generator=torch.Generator().manual_seed(0))
    layer.bias = torch.nn.Parameter(layer.bias + 3 * shift, requires_grad=False)  # a new tensor object
    after = engine.generate_ids(prompt, 8, ignore_eos=True)
    fresh = Pythia(model, max_len=64).generate_ids(prompt, 8, ignore_eos=True)
    assert after == fresh and after != before
    # and the decode steps of one call equal full forwards over the growing sequence
    ids = prompt + after
    cache = model.new_cache(1, 64)
    full = model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache, span=len(ids) - 1, last_only=False)
    assert full[0, len(prompt) - 1 :].argmax(-1).tolist() == after


def test_batched_left_padded_generation_equals_one_by_one():
    _, model = pair("14m")
    engine = Pythia(model, max_batch=4, max_len=128)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 1024, (n,), generator=g).tolist() for n in (5, 17, 1, 12)]
    batched = engine.generate_ids(prompts, 32, ignore_eos=True)
    alone = [engine.generate_ids(p, 32, ignore_eos=True) for p in prompts]
    assert batched == alone
    # Sampling too: each row of a batch draws from its own distribution, so compare
    # the distributions (logits) rather than draws: the prefill logits of a padded row
    # equal the row alone.
    B, T = len(prompts), max(map(len, prompts))
    ids = torch.ones(B, T, dtype=torch.int64)
    pos = torch.full((B, T), -1)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        pos[b, T - len(p) :] = torch.arange(len(p))
    padded = model(ids, pos, model.new_cache(B, 64), span=T)
    for b, p in enumerate(prompts):
        single = model(torch.tensor([p]), full_positions(1, len(p)), model.new_cache(1, 64), span=len(p))
        assert rel_err(padded[b : b + 1], single) <= 1e-5


def test_generate_continues_after_earlier_calls_without_stale_cache():
    _, model = pair("tiny")
    engine = Pythia(model, max_len=64)
    a = engine.generate_ids([5, 6, 7, 8, 9, 10, 11, 12], 16, ignore_eos=True)
    engine.generate_ids([100, 101], 40, ignore_eos=True)  # writes further slots
    assert engine.generate_ids([5, 6, 7, 8, 9, 10, 11, 12], 16, ignore_eos=True) == a


def test_dense_model_matches_transformers_weights_exactly():
    hf = hf_model("tiny")
    model = PythiaModel.from_hf(hf, quant_type=None)
    ids = torch.randint(0, 512, (1, 13))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = model(ids, full_positions(1, 13), model.new_cache(1, 16), span=13, last_only=False)
    assert rel_err(ours, ref) <= 1e-5


def test_bf16_activations_error_within_twice_transformers_bf16():
    hf, model32 = pair("14m")
    ids = torch.randint(0, 1024, (2, 29))
    with torch.no_grad():
        ref = hf(ids).logits
        hf_bf16 = hf.to(torch.bfloat16)(ids).logits.float()
    model = PythiaModel.from_hf(hf.float(), dtype=torch.bfloat16)
    ours = model(ids, full_positions(2, 29), model.new_cache(2, 32), span=29, last_only=False)
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) <= 2 * rel_err(hf_bf16, ref)


def test_quantized_embed_out_costs_bounded_logit_error():
    hf, dense_head = pair("14m")
    quant_head = PythiaModel.from_hf(hf_model("14m"), quantize_embed_out=True)
    ids = torch.randint(0, 1024, (1, 16))
    a = dense_head(ids, full_positions(1, 16), dense_head.new_cache(1, 16), span=16, last_only=False)
    b = quant_head(ids, full_positions(1, 16), quant_head.new_cache(1, 16), span=16, last_only=False)
    err = rel_err(b, a)
    # 4-bit embed_out: ~8-9% of the logit range here (NF4 step ~ 1/16 of the block max).
    assert 1e-4 < err < 0.1
    # And it is exactly the 4-bit matmul: transformers with the dequantized head agrees.
    hf_q = hf_model("14m")
    from neox import give_dequantized

    give_dequantized(hf_q, quant_head)
    with torch.no_grad():
        ref = hf_q(ids).logits
    assert rel_err(b, ref) <= 1e-4


def test_double_quant_model_close_to_plain_absmax():
    hf = hf_model("tiny")
    plain = PythiaModel.from_hf(hf)
    dq = PythiaModel.from_hf(hf, double_quant=True)
    ids = torch.randint(0, 512, (1, 10))
    a = plain(ids, full_positions(1, 10), plain.new_cache(1, 16), span=10, last_only=False)
    b = dq(ids, full_positions(1, 10), dq.new_cache(1, 16), span=10, last_only=False)
    assert 0 < rel_err(b, a) < 1e-2
    assert dq.gpt_neox.layers[0].attention.dense.nested is not None


def test_hidden_states_are_returned_per_layer():
    hf, model = pair("tiny")
    ids = torch.randint(0, 512, (1, 6))
    hs = []
    model(ids, full_positions(1, 6), model.new_cache(1, 8), span=6, hidden_states=hs)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states
    assert len(hs) == len(ref) == 3
    for a, b in zip(hs[:-1], ref[:-1]):  # transformers applies the final LayerNorm to its last entry
        assert rel_err(a, b) <= 1e-4


# ----------------------------------------------------------------- loading --


def test_load_tensors_reports_missing_unexpected_and_bad_shapes():
    hf = hf_model("tiny")
    model = PythiaModel(PythiaConfig.from_dict(hf.config.to_dict()))
    sd = dict(hf.state_dict())
    del sd["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    with pytest.raises(CheckpointError, match="missing 1 tensor.*layers.1.mlp.dense_4h_to_h.weight"):
        model.load_tensors(sd.items())
    sd = dict(hf.state_dict())
    sd["gpt_neox.layers.9.attention.dense.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match="layers.9.attention.dense.weight"):
        model.load_tensors(sd.items())
    sd = dict(hf.state_dict())
    sd["gpt_neox.layers.0.attention.dense.weight"] = torch.zeros(64, 65)
    with pytest.raises(CheckpointError, match=r"attention.dense.weight: shape \(64, 65\)"):
        model.load_tensors(sd.items())
    sd = dict(hf.state_dict())
    sd["gpt_neox.final_layer_norm.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match="final_layer_norm.weight"):
        model.load_tensors(sd.items())


@pytest.mark.parametrize("as_mapping", [True, False], ids=["mapping", "iterable"])
def test_load_tensors_refuses_two_entries_for_one_tensor_and_stray_weight_keys(as_mapping):
    # embed_out.weight beside lm_head.weight (transformers 5's name for it):
    # the last one read won, silently. A stray weight.* key of a 4-bit layer
    # was dropped, and a dense layer's weight_orig made it look 4-bit.
    hf = hf_model("tiny")
    model = PythiaModel(PythiaConfig.from_dict(hf.config.to_dict()))
    give = (lambda sd: sd) if as_mapping else (lambda sd: list(sd.items()))
    sd = dict(hf.state_dict())
    sd = {"lm_head.weight" if k == "embed_out.weight" else k: v for k, v in sd.items()}
    sd["embed_out.weight"] = torch.zeros_like(sd["lm_head.weight"])
    with pytest.raises(CheckpointError, match="lm_head.weight and embed_out.weight, two"):
        model.load_tensors(give(sd))
    bnb = dict(PythiaModel.from_hf(hf).state_dict())
    bnb["gpt_neox.layers.0.attention.dense.weight.junk"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="config does not: gpt_neox.layers.0.attention.dense.weight.junk"):
        model.load_tensors(give(bnb))
    model.load_tensors(give(bnb), strict=False)  # not strict: ignored
    sd = dict(hf.state_dict())
    sd["gpt_neox.layers.0.attention.dense.weight_orig"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match="config does not: gpt_neox.layers.0.attention.dense.weight_orig"):
        PythiaModel(PythiaConfig.from_dict(hf.config.to_dict())).load_tensors(give(sd))


@pytest.mark.parametrize("as_mapping", [True, False], ids=["mapping", "iterable"])
def test_load_tensors_refuses_weights_holding_nan_or_inf(as_mapping):
    # Corrupt weights: all logits NaN, greedy decoding then emitted token 0
    # forever and sampling failed inside torch.multinomial.
    hf = hf_model("tiny")
    give = (lambda sd: sd) if as_mapping else (lambda sd: list(sd.items()))
    cfg = PythiaConfig.from_dict(hf.config.to_dict())
    for name, value in (("gpt_neox.embed_in.weight", float("nan")), ("gpt_neox.layers.1.mlp.dense_4h_to_h.weight", float("inf")),
                        ("gpt_neox.final_layer_norm.bias", float("-inf"))):
        sd = dict(hf.state_dict())
        sd[name] = sd[name].clone()
        sd[name].view(-1)[3] = value
        with pytest.raises(CheckpointError, match=f"{name}: holds NaN or infinite values"):
            PythiaModel(cfg).load_tensors(give(sd))
    bnb = dict(PythiaModel.from_hf(hf).state_dict())  # 4-bit: the block scales show it
    key = "gpt_neox.layers.0.attention.dense.weight.absmax"
    bnb[key] = bnb[key].clone()
    bnb[key][0] = float("nan")
    with pytest.raises(CheckpointError, match=f"{key}: holds NaN or infinite values"):
        PythiaModel(cfg).load_tensors(give(bnb))


@pytest.mark.parametrize("shape", [(3_000_001,), (2_500, 1_000), (7, 300_000, 2), (0, 5), ()], ids=str)
def test_finiteness_is_checked_block_by_block_to_the_last_value(shape):
    # The check runs over blocks of ~1M values (isfinite of a whole float16
    # embedding was the peak of a load: ~2.5x the tensor). Every value is still
    # seen: a NaN or inf in the very last one is found, in any layout.
    from pythia_native.model import _blocks, _check_finite

    t = torch.zeros(shape, dtype=torch.float16)
    blocks = _blocks(t)
    assert sum(b.numel() for b in blocks) == t.numel()
    assert max(b.numel() for b in blocks) <= max(1 << 20, t[0].numel() if t.dim() > 1 and len(t) else 0)
    _check_finite("w", t)
    if t.numel():
        for bad in (float("nan"), float("-inf")):
            t.view(-1)[-1] = bad
            with pytest.raises(CheckpointError, match="w: holds NaN or infinite values"):
                _check_finite("w", t)
            t.view(-1)[-1] = 0


def test_a_dtype_cast_is_refused_and_assign_into_a_meta_model_works():
    # .half() / .bfloat16() cast LayerNorm too and left model.dtype (the
    # caches') behind: the model then failed inside its kernels. Refused,
    # changing nothing. A meta-built model filled with load_state_dict(assign=True) runs.
    hf, model = pair("tiny")
    ids = torch.randint(0, SHAPES["tiny"]["vocab_size"], (1, 7))
    want = model(ids, full_positions(1, 7), model.new_cache(1, 8), span=7)
    for cast in (lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.to(torch.float64), lambda m: m.type(torch.half)):
        with pytest.raises(TypeError, match=r"its dtypes are fixed when it is built \(activations torch.float32"):
            cast(model)
    model.to("cpu")  # no change of dtype: allowed
    _, bf16 = pair("tiny", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="turn its torch.float32 tensors into torch.bfloat16"):
        bf16.bfloat16()  # the activation dtype already, but its LayerNorm is float32
    assert torch.equal(model(ids, full_positions(1, 7), model.new_cache(1, 8), span=7), want)
    with torch.device("meta"):
        empty = PythiaModel(model.config)
    empty.load_state_dict(model.state_dict(), assign=True)
    assert empty.device.type == "cpu"
    assert torch.equal(empty(ids, full_positions(1, 7), empty.new_cache(1, 8), span=7), want)


def test_load_tensors_skips_old_buffers_and_keeps_storage():
    hf = hf_model("tiny")
    model = PythiaModel.from_hf(hf)
    ptr = model.gpt_neox.layers[0].attention.query_key_value.weight.data_ptr()
    sd = dict(hf.state_dict())
    sd["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    sd["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    model.load_tensors(sd.items())
    assert model.gpt_neox.layers[0].attention.query_key_value.weight.data_ptr() == ptr


def test_kv_cache_bounds():
    cfg = PythiaConfig.from_dict(hf_model("tiny").config.to_dict())
    with pytest.raises(ValueError, match="max_len"):
        KVCache(cfg, 1, cfg.max_position_embeddings + 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="max_batch"):
        KVCache(cfg, 0, 8, torch.float32, "cpu")
    c = KVCache(cfg, 2, 8, torch.float32, "cpu")
    assert c.k.shape == (2, 2, 4, 8, 16) and c.nbytes == 2 * c.k.numel() * 4


# ------------------------------------------------------------------ config --

PUBLISHED_160M = PYTHIA_160M_CONFIG


def test_config_reads_published_and_transformers5_spellings():
    old = PythiaConfig.from_dict(PUBLISHED_160M)
    assert (old.head_dim, old.rotary_ndims, old.rope_theta, old.vocab_size) == (64, 16, 10000.0, 50304)
    new = PythiaConfig.from_dict(hf_model("hd80").config.to_dict())
    assert new.rotary_ndims == 20 and new.rope_theta == 10000.0
    custom = dict(PUBLISHED_160M)
    del custom["rotary_pct"], custom["rotary_emb_base"]
    custom["rope_parameters"] = {"partial_rotary_factor": 0.5, "rope_theta": 500.0, "rope_type": "default"}
    c = PythiaConfig.from_dict(custom)
    assert c.rotary_ndims == 32 and c.rope_theta == 500.0
    assert PythiaConfig.from_dict(c.to_dict()) == c


def test_config_with_rope_parameters_and_rope_scaling_reads_as_transformers_or_is_refused():
    # transformers 5 takes a non-empty rope_scaling in place of rope_parameters,
    # values and all: it read theta 500 and factor 1.0 where pythia-native read
    # rope_parameters' 10000 and 0.25 (logits 16% off). Accepted only where
    # both readings agree, and then equal to transformers'.
    transformers = pytest.importorskip("transformers", minversion="5")  # rope_parameters
    default = {"partial_rotary_factor": 0.25, "rope_theta": 10000, "rope_type": "default"}
    base = {k: v for k, v in PUBLISHED_160M.items() if k not in ("rotary_pct", "rotary_emb_base")}
    refused = [
        {"rope_parameters": default, "rope_scaling": {"rope_type": "default", "partial_rotary_factor": 1.0, "rope_theta": 500.0}},
        {"rope_parameters": {**default, "rope_theta": 500.0}, "rope_scaling": {"rope_type": "default", "rope_theta": 10000}},
        # A bare default rope_scaling: transformers drops rope_parameters' 0.5 for the top-level or default 0.25.
        {"rope_parameters": {**default, "partial_rotary_factor": 0.5}, "rope_scaling": {"rope_type": "default"}},
    ]
    for extra in refused:
        with pytest.raises(ConfigError, match="rope_parameters and rope_scaling give different rotary settings"):
            PythiaConfig.from_dict({**base, **extra})
    # transformers' GPT-NeoX ignores other models' top-level spelling: refused where it says otherwise.
    for extra in ({"rope_theta": 500.0}, {"partial_rotary_factor": 0.5, "rope_parameters": default}):
        with pytest.raises(ConfigError, match="a top-level (rope_theta|partial_rotary_factor) .* ignores the top-level"):
            PythiaConfig.from_dict({**base, **extra})
    accepted = [
        {"rope_parameters": default, "rope_scaling": {"rope_type": "default"}},
        {"rope_parameters": {**default, "rope_theta": 500.0}, "rope_scaling": {**default, "rope_theta": 500}},
        {"rope_parameters": {**default, "partial_rotary_factor": 0.5}, "rope_scaling": {"type": "default"},
         "rotary_pct": 0.5},
        {"rope_scaling": {"rope_type": "default", "partial_rotary_factor": 0.5, "rope_theta": 500.0}},
        # rope_parameters without values says nothing: rope_scaling's are read, as transformers 5 reads them.
        {"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"partial_rotary_factor": 0.5, "rope_theta": 500}},
        {"rope_parameters": {}, "rope_scaling": {"rope_theta": 500}, "rotary_pct": 0.5},
        {"rope_theta": 10000, "partial_rotary_factor": 0.25},  # top-level, as read anyway
        {"rotary_emb_base": 500, "rope_theta": 500},
    ]
    for extra in accepted:
        ours = PythiaConfig.from_dict({**base, **extra})
        theirs = transformers.GPTNeoXConfig(**{**base, **extra}).rope_parameters
        assert (ours.rotary_pct, ours.rope_theta) == (theirs["partial_rotary_factor"], theirs["rope_theta"]), extra


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        PythiaConfig.from_dict({**PUBLISHED_160M, "model_type": "llama"})
    with pytest.raises(ConfigError, match="missing hidden_size"):
        PythiaConfig.from_dict({k: v for k, v in PUBLISHED_160M.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="not a multiple"):
        PythiaConfig.from_dict({**PUBLISHED_160M, "num_attention_heads": 7})
    with pytest.raises(ConfigError, match="hidden_act"):
        PythiaConfig.from_dict({**PUBLISHED_160M, "hidden_act": "relu"})
    # Python's json reads NaN and Infinity: a corrupt config fails here, not as NaN logits.
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ConfigError, match=r"rope_theta \(rotary_emb_base\) must be a finite number > 0"):
            PythiaConfig.from_dict({**PUBLISHED_160M, "rotary_emb_base": bad})
    for bad in (float("nan"), float("inf"), -1e-5):
        with pytest.raises(ConfigError, match="layer_norm_eps must be a finite number >= 0"):
            PythiaConfig.from_dict({**PUBLISHED_160M, "layer_norm_eps": bad})
    (tmp_path / "config.json").write_text(json.dumps({**PUBLISHED_160M, "rotary_emb_base": float("inf")}))
    with pytest.raises(ConfigError, match="got inf"):
        PythiaConfig.from_json(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        PythiaConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PythiaConfig.from_json(tmp_path)


def test_model_rejects_unsupported_dtype():
    cfg = PythiaConfig.from_dict(PUBLISHED_160M)
    with pytest.raises(ValueError, match="dtype"):
        PythiaModel(cfg, dtype=torch.float64)


# ------------------------------------------------------------------ CUDA --
# The engine on a GPU: eager against CUDA-graph decoding, transformers on the
# CPU as the oracle. Skipped without a GPU (benchmarks/gpu_check.sh runs them).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("shape", ["14m", "hd80"])
def test_greedy_generation_matches_transformers_cuda(shape):
    hf, model = pair(shape, device="cuda")  # float32 activations on the GPU
    prompt = torch.randint(2, SHAPES[shape]["vocab_size"], (1, 11))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=1)[0, 11:]
    engine = Pythia(model, max_len=128)
    assert engine.generate_ids(prompt[0].tolist(), 64, ignore_eos=True) == ref.tolist()
    assert set(engine._graphs) == {(1, True, "float32")}  # the decode steps ran as a captured graph


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_decode_equals_eager_cuda(dtype):
    _, model = pair("14m", dtype=dtype, device="cuda")
    eager = Pythia(model, max_batch=3, max_len=96, cuda_graphs=False)
    graphed = Pythia(model, max_batch=3, max_len=96)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 1024, (n,), generator=g).tolist() for n in (5, 17, 1)]
    assert graphed.generate_ids(prompts, 24, ignore_eos=True) == eager.generate_ids(prompts, 24, ignore_eos=True)
    # Another batch size gets its own graph; the first one replays with new positions.
    assert graphed.generate_ids(prompts[1], 24, ignore_eos=True) == eager.generate_ids(prompts[1], 24, ignore_eos=True)
    assert graphed.generate_ids(prompts, 8, ignore_eos=True) == eager.generate_ids(prompts, 8, ignore_eos=True)
    assert {key[0] for key in graphed._graphs} == {1, 3}
    # A setting the model reads when bound, changed after the capture, is seen
    # (a new graph) as it is when decoding eagerly, and the old graph replays
    # again once the setting is back.
    model.fuse_decode = False
    assert graphed.generate_ids(prompts, 8, ignore_eos=True) == eager.generate_ids(prompts, 8, ignore_eos=True)
    assert (3, False, "float32") in graphed._graphs
    model.fuse_decode = True
    assert graphed.generate_ids(prompts, 8, ignore_eos=True) == eager.generate_ids(prompts, 8, ignore_eos=True)
    assert set(graphed._graphs) == {(1, True, "float32"), (3, True, "float32"), (3, False, "float32")}


@needs_cuda
def test_graphs_follow_a_model_moved_away_and_back_cuda():
    # The graph captured by the first call read the weights' old addresses;
    # after model.cpu(); model.cuda() it must be captured anew, not replayed.
    _, model = pair("14m", dtype=torch.float16, device="cuda")
    eager = Pythia(model, max_len=64, cuda_graphs=False)
    graphed = Pythia(model, max_len=64)
    want = eager.generate_ids([5, 6, 7], 16, ignore_eos=True)
    assert graphed.generate_ids([5, 6, 7], 16, ignore_eos=True) == want
    old, before = graphed._graphs[graphed._graph_key(1)], graphed._addresses()
    model.cpu()
    torch.cuda.empty_cache()  # the old weights' blocks go back to the driver ...
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    junk = torch.full((nbytes // 4 + (1 << 20),), float("nan"), device="cuda")  # ... and NaNs take them
    model.cuda()  # so the weights come back elsewhere
    assert graphed.generate_ids([5, 6, 7], 16, ignore_eos=True) == want
    if graphed._addresses() != before:  # (the allocator could still hand the same addresses back)
        assert graphed._graphs[graphed._graph_key(1)] is not old
    del junk


@needs_cuda
def test_engines_capture_on_streams_of_their_own_cuda():
    # pytorch #193402: resetting a graph frees the cuBLAS workspaces of the
    # stream it was captured on, which other live graphs captured there use.
    # Each engine captures on a stream of its own, so dropping one engine's
    # graphs (as cache growth does) leaves the other's replaying correctly.
    _, model = pair("14m", dtype=torch.float16, device="cuda")
    eager = Pythia(model, max_len=64, cuda_graphs=False)
    a, b = Pythia(model, max_len=64), Pythia(model, max_len=64)
    want = eager.generate_ids([5, 6, 7], 16, ignore_eos=True)
    assert a.generate_ids([5, 6, 7], 16, ignore_eos=True) == want
    assert b.generate_ids([5, 6, 7], 16, ignore_eos=True) == want
    assert a._capture_stream.handle != b._capture_stream.handle
    for _ in range(40):  # cycle torch's stream pool (32 per device) past where it began
        torch.cuda.Stream()
    a._drop_graphs()
    gc.collect()
    torch.cuda.synchronize()
    assert b.generate_ids([5, 6, 7], 16, ignore_eos=True) == want
    assert a.generate_ids([5, 6, 7], 16, ignore_eos=True) == want  # recaptured


@needs_cuda
def test_engines_in_two_threads_capture_while_the_other_runs_cuda():
    # One engine captures its decode graphs while another, in a second thread,
    # allocates caches and decodes eagerly: a capture in "global" mode fails on
    # the other thread's cudaMalloc / synchronize ("operation not permitted when
    # stream is capturing"); each engine's tokens must equal its solo run.
    import threading

    _, model = pair("14m", dtype=torch.float16, device="cuda")
    prompts = {n: torch.randint(2, 1024, (n, 7), generator=torch.Generator().manual_seed(n)).tolist()
               for n in range(1, 5)}
    solo = Pythia(model, max_batch=4, max_len=64, cuda_graphs=False)
    want = {n: solo.generate_ids(p, 16, ignore_eos=True) for n, p in prompts.items()}
    errors, go = [], threading.Barrier(2)

    def run(engine_kwargs):
        try:
            go.wait()
            for _ in range(3):
                engine = Pythia(model, max_len=64, **engine_kwargs)  # a new cache (and graphs) each round
                for n, p in prompts.items():
                    assert engine.generate_ids(p, 16, ignore_eos=True) == want[n]
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(kw,)) for kw in ({}, {"cuda_graphs": False})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@needs_cuda
def test_generate_inside_then_outside_inference_mode_cuda():
    # The first capture under the caller's inference_mode makes its static inputs
    # inference tensors; a later call outside it must still be able to refill them.
    _, model = pair("tiny", dtype=torch.float16, device="cuda")
    engine = Pythia(model, max_len=64)
    with torch.inference_mode():
        a = engine.generate_ids([5, 6, 7, 8], 12, ignore_eos=True)
    assert engine.generate_ids([5, 6, 7, 8], 12, ignore_eos=True) == a


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_graphs_on_a_second_gpu_cuda():
    # cuda:1 while cuda:0 is current: the graph must capture cuda:1's stream.
    _, model = pair("14m", dtype=torch.float16, device="cuda:1")
    eager = Pythia(model, max_len=64, cuda_graphs=False)
    graphed = Pythia(model, max_len=64)
    with torch.cuda.device(0):
        assert graphed.generate_ids([5, 6, 7], 24, ignore_eos=True) == eager.generate_ids([5, 6, 7], 24, ignore_eos=True)
        assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("shape", ["14m", "160m"])
def test_int16_compute_decode_close_to_float32_and_to_transformers(shape):
    # compute="int16": decode steps (M = 1) through the int16 GEMV. The logits
    # stay within int16's error of float32's, and greedy decoding still
    # matches transformers on the dequantized weights (peaked random logits).
    import pythia_native as pn

    hf, model = pair(shape)
    prompt = torch.randint(2, SHAPES[shape]["vocab_size"], (1, 11))
    vocab = SHAPES[shape]["vocab_size"]
    # A prefill longer than the int16 GEMV's M (it computes in float32), then
    # 12 decode steps.
    p = pn.build_info()["cpu_gemv_int16_max_m"] + 4
    ids = torch.randint(0, vocab, (1, p + 12))
    steps = {}
    for mode in ("float32", "int16"):
        model.compute = mode
        cache = model.new_cache(1, p + 16)
        out = [model(ids[:, :p], full_positions(1, p), cache, span=p)]
        for t in range(p, p + 12):
            out.append(model(ids[:, t : t + 1], torch.full((1, 1), t), cache))
        steps[mode] = torch.cat(out)
    assert torch.equal(steps["int16"][0], steps["float32"][0])  # the prefill computes in float32
    err = rel_err(steps["int16"][1:], steps["float32"][1:])
    if pn.build_info()["cpu_gemv_int16"]:
        assert 0 < err <= 2e-3, err
    else:
        assert err == 0  # no AVX2 (no int16 kernel): float32 throughout
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=1)[0, 11:]
    model.compute = "int16"  # greedy decoding in int16 against transformers in float32
    assert Pythia(model, max_len=64).generate_ids(prompt[0].tolist(), 32, ignore_eos=True) == ref.tolist()


def test_compute_mode_is_checked():
    _, model = pair("tiny")
    with pytest.raises(ValueError, match="compute must be one of 'float32', 'int16', got 'int8'"):
        PythiaModel(model.config, compute="int8")
    model.compute = "fp16"
    with pytest.raises(ValueError, match="got 'fp16'"):
        model.bind()


def test_config_token_ids_and_flags_are_checked():
    ok = PythiaConfig.from_dict({**PUBLISHED_160M, "eos_token_id": [0, 2], "bos_token_id": 1})
    assert (ok.eos_token_id, ok.bos_token_id) == (0, 1)  # the first of a list (transformers' form)
    assert ok.eos_token_ids == (0, 2)  # each of them ends generation
    assert ok.to_dict()["eos_token_id"] == [0, 2] and PythiaConfig.from_dict(ok.to_dict()) == ok
    assert PythiaConfig.from_dict(PUBLISHED_160M).to_dict()["eos_token_id"] == 0  # one id stays an int
    assert dataclasses.replace(ok, eos_token_id=None, extra_eos_token_ids=()).eos_token_ids == ()
    with pytest.raises(ConfigError, match="extra_eos_token_ids given without an eos_token_id"):
        dataclasses.replace(ok, eos_token_id=None)
    for key, bad in [("bos_token_id", -1), ("bos_token_id", 50304), ("eos_token_id", 2.0), ("eos_token_id", [0, -1]),
                     ("eos_token_id", ["0"]), ("bos_token_id", True)]:
        with pytest.raises(ConfigError, match=f"{key} must be a token id"):
            PythiaConfig.from_dict({**PUBLISHED_160M, key: bad})
    with pytest.raises(ConfigError, match="eos_token_id is an empty list"):
        PythiaConfig.from_dict({**PUBLISHED_160M, "eos_token_id": []})
    for key in ("use_parallel_residual", "attention_bias", "tie_word_embeddings"):
        with pytest.raises(ConfigError, match=f"{key} must be true or false"):
            PythiaConfig.from_dict({**PUBLISHED_160M, key: "false"})
    for key, value in [("rope_parameters", [1, 2]), ("rope_scaling", "linear")]:
        with pytest.raises(ConfigError, match=f"{key} must be an object"):
            PythiaConfig.from_dict({**PUBLISHED_160M, key: value})
    # A scaling in either key is refused, also rope_scaling beside a default
    # rope_parameters (transformers applies it; it was ignored: logits 0.12 off).
    default = {"partial_rotary_factor": 0.25, "rope_theta": 10000, "rope_type": "default"}
    for extra in ({"rope_scaling": {"type": "linear", "factor": 4.0}},
                  {"rope_parameters": default, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
                  {"rope_parameters": {**default, "rope_type": "yarn"}}):
        key = "rope_scaling" if "rope_scaling" in extra else "rope_parameters"
        with pytest.raises(ConfigError, match=f"{key} has rope_type '(linear|dynamic|yarn)', which is not supported"):
            PythiaConfig.from_dict({**PUBLISHED_160M, **extra})
    assert PythiaConfig.from_dict({**PUBLISHED_160M, "rope_parameters": default, "rope_scaling": None}).rope_theta == 10000
    for rope in ({"partial_rotary_factor": "abc"}, {"rope_theta": "1e4"}, {"partial_rotary_factor": None}):
        with pytest.raises(ConfigError, match="must be a number"):
            PythiaConfig.from_dict({**PUBLISHED_160M, "rope_parameters": rope})
    with pytest.raises(ConfigError, match="rotary_pct must be a number, got True"):
        PythiaConfig.from_dict({**PUBLISHED_160M, "rotary_pct": True})
    with pytest.raises(ConfigError, match="hidden_act"):
        PythiaConfig.from_dict({**PUBLISHED_160M, "hidden_act": ["gelu"]})


def test_load_tensors_checks_a_mapping_whole_before_writing():
    hf = hf_model("tiny")
    model = PythiaModel.from_hf(hf)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = dict(hf_model("tiny", 1).state_dict())
    other["gpt_neox.layers.1.post_attention_layernorm.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match="post_attention_layernorm.weight: shape"):
        model.load_tensors(other)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.partial_load is None
    ids = torch.tensor([[5, 6, 7]])
    model(ids, full_positions(1, 3), model.new_cache(1, 8), span=3)  # still runs
    # A plain iterable is checked as it goes: a failure after some writes marks the model.
    with pytest.raises(CheckpointError, match="post_attention_layernorm.weight: shape"):
        model.load_tensors(other.items())
    with pytest.raises(GenerationError, match="partly overwritten"):
        model(ids, full_positions(1, 3), model.new_cache(1, 8), span=3)
    model.load_tensors(hf.state_dict())
    assert model.partial_load is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_prefill_span_is_checked_against_positions_and_cache():
    # span (max(positions) + 1) was trusted: one short of it silently dropped the
    # keys past it, one past the cache failed inside SDPA, and a batch larger
    # than the cache failed in the slot clearing with an IndexError.
    _, model = pair("tiny")
    ids = torch.randint(0, 100, (2, 4))
    pos = full_positions(2, 4)
    want = model(ids, pos, model.new_cache(2, 16), span=4)
    assert torch.equal(model(ids, pos, model.new_cache(2, 16), span=np.int64(4)), want)
    torch.testing.assert_close(model(ids, pos, model.new_cache(2, 16), span=6), want, rtol=1e-6, atol=1e-6)
    for span, match in ((2, r"span must be max\(positions\) \+ 1 = 4 or more, got 2"),
                        (0, r"span must be an integer in \[1, 16\]"),
                        (20, r"span must be an integer in \[1, 16\]"),
                        (4.0, r"span must be an integer in \[1, 16\]")):
        with pytest.raises(GenerationError, match=match):
            model(ids, pos, model.new_cache(2, 16), span=span)
    three = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [-1, 0, 1, 2]])
    with pytest.raises(GenerationError, match=r"B <= 2 \(the cache's max_batch\), got \(3, 4\)"):
        model(torch.randint(0, 100, (3, 4)), three, model.new_cache(2, 16), span=4)


def test_a_kv_cache_too_large_to_allocate_says_so():
    # A config whose context is huge (max_len defaults to it): a named error with
    # the size, not the allocator's bare RuntimeError from deep in torch.zeros.
    cfg = PythiaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=10**12)
    model = PythiaModel(cfg)
    with pytest.raises(GenerationError, match=r"max_batch=1 x max_len=1000000000000 needs .* GiB .* pass a smaller max_len"):
        Pythia(model)
    # More elements than int64 sizes hold: torch raised a bare TypeError.
    with pytest.raises(GenerationError, match=r"max_batch=9223372036854775808 x max_len=8 needs .* GiB"):
        Pythia(model, max_batch=2**63, max_len=8)
    for bad in (2.0, True, "2"):
        with pytest.raises(GenerationError, match="max_batch must be an integer >= 1"):
            Pythia(model, max_batch=bad, max_len=8)
    assert Pythia(model, max_batch=np.int64(2), max_len=np.int32(8)).cache.max_batch == 2


def test_dense_weights_take_the_models_format_after_a_bitsandbytes_load():
    # A bitsandbytes layer is taken as it is (here blocksize 128 and fp4); a dense
    # checkpoint loaded into the same model afterwards is quantized to the
    # model's own format again (it kept the layer's: blocksize 128, fp4).
    hf, model = pair("tiny")  # nf4, blocksize 64
    ids = torch.randint(0, SHAPES["tiny"]["vocab_size"], (1, 9))
    want = model(ids, full_positions(1, 9), model.new_cache(1, 16), span=9)
    other = PythiaModel.from_hf(hf, blocksize=128, quant_type="fp4")
    bnb = {k: v for k, v in other.state_dict().items()}
    # Our model is nf4: a fp4 checkpoint's layers are refused by load_revision, but
    # load_tensors takes each layer's format from its quant_state.
    model.load_tensors(bnb)
    layer = model.gpt_neox.layers[0].attention.query_key_value
    assert (layer.blocksize, layer.quant_type) == (128, "fp4")
    model.load_tensors(hf.state_dict())
    assert (layer.blocksize, layer.quant_type) == (64, "nf4")
    assert torch.equal(model(ids, full_positions(1, 9), model.new_cache(1, 16), span=9), want)


@pytest.mark.parametrize("hidden, heads", [(100, 4), (512, 1), (96, 8)])
def test_config_refuses_a_head_dim_the_attention_kernels_cannot_run(hidden, heads):
    # head_dim 25, 512 and 12: the prefill (SDPA) would take them and the first
    # decode step fail mid-stream; refused when the config is built instead.
    with pytest.raises(ConfigError, match=f"head_dim {hidden // heads} .* multiples of 8 up to 256"):
        PythiaConfig.from_dict({**PUBLISHED_160M, "hidden_size": hidden, "num_attention_heads": heads})
    for size in ("14m", "1b", "2.8b"):  # head_dim 32, 256, 80: the suite's range
        PythiaConfig.for_size(size)


def test_suite_architectures_cover_the_suites_sizes():
    # Two tables, config.py's architectures (random-weight models) and suite.py's
    # names: one key set, in one order, so a size added to one is in the other.
    from pythia_native import suite
    from pythia_native.config import SUITE_ARCHITECTURES

    assert tuple(SUITE_ARCHITECTURES) == suite.SIZES
    for size in suite.SIZES:
        c = PythiaConfig.for_size(size)
        assert c.vocab_size % 128 == 0 and c.hidden_size % 128 == 0  # Pythia's padding and widths (PYTHIA.md)
