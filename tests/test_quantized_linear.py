"""QuantizedLinear: built from nn.Linear or from a bitsandbytes state dict;
state_dict() in the bitsandbytes serialized layout, both directions."""
import json

import pytest
import torch
from torch import nn

import pythia_native as pn
from pythia_native import QuantizedLinear


def _linear(k=128, n=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
def test_from_linear_forward(quant_type, compress, device):
    lin = _linear().to(device)
    q = QuantizedLinear.from_linear(lin, quant_type=quant_type, compress_statistics=compress)
    x = torch.randn(5, 128, device=device)
    w = q.dequantize(torch.float32)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, w, lin.bias.detach()), rtol=1e-5, atol=1e-6)
    # Rounding to the nearest code: the error is at most half the widest gap of the table, times absmax.
    code = pn.code_table(quant_type).sort().values
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    assert (w - lin.weight.detach()).abs().max() <= half_gap * lin.weight.detach().abs().max() * (1 + 1e-3)


def test_state_dict_layout():
    q = QuantizedLinear.from_linear(_linear(), quant_type="nf4")
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"}
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (128 * 48 // 2, 1)
    record = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert record == {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [48, 128]}
    qd = QuantizedLinear.from_linear(_linear(), quant_type="fp4", compress_statistics=True)
    sd = qd.state_dict()
    assert sd["weight.absmax"].dtype == torch.uint8
    assert {"weight.nested_absmax", "weight.nested_quant_map", "weight.quant_state.bitsandbytes__fp4"} <= set(sd)
    record = json.loads(bytes(sd["weight.quant_state.bitsandbytes__fp4"].tolist()))
    assert record["nested_blocksize"] == 256 and record["nested_dtype"] == "float32"


@pytest.mark.parametrize("compress", [False, True])
def test_state_dict_round_trip(compress):
    q = QuantizedLinear.from_linear(_linear(), compress_statistics=compress)
    q2 = QuantizedLinear.from_state_dict(q.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(q(x), q2(x))
    q3 = QuantizedLinear(128, 48)
    q3.load_state_dict(q.state_dict())
    assert torch.equal(q(x), q3(x))
    assert (q3.nested is not None) == compress


def _bnb_linear(lin, quant_type, compress, dtype=torch.float32):
    bnb = pytest.importorskip("bitsandbytes")
    b = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          quant_type=quant_type, compress_statistics=compress, compute_dtype=dtype)
    b.load_state_dict(lin.state_dict())
    b = b.to("cpu")  # quantizes
    for m in b.modules():  # exact CPU path (dequantize in fp32, then matmul): FORMAT.md
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return b.eval()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
def test_loads_bitsandbytes_state_dict(quant_type, compress):
    lin = _linear(k=192, n=40)
    b = _bnb_linear(lin, quant_type, compress)
    sd = b.state_dict()
    q = QuantizedLinear.from_state_dict(sd)
    assert torch.equal(q.weight, sd["weight"])  # used as is, never re-quantized
    x = torch.randn(4, 192)
    with torch.no_grad():
        torch.testing.assert_close(q(x), b(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
def test_bitsandbytes_loads_ours(quant_type, compress):
    bnb = pytest.importorskip("bitsandbytes")
    lin = _linear(k=192, n=40, seed=3)
    q = QuantizedLinear.from_linear(lin, quant_type=quant_type, compress_statistics=compress)
    b = bnb.nn.Linear4bit(192, 40, quant_type=quant_type, compress_statistics=compress, compute_dtype=torch.float32)
    sd = q.state_dict()
    # What transformers does with a pre-quantized checkpoint: Params4bit.from_prequantized.
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    b.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=b)
    b.bias = nn.Parameter(sd["bias"], requires_grad=False)
    b.support_avx512bf16_for_cpu = False
    b.eval()
    x = torch.randn(4, 192)
    with torch.no_grad():
        torch.testing.assert_close(b(x), q(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(b.weight.data, q.weight)


def test_from_state_dict_errors():
    sd = QuantizedLinear.from_linear(_linear()).state_dict()
    bad = dict(sd)
    del bad["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(KeyError, match="quant_state"):
        QuantizedLinear.from_state_dict(bad)
    bad = dict(sd, **{"weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{not json"), dtype=torch.uint8)})
    with pytest.raises(ValueError, match="not a valid bitsandbytes quant_state record"):
        QuantizedLinear.from_state_dict(bad)
    record = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    for blocksize in (0, -64, 48):  # a corrupt record: an error, not a ZeroDivisionError
        state = torch.tensor(list(json.dumps(dict(record, blocksize=blocksize)).encode()), dtype=torch.uint8)
        with pytest.raises(ValueError, match="blocksize must be a power of two"):
            QuantizedLinear.from_state_dict(dict(sd, **{"weight.quant_state.bitsandbytes__nf4": state}))
    bad = dict(sd, weight=sd["weight"][:-1])
    with pytest.raises(ValueError, match="expected 3072 packed bytes"):
        QuantizedLinear.from_state_dict(bad)
    bad = dict(sd, **{"weight.absmax": sd["weight.absmax"][:2]})
    with pytest.raises(ValueError, match="block scales"):
        QuantizedLinear.from_state_dict(bad)
    bad = dict(sd, **{"weight.quant_map": torch.linspace(-1, 1, 16)})
    with pytest.raises(ValueError, match="not the standard nf4 table"):
        QuantizedLinear.from_state_dict(bad)
    with pytest.raises(RuntimeError, match="does not match this layer"):
        QuantizedLinear(64, 48).load_state_dict(sd)


def test_to_device_keeps_nested(device):
    q = QuantizedLinear.from_linear(_linear(), compress_statistics=True).to(device)
    assert q.nested.absmax_q.device.type == device
    sd = q.state_dict()
    assert all(t.device.type == device for t in sd.values())


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_dtype"])
@pytest.mark.parametrize("compress", [False, True])
def test_dtype_cast_keeps_absmax_float32(cast, compress, device):
    """model.half() / .bfloat16() / .to(dtype) cast the bias (the compute dtype)
    but leave the 4-bit format alone: absmax stays the same float32 values."""
    q = QuantizedLinear.from_linear(_linear(), compress_statistics=compress).to(device)
    absmax, weight, ref = q.absmax.clone(), q.weight.clone(), q.dequantize(torch.float32)
    dt = torch.bfloat16 if cast == "bfloat16" else torch.float16
    q = q.half() if cast == "half" else q.bfloat16() if cast == "bfloat16" else q.to(dt)
    assert q.absmax.dtype == torch.float32 and torch.equal(q.absmax, absmax)
    assert torch.equal(q.weight, weight) and q.bias.dtype == dt
    assert torch.equal(q.dequantize(torch.float32), ref)
    x = torch.randn(3, 128, device=device).to(dt)
    y = q(x)
    assert y.dtype == dt
    want = torch.nn.functional.linear(x.float(), ref, q.bias.float())
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
