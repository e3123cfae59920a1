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
