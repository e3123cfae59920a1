"""neox_block_, the fused GPT-NeoX block of a decode step, against the same
block composed from the per-op kernels (pythia_native/block.py) and against
its twin in reference.py: every Pythia head dim, parallel and sequential
residual, bias or none, left padding, several new tokens per sequence, an
intermediate size that is not a multiple of the blocksize, more rows than the
small-M kernels take, every CPU ISA; then the errors, and the model taking it."""
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pythia_native as pn
from conftest import CPU_ISAS
from pythia_native import reference as ref
from pythia_native.block import composed_block_

# name: (hidden, heads, intermediate, rotary_ndims)
SHAPES = {
    "hd16": (64, 4, 256, 4),
    "hd80": (160, 2, 640, 20),
    "hd256": (512, 2, 2048, 64),
    "odd-inter": (96, 3, 200, 8),  # dense_4h_to_h's K = 200: rows straddle quant blocks
}


def _rel_err(y, y_ref):
    return ((y.double() - y_ref.double()).abs().max() / y_ref.double().abs().max()).item()


def make_block(shape, dtype, *, bias=True, parallel=True, quant_type="nf4", blocksize=64, device="cpu", seed=0,
               compute="float32"):
    """The op's arguments after (x, positions, k_cache, v_cache), as a dict for ops.neox_block_."""
    hidden, heads, inter, rot = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)

    def linear(n, k):
        w = torch.randn(n, k, generator=g) / k**0.5
        packed, absmax = pn.quantize_4bit(w, blocksize, quant_type)
        b = (0.1 * torch.randn(n, generator=g)).to(dtype).to(device) if bias else None
        return packed.to(device), absmax.to(device), b

    def layer_norm():
        return (1 + 0.2 * torch.randn(hidden, generator=g)).to(device), (0.1 * torch.randn(hidden, generator=g)).to(device)

    return dict(
        ln1=layer_norm(), ln2=layer_norm(), eps=1e-5,
        linears=[linear(3 * hidden, hidden), linear(hidden, hidden), linear(inter, hidden), linear(hidden, inter)],
        intermediate_size=inter, blocksize=blocksize, quant_type=quant_type, rotary_ndims=rot,
        rope_theta=10000.0, scale=(hidden // heads) ** -0.5, parallel_residual=parallel, compute=compute,
    )


def make_inputs(shape, dtype, B, T, *, L=40, device="cpu", seed=1):
    """x [B, T, hidden]; positions ending somewhere in a cache that already holds
    content, sequence 1 left-padded; caches [B + 1, H, L, D]."""
    hidden, heads, _, _ = SHAPES[shape]
    D = hidden // heads
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, hidden, generator=g).to(dtype).to(device)
    pos = torch.empty(B, T, dtype=torch.int64)
    for b in range(B):
        end = int(torch.randint(T - 1, L, (1,), generator=g))
        pos[b] = torch.arange(end - T + 1, end + 1)
    if B > 1:
        pos[1] = torch.arange(T) - max(1, T // 2)
    k = torch.randn(B + 1, heads, L, D, generator=g).to(dtype).to(device)
    v = torch.randn(B + 1, heads, L, D, generator=g).to(dtype).to(device)
    return x, pos.to(device), k, v


def flat_args(x, pos, k, v, p):
    """The op's positional arguments, in its schema's order."""
    lin = [t for triple in p["linears"] for t in triple]
    return (
        x, pos, k, v, *p["ln1"], *p["ln2"], p["eps"], *lin, p["intermediate_size"], p["blocksize"],
        p["quant_type"], p["rotary_ndims"], p["rope_theta"], p["scale"], p["parallel_residual"], p["compute"],
    )


def run_three(shape, dtype, B, T, *, device="cpu", **kw):
    """(fused, composed, reference) results: each a (x, k_cache, v_cache) after the block."""
    p = make_block(shape, dtype, device=device, **kw)
    x, pos, k, v = make_inputs(shape, dtype, B, T, device=device)
    fused = [t.clone() for t in (x, k, v)]
    pn.ops.neox_block_(fused[0], pos, fused[1], fused[2], **p)
    composed = [t.clone() for t in (x, k, v)]
    composed_block_(*flat_args(composed[0], pos, composed[1], composed[2], p))
    # The reference in float32 from the same (rounded) inputs: the yardstick of bf16.
    # (in float32 arithmetic whatever the op's compute mode)
    p32 = dict(p, linears=[(a, b, None if c is None else c.float()) for a, b, c in p["linears"]])
    del p32["compute"]
    reference = [t.float().clone() for t in (x, k, v)]
    ref.neox_block_(reference[0], pos, reference[1], reference[2], **p32)
    return fused, composed, reference


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 3)])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_fused_equals_composition_float32(shape, B, T, parallel):
    fused, composed, reference = run_three(shape, torch.float32, B, T, parallel=parallel)
    # Same kernels in the same order; only LayerNorm's float32 sums differ.
    for f, c, r, name in zip(fused, composed, reference, ("x", "k_cache", "v_cache")):
        assert _rel_err(f, c) <= 1e-5, name
        assert _rel_err(f, r) <= 1e-5, name


