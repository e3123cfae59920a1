"""Random GPT-NeoX checkpoints for the engine tests, built with transformers.

Shapes cover the suite's awkward cases: head_dim 16..256, rotary 4..64, the
head_dim-80/rotary-20 of pythia-2.8b, 12 layers like pythia-160m.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pythia_native.model import QUANTIZED_LINEARS, PythiaModel  # noqa: E402

# name -> GPTNeoXConfig kwargs (vocab kept small where the test is about shapes).
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=512),
    "14m": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512, vocab_size=1024),
    "hd80": dict(hidden_size=320, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1280, vocab_size=1024),
    "hd256": dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2048, vocab_size=1024),
    "160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50304),
}


def hf_config(shape: str, **overrides):
    kw = dict(SHAPES[shape])
    # A larger init than 0.02 makes the logits peaked, so greedy choices are not near-ties.
    kw.update(max_position_embeddings=256, initializer_range=0.1, eos_token_id=0, bos_token_id=0, pad_token_id=1)
    kw.update(overrides)
    return transformers.GPTNeoXConfig(**kw)


def hf_model(shape: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return transformers.GPTNeoXForCausalLM(hf_config(shape, **overrides)).eval()


def give_dequantized(hf, model: PythiaModel) -> None:
    """Put our 4-bit layers' dequantized weights into the transformers model, so
    both compute with the same weights and only the arithmetic differs."""
    sd = hf.state_dict()
    for i, layer in enumerate(model.gpt_neox.layers):
        for n in QUANTIZED_LINEARS:
            sub = layer.get_submodule(n)
            if hasattr(sub, "dequantize"):
                sd[f"gpt_neox.layers.{i}.{n}.weight"] = sub.dequantize(torch.float32)
    if hasattr(model.embed_out, "dequantize"):
        key = "lm_head.weight" if "lm_head.weight" in sd else "embed_out.weight"
        sd[key] = model.embed_out.dequantize(torch.float32)
    hf.load_state_dict(sd)


def pair(shape: str, seed: int = 0, hf_overrides=None, **model_kwargs):
    """A transformers model and our model holding the same (dequantized) weights."""
    hf = hf_model(shape, seed, **(hf_overrides or {}))
    model = PythiaModel.from_hf(hf, **model_kwargs)
    give_dequantized(hf, model)
    return hf, model


def tokenizer_path() -> Path | None:
    """The real GPT-NeoX-20B tokenizer (../shared/tokenizer) when this checkout has it.
    PYTHIA_NATIVE_TOKENIZER=fallback: None even then, so the tests run with the
    small trained one (make asan-pytest does, so CI runs the suite with both)."""
    if os.environ.get("PYTHIA_NATIVE_TOKENIZER") == "fallback":
        return None
    here = Path(__file__).resolve()
    for root in (here.parents[1], here.parents[2]):
        p = root / "shared" / "tokenizer" / "gpt-neox-20b" / "tokenizer.json"
        if p.is_file():
            return p
    env = os.environ.get("PYTHIA_NATIVE_TOKENIZER")
    return Path(env) if env else None


def trained_tokenizer(tmp_dir: Path) -> Path:
    """A small byte-level BPE trained on the fly (when the real one is absent):
    same pre-tokenizer and decoder family, so UTF-8 handling is exercised alike."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["Once upon a time there was a model that spoke in four bits.", "héllo wörld ünïcode 日本語 テキスト 🙂🚀"] * 50
    tok.train_from_iterator(text, trainer)
    path = tmp_dir / "tokenizer.json"
    tok.save(str(path))
    return path
