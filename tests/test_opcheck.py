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
     "packed must hold 50 bytes"),
    (lambda: ops.gemm_4bit(_meta(2, 128), _meta(3072, 1, dtype=torch.uint8), _meta(96, dtype=torch.float16), None,
                           48, 128, 64, "nf4"), "absmax must be float32"),
    (lambda: ops.gemm_4bit(_meta(2, 128), _meta(3072, 1, dtype=torch.uint8), _meta(95), None, 48, 128, 64, "nf4"),
     "absmax must hold 96 block scales"),
    (lambda: ops.gemm_4bit(_meta(2, 128), _meta(3072, 1, dtype=torch.uint8), _meta(96), _meta(47), 48, 128, 64, "nf4"),
     r"bias must have shape \[48\]"),
    (lambda: ops.gemm_4bit(_meta(2, 128), _meta(3072, 1, dtype=torch.uint8), _meta(96), None, 48, 128, 64, "nf4", "int8"),
     "compute must be one of"),
    (lambda: ops.gemm_f16w(_meta(2, 40), _meta(40), None), "weight must be a 2-D float16 tensor"),
    (lambda: ops.gelu(_meta(5, dtype=torch.int64)), "x must be float32, float16 or bfloat16"),
    (lambda: ops.decode_attention(_meta(2, 1, 2, 16), _meta(2, 2, 8, 17), _meta(2, 2, 8, 17),
                                  _meta(2, 1, dtype=torch.int64), 1.0), "k_cache must have shape"),
    (lambda: ops.decode_attention(_meta(2, 1, 2, 16), _meta(2, 2, 8, 16), _meta(2, 2, 8, 16),
                                  _meta(2, 1, dtype=torch.int32), 1.0), "positions must be int64"),
    (lambda: ops.decode_attention(_meta(2, 1, 2, 16), _meta(2, 2, 8, 16, dtype=torch.float16),
                                  _meta(2, 2, 8, 16, dtype=torch.float16), _meta(2, 1, dtype=torch.int64), 1.0),
     "k_cache and v_cache must have the activations' dtype"),
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


def test_compiled_call_with_a_bad_blocksize_names_it():
    @torch.compile(backend="eager", fullgraph=True)
    def f(w):
        return pn.quantize_4bit(w, 0)

    with pytest.raises(Exception, match="blocksize must be a power of two"):
        f(torch.randn(64))