@pytest.mark.parametrize("shape", ["hd16", "hd80", "odd-inter"])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 3)])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_fused_bfloat16_within_twice_the_composition_error(shape, B, T, parallel):
    fused, composed, reference = run_three(shape, torch.bfloat16, B, T, parallel=parallel)
    for f, c, r, name in zip(fused, composed, reference, ("x", "k_cache", "v_cache")):
        assert f.dtype == torch.bfloat16
        assert _rel_err(f, r) <= 2 * _rel_err(c, r) + 1e-6, name


@pytest.mark.parametrize("cpu_isa", ["avx512", "avx2"], indirect=True)  # the ISAs with an int16 kernel
@pytest.mark.parametrize("shape", ["hd80", "hd256"])  # hd80: only K = 640 (down) takes int16; hd256: all four
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 3), (3, 6)])  # M = 18: every Linear in float32
def test_fused_int16_equals_composition_int16(cpu_isa, shape, B, T):
    fused, composed, reference = run_three(shape, torch.float32, B, T, compute="int16")
    plain, _, _ = run_three(shape, torch.float32, B, T)
    for f, c, r, name in zip(fused, composed, reference, ("x", "k_cache", "v_cache")):
        assert _rel_err(f, c) <= 1e-5, name  # the same int16 kernels through the op and the composition
        assert _rel_err(f, r) <= 1e-3, name  # int16's own error, within one block
    if B * T <= pn.build_info()["cpu_gemv_int16_max_m"]:
        assert not torch.equal(fused[0], plain[0])  # int16 did run
    else:
        assert torch.equal(fused[0], plain[0])  # M above the int16 GEMV: float32 throughout


def test_composition_fills_the_schema_defaults():
    # The dispatcher gives a Python kernel (the CUDA one is composed_block_)
    # only the arguments its caller passed: compute left out means "float32".
    p = make_block("hd256", torch.float32)
    x, pos, k, v = make_inputs("hd256", torch.float32, 1, 1)
    full = [t.clone() for t in (x, k, v)]
    composed_block_(*flat_args(full[0], pos, full[1], full[2], p))
    short = [t.clone() for t in (x, k, v)]
    composed_block_(*flat_args(short[0], pos, short[1], short[2], p)[:-1])
    assert all(torch.equal(a, b) for a, b in zip(full, short))


def test_no_bias_fp4_blocksize_128():
    fused, composed, _ = run_three("hd80", torch.float32, 2, 1, bias=False, quant_type="fp4", blocksize=128)
    for f, c in zip(fused, composed):
        assert _rel_err(f, c) <= 1e-5


@pytest.mark.parametrize("B", [5, 17, 70])  # the GEMV, the small-M tiles, BLAS panels (M > 64)
def test_rows_through_every_gemm_path(B):
    fused, composed, _ = run_three("hd16", torch.float32, B, 1)
    for f, c in zip(fused, composed):
        assert _rel_err(f, c) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["hd16", "odd-inter"])
