"""Bad input: a clear error that names the argument, from C++ and Python alike."""
import pytest
import torch

import pythia_native as pn

ops = torch.ops.pythia_native


@pytest.fixture
def q():
    w = torch.randn(7, 64)
    packed, absmax = pn.quantize_4bit(w)
    return packed, absmax


def test_quantize_bad_args():
    with pytest.raises(RuntimeError, match="weight must be float32, float16 or bfloat16"):
        pn.quantize_4bit(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        pn.quantize_4bit(torch.ones(4, 4), blocksize=48)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        pn.quantize_4bit(torch.ones(4, 4), blocksize=8192)
    with pytest.raises(RuntimeError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        pn.quantize_4bit(torch.ones(4, 4), quant_type="int4")


def test_dequantize_bad_args(q):
    packed, absmax = q
    with pytest.raises(RuntimeError, match="packed must hold"):
        pn.dequantize_4bit(packed, absmax, (8, 64))
    with pytest.raises(RuntimeError, match="absmax must hold"):
        pn.dequantize_4bit(packed, absmax[:-1], (7, 64))
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        pn.dequantize_4bit(packed.to(torch.int8), absmax, (7, 64))
    with pytest.raises(RuntimeError, match="absmax must be float32"):
        pn.dequantize_4bit(packed, absmax.half(), (7, 64))
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        pn.dequantize_4bit(packed, absmax, (7, 64), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="shape must be non-negative"):
        pn.dequantize_4bit(packed, absmax, (-7, -64))


def test_gemm_bad_args(q):
    packed, absmax = q
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"x must have shape \[..., k\] with k = 64"):
        pn.gemm_4bit(torch.randn(2, 63), packed, absmax, (7, 64))
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        pn.gemm_4bit(x.double(), packed, absmax, (7, 64))
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        pn.gemm_4bit(x, packed, absmax, (7, 64), torch.zeros(7, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"bias must have shape \[7\]"):
        pn.gemm_4bit(x, packed, absmax, (7, 64), torch.zeros(8))
    with pytest.raises(RuntimeError, match="packed must hold"):
        pn.gemm_4bit(x, packed[:-1], absmax, (7, 64))
    with pytest.raises(RuntimeError, match="absmax must hold"):
        pn.gemm_4bit(x, packed, absmax[:3], (7, 64))
    with pytest.raises(RuntimeError, match="absmax must be float32"):
        pn.gemm_4bit(x, packed, absmax.to(torch.uint8), (7, 64))
    with pytest.raises(RuntimeError, match="weight shape .* must be positive"):
        pn.gemm_4bit(x, packed, absmax, (0, 64))
    with pytest.raises(RuntimeError, match="packed must be contiguous"):
        pn.gemm_4bit(x, torch.zeros(448, dtype=torch.uint8)[::2], absmax, (7, 64))
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        pn.gemm_4bit(x, packed, absmax, (7, 64), blocksize=100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_mismatch(q):
    packed, absmax = q
    with pytest.raises(RuntimeError, match="x and packed must be on the same device"):
        pn.gemm_4bit(torch.randn(2, 64, device="cuda"), packed, absmax, (7, 64))
    with pytest.raises(RuntimeError, match="packed and absmax must be on the same device"):
        pn.gemm_4bit(torch.randn(2, 64), packed, absmax.cuda(), (7, 64))


def test_set_cpu_isa_rejects_unknown():
    with pytest.raises(ValueError, match="expected 'avx512_bf16', 'avx512', 'avx2'"):
        pn._C.set_cpu_isa("sse9")
