"""The GPT-NeoX model with 4-bit Linear layers, and its static KV cache.

Module and parameter names follow transformers' ``GPTNeoXForCausalLM``
(``gpt_neox.layers.3.attention.query_key_value.weight``, ``embed_out.weight``,
...), so a Hugging Face state dict maps onto this model key by key and what
this model saves, transformers loads.

One block (``../shared/docs/PYTHIA.md`` lists the traps)::

    h = LN1(x)                                      LayerNorm in float32
    qkv = query_key_value(h)        [B, T, H*3*D]   gemm_4bit; per head [q|k|v]
    q = rotary_kv_cache_(qkv, pos)  [B, T, H, D]    rotary on q and k, k/v -> cache
    a = attention(q, cache, pos)    [B, T, H, D]    decode_attention (T = 1) or SDPA
    x = x + dense(a) + mlp(LN2(x))                  parallel residual
    mlp(h) = dense_4h_to_h(gelu(dense_h_to_4h(h)))  exact (erf) GELU

Positions and the cache. Token ``(b, t)`` has a position ``positions[b, t]``:
its rotary angle and its slot in sequence ``b``'s cache. Left padding gets a
negative position: it is neither written to the cache nor attended to, so a
left-padded batch computes what each sequence would alone, up to rounding:
the 4-bit kernels are chosen by the number of rows M (gemm_4bit: a GEMV, a
tile kernel, BLAS; where each starts depends on the CPU's ISA), so a
sequence's sums can come in another order in a batch than alone. Within one
kernel a row's bits do not depend on the other rows. What that costs:

* float32: logits ~1e-6 relative apart (up to ~4e-6, 4e-5 absolute,
  measured), not bit for bit; greedy tokens the same in every test and
  audit run (a flip needs the top two logits closer than that).
* bfloat16: every output is rounded to bf16 (one ulp is ~1% of a logit),
  so the order of the sums shows: greedy tokens can depend on the rest of
  the batch (an audit saw a third of the rows of random 160m-shaped models
  diverge within 48 steps). A prefill past the tile kernel's rows (64 with
  AVX-512, 16 with AVX2) also multiplies by W rounded to bf16 (BLAS).
* compute="int16": the int16 GEMV takes M <= 16 only; a batched prefill of
  more rows (padding included) runs in float32, the same prompt alone in
  int16 (~1e-4 apart), so greedy tokens can depend on the batch there too.

The same holds across lengths (score() of a text and of its prefix give a
shared token's log-probability ~1e-5 apart) and across ISAs (an AVX-512 and
an AVX2 host: ~1e-6 apart in float32). Repeated calls, thread counts and
processes give the same bits.
"""
from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Collection, Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .block import compose_block, layer_norm_fn, prefill_mask
from .config import PythiaConfig
from .errors import CheckpointError, GenerationError, LoadInProgressError
from .format import DEFAULT_BLOCKSIZE, DEFAULT_QUANT_TYPE, check_quant_type
from .quantized_linear import QuantizedLinear, parse_quant_state, weight_keys
from .sampling import is_int
from .weights import is_skipped_buffer