def test_strided_biases_give_the_contiguous_result(dtype, shape):
    # A float32 bias that is a strided view was made contiguous into a temporary
    # freed before the GEMVs read it: garbage (up to 1e20) in x.
    p = make_block(shape, dtype)
    strided = []
    for packed, absmax, b in p["linears"]:
        wide = torch.full((2 * b.numel(),), float("nan"), dtype=b.dtype)
        wide[::2] = b
        strided.append((packed, absmax, wide[::2]))
    assert not strided[0][2].is_contiguous()
    x, pos, k, v = make_inputs(shape, dtype, 2, 1)
    want = [t.clone() for t in (x, k, v)]
    pn.ops.neox_block_(want[0], pos, want[1], want[2], **p)
    for _ in range(3):  # the freed memory's contents vary from call to call
        got = [t.clone() for t in (x, k, v)]
        pn.ops.neox_block_(got[0], pos, got[1], got[2], **dict(p, linears=strided))
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_empty_batch_changes_nothing():
    p = make_block("hd16", torch.float32)
    x, pos, k, v = make_inputs("hd16", torch.float32, 1, 1)
    k0, v0 = k.clone(), v.clone()
    x = x[:0]
    pn.ops.neox_block_(x, pos[:0], k, v, **p)
    assert torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("path", ["op", "composition"])
