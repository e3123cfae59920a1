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


def test_dequantize_absmax_bad_args():
    absmax_q = torch.randint(0, 256, (300,), dtype=torch.uint8)
    nested, code = torch.rand(2), torch.linspace(-1, 1, 256)
    with pytest.raises(RuntimeError, match="absmax_q must be uint8"):
        pn.dequantize_absmax(absmax_q.int(), nested, code, 0.5)
    with pytest.raises(RuntimeError, match="nested_absmax must be float32"):
        pn.dequantize_absmax(absmax_q, nested.double(), code, 0.5)
    with pytest.raises(RuntimeError, match="nested_code must be float32 with 256 entries"):
        pn.dequantize_absmax(absmax_q, nested, code[:-1], 0.5)
    with pytest.raises(RuntimeError, match=r"nested_absmax must hold ceil\(300 / 256\) = 2 values, got \[3\]"):
        pn.dequantize_absmax(absmax_q, torch.rand(3), code, 0.5)
    # A corrupt quant_state's offset or nested block size: an error, not NaN
    # absmax (or an allocation of nested_blocksize floats, as there was).
    for offset, shown in ((float("nan"), "nan"), (float("inf"), "inf"), (1e39, r"1e\+39")):
        with pytest.raises(RuntimeError, match=f"offset must be a finite float32, got {shown}"):
            pn.dequantize_absmax(absmax_q, nested, code, offset)
    for nb in (0, -256, 2**31 + 1, 2**62):
        with pytest.raises(RuntimeError, match=r"nested_blocksize must be in \[1, 2\^31\], got " + str(nb)):
            pn.dequantize_absmax(absmax_q, torch.rand(1), code, 0.5, nb)
    # The largest block size is fine (one nested scale for everything).
    one = pn.dequantize_absmax(absmax_q, torch.tensor([2.0]), code, 0.5, 2**31)
    assert torch.equal(one, code[absmax_q.long()] * 2.0 + 0.5)


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


