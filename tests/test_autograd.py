"""Autograd through the ops (csrc/autograd.cpp): gemm_4bit, gemm_f16w and gelu
are differentiable in their activations (gradients equal to torch's for the
same dequantized weight); a backward through the inference-only ops is an
error that names the op, never a silently missing (None) gradient."""
import pytest
import torch
import torch.nn.functional as F

import pythia_native as pn
from pythia_native import QuantizedLinear

ops = torch.ops.pythia_native


def _layer(device, n=48, k=128, seed=0):
    torch.manual_seed(seed)
    return QuantizedLinear.from_linear(torch.nn.Linear(k, n)).to(device)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
@pytest.mark.parametrize("shape", [(5, 128), (2, 3, 128), (1, 128), (0, 128)], ids=str)
@pytest.mark.parametrize("compute", ["float32", "int16"])
def test_gemm_4bit_gradients_match_a_dense_linear(dtype, tol, shape, compute, device):
    q = _layer(device).to(dtype)
    q.compute = compute
    q.bias.requires_grad_(True)
    w = q.dequantize(dtype)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(*shape[:-1], 48, device=device, dtype=dtype)
    q(x).backward(g)
    xr = x.detach().clone().requires_grad_(True)
    br = q.bias.detach().clone().requires_grad_(True)
    F.linear(xr, w, br).backward(g)
    assert x.grad.shape == x.shape and q.bias.grad.dtype == dtype
    torch.testing.assert_close(x.grad, xr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(q.bias.grad, br.grad, rtol=tol, atol=tol)


def test_gemm_4bit_gradient_of_a_noncontiguous_x(device):
    q = _layer(device)
    base = torch.randn(128, 6, device=device, requires_grad=True)
    x = base.t()  # [6, 128], strides (1, 6)
    q(x).sum().backward()
    torch.testing.assert_close(base.grad, q.dequantize().sum(0).view(128, 1).expand(128, 6))


def test_gemm_4bit_refuses_an_absmax_that_requires_grad(device):
    q = _layer(device)
    absmax = q.absmax.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="gemm_4bit: absmax requires grad, but the 4-bit weight is frozen"):
        pn.gemm_4bit(torch.randn(2, 128, device=device), q.weight, absmax, (48, 128))
    with torch.no_grad():  # no graph is built: nothing to refuse
        pn.gemm_4bit(torch.randn(2, 128, device=device), q.weight, absmax, (48, 128))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_f16w_gradients(dtype, device):
    torch.manual_seed(0)
    w = torch.randn(33, 40, device=device).half().requires_grad_(True)
    b = torch.randn(33, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 3, 40, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 3, 33, device=device, dtype=dtype)
    pn.gemm_f16w(x, w, b).backward(g)
    xr, wr, br = (t.detach().float().requires_grad_(True) for t in (x, w, b))
    F.linear(xr, wr, br).backward(g.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (dtype, torch.float16, dtype)
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad.float(), wr.grad, rtol=1e-3, atol=1e-3)  # float16 rounding
    torch.testing.assert_close(b.grad.float(), br.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gelu_gradient_is_the_exact_derivative(dtype, device):
    x = torch.linspace(-8, 8, 1001, device=device, dtype=dtype).requires_grad_(True)
    pn.gelu(x).backward(torch.ones_like(x))
    xd = x.detach().double()
    want = 0.5 * torch.special.erfc(-xd / 2**0.5) + xd * torch.exp(-0.5 * xd * xd) / (2 * torch.pi) ** 0.5
    torch.testing.assert_close(x.grad.double(), want.to(dtype).double(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_inference_ops_refuse_a_backward_by_name(device):
    B, T, H, D, L = 1, 1, 2, 32, 4
    q = torch.randn(B, T, H, D, device=device, requires_grad=True)
    k, v = torch.randn(B, H, L, D, device=device), torch.randn(B, H, L, D, device=device)
    out = pn.decode_attention(q, k, v, torch.tensor([[2]], device=device))
    with pytest.raises(RuntimeError, match="derivative for pythia_native::decode_attention is not implemented"):
        out.sum().backward()
    layer = _layer(device)
    absmax = layer.absmax.clone().requires_grad_(True)
    w = pn.dequantize_4bit(layer.weight, absmax, (48, 128))
    with pytest.raises(RuntimeError, match="derivative for pythia_native::dequantize_4bit is not implemented"):
        w.sum().backward()


def _block_args_with_grad(device, which: str):
    from test_block import flat_args, make_block, make_inputs

    p = make_block("hd16", torch.float32, device=device)
    x, pos, k, v = make_inputs("hd16", torch.float32, 1, 1, device=device)
    args = list(flat_args(x, pos, k, v, p))
    names = [a.name for a in ops.neox_block_.default._schema.arguments]
    i = names.index(which)
    if which == "x":  # a non-leaf: the op would overwrite it and keep its grad_fn
        args[i] = torch.randn_like(args[i], requires_grad=True) * 1.0
    else:
        args[i] = args[i].detach().clone().requires_grad_(True)
    return args


@pytest.mark.parametrize("which", ["x", "k_cache", "ln1_weight", "qkv_bias"])
def test_in_place_ops_refuse_inputs_that_require_grad(which, device):
    # They write x / the caches in place and have no backward. torch's fallback
    # let them run: x kept its old grad_fn (a backward took the block for the
    # identity), a ln1_weight that required grad left x without one, gradients
    # to qkv through the caches were None. Now the call is refused, by name;
    # under no_grad / inference_mode it runs.
    args = _block_args_with_grad(device, which)
    with pytest.raises(RuntimeError, match=f"neox_block_: {which} requires grad, but this op writes"):
        ops.neox_block_(*args)
    with torch.no_grad():
        ops.neox_block_(*args)
    B, T, H, D, L = 1, 2, 2, 32, 8
    pos = torch.tensor([[0, 1]], device=device)
    qkv = torch.randn(B, T, H * 3 * D, device=device)
    k, v = torch.zeros(B, H, L, D, device=device), torch.zeros(B, H, L, D, device=device)
    for name, call in [
        ("qkv", lambda: pn.rotary_kv_cache_(qkv.clone().requires_grad_(True), pos, k, v, 8)),
        ("k_cache", lambda: pn.rotary_kv_cache_(qkv, pos, k.clone().requires_grad_(True), v, 8)),
        ("v_cache", lambda: pn.rotary_kv_cache_(qkv, pos, k, v * torch.ones(1, requires_grad=True, device=device), 8)),
    ]:
        with pytest.raises(RuntimeError, match=f"rotary_kv_cache_: {name} requires grad, but this op writes"):
            call()
    with torch.inference_mode():
        pn.rotary_kv_cache_(qkv.clone().requires_grad_(True), pos, k, v, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_with_gradients(dtype, device):
    # opcheck's autograd checks only look at the Autograd kernel when an input requires grad.
    q = _layer(device)
    x = torch.randn(3, 128, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(48, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(ops.gemm_4bit, (x, q.weight, q.absmax, b, 48, 128, 64, "nf4"))
    w = torch.randn(48, 128, device=device).half().requires_grad_(True)
    torch.library.opcheck(ops.gemm_f16w, (x, w, b))
    torch.library.opcheck(ops.gelu, (x,))


@pytest.mark.parametrize("weight_grad", [False, True])
def test_gradients_without_a_bias(weight_grad, device):
    # bias=None: the backward indexed past its inputs (RuntimeError: Index out of range).
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(torch.nn.Linear(128, 48, bias=False)).to(device)
    x = torch.randn(3, 128, device=device, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(3, 128), rtol=1e-5, atol=1e-5)
    w = torch.randn(33, 40, device=device).half().requires_grad_(weight_grad)
    x = torch.randn(2, 40, device=device, requires_grad=True)
    pn.gemm_f16w(x, w, None).sum().backward()
    torch.testing.assert_close(x.grad, w.detach().float().sum(0).expand(2, 40), rtol=1e-5, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(w.grad.float(), x.detach().sum(0).expand(33, 40), rtol=1e-3, atol=1e-3)
    torch.library.opcheck(ops.gemm_4bit, (x.detach().new_zeros(2, 128).requires_grad_(True), q.weight, q.absmax,
                                          None, 48, 128, 64, "nf4"))


def test_in_place_ops_bump_the_version_counters_of_what_they_write(device):
    # As torch's in-place ops do: autograd then refuses a backward through a
    # value saved before the write, instead of using the overwritten data.
    from test_block import flat_args, make_block, make_inputs

    from pythia_native.block import composed_block_

    B, T, H, D, L = 1, 2, 2, 32, 8
    qkv = torch.randn(B, T, H * 3 * D, device=device)
    k, v = torch.zeros(B, H, L, D, device=device), torch.zeros(B, H, L, D, device=device)
    pn.rotary_kv_cache_(qkv, torch.tensor([[0, 1]], device=device), k, v, 8)
    assert (k._version, v._version) == (1, 1)
    p = make_block("hd16", torch.float32, device=device)
    x, pos, k, v = make_inputs("hd16", torch.float32, 1, 1, device=device)
    for block in (lambda *a: ops.neox_block_(*a), composed_block_):
        before = (x._version, k._version, v._version)
        block(*flat_args(x, pos, k, v, p))
        assert all(a > b for a, b in zip((x._version, k._version, v._version), before))
    # A cache value saved for backward, then overwritten (under no_grad, as
    # the op requires of a tensor that requires grad): the backward is refused.
    leaf = torch.randn(B, H, L, D, device=device, requires_grad=True)
    saved = leaf * 1.0
    loss = (saved * saved).sum()
    with torch.no_grad():
        pn.rotary_kv_cache_(qkv, torch.tensor([[0, 1]], device=device), saved, torch.zeros_like(saved), 8)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Inference tensors have no counter: written in or out of inference_mode, no error.
    with torch.inference_mode():
        ki, vi = torch.zeros(B, H, L, D, device=device), torch.zeros(B, H, L, D, device=device)
        pn.rotary_kv_cache_(qkv, torch.tensor([[0, 1]], device=device), ki, vi, 8)
    pn.rotary_kv_cache_(qkv, torch.tensor([[0, 1]], device=device), ki, vi, 8)