def test_arguments_that_share_memory_with_what_it_writes_are_refused(path, device):
    # x and the caches are written in place while the weights, biases and the
    # other cache are read: k_cache passed as v_cache, or a bias that is a view
    # of x, gave a silently different x (by up to ~1).
    op = torch.ops.pythia_native.neox_block_
    block = composed_block_ if path == "composition" else op
    p = make_block("hd16", torch.float32, device=device)
    x, pos, k, v = make_inputs("hd16", torch.float32, 1, 1, device=device)
    args = list(flat_args(x, pos, k, v, p))
    names = [a.name for a in op.default._schema.arguments]
    hidden = x.shape[-1]
    wide = torch.randn(2 * hidden, device=device)
    x_in_wide = wide[:hidden].view(1, 1, hidden)
    cases = [
        ("k_cache and v_cache share memory", {"v_cache": k}),
        ("down_bias shares memory with x", {"x": x_in_wide, "down_bias": wide[hidden // 2 :][:hidden]}),
        ("ln2_weight shares memory with k_cache", {"ln2_weight": k.view(-1)[:hidden]}),
        # The same memory through a separate storage (torch.from_numpy twice on
        # one array, torch.frombuffer, from_dlpack) passed the check.
        ("k_cache and v_cache share memory", {"v_cache": torch.from_dlpack(k)}),
        ("x and k_cache share memory", {"x": torch.from_dlpack(k).view(-1)[:hidden].view(1, 1, hidden)}),
    ]
    for msg, swap in cases:
        a = list(args)
        for name, t in swap.items():
            a[names.index(name)] = t
        before = [t.clone() for t in (x, k, v, wide)]
        with pytest.raises(RuntimeError, match=f"neox_block_: {msg}"):
            block(*a)
        assert all(torch.equal(t, b) for t, b in zip((x, k, v, wide), before))


def test_cache_shape_product_is_overflow_checked():
    # An empty cache can claim any H: H * D = 2**64 + 8 wrapped to x's hidden
    # size 8 and the op accepted it (UBSan: signed overflow).
    p = make_block("hd16", torch.float32)
    x, pos, k, v = make_inputs("hd16", torch.float32, 1, 1)
    hidden, D = x.shape[-1], k.shape[-1]
    H = (2**64 + hidden) // D
    assert (H * D) % 2**64 == hidden
    k, v = (torch.empty_strided((0, H, 1, D), (0, D, D, 1)) for _ in range(2))
    with pytest.raises(RuntimeError, match="neox_block_: x's hidden size"):
        torch.ops.pythia_native.neox_block_(*flat_args(x[:0], pos[:0], k, v, p))


@pytest.mark.parametrize("path", ["op", "composition"])
def test_inference_tensors_are_updated_outside_inference_mode(path, device):
    # x and the caches made under inference_mode, the block called outside it
    # (as rotary_kv_cache_ allows): the composition (the CUDA kernel) refused
    # with "Inplace update to inference tensor outside InferenceMode".
    block = composed_block_ if path == "composition" else torch.ops.pythia_native.neox_block_
    p = make_block("hd16", torch.float32, device=device)
    x, pos, k, v = make_inputs("hd16", torch.float32, 2, 1, device=device)
    expected = [t.clone() for t in (x, k, v)]
    block(*flat_args(*expected[:1], pos, *expected[1:], p))
    with torch.inference_mode():
        got = [t.clone() for t in (x, k, v)]
    block(*flat_args(*got[:1], pos, *got[1:], p))
    for g, e, name in zip(got, expected, ("x", "k_cache", "v_cache")):
        assert g.is_inference()
        assert torch.equal(g, e), name


@pytest.mark.parametrize("cpu_isa", CPU_ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_cpu_isa(cpu_isa, dtype):
    fused, composed, reference = run_three("hd80", dtype, 2, 2)
    for f, c, r in zip(fused, composed, reference):
        if dtype == torch.float32:
            assert _rel_err(f, c) <= 1e-5
        else:
            assert _rel_err(f, r) <= 2 * _rel_err(c, r) + 1e-6


def test_padding_token_writes_no_cache_slot():
    p = make_block("hd16", torch.float32)
    x, pos, k, v = make_inputs("hd16", torch.float32, 2, 3)
    assert (pos[1] < 0).any()
    k0, v0 = k.clone(), v.clone()
    pn.ops.neox_block_(x, pos, k, v, **p)
    written = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool)
    for b in range(2):
        for t in range(3):
            if pos[b, t] >= 0:
                written[b, pos[b, t]] = True
    untouched = ~written
    assert torch.equal(k.transpose(1, 2)[untouched], k0.transpose(1, 2)[untouched])
    assert torch.equal(v.transpose(1, 2)[untouched], v0.transpose(1, 2)[untouched])
    assert not torch.equal(k.transpose(1, 2)[written], k0.transpose(1, 2)[written])


# ------------------------------------------------------------------ errors ---


def _bad(name):
    """(mutate(args dict), message fragment) for each bad input."""
    cases = {
        "x int": (lambda a: a.update(x=a["x"].long()), "x must be float32, float16 or bfloat16"),
        "x 2-d": (lambda a: a.update(x=a["x"][0]), "x must have shape [B, T, hidden]"),
        "x strided": (lambda a: a.update(x=torch.randn(2, 1, 128)[..., ::2]), "x must be contiguous"),
        "cache dtype": (lambda a: a.update(k=a["k"].double()), "k_cache must have x's dtype"),
        "cache heads": (lambda a: a.update(k=a["k"][:, :2].contiguous(), v=a["v"][:, :2].contiguous()), "must equal the cache's H * D"),
        "cache batch": (lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), "fewer than x's batch"),
        "positions dtype": (lambda a: a.update(pos=a["pos"].int()), "positions must be int64"),
        "positions shape": (lambda a: a.update(pos=a["pos"][:1]), "positions must have shape [B, T] = [2, 1]"),
        "position past cache": (lambda a: a["pos"].fill_(40), "positions must be < L = 40"),
        "ln1 shape": (lambda a: a["p"].update(ln1=(a["p"]["ln1"][0][:5], a["p"]["ln1"][1])), "ln1_weight must have shape [64]"),
        "ln2 dtype": (lambda a: a["p"].update(ln2=(a["p"]["ln2"][0], a["p"]["ln2"][1].double())), "ln2_bias must be float32"),
        "qkv packed": (lambda a: a["p"]["linears"].__setitem__(0, (a["p"]["linears"][0][0][:-1],) + a["p"]["linears"][0][1:]), "qkv_packed must hold (12288 + 1) / 2 = 6144 bytes"),
        "up absmax": (lambda a: a["p"]["linears"].__setitem__(2, (a["p"]["linears"][2][0], a["p"]["linears"][2][1].half(), a["p"]["linears"][2][2])), "up_absmax must be float32"),
        "down bias": (lambda a: a["p"]["linears"].__setitem__(3, a["p"]["linears"][3][:2] + (a["p"]["linears"][3][2].double(),)), "down_bias must have x's dtype"),
        "intermediate": (lambda a: a["p"].update(intermediate_size=255), "up_packed must hold"),
        "blocksize": (lambda a: a["p"].update(blocksize=48), "blocksize must be a power of two"),
        "quant type": (lambda a: a["p"].update(quant_type="int4"), "quant_type must be 'nf4' or 'fp4'"),
        "rotary odd": (lambda a: a["p"].update(rotary_ndims=3), "rotary_ndims must be even"),
        "eps nan": (lambda a: a["p"].update(eps=float("nan")), "eps must be a finite float32 >= 0, got nan"),
        "eps past float32": (lambda a: a["p"].update(eps=1e39), "eps must be a finite float32 >= 0"),
        "rope_theta 0": (lambda a: a["p"].update(rope_theta=0.0), "rope_theta must be a finite float32 > 0, got 0"),
        "rope_theta inf": (lambda a: a["p"].update(rope_theta=float("inf")), "rope_theta must be a finite float32 > 0"),
        "scale nan": (lambda a: a["p"].update(scale=float("nan")), "scale must be a finite float32, got nan"),
    }
    return cases[name]


@pytest.mark.parametrize("case", [
    "x int", "x 2-d", "x strided", "cache dtype", "cache heads", "cache batch", "positions dtype",
    "positions shape", "position past cache", "ln1 shape", "ln2 dtype", "qkv packed", "up absmax",
    "down bias", "intermediate", "blocksize", "quant type", "rotary odd", "eps nan", "eps past float32",
    "rope_theta 0", "rope_theta inf", "scale nan",
])
@pytest.mark.parametrize("path", ["op", "composition", "meta"])
def test_bad_input_names_the_argument_and_changes_nothing(case, path):
    # "meta": the fake kernel (torch.compile, FakeTensor) runs the op's checks too,
    # all but the one that reads the positions' values.
    if path == "meta" and case in ("position past cache", "x strided"):
        pytest.skip("a value check (the kernel's), or a layout .to('meta') does not keep")
    p = make_block("hd16", torch.float32)
    x, pos, k, v = make_inputs("hd16", torch.float32, 2, 1)
    a = dict(x=x, pos=pos, k=k, v=v, p=dict(p, linears=list(p["linears"])))
    mutate, message = _bad(case)
    mutate(a)
    before = [t.clone() for t in (a["x"], a["k"], a["v"])]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        if path == "op":
            pn.ops.neox_block_(a["x"], a["pos"], a["k"], a["v"], **a["p"])
        elif path == "meta":
            args = [t.to("meta") if isinstance(t, torch.Tensor) else t
                    for t in flat_args(a["x"], a["pos"], a["k"], a["v"], a["p"])]
            torch.ops.pythia_native.neox_block_(*args)
        else:
            composed_block_(*flat_args(a["x"], a["pos"], a["k"], a["v"], a["p"]))
    for t, t0 in zip((a["x"], a["k"], a["v"]), before):
        assert torch.equal(t, t0)


def test_opcheck(device):
    p = make_block("hd16", torch.float32, device=device)
    x, pos, k, v = make_inputs("hd16", torch.float32, 2, 2, device=device)
    torch.library.opcheck(torch.ops.pythia_native.neox_block_, flat_args(x, pos, k, v, p))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_within_twice_the_low_precision_reference_error_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    # The same rounded inputs for all three: the op on CUDA, the reference in
    # dtype on the CPU (the yardstick: plain PyTorch rounding where the op
    # rounds) and the reference in float32.
    p = make_block("hd80", dtype)
    x, pos, k, v = make_inputs("hd80", dtype, 2, 2)
    on_gpu = [t.cuda() for t in (x, k, v)]
    p_gpu = dict(p, ln1=tuple(t.cuda() for t in p["ln1"]), ln2=tuple(t.cuda() for t in p["ln2"]),
                 linears=[tuple(None if t is None else t.cuda() for t in lin) for lin in p["linears"]])
    pn.ops.neox_block_(on_gpu[0], pos.cuda(), on_gpu[1], on_gpu[2], **p_gpu)
    low = [t.clone() for t in (x, k, v)]
    ref.neox_block_(low[0], pos, low[1], low[2], **p)
    p32 = dict(p, linears=[(a, b, None if c is None else c.float()) for a, b, c in p["linears"]])
    exact = [t.float() for t in (x, k, v)]
    ref.neox_block_(exact[0], pos, exact[1], exact[2], **p32)
    for g, lo, r, name in zip(on_gpu, low, exact, ("x", "k_cache", "v_cache")):
        assert g.dtype == dtype
        assert _rel_err(g.cpu(), r) <= 2 * _rel_err(lo, r) + 1e-6, name


# ------------------------------------------------------------- the model ---


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _tiny_model(**kw):
    from pythia_native.config import PythiaConfig
    from pythia_native.model import PythiaModel

    cfg = PythiaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=256, max_position_embeddings=64, **kw)
    return PythiaModel.random(cfg)


def test_model_decode_step_runs_one_fused_op_per_layer():
    model = _tiny_model()
    cache = model.new_cache(1, 16)
    model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], cache, span=3)
    with _OpLog() as log:
        model(torch.tensor([[8]]), torch.tensor([[3]]), cache)
    assert log.names.count("pythia_native.neox_block_") == 3
    assert "pythia_native.gemm_4bit" not in log.names


