"""torch.library.opcheck on every op: schema, fake kernel, dispatch."""
import pytest
import torch

import pythia_native as pn  # noqa: F401

ops = torch.ops.pythia_native


def _args(device):
    w = torch.randn(33, 128, device=device)
    packed, absmax = ops.quantize_4bit(w, 64, "nf4")
    return w, packed, absmax


def test_quantize_4bit(device):
    w, _, _ = _args(device)
    torch.library.opcheck(ops.quantize_4bit, (w, 64, "nf4"))
    torch.library.opcheck(ops.quantize_4bit, (w.half()[:, :7], 128, "fp4"))


def test_dequantize_4bit(device):
    _, packed, absmax = _args(device)
    torch.library.opcheck(ops.dequantize_4bit, (packed, absmax, 64, "nf4", [33, 128], torch.bfloat16))


def test_dequantize_absmax(device):
    q = torch.randint(0, 256, (300,), dtype=torch.uint8, device=device)
    torch.library.opcheck(ops.dequantize_absmax, (q, torch.rand(2, device=device), torch.linspace(-1, 1, 256, device=device), 0.1, 256))


@pytest.mark.parametrize("M", [0, 1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_4bit(M, dtype, device):
    _, packed, absmax = _args(device)
    x = torch.randn(M, 128, device=device, dtype=dtype)
    bias = torch.randn(33, device=device, dtype=dtype)
    torch.library.opcheck(ops.gemm_4bit, (x, packed, absmax, bias, 33, 128, 64, "nf4"))
    torch.library.opcheck(ops.gemm_4bit, (x, packed, absmax, None, 33, 128, 64, "nf4"))
    torch.library.opcheck(ops.gemm_4bit, (x, packed, absmax, bias, 33, 128, 64, "nf4", "int16"))


def test_gemm_4bit_under_torch_compile():
    _, packed, absmax = _args("cpu")
    x = torch.randn(4, 128)

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        return pn.gemm_4bit(x, packed, absmax, (33, 128)) * 2

    torch.testing.assert_close(f(x), pn.gemm_4bit(x, packed, absmax, (33, 128)) * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_kv_cache_(dtype, device):
    B, T, H, D, L = 2, 3, 2, 32, 7
    qkv = torch.randn(B, T, H * 3 * D, device=device, dtype=dtype)
    positions = torch.tensor([[0, 1, 2], [-1, 3, 4]], device=device)
    k = torch.zeros(B + 1, H, L, D, device=device, dtype=dtype)
    v = torch.zeros_like(k)
    torch.library.opcheck(ops.rotary_kv_cache_, (qkv, positions, k, v, 8, 10000.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_attention(dtype, device):
    B, T, H, D, L = 2, 3, 2, 32, 7
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = torch.randn(B + 1, H, L, D, device=device, dtype=dtype)
    v = torch.randn_like(k)
    positions = torch.tensor([[0, 1, 2], [-1, 3, 6]], device=device)
    torch.library.opcheck(ops.decode_attention, (q, k, v, positions, 0.125))


def test_attention_under_torch_compile():
    B, T, H, D, L = 1, 2, 2, 32, 5
    qkv = torch.randn(B, T, H * 3 * D)
    positions = torch.tensor([[1, 2]])
    k, v = torch.zeros(B, H, L, D), torch.zeros(B, H, L, D)
    k2, v2 = k.clone(), v.clone()

    @torch.compile(backend="eager", fullgraph=True)
    def f(qkv, k, v):
        q = pn.rotary_kv_cache_(qkv, positions, k, v, 8)
        return pn.decode_attention(q, k, v, positions) * 2

    out = f(qkv, k, v)
    q = pn.rotary_kv_cache_(qkv, positions, k2, v2, 8)
    torch.testing.assert_close(out, pn.decode_attention(q, k2, v2, positions) * 2)
    assert torch.equal(k, k2) and torch.equal(v, v2)  # the in-place writes happened


@pytest.mark.parametrize("M", [0, 1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_f16w(M, dtype, device):
    w = torch.randn(33, 40, device=device).half()
    x = torch.randn(M, 40, device=device, dtype=dtype)
    torch.library.opcheck(ops.gemm_f16w, (x, w, torch.randn(33, device=device, dtype=dtype)))
    torch.library.opcheck(ops.gemm_f16w, (x, w, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gelu(dtype, device):
    torch.library.opcheck(ops.gelu, (torch.randn(3, 70, device=device, dtype=dtype),))
    torch.library.opcheck(ops.gelu, (torch.randn(0, device=device, dtype=dtype),))


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.quantize_4bit(_meta(100), 0, "nf4"), r"blocksize must be a power of two in \[32, 4096\], got 0"),
    (lambda: ops.quantize_4bit(_meta(100, dtype=torch.int64), 64, "nf4"), "weight must be float32, float16 or bfloat16"),
    (lambda: ops.quantize_4bit(_meta(100), 64, "nf5"), "quant_type must be 'nf4' or 'fp4'"),
    (lambda: ops.dequantize_4bit(_meta(50, 1, dtype=torch.uint8), _meta(2), 64, "nf4", [10, 10], torch.int32),
     "dtype must be float32"),
    (lambda: ops.dequantize_4bit(_meta(49, 1, dtype=torch.uint8), _meta(2), 64, "nf4", [10, 10], torch.float32),
     r"packed must hold \(100 \+ 1\) / 2 = 50 bytes"),
    (lambda: ops.gemm_4bit(_meta(2, 128), _meta(3072, 1, dtype=torch.uint8), _meta(96, dtype=torch.float16), None,
                           48, 128, 64, "nf4"), "absmax must be float32"),
    (lambda: ops.gemm_4bit(_meta(2, 128), _meta(3072, 1, dtype=torch.uint8), _meta(95), None, 48, 128, 64, "nf4"),
     r"absmax must hold ceil\(6144 / 64\) = 96 block scales"),
    (lambda: ops.gemm_4bit(_meta(2, 128), _meta(3072, 1, dtype=torch.uint8), _meta(96), _meta(47), 48, 128, 64, "nf4"),
     r"bias must have shape \[48\]"),
    (lambda: ops.gemm_4bit(_meta(2, 128), _meta(3072, 1, dtype=torch.uint8), _meta(96), None, 48, 128, 64, "nf4", "int8"),
     "compute must be 'float32' or 'int16', got 'int8'"),
    (lambda: ops.gemm_f16w(_meta(2, 40), _meta(40), None), "weight must be float16, got Float"),
    (lambda: ops.gelu(_meta(5, dtype=torch.int64)), "x must be float32, float16 or bfloat16"),
    (lambda: ops.decode_attention(_meta(2, 1, 2, 16), _meta(2, 2, 8, 17), _meta(2, 2, 8, 17),
                                  _meta(2, 1, dtype=torch.int64), 1.0), "k_cache must have shape"),
    (lambda: ops.decode_attention(_meta(2, 1, 2, 16), _meta(2, 2, 8, 16), _meta(2, 2, 8, 16),
                                  _meta(2, 1, dtype=torch.int32), 1.0), "positions must be int64"),
    (lambda: ops.decode_attention(_meta(2, 1, 2, 16), _meta(2, 2, 8, 16, dtype=torch.float16),
                                  _meta(2, 2, 8, 16, dtype=torch.float16), _meta(2, 1, dtype=torch.int64), 1.0),
     "k_cache must have q's dtype Float, got Half"),
    (lambda: ops.rotary_kv_cache_(_meta(1, 1, 96, dtype=torch.int32), _meta(1, 1, dtype=torch.int64),
                                  _meta(1, 2, 8, 16), _meta(1, 2, 8, 16), 4, 1e4), "qkv must be float32"),
    (lambda: ops.rotary_kv_cache_(_meta(1, 1, 96), _meta(1, 1, dtype=torch.int64),
                                  _meta(1, 2, 8, 16), _meta(1, 2, 8, 16), 3, 1e4), "rotary_ndims must be even"),
])
def test_fake_kernels_check_what_metadata_decides(call, match):
    # A traced call (meta / FakeTensor, torch.compile) fails where the eager one
    # would, with a message that names the argument, not a ZeroDivisionError or
    # an unpacking error from the shape arithmetic.
    with pytest.raises(RuntimeError, match=match):
        call()


def _cases():
    """(name, op, args) that the CPU kernels refuse on metadata alone."""
    w = torch.randn(48, 128)
    packed, absmax = pn.quantize_4bit(w)
    pos, k, v = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16)
    qkv, q = torch.randn(2, 3, 96), torch.randn(2, 3, 2, 16)
    code, nested = torch.linspace(-1, 1, 256), torch.rand(2)
    return [
        ("rotary 2-D qkv", ops.rotary_kv_cache_, (qkv[0], pos, k, v, 8, 1e4)),
        ("rotary positions [3, 2]", ops.rotary_kv_cache_, (qkv, pos.t(), k, v, 8, 1e4)),
        ("rotary Bc < B", ops.rotary_kv_cache_, (qkv, pos, k[:1], v[:1], 8, 1e4)),
        ("rotary H = 0", ops.rotary_kv_cache_, (qkv[..., :0], pos, k[:, :0], v[:, :0], 8, 1e4)),
        ("rotary ndims > 256", ops.rotary_kv_cache_, (torch.randn(1, 1, 3 * 264), pos[:1, :1],
                                                     torch.zeros(1, 1, 2, 264), torch.zeros(1, 1, 2, 264), 258, 1e4)),
        ("decode positions [3, 2]", ops.decode_attention, (q, k, v, pos.t(), 0.25)),
        ("decode Bc < B", ops.decode_attention, (q, k[:1], v[:1], pos, 0.25)),
        ("decode D = 12", ops.decode_attention, (q[..., :12], k[..., :12], v[..., :12], pos, 0.25)),
        ("decode L = 0", ops.decode_attention, (q, k[:, :, :0], v[:, :, :0], pos, 0.25)),
        ("decode strided cache", ops.decode_attention, (q, k.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :, :16],
                                                         v.transpose(0, 1).contiguous().transpose(0, 1), pos, 0.25)),
        ("gemm_4bit 0-d x", ops.gemm_4bit, (torch.tensor(1.0), packed, absmax, None, 48, 128, 64, "nf4")),
        ("gemm_4bit strided packed", ops.gemm_4bit, (torch.randn(2, 128), torch.cat([packed, packed], 1)[:, :1], absmax, None,
                                                     48, 128, 64, "nf4")),
        ("gemm_f16w strided weight", ops.gemm_f16w, (torch.randn(2, 40), torch.randn(40, 33).half().t(), None)),
        ("gemm_f16w n = 0", ops.gemm_f16w, (torch.randn(2, 40), torch.randn(0, 40).half(), None)),
        ("gemm_f16w 0-d x", ops.gemm_f16w, (torch.tensor(1.0), torch.randn(3, 40).half(), None)),
        ("dequantize strided absmax", ops.dequantize_4bit, (packed, torch.stack([absmax, absmax], 1)[:, 0], 64, "nf4",
                                                           [48, 128], torch.float32)),
        ("dequantize negative shape", ops.dequantize_4bit, (packed, absmax, 64, "nf4", [-48, -128], torch.float32)),
        ("absmax nested size", ops.dequantize_absmax, (torch.zeros(300, dtype=torch.uint8), torch.rand(3), code, 0.5, 256)),
        ("absmax float64 code", ops.dequantize_absmax, (torch.zeros(300, dtype=torch.uint8), nested, code.double(), 0.5, 256)),
    ]


def _first_line(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the message is what is compared
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return "no error"


def _as_meta(a):
    return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta") if isinstance(a, torch.Tensor) else a


@pytest.mark.parametrize("case", range(len(_cases())))
def test_fake_kernels_raise_what_the_op_raises(case):
    # The fake kernels run the op's own C++ checks on static shapes: on meta
    # tensors and under FakeTensorMode each of these once passed (or failed
    # with an IndexError from the shape arithmetic) where the CPU op refused.
    from torch._subclasses.fake_tensor import FakeTensorMode

    name, op, args = _cases()[case]
    eager = _first_line(lambda: op(*args))
    assert eager.startswith("RuntimeError: pythia_native."), (name, eager)
    assert _first_line(lambda: op(*[_as_meta(a) for a in args])) == eager, name
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert _first_line(lambda: op(*fake)) == eager, name


def test_one_meta_argument_among_real_ones_is_refused():
    # The dispatcher sends such a call to the fake kernel; it returned an
    # uninitialized CPU tensor (values like -4e30) and skipped the caches' writes.
    w = torch.randn(48, 128)
    packed, absmax = pn.quantize_4bit(w)
    x = torch.randn(2, 128)
    with pytest.raises(RuntimeError, match="gemm_4bit: bias must be on x's device cpu, got meta"):
        ops.gemm_4bit(x, packed, absmax, torch.randn(48, device="meta"), 48, 128, 64, "nf4")
    with pytest.raises(RuntimeError, match="gemm_f16w: bias must be on x's device cpu, got meta"):
        ops.gemm_f16w(x, w.half(), torch.randn(48, device="meta"))
    k, v = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    pos = torch.zeros(1, 1, dtype=torch.int64, device="meta")
    with pytest.raises(RuntimeError, match="rotary_kv_cache_: positions must be on the device of the other tensors cpu"):
        ops.rotary_kv_cache_(torch.randn(1, 1, 96), pos, k, v, 8, 1e4)
    with pytest.raises(RuntimeError, match="decode_attention: positions must be on the device of the other tensors cpu"):
        ops.decode_attention(torch.randn(1, 1, 2, 16), k, v, pos, 0.25)


def test_compiled_call_with_a_bad_blocksize_names_it():
    @torch.compile(backend="eager", fullgraph=True)
    def f(w):
        return pn.quantize_4bit(w, 0)

    with pytest.raises(Exception, match="blocksize must be a power of two"):
        f(torch.randn(64))