# The four Linear layers of a block that are stored in 4 bits.
QUANTIZED_LINEARS = (
    "attention.query_key_value",
    "attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)


def tensor_addresses(model: "PythiaModel") -> list[tuple[str, int]]:
    """Where every parameter and buffer of ``model`` lives (name, data pointer):
    what a captured CUDA graph reads. Not ``state_dict()``: QuantizedLinear
    builds some of its entries (quant_map, the quant-state record, double-quant
    statistics) anew on each call, so their addresses say nothing about the graphs."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [(n, t.data_ptr()) for n, t in tensors]


class KVCache:
    """Preallocated keys and values of every layer: ``k, v [layers, max_batch, H, max_len, D]``.

    ``k[i]`` is the contiguous ``[max_batch, H, max_len, D]`` block the
    attention ops of layer ``i`` read and write; a decode step writes one slot
    per sequence and allocates nothing. Slots past a sequence's length hold
    stale values that no query can see: ``decode_attention`` stops at each
    query's position, and a prefill zeroes the stale slots its SDPA reads
    (:func:`_clear_unwritten_slots`).
    """

    def __init__(self, config: PythiaConfig, max_batch: int, max_len: int, dtype: torch.dtype, device):
        if not is_int(max_batch) or max_batch < 1:
            raise GenerationError(f"KVCache: max_batch must be an integer >= 1, got {max_batch!r}")
        if not is_int(max_len) or not 1 <= max_len <= config.max_position_embeddings:
            raise GenerationError(
                f"KVCache: max_len must be an integer in [1, max_position_embeddings={config.max_position_embeddings}], "
                f"got {max_len!r}"
            )
        max_batch, max_len = int(max_batch), int(max_len)
        shape = (config.num_hidden_layers, max_batch, config.num_attention_heads, max_len, config.head_dim)
        # Zeros, not empty: a slot is never read before it is written, but stale
        # memory should never be able to hold a NaN.
        try:
            if math.prod(shape) >= 2**62:  # beyond what torch's int64 sizes hold (it raised a TypeError)
                raise MemoryError("more elements than a tensor can have")
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError, or the CPU allocator's RuntimeError
            self.k = self.v = None
            gib = 2 * math.prod(shape) * torch.empty(0, dtype=dtype).element_size() / 2**30
            raise GenerationError(
                f"KVCache: max_batch={max_batch} x max_len={max_len} needs {gib:.3g} GiB of {dtype} on {device} "
                f"and could not be allocated ({str(e).splitlines()[0][:120]}); pass a smaller max_len or max_batch"
            ) from None
        # Layer i's (k[i], v[i]), made once: a decode step indexes no tensor.
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        self.max_batch = max_batch
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def _clear_unwritten_slots(cache: KVCache, positions: torch.Tensor, span: int) -> None:
    """Zero slots ``last_b + 1 .. span - 1`` of each sequence b (``last_b`` its
    largest position in ``positions [B, T]``), in every layer, before a prefill.

    No query of b sees those slots, but the prefill's SDPA reads the first
    ``span`` slots of every sequence and multiplies the masked ones by a zero
    probability: a NaN or inf an earlier request left there (an overflow in
    float16, a broken revision in a sweep) would come out as 0 * inf = NaN in
    b's output. Zeros there keep it out; slots b writes are never touched.
    Writes only the stale part (none for one sequence, or prompts of one
    length); reads the positions on the host (a sync on CUDA, once per prefill)
    and, having them, checks ``span`` against them and the cache: a span short
    of the largest position would silently drop the keys past it, one past the
    cache fails deep in SDPA, and more rows than the cache holds in the slot
    clearing."""
    if not is_int(span) or not 1 <= span <= cache.max_len:
        raise GenerationError(f"span must be an integer in [1, {cache.max_len}] (the cache's max_len), got {span!r}")
    if positions.dim() != 2 or positions.shape[0] > cache.max_batch:
        raise GenerationError(
            f"positions must be [B, T] with B <= {cache.max_batch} (the cache's max_batch), got {tuple(positions.shape)}"
        )
    if positions.numel() == 0:
        return
    lasts = positions.max(dim=1).values.tolist()
    if max(lasts) >= span:
        raise GenerationError(f"span must be max(positions) + 1 = {max(lasts) + 1} or more, got {span}")
    for b, last in enumerate(lasts):
        start = max(last + 1, 0)
        if start < span:
            cache.k[:, b, :, start:span].zero_()
            cache.v[:, b, :, start:span].zero_()


# The load under way into each model (load_tensors), by weak reference: a
# lock attribute would make the module impossible to deepcopy or pickle. Two
# loads into one model at once (load_revision through two engines over it)
# interleaved their writes into a mix of both checkpoints that no check could
# see afterwards: the second is refused.
_LOADING: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()
_LOADING_GUARD = threading.Lock()


def _blocks(t: torch.Tensor, elements: int = 1 << 20):
    """Views of ``t`` of about ``elements`` values each (whole rows of its first
    dimension, or slices of a 1-d tensor), for checks whose temporaries would
    otherwise be the tensor's size or several times it."""
    if t.dim() <= 1:
        return t.reshape(-1).split(elements)
    if t.shape[0] == 0:
        return (t,)
    rows = max(1, elements // max(1, t[0].numel()))
    return t.split(rows)


def fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of t survives a round trip through ``dtype`` (checked
    in blocks, so the copies stay small next to the tensor: whole, a float32
    embedding's took 221 MB for pythia-160m)."""
    if t.dtype == dtype:
        return True
    return all(torch.equal(c.to(dtype).to(c.dtype), c) for c in _blocks(t))


# The dtypes a dense Linear weight may have: those the 4-bit quantizer reads.
_QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)


def _own_name(name: str) -> str:
    """transformers 5 calls embed_out lm_head in memory (files keep embed_out)."""
    return "embed_out." + name[len("lm_head."):] if name.startswith("lm_head.") else name


def _layer_of(name: str, prefixes: set[str]) -> Optional[str]:
    """The 4-bit layer prefix (``...dense.``) whose ``weight`` or ``weight.*``
    entry ``name`` is, or None (``...dense.weight_orig`` is no entry of it)."""
    return next((p for p in prefixes if name == p + "weight" or name.startswith(p + "weight.")), None)


def _check_dense(name: str, shape: tuple, dtype: torch.dtype, expected: tuple, dtypes: Optional[tuple]) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"{name}: shape {tuple(shape)} does not fit the config (expected {tuple(expected)})")
    if not dtype.is_floating_point:
        raise CheckpointError(f"{name}: expected a floating-point tensor, got {dtype}")
    if dtypes is not None and dtype not in dtypes:
        raise CheckpointError(
            f"{name}: dtype {dtype} is not supported (expected {', '.join(str(d) for d in dtypes)}); "
            "convert the checkpoint to float16, bfloat16 or float32"
        )


def _check_finite(name: str, t: torch.Tensor) -> None:
    """A weight holding NaN or inf is corrupt: it would make every logit NaN (greedy
    decoding then emits token 0 forever, sampling fails inside torch). Checked in
    blocks: isfinite of a whole float16 embedding made ~2.5x its size in
    temporaries (184 MB for pythia-160m's, 490 MB for 1.4b's), the peak of a load."""
    if t.is_floating_point() and not all(bool(torch.isfinite(c).all()) for c in _blocks(t)):
        raise CheckpointError(f"{name}: holds NaN or infinite values; the checkpoint is corrupt (download it again)")


def _check_4bit_layer(module: QuantizedLinear, entries: dict[str, torch.Tensor], prefix: str,
                      unexpected: list[str]) -> None:
    """What ``module.load_quantized_(entries, prefix)`` checks, assigning nothing
    (the packed weight may be a meta tensor: only its size is read). Entries
    the layer does not read (a stray ``weight.*`` key) go to ``unexpected``."""
    if prefix + "weight" not in entries:
        raise CheckpointError(f"{prefix}weight: 4-bit statistics present ({', '.join(sorted(entries))}) but no packed weight")
    try:
        state = parse_quant_state(entries, prefix)
        if state.shape != (module.out_features, module.in_features):
            raise ValueError(
                f"{prefix}weight: quant_state shape {state.shape} does not match this layer "
                f"({module.out_features}, {module.in_features})"
            )
        module._read_quantized(entries, prefix, state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(_message(e)) from None
    for key in ("weight.absmax", "weight.nested_absmax"):  # NaN / inf weights show in their block scales
        if prefix + key in entries:
            _check_finite(prefix + key, entries[prefix + key])
    unexpected.extend(sorted(set(entries) - weight_keys(prefix, entries, state.nested_offset is not None)))


def _message(e: Exception) -> str:
    """An error's one-line text (a KeyError's str() is the repr of its message)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    return text.splitlines()[0] if text else type(e).__name__


def _check_complete(own: dict, quantized: set[str], seen: set[str], unexpected: list[str]) -> None:
    expected = {n for n in own if not any(n.startswith(q + "weight") for q in quantized)}
    expected |= {q + "weight" for q in quantized}
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensor(s) this GPT-NeoX config does not: {', '.join(unexpected[:8])}"
            + (" ..." if len(unexpected) > 8 else "")
        )


# ----------------------------------------------------------------- binding --
# (So forward hooks and forward overrides of submodules do not run; README, Use.)
# Every module below computes through a plain function made by its bind():
# forward() binds and calls it, and the generate loop binds the whole model
# once per call (PythiaModel.bind), so that a CPU decode step does not pay
# nn.Module call and attribute overhead ~200 times: a 12-layer model with
# hidden size 64, whose step is almost all overhead, went from 1.50-1.61 to
# 0.88-0.96 ms per decode step (2-vCPU Xeon, alternated processes). A decode
# step's blocks then became one fused op each (neox_block_, see Layer.bind):
# the same model, 0.96-1.48 -> 0.51-0.65 ms per step (same machine,
# alternated). The math is defined once (pythia_native/block.py), whichever
# way it is called; a bound function is valid while the module's tensors stay
# the same objects.


def _bind_layer_norm(ln: nn.LayerNorm):
    """x -> LayerNorm(x) in float32 whatever the activation dtype (fp16 Pythia overflows otherwise)."""
    return layer_norm_fn(ln.weight, ln.bias, ln.eps)


def _bind_linear(module: nn.Module, compute: str = "float32"):
    """x -> module(x): bound for a QuantizedLinear (gemm_4bit in mode
    ``compute``) or a plain nn.Linear, the module itself (its own forward,
    called each time) for anything else."""
    if isinstance(module, QuantizedLinear):
        return module.bind(compute)
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _block_linear_prefixes(config: PythiaConfig) -> set[str]:
    """"gpt_neox.layers.<i>.<linear>." of every block Linear."""
    return {f"gpt_neox.layers.{i}.{n}." for i in range(config.num_hidden_layers) for n in QUANTIZED_LINEARS}


class Attention(nn.Module):
    """``attention.*`` of a block: the fused QKV and output Linears (the math
    is in :func:`pythia_native.block.compose_block`)."""

    def __init__(self, config: PythiaConfig, make_linear):
        super().__init__()
        h = config.hidden_size
        self.query_key_value = make_linear(h, 3 * h, config.attention_bias, "attention.query_key_value")
        self.dense = make_linear(h, h, config.attention_bias, "attention.dense")


class MLP(nn.Module):
    """``mlp.*`` of a block: the two Linears around the activation."""

    def __init__(self, config: PythiaConfig, make_linear):
        super().__init__()
        self.dense_h_to_4h = make_linear(config.hidden_size, config.intermediate_size, True, "mlp.dense_h_to_4h")
        self.dense_4h_to_h = make_linear(config.intermediate_size, config.hidden_size, True, "mlp.dense_4h_to_h")


class Layer(nn.Module):
    def __init__(self, config: PythiaConfig, make_linear):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.config = config
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = Attention(config, make_linear)
        self.mlp = MLP(config, make_linear)

    def forward(self, x, positions, k_cache, v_cache, mask):
        """The block's output (a new tensor; x is left as it was)."""
        own = x.clone(memory_format=torch.contiguous_format) if mask is None else x
        return self.bind()(own, positions, k_cache, v_cache, mask)

    def bind(self, fuse: bool = True, compute: str = "float32"):
        """``layer(x, positions, k_cache, v_cache, mask) -> x'``, its 4-bit Linears
        in gemm_4bit's mode ``compute``. With ``fuse``, a decode step
        (mask None) of a block whose four Linears are 4-bit and whose GELU is
        the exact one runs as the fused op ``neox_block_``, which updates x in
        place (the caller owns x: PythiaModel's run makes it from the
        embedding); every other call composes the ops in Python."""
        c = self.config
        linears = (
            self.attention.query_key_value, self.attention.dense, self.mlp.dense_h_to_4h, self.mlp.dense_4h_to_h
        )
        approximate = c.gelu_approximate
        # The exact GELU (every Pythia) through our op: at decode sizes torch's CPU
        # GELU took 37-73 us a call inside a step (oneDNN), ours 8-11 us
        # (csrc/cpu/activation.cpp); the tanh forms stay torch's.
        act = ops.gelu if approximate == "none" else (lambda x: F.gelu(x, approximate=approximate))
        qkv, dense, up, down = (_bind_linear(m, compute) for m in linears)
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        rotary = dict(rotary_ndims=c.rotary_ndims, rope_theta=float(c.rope_theta), scale=c.head_dim**-0.5)
        composed = compose_block(
            ln1=_bind_layer_norm(ln1), ln2=_bind_layer_norm(ln2), qkv=qkv, dense=dense, up=up, down=down,
            act=act, parallel_residual=c.use_parallel_residual, **rotary,
        )
        fusable = (
            fuse
            and approximate == "none"
            and all(isinstance(m, QuantizedLinear) for m in linears)
            and len({(m.blocksize, m.quant_type) for m in linears}) == 1
            and all(t.dtype == torch.float32 for t in (ln1.weight, ln1.bias, ln2.weight, ln2.bias))
        )
        if not fusable:
            return composed
        fused = torch.ops.pythia_native.neox_block_
        weights = [(m.weight, m.absmax, m.bias) for m in linears]
        ln_args = (ln1.weight, ln1.bias, ln2.weight, ln2.bias, float(ln1.eps))
        tail = (
            c.intermediate_size, linears[0].blocksize, linears[0].quant_type, rotary["rotary_ndims"],
            rotary["rope_theta"], rotary["scale"], bool(c.use_parallel_residual), compute,
        )
        cast: dict = {}  # biases in the activation dtype, converted once per dtype

        def weight_args(dtype):
            args = cast.get(dtype)
            if args is None:
                args = tuple(
                    t for w, a, b in weights for t in (w, a, b if b is None or b.dtype == dtype else b.to(dtype))
                )
                cast[dtype] = args
            return args

        def layer(x, positions, k_cache, v_cache, mask):
            if mask is not None:
                return composed(x, positions, k_cache, v_cache, mask)
            fused(x, positions, k_cache, v_cache, *ln_args, *weight_args(x.dtype), *tail)
            return x

        return layer


class Backbone(nn.Module):
    """``gpt_neox``: embeddings, the blocks, the final LayerNorm."""

    def __init__(self, config: PythiaConfig, make_linear, dtype):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        # make_linear gets each Linear's full name ("gpt_neox.layers.3.mlp.dense_4h_to_h").
        self.layers = nn.ModuleList(
            Layer(config, lambda i_f, o_f, bias, name, i=i: make_linear(i_f, o_f, bias, f"gpt_neox.layers.{i}.{name}"))
            for i in range(config.num_hidden_layers)
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class PythiaModel(nn.Module):
    """GPT-NeoX for causal LM with its four Linear layers per block in 4 bits.

    Args:
        config: the architecture.
        quant_type: "nf4" or "fp4" for ``QuantizedLinear`` layers, or None for
            dense ``nn.Linear`` layers in ``dtype`` (the baseline to compare with).
        blocksize: elements per absmax block (64 in Pythia checkpoints bitsandbytes writes).
        double_quant: keep the block scales double-quantized when saving
            (bitsandbytes ``compress_statistics``); compute uses decoded scales.
        quantize_embed_out: also store ``embed_out`` in 4 bits (off by default:
            it costs logit accuracy, see the tests and benchmarks).
        head_dtype: storage dtype of a dense ``embed_out``: None for ``dtype``,
            or torch.float16 on the CPU, which keeps a float16 checkpoint's
            head as it is (half the bytes of float32, the largest read of a
            decode step) and computes it with ``ops.gemm_f16w`` in float32:
            the same values as a float32 head. :func:`pythia_native.load`
            picks it for Pythia's float16 checkpoints. A checkpoint whose head
            float16 cannot hold exactly is kept in ``dtype`` instead.
        dtype: activation dtype: float32 or bfloat16 on the CPU; float16 or
            bfloat16 on CUDA. LayerNorm, softmax and accumulation run in float32.
        dense_linears: block Linears kept dense (``nn.Linear`` in ``dtype``) in
            a 4-bit model, by full name ("gpt_neox.layers.0.attention.dense"):
            those a bitsandbytes checkpoint left unquantized
            (``llm_int8_skip_modules``). Their blocks run unfused.
        compute: the 4-bit Linears' arithmetic (``ops.gemm_4bit``): "float32",
            or "int16", where the CPU GEMV (decode steps) rounds x to int16 per
            64 elements: 1.6-2.4x faster GEMVs at M = 1 with AVX-512 VNNI, 2.4-4.4x with AVX2
            only; ~1e-4 relative error per Linear.
            An attribute read when the model is bound (each generate call).
    Parameters start as their modules' defaults (not a usable model); fill them
    with :meth:`load_tensors` (a checkpoint) or :meth:`from_hf` (a transformers
    model), or build one with :meth:`random`.
    """

    def __init__(
        self,
        config: PythiaConfig,
        *,
        quant_type: Optional[str] = DEFAULT_QUANT_TYPE,
        blocksize: int = DEFAULT_BLOCKSIZE,
        double_quant: bool = False,
        quantize_embed_out: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        head_dtype: Optional[torch.dtype] = None,
        compute: str = "float32",
        dense_linears: Collection[str] = (),
    ):
        super().__init__()
        self.compute = ops.check_compute(compute)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if head_dtype not in (None, dtype, torch.float16):
            raise ValueError(f"head_dtype must be None, the activation dtype or torch.float16, got {head_dtype}")
        if head_dtype == torch.float16 and dtype != torch.float16 and torch.device(device).type != "cpu":
            raise ValueError(
                "head_dtype=torch.float16 with non-float16 activations is for the CPU; on CUDA keep the head "
                "in the activation dtype (head_dtype=None)"
            )
        self.config = config
        self.quant_type = check_quant_type(quant_type) if quant_type is not None else None
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.quantize_embed_out = quantize_embed_out
        self.dtype = dtype
        known = {p[:-1] for p in _block_linear_prefixes(config)}
        unknown = sorted(set(dense_linears) - known)
        if unknown:
            raise ValueError(f"dense_linears: {unknown[:3]} are not block Linears of this config "
                             "(expected names like 'gpt_neox.layers.0.attention.dense')")
        self.dense_linears = frozenset(dense_linears) if self.quant_type is not None else frozenset()

        def make_linear(in_f: int, out_f: int, bias: bool, name: str) -> nn.Module:
            if self.quant_type is None or name in self.dense_linears:
                return nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)
            return QuantizedLinear(in_f, out_f, bias, blocksize=blocksize, quant_type=self.quant_type, dtype=dtype, device=device)

        with torch.device(device):
            self.gpt_neox = Backbone(config, make_linear, dtype)
        if quantize_embed_out and self.quant_type is not None:
            self.embed_out = QuantizedLinear(
                config.hidden_size, config.vocab_size, False, blocksize=blocksize, quant_type=self.quant_type,
                dtype=dtype, device=device,
            )
        else:
            self.embed_out = nn.Linear(
                config.hidden_size, config.vocab_size, bias=False, dtype=head_dtype or dtype, device=device
            )
        # A decode step's blocks as the fused op neox_block_ (Layer.bind); False
        # composes the per-op kernels instead (the same results up to
        # LayerNorm's summation order): for per-op profiles and comparisons.
        # Read when the model is bound, i.e. at each generate call.
        self.fuse_decode = True
        # Why the weights are a mix of two checkpoints (a load that failed half-way), else None.
        self.partial_load: Optional[str] = None
        # Bumped when load_tensors starts writing and again when it ends (odd:
        # a load is under way): engines sharing this model compare it around
        # each model call, so a request that overlapped another engine's
        # load_revision fails instead of mixing two revisions' weights.
        self.weights_generation = 0
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.gpt_neox.embed_in.weight.device

    def _apply(self, fn, recurse=True):
        # .half() / .bfloat16() / .float() / .to(dtype): the activation dtype is
        # fixed when a PythiaModel is built (LayerNorm and the block scales stay
        # float32, caches follow self.dtype), and a cast left a model failing in
        # its kernels ("mixed dtype", "k_cache must have qkv's dtype"). Refused
        # before anything changes; a device move (or to_empty) goes through.
        # Every floating dtype the model holds is probed (activations, float32
        # LayerNorm, a float16 head): .bfloat16() of a bfloat16 model would
        # still cast its LayerNorm.
        held = {t.dtype for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()} | {self.dtype}
        for dtype in held:
            probe = fn(torch.empty(0, dtype=dtype, device=self.device))
            if probe.dtype != dtype:
                raise TypeError(
                    f"PythiaModel: its dtypes are fixed when it is built (activations {self.dtype}, LayerNorm "
                    f"float32); the cast would turn its {dtype} tensors into {probe.dtype}. Build another with "
                    "pn.load(..., dtype=...) or PythiaModel(..., dtype=...) instead"
                )
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------- compute --

    def new_cache(self, max_batch: int, max_len: Optional[int] = None) -> KVCache:
        # None: the whole context. 0 is not None: KVCache refuses it.
        max_len = self.config.max_position_embeddings if max_len is None else max_len
        return KVCache(self.config, max_batch, max_len, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        *,
        span: Optional[int] = None,
        last_only: bool = True,
        hidden_states: Optional[list] = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Run new tokens through the model, writing their keys/values to ``cache``.

        input_ids, positions: int64 ``[B, T]`` (B <= cache.max_batch;
        positions < cache.max_len; negative = padding). ``span``: None for a
        decode step (attention through ``decode_attention``), else
        ``max(positions) + 1`` for a prefill through SDPA. Returns float32
        logits ``[B, vocab_size]`` of the last token of each row (all tokens:
        ``[B, T, vocab_size]`` with ``last_only=False``). ``hidden_states``, if
        a list, receives the residual stream after the embedding and after every block.
        ``head=False`` returns the final LayerNorm's output instead of the
        logits (``[B, hidden]`` / ``[B, T, hidden]``), for :meth:`logits` to
        take in pieces: all of a long text's logits at once are T x vocab
        float32 (412 MB at T = 2048), and a log-softmax over them as much again.
        """
        return self.bind()(input_ids, positions, cache, span=span, last_only=last_only,
                           hidden_states=hidden_states, head=head)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[..., vocab_size]`` of final-LayerNorm outputs ``h``
        ``[..., hidden]`` (what ``forward(..., head=False)`` returns): the head
        as ``forward`` applies it."""
        return self._bind_logits(ops.check_compute(self.compute))(h).float()

    def bind(self):
        """``forward`` as a plain function with every tensor looked up once (see
        "binding" above): valid while the model's tensors (and the layers'
        blocksize) stay the same, which an in-place load with the same layout
        keeps and a reallocating one does not; the generate loop binds again
        after every ``load_revision``."""
        if self.partial_load is not None:
            raise GenerationError(
                f"the model's weights are partly overwritten by a load that failed ({self.partial_load}); "
                "load a revision again (engine.load_revision) or load() the model anew"
            )
        embed_in = self.gpt_neox.embed_in.weight
        compute = ops.check_compute(self.compute)
        layers = [layer.bind(fuse=self.fuse_decode, compute=compute) for layer in self.gpt_neox.layers]
        final_layer_norm = _bind_layer_norm(self.gpt_neox.final_layer_norm)
        logits = self._bind_logits(compute)

        @torch.inference_mode()
        def run(input_ids, positions, cache, *, span=None, last_only=True, hidden_states=None, head=True):
            mask = None
            if span is not None:
                mask = prefill_mask(positions, span)
                _clear_unwritten_slots(cache, positions, span)
            # x is this call's own tensor: a decode step's layers update it in
            # place (Layer.bind), so the residual stream is copied when kept.
            x = F.embedding(input_ids, embed_in)
            if hidden_states is not None:
                hidden_states.append(x.clone())
            for layer, (k_cache, v_cache) in zip(layers, cache.layers):
                x = layer(x, positions, k_cache, v_cache, mask)
                if hidden_states is not None:
                    hidden_states.append(x.clone())
            if last_only:
                x = x[:, -1]
            x = final_layer_norm(x)
            return logits(x).float() if head else x

        return run

    def _bind_logits(self, compute: str = "float32"):
        """embed_out: ``[..., hidden] -> [..., vocab]``.

        A float16 head under float32/bfloat16 activations (``head_dtype``) goes
        through ``ops.gemm_f16w``: for pythia-160m's 50304 x 768 head on a
        2-core AVX-512 Xeon, 2.4 ms at M = 1 where a float32 head took 4.8 ms
        (``torch.mm``). Otherwise, on the CPU a dense head is computed as
        ``W @ x.T`` (matrix-vector for one row): measured on the same machine,
        ``F.linear`` takes 6.8 ms (bf16, one row) and 23 ms (fp32, 8 rows) where
        ``torch.mv`` / ``W @ x.T`` take 2.8 ms and 15.6 ms; the head is the
        largest matrix a decode step reads, so this is most of a step.
        """
        head = self.embed_out
        if isinstance(head, QuantizedLinear):
            return head.bind(compute)
        weight = head.weight

        def logits(x: torch.Tensor) -> torch.Tensor:
            if weight.dtype != x.dtype:  # a float16 head on the CPU (see head_dtype)
                return ops.gemm_f16w(x, weight)
            if x.device.type != "cpu":
                return F.linear(x, weight)
            rows = x.reshape(-1, x.shape[-1])
            if rows.shape[0] == 1:
                out = torch.mv(weight, rows[0]).unsqueeze(0)
            else:
                out = torch.mm(weight, rows.T).T
            return out.reshape(*x.shape[:-1], -1)

        return logits

    # ------------------------------------------------------------- loading --

    def _linear_prefixes(self) -> set[str]:
        return _block_linear_prefixes(self.config) | {"embed_out."}

    @torch.no_grad()
    def load_tensors(self, tensors, *, strict: bool = True) -> None:
        """Fill the model from ``(name, tensor)`` pairs in transformers' naming,
        one at a time (peak memory: the model plus the tensor in hand).

        ``tensors``: a ``weights.CheckpointReader``, a mapping (a state dict)
        or any iterable of pairs. Dense weights of 4-bit layers are quantized
        as they arrive. A layer that is already 4-bit in bitsandbytes' layout
        (``weight`` packed in any storage dtype plus ``weight.absmax``,
        ``weight.quant_state.*``, ...) is taken as it is, never re-quantized,
        once the whole checkpoint has been read (its entries may sit in
        different shards). Dense tensors are cast to the model's dtype
        (LayerNorm stays float32). Parameters are written in place, so
        captured CUDA graphs stay valid. The buffers in
        ``weights.SKIPPED_BUFFERS`` are ignored. With ``strict``, a missing or
        unknown key raises :class:`CheckpointError`.

        A reader or a mapping is checked whole before anything is written
        (names, shapes and dtypes from the file headers; each 4-bit layer's
        statistics), so a checkpoint that does not fit leaves the model as it
        was. Should writing still fail half-way (an I/O error while reading the
        data, NaN or infinite values, or a bad tensor of a plain iterable), the model is marked
        unusable (``partial_load``) and refuses to run until a load succeeds.

        Returns the model's ``weights_generation`` after the load. A second
        load into the model while one is under way (another thread's) raises
        :class:`LoadInProgressError` at once, before it writes anything.
        """
        keyed = isinstance(tensors, Mapping) or all(hasattr(tensors, a) for a in ("keys", "get", "spec"))
        four_bit = self._check_tensors(tensors, strict) if keyed else None
        state = {"wrote": False}
        # This load's token in _LOADING, taken and given back inside the try: a
        # KeyboardInterrupt right after a bare lock.acquire() left the model
        # refusing every later load. The generation is bumped through __dict__
        # (nn.Module.__setattr__ is Python code an interrupt can cut in two).
        token = object()
        try:
            with _LOADING_GUARD:
                if _LOADING.get(self) is not None:
                    raise LoadInProgressError(
                        "another load into this model is under way (load_revision of another engine over it?); "
                        "loads into one model must not overlap: its weights would be a mix of both"
                    )
                _LOADING[self] = token
            self.__dict__["weights_generation"] += 1
            try:
                self._write_tensors(tensors.items() if isinstance(tensors, Mapping) else tensors, four_bit, strict, state)
            except BaseException as e:
                if state["wrote"]:
                    self.partial_load = f"{type(e).__name__}: {e}".splitlines()[0]
                raise
            finally:
                self.__dict__["weights_generation"] += 1
            self.partial_load = None
            return self.weights_generation
        finally:
            with _LOADING_GUARD:
                if _LOADING.get(self) is token:
                    del _LOADING[self]

    @property
    def loading(self) -> bool:
        """Whether a load_tensors into this model is under way (another thread's)."""
        with _LOADING_GUARD:
            return _LOADING.get(self) is not None

    def _quantized_prefixes(self) -> set[str]:
        return {p for p in self._linear_prefixes() if isinstance(self.get_submodule(p[:-1]), QuantizedLinear)}

    def _check_tensors(self, source, strict: bool) -> set[str]:
        """Check a reader's or a mapping's every entry against the model, writing
        nothing; returns the prefixes of the layers the source holds in 4 bits.
        Raises :class:`CheckpointError` as :meth:`load_tensors` would."""

        def spec(key: str) -> tuple[tuple[int, ...], torch.dtype]:
            if isinstance(source, Mapping):
                t = source[key]
                return tuple(t.shape), t.dtype
            return source.spec(key)

        keys: dict[str, str] = {}  # our name -> the source's
        for key in source.keys():
            if not is_skipped_buffer(key):
                if _own_name(key) in keys:  # embed_out.* beside lm_head.*: one head, two copies
                    raise CheckpointError(f"checkpoint holds both {keys[_own_name(key)]} and {key}, "
                                          "two names of one tensor; keep one")
                keys[_own_name(key)] = key
        quantized = self._quantized_prefixes()
        layers: dict[str, list[str]] = {}
        for name in keys:
            prefix = _layer_of(name, quantized)
            if prefix is not None:
                layers.setdefault(prefix, []).append(name)
        # bitsandbytes entries beside the weight, or a packed (integer) weight, make a layer 4-bit;
        # the weight's storage dtype alone does not (bnb_4bit_quant_storage may be a float type).
        four_bit = {
            p for p, names in layers.items()
            if any(n != p + "weight" for n in names) or not spec(keys[p + "weight"])[1].is_floating_point
        }
        own = dict(self.named_parameters())
        seen: set[str] = set()
        unexpected: list[str] = []
        for name, key in keys.items():
            prefix = _layer_of(name, quantized)
            if prefix in four_bit:
                continue
            shape, dtype = spec(key)
            if prefix is not None:
                module = self.get_submodule(prefix[:-1])
                _check_dense(name, shape, dtype, (module.out_features, module.in_features), _QUANTIZABLE)
            elif name in own:
                _check_dense(name, shape, dtype, tuple(own[name].shape), None)
            else:
                unexpected.append(name)
                continue
            seen.add(name)
        for prefix in sorted(four_bit):
            entries = {}
            for name in layers[prefix]:
                if name == prefix + "weight":  # the packed bytes: checked by size, not read
                    shape, dtype = spec(keys[name])
                    entries[name] = torch.empty(shape, dtype=dtype, device="meta")
                else:
                    entries[name] = source.get(keys[name])
            _check_4bit_layer(self.get_submodule(prefix[:-1]), entries, prefix, unexpected)
            seen.add(prefix + "weight")
        if strict:
            _check_complete(own, quantized, seen, unexpected)
        return four_bit

    def _write_tensors(self, tensors, four_bit: Optional[set[str]], strict: bool, state: dict) -> None:
        """The writing half of :meth:`load_tensors`. ``four_bit``: the layers the
        source holds in 4 bits (:meth:`_check_tensors`), or None to tell them
        tensor by tensor (a plain iterable, checked here as it goes)."""
        own = {n: p for n, p in self.named_parameters()}
        quantized = self._quantized_prefixes()
        known = four_bit is not None
        four_bit = set(four_bit or ())
        pending: dict[str, dict[str, torch.Tensor]] = {}  # prefix -> bitsandbytes entries of one 4-bit layer
        seen: set[str] = set()
        unexpected: list[str] = []
        given: dict[str, str] = {}  # our name -> the name it came as
        for name, t in tensors:
            if is_skipped_buffer(name):
                continue
            if _own_name(name) in given:
                raise CheckpointError(f"checkpoint holds {given[_own_name(name)]} and {name}, "
                                      "two entries for one tensor; keep one")
            given[_own_name(name)] = name
            name = _own_name(name)
            layer_prefix = _layer_of(name, quantized)
            if layer_prefix is not None:
                module = self.get_submodule(layer_prefix[:-1])
                if not known and (name != layer_prefix + "weight" or not t.is_floating_point()):
                    four_bit.add(layer_prefix)
                if layer_prefix not in four_bit:
                    _check_dense(name, tuple(t.shape), t.dtype, (module.out_features, module.in_features), _QUANTIZABLE)
                    _check_finite(name, t)
                    state["wrote"] = True
                    # The model's format, not what a bitsandbytes revision loaded
                    # before left in the layer (another blocksize, say).
                    module.quantize_(t.to(self.device), compress_statistics=self.double_quant,
                                     blocksize=self.blocksize, quant_type=self.quant_type)
                    seen.add(name)
                else:
                    pending.setdefault(layer_prefix, {})[name] = t
                continue
            target = own.get(name)
            if target is None:
                unexpected.append(name)
                continue
            _check_dense(name, tuple(t.shape), t.dtype, tuple(target.shape), None)
            _check_finite(name, t)
            state["wrote"] = True
            if target is self.embed_out.weight and target.dtype == torch.float16 != self.dtype and not fits(t, torch.float16):
                # A head float16 cannot hold exactly: keep it in the activation dtype instead.
                target = self.embed_out.weight = nn.Parameter(
                    torch.empty(target.shape, dtype=self.dtype, device=target.device), requires_grad=False
                )
                own[name] = target
            target.copy_(t)
            seen.add(name)
        for prefix, entries in sorted(pending.items()):
            module = self.get_submodule(prefix[:-1])
            if not known:
                _check_4bit_layer(module, entries, prefix, unexpected)
            state["wrote"] = True
            try:
                module.load_quantized_(entries, prefix)
            except (KeyError, ValueError) as e:
                raise CheckpointError(_message(e)) from None
            seen.add(prefix + "weight")
        if strict:
            _check_complete(own, quantized, seen, unexpected)

    @classmethod
    def random(cls, config: PythiaConfig, *, seed: int = 0, std: float = 0.02, **kwargs) -> "PythiaModel":
        """A model with random weights (normal, ``std``; LayerNorm at 1/0), quantized
        like a checkpoint would be: for benchmarks and smoke tests with no download.
        The values are float16 numbers, as in Pythia's float16 checkpoints."""
        shapes = PythiaModel(config, quant_type=None, device="meta")
        model = cls(config, **kwargs)
        g = torch.Generator().manual_seed(seed)

        def tensors():
            for name, p in shapes.named_parameters():
                if "layernorm" in name or "layer_norm" in name:
                    yield name, (torch.ones if name.endswith("weight") else torch.zeros)(p.shape)
                else:
                    yield name, (torch.randn(p.shape, generator=g) * std).half().float()

        model.load_tensors(tensors())
        return model

    @classmethod
    def from_hf(cls, hf_model: nn.Module, **kwargs) -> "PythiaModel":
        """Quantize a transformers ``GPTNeoXForCausalLM`` (for tests and comparisons)."""
        config = PythiaConfig.from_dict(hf_model.config.to_dict())
        model = cls(config, **kwargs)
        model.load_tensors(hf_model.state_dict())
        return model