def test_model_with_tanh_gelu_composes_the_ops():
    model = _tiny_model(hidden_act="gelu_new")
    cache = model.new_cache(1, 16)
    with _OpLog() as log:
        model(torch.tensor([[8]]), torch.tensor([[0]]), cache)
    assert "pythia_native.neox_block_" not in log.names
    assert log.names.count("pythia_native.gemm_4bit") == 12


def test_layer_forward_and_decode_hidden_states_do_not_alias():
    model = _tiny_model()
    cache = model.new_cache(1, 16)
    layer = model.gpt_neox.layers[0]
    x = torch.randn(1, 1, 64)
    x0 = x.clone()
    k, v = cache.layers[0]
    y = layer(x, torch.tensor([[0]]), k, v, None)
    assert torch.equal(x, x0) and not torch.equal(y, x)
    hs = []
    model(torch.tensor([[9]]), torch.tensor([[1]]), cache, hidden_states=hs)
    assert len(hs) == 4
    assert torch.equal(hs[0], model.gpt_neox.embed_in.weight[9].view(1, 1, -1))
    assert len({t.data_ptr() for t in hs}) == 4


def test_fuse_decode_off_composes_the_ops_with_the_same_tokens():
    from pythia_native.generate import Pythia

    model = _tiny_model()
    engine = Pythia(model, max_batch=1, max_len=48)
    fused = engine.generate_ids([5, 6, 7, 8], 24, ignore_eos=True)
    model.fuse_decode = False
    cache = model.new_cache(1, 16)
    with _OpLog() as log:
        model(torch.tensor([[8]]), torch.tensor([[0]]), cache)
    assert "pythia_native.neox_block_" not in log.names and log.names.count("pythia_native.gemm_4bit") == 12
    assert engine.generate_ids([5, 6, 7, 8], 24, ignore_eos=True) == fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B, T", [(1, 1), (1, 7), (2, 33), (3, 300)])
def test_prefill_of_whole_rows_takes_sdpa_causal_masking_with_the_same_bits(dtype, B, T):
    # Rows 0..T-1 (no padding, span T) take SDPA's is_causal, which skips the
    # masked half; it must give what the explicit mask gives, bit for bit (a
    # batch of prompts of one length against the same prompts left-padded).
    from pythia_native.block import CAUSAL, prefill_attention, prefill_mask

    g = torch.Generator().manual_seed(T)
    H, D, L = 2, 64, 320
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k, v = (torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(2))
    positions = torch.arange(T).expand(B, T)
    assert prefill_mask(positions, T) is CAUSAL
    explicit = (torch.arange(T)[None, None, :] <= positions[:, :, None])[:, None]
    with torch.inference_mode():
        assert torch.equal(prefill_attention(q, k, v, CAUSAL, 0.125), prefill_attention(q, k, v, explicit, 0.125))
    # Anything else keeps the explicit mask: a padded row, a span beyond T (tokens after a cache).
    padded = positions.clone()
    padded[0, 0] = -1
    assert prefill_mask(padded, T) is not CAUSAL and prefill_mask(positions + 2, T + 2) is not CAUSAL