def test_weight_shapes_past_int64_raise():
    # 2^33 x 2^31 = 2^64 wraps to 0 in int64: empty packed / absmax tensors
    # would then pass the size checks and the kernel would index rows it was
    # never given. x is a stride-0 view, so [1, 2^31] costs no memory.
    empty_p, empty_a = torch.zeros(0, dtype=torch.uint8), torch.zeros(0)
    x = torch.zeros(1).expand(1, 2**31)
    with pytest.raises(RuntimeError, match=r"gemm_4bit: a weight of shape \(8589934592, 2147483648\) "
                       r"has more than 2\^62 elements"):
        pn.gemm_4bit(x, empty_p, empty_a, (2**33, 2**31))
    # Within int64 but past the 2^62 bound (kMaxWeightNumel in ops.h), which
    # keeps (numel + 1) / 2 and ceil(numel / blocksize) far from wrapping.
    with pytest.raises(RuntimeError, match="more than 2\\^62 elements"):
        pn.gemm_4bit(torch.zeros(1).expand(1, 2**61), empty_p, empty_a, (3, 2**61))
    with pytest.raises(RuntimeError, match="dequantize_4bit: a weight of shape .* has more than 2\\^62"):
        pn.dequantize_4bit(empty_p, empty_a, (2**32, 2**32))
    with pytest.raises(RuntimeError, match="more than 2\\^62"):
        pn.dequantize_4bit(empty_p, empty_a, (2**30, 2**31, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_mismatch(q):
    packed, absmax = q
    with pytest.raises(RuntimeError, match="x and packed must be on the same device"):
        pn.gemm_4bit(torch.randn(2, 64, device="cuda"), packed, absmax, (7, 64))
    with pytest.raises(RuntimeError, match="packed and absmax must be on the same device"):
        pn.gemm_4bit(torch.randn(2, 64), packed, absmax.cuda(), (7, 64))


def test_set_cpu_isa_rejects_unknown():
    with pytest.raises(ValueError, match="expected 'avx512', 'avx2'"):
        pn._C.set_cpu_isa("sse9")
    with pytest.raises(pn.DeviceError, match="set_cpu_isa: expected one of 'avx512', 'avx2', 'scalar', 'auto', got 'AVX2'"):
        pn.set_cpu_isa("AVX2")
    from conftest import CPU_ISAS, isa_supported

    before = pn._C.cpu_isa()
    try:
        for isa in CPU_ISAS:
            if isa_supported(isa):
                pn.set_cpu_isa(isa)
                assert pn.build_info()["cpu_isa_active"] == isa
            else:  # a CPU without it: refused, naming it, and the ISA in use stays
                with pytest.raises(pn.DeviceError, match=f"set_cpu_isa='{isa}': this CPU does not support {isa}"):
                    pn.set_cpu_isa(isa)
        pn.set_cpu_isa("auto")
        assert pn.build_info()["cpu_isa_active"] == pn.build_info()["cpu_isa_best"]
    finally:
        pn.set_cpu_isa(before)


def _run_python(code, **env):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_cpu_isa_from_the_environment():
    p = _run_python("import pythia_native as pn; print(pn.build_info()['cpu_isa_active'])", PYTHIA_NATIVE_CPU_ISA="scalar")
    assert p.returncode == 0 and p.stdout.split() == ["scalar"], p.stderr
    p = _run_python("import pythia_native", PYTHIA_NATIVE_CPU_ISA="sse")
    assert p.returncode == 1 and "DeviceError: PYTHIA_NATIVE_CPU_ISA: expected one of 'avx512'" in p.stderr
    # The command line: one line, exit 2.
    p = _run_python("import sys, _pythia_native_cli; sys.exit(_pythia_native_cli.main(['revisions', 'pythia-14m']))",
                    PYTHIA_NATIVE_CPU_ISA="sse")
    assert p.returncode == 2 and p.stderr == (
        "pythia-native: error: PYTHIA_NATIVE_CPU_ISA: expected one of 'avx512', 'avx2', 'scalar', 'auto', got 'sse'\n")


_BLOCK_IMPORT = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == {name!r}:\n"
    "            raise {error}\n"
    "sys.meta_path.insert(0, Block())\n"
    "import _pythia_native_cli\n"
    "sys.exit(_pythia_native_cli.main(['revisions', 'pythia-14m']))\n")


@pytest.mark.parametrize("name, error, one_line", [
    # A dependency that is not installed: one line, naming it.
    ("tokenizers", "ModuleNotFoundError(\"No module named 'tokenizers'\", name='tokenizers')", True),
    # The extension not loading: one line, saying to rebuild.
    ("pythia_native._C", "ImportError('undefined symbol: _ZN3c10')", True),
    # An import error inside the package is a bug: its traceback.
    ("pythia_native.sampling", "ImportError(\"cannot import name 'top_p'\")", False),
    ("pythia_native.sampling", "ModuleNotFoundError(\"No module named 'x'\", name='pythia_native.x')", False),
])
def test_the_command_line_reports_import_failures_by_whose_they_are(name, error, one_line):
    p = _run_python(_BLOCK_IMPORT.format(name=name, error=error))
    if one_line:
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("pythia-native: error:"), p.stderr
    else:
        assert p.returncode == 1 and "Traceback" in p.stderr, p.stderr


def test_an_extension_that_does_not_load_says_to_rebuild():
    # As an extension built against another torch fails (its symbols missing).
    p = _run_python(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pythia_native._C':\n"
        "            raise ImportError('_C.so: undefined symbol: _ZN3c1015SmallVectorBase')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pythia_native\n")
    assert p.returncode == 1
    assert ("ImportError: pythia_native._C could not be loaded (_C.so: undefined symbol: _ZN3c1015SmallVectorBase): "
            "it must be built, against the torch installed here (") in p.stderr, p.stderr
    assert "make build" in p.stderr


def _attn_args(dtype=torch.float32):
    B, T, H, D, L = 2, 3, 2, 32, 7
    qkv = torch.randn(B, T, H * 3 * D, dtype=dtype)
    q = torch.randn(B, T, H, D, dtype=dtype)
    k = torch.zeros(B, H, L, D, dtype=dtype)
    v = torch.zeros(B, H, L, D, dtype=dtype)
    pos = torch.tensor([[0, 1, 2], [3, 4, 5]])
    return qkv, q, k, v, pos


def test_rotary_kv_cache_bad_args():
    qkv, _, k, v, pos = _attn_args()
    with pytest.raises(RuntimeError, match="qkv must be float32, float16 or bfloat16"):
        pn.rotary_kv_cache_(qkv.double(), pos, k, v, 8)
    with pytest.raises(RuntimeError, match=r"qkv must have shape \[B, T, H \* 3 \* D\]"):
        pn.rotary_kv_cache_(qkv[0], pos, k, v, 8)
    with pytest.raises(RuntimeError, match=r"qkv must have shape \[B, T, H \* 3 \* D\] = \[2, 3, 192\]"):
        pn.rotary_kv_cache_(qkv[..., :-1], pos, k, v, 8)
    with pytest.raises(RuntimeError, match="k_cache must have qkv's dtype"):
        pn.rotary_kv_cache_(qkv, pos, k.half(), v, 8)
    with pytest.raises(RuntimeError, match="v_cache must have qkv's dtype"):
        pn.rotary_kv_cache_(qkv, pos, k, v.bfloat16(), 8)
    with pytest.raises(RuntimeError, match=r"k_cache must have shape \[Bc, H, L, D\]"):
        pn.rotary_kv_cache_(qkv, pos, k[0], v, 8)
    with pytest.raises(RuntimeError, match="k_cache must be contiguous"):
        pn.rotary_kv_cache_(qkv, pos, k.transpose(2, 3).contiguous().transpose(2, 3), v, 8)
    with pytest.raises(RuntimeError, match="k_cache and v_cache must have one shape"):
        pn.rotary_kv_cache_(qkv, pos, k, v[:, :, :5].contiguous(), 8)
    with pytest.raises(RuntimeError, match="k_cache holds 1 sequences, fewer than qkv's batch B = 2"):
        pn.rotary_kv_cache_(qkv, pos, k[:1], v[:1], 8)
    with pytest.raises(RuntimeError, match="positions must be int64"):
        pn.rotary_kv_cache_(qkv, pos.int(), k, v, 8)
    with pytest.raises(RuntimeError, match=r"positions must have shape \[B, T\] = \[2, 3\]"):
        pn.rotary_kv_cache_(qkv, pos[:, :2], k, v, 8)
    for r in (-2, 7, 34):
        with pytest.raises(RuntimeError, match="rotary_ndims must be even and in"):
            pn.rotary_kv_cache_(qkv, pos, k, v, r)
    with pytest.raises(RuntimeError, match=r"positions must be < L = 7 \(the cache length\), got 7"):
        pn.rotary_kv_cache_(qkv, torch.tensor([[0, 1, 2], [3, 4, 7]]), k, v, 8)
    # The base of the angles: 0, negative or non-finite (as float32) makes them NaN/inf.
    for theta, shown in ((0.0, "0"), (-10000.0, "-10000"), (float("nan"), "nan"), (float("inf"), "inf"), (1e39, r"1e\+39")):
        with pytest.raises(RuntimeError, match=rf"rotary_kv_cache_: rope_theta must be a finite float32 > 0, got {shown}"):
            pn.rotary_kv_cache_(qkv, pos, k, v, 8, theta)
    assert not k.any() and not v.any()  # nothing was written


def test_decode_attention_bad_args():
    _, q, k, v, pos = _attn_args()
    with pytest.raises(RuntimeError, match="q must be float32, float16 or bfloat16"):
        pn.decode_attention(q.double(), k, v, pos)
    with pytest.raises(RuntimeError, match=r"q must have shape \[B, T, H, D\]"):
        pn.decode_attention(q[0], k, v, pos)
    with pytest.raises(RuntimeError, match="k_cache must have q's dtype"):
        pn.decode_attention(q, k.bfloat16(), v, pos)
    with pytest.raises(RuntimeError, match="v_cache must have q's dtype"):
        pn.decode_attention(q, k, v.half(), pos)
    with pytest.raises(RuntimeError, match="v_cache must be contiguous"):
        pn.decode_attention(q, k, v.transpose(0, 1).contiguous().transpose(0, 1), pos)
    with pytest.raises(RuntimeError, match=r"k_cache must have shape \[Bc, H, L, D\] with q's H = 2 and D = 32"):
        pn.decode_attention(q, k[:, :1].contiguous(), v[:, :1].contiguous(), pos)
    with pytest.raises(RuntimeError, match="k_cache holds 1 sequences, fewer than q's batch B = 2"):
        pn.decode_attention(q, k[:1], v[:1], pos)
    with pytest.raises(RuntimeError, match="k_cache must have L >= 1 slots"):
        pn.decode_attention(q, k[:, :, :0], v[:, :, :0], pos)
    with pytest.raises(RuntimeError, match="head dim D must be a multiple of 8 and at most 256"):
        pn.decode_attention(q[..., :20].contiguous(), k[..., :20].contiguous(), v[..., :20].contiguous(), pos)
    with pytest.raises(RuntimeError, match="head dim D must be a multiple of 8 and at most 256"):
        big = torch.zeros(2, 1, 1, 264)
        pn.decode_attention(torch.zeros(2, 3, 1, 264), big, big, pos)
    with pytest.raises(RuntimeError, match="positions must be int64"):
        pn.decode_attention(q, k, v, pos.float())
    with pytest.raises(RuntimeError, match=r"positions must have shape \[B, T\] = \[2, 3\]"):
        pn.decode_attention(q, k, v, pos.view(-1))
    # An inf or NaN scale turns every score into inf/NaN: an error, not NaN rows.
    for scale, shown in ((float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf"), (1e39, r"1e\+39")):
        with pytest.raises(RuntimeError, match=rf"decode_attention: scale must be a finite float32, got {shown}"):
            pn.decode_attention(q, k, v, pos, scale)
    pn.decode_attention(q, k, v, pos, 0.0)  # finite: uniform attention, fine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_cuda_device_mismatch():
    qkv, q, k, v, pos = _attn_args()
    with pytest.raises(RuntimeError, match="k_cache must be on qkv's device"):
        pn.rotary_kv_cache_(qkv.cuda(), pos.cuda(), k, v.cuda(), 8)
    with pytest.raises(RuntimeError, match="positions must be on the device of the other tensors"):
        pn.rotary_kv_cache_(qkv.cuda(), pos, k.cuda(), v.cuda(), 8)
    with pytest.raises(RuntimeError, match="v_cache must be on q's device"):
        pn.decode_attention(q.cuda(), k.cuda(), v, pos.cuda())
    with pytest.raises(RuntimeError, match="positions must be on the device of the other tensors"):
        pn.decode_attention(q.cuda(), k.cuda(), v.cuda(), pos)
    # A cache view that starts off a 16-byte boundary (the kernel reads 16-byte rows).
    flat = torch.zeros(k.numel() + 1, device="cuda")
    odd = flat[1:].view(k.shape)
    with pytest.raises(RuntimeError, match="must start on a 16-byte boundary"):
        pn.decode_attention(q.cuda(), odd, odd, pos.cuda())
