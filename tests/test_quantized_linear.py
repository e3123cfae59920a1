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
    for dtype in ("uint8", "complex64", "float64"):  # the weight's dtype: accepted, then dequantize failed
        state = torch.tensor(list(json.dumps(dict(record, dtype=dtype)).encode()), dtype=torch.uint8)
        with pytest.raises(ValueError, match=f"dtype must be float32, float16 or bfloat16, got '{dtype}'"):
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


def _record(sd, **changes):
    key = next(k for k in sd if "quant_state" in k)
    record = dict(json.loads(bytes(sd[key].tolist())), **changes)
    return dict(sd, **{key: torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8)})


def test_strict_load_reports_keys_it_does_not_read():
    # A bias the layer has no place for, and stray entries under its prefix, are
    # unexpected keys (nn.Module's rule), not silently dropped.
    q = QuantizedLinear.from_linear(_linear())
    sd = q.state_dict()
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "bias"'):
        QuantizedLinear(128, 48, bias=False).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="weight.junk"):
        QuantizedLinear(128, 48).load_state_dict(dict(sd, **{"weight.junk": torch.zeros(1)}))
    res = QuantizedLinear(128, 48, bias=False).load_state_dict(sd, strict=False)
    assert res.unexpected_keys == ["bias"] and res.missing_keys == []
    # Nested in a model: only keys under the layer's own prefix are its business.
    model = nn.Sequential(QuantizedLinear(128, 48), nn.Linear(48, 2))
    model[0].load_state_dict(sd)
    model.load_state_dict(model.state_dict())


@pytest.mark.parametrize("drop", ["weight", "weight.absmax", "weight.nested_absmax", "bias"])
def test_missing_keys_are_reported_not_keyerrors(drop):
    sd = QuantizedLinear.from_linear(_linear(), compress_statistics=True).state_dict()
    del sd[drop]
    q = QuantizedLinear(128, 48)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    if drop in ("weight", "weight.absmax", "bias"):
        res = q.load_state_dict(sd, strict=False)
        assert res.missing_keys == [drop]
        with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{drop}"'):
            QuantizedLinear(128, 48).load_state_dict(sd)
    else:
        with pytest.raises(RuntimeError, match=f"{drop}: missing"):
            q.load_state_dict(sd, strict=False)
    if drop != "bias":  # nothing was taken from a state dict that did not load
        assert all(torch.equal(before[k], v) for k, v in q.state_dict().items() if k in before)
    if drop == "bias":  # optional in a bitsandbytes layer: a layer without one
        assert QuantizedLinear.from_state_dict(sd).bias is None
    else:
        with pytest.raises(KeyError, match=f"{drop}: missing from the state dict|{drop}: missing"):
            QuantizedLinear.from_state_dict(sd)


def test_failed_load_leaves_the_layer_as_it_was():
    lin = _linear()
    q = QuantizedLinear.from_linear(lin)  # blocksize 64
    x = torch.randn(3, 128)
    want = q(x)
    other = QuantizedLinear.from_linear(_linear(seed=1), blocksize=128, quant_type="fp4").state_dict()
    for bad in (dict(other, **{"weight.absmax": torch.ones(3)}),          # wrong absmax length
                dict(other, bias=torch.zeros(49)),                          # wrong bias length
                dict(other, **{"weight.quant_map": torch.zeros(16)})):      # not the fp4 table
        with pytest.raises(RuntimeError):
            q.load_state_dict(bad)
        assert (q.blocksize, q.quant_type, q.weight_dtype) == (64, "nf4", torch.float32)
        assert torch.equal(q(x), want)
    q.load_state_dict(other)  # and a good one still loads
    assert (q.blocksize, q.quant_type) == (128, "fp4")


def test_from_state_dict_keeps_the_records_weight_dtype():
    # The record's dtype is the weight's before quantization; the bias and
    # compute dtype do not change it, so a round trip writes the same record.
    lin = _linear()
    q16 = QuantizedLinear.from_linear(lin.half())
    sd = q16.state_dict()
    for kwargs, bias in ((dict(compute_dtype=torch.float32), sd["bias"]), ({}, sd["bias"].float())):
        q = QuantizedLinear.from_state_dict(dict(sd, bias=bias), **kwargs)
        assert q.weight_dtype == torch.float16 and q.bias.dtype == torch.float32
        assert q.dequantize().dtype == torch.float16
        key = "weight.quant_state.bitsandbytes__nf4"
        assert torch.equal(q.state_dict()[key], sd[key])


def test_from_state_dict_checks_the_bias():
    sd = QuantizedLinear.from_linear(_linear()).state_dict()
    for bias, match in ((torch.zeros(49), r"bias: expected shape \(48,\)"),
                        (torch.zeros(1, 48), r"bias: expected shape \(48,\)"),
                        (torch.zeros(48, dtype=torch.int64), "bias: expected a floating-point tensor")):
        with pytest.raises(ValueError, match=match):
            QuantizedLinear.from_state_dict(dict(sd, bias=bias))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, 64.0, True])
def test_blocksize_is_checked_where_the_layer_is_made(blocksize):
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in \[32, 4096\]"):
        QuantizedLinear(128, 48, blocksize=blocksize)
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in \[32, 4096\]"):
        QuantizedLinear.from_linear(_linear(), blocksize=blocksize)


@pytest.mark.parametrize("changes, match", [
    (dict(shape=[48.5, 128]), "shape must hold integers"),
    (dict(blocksize=64.7), "blocksize must hold integers"),
    (dict(blocksize="64"), "blocksize must hold integers"),
    (dict(blocksize=16), r"blocksize must be a power of two in \[32, 4096\]"),
    (dict(shape="48x128"), "shape must be a list"),
    (dict(nested_offset=None), "nested_offset must be a finite number"),
    (dict(nested_offset="abc"), "nested_offset must be a finite number"),
    (dict(nested_offset=float("nan")), "nested_offset must be a finite number"),
])
def test_corrupt_records_name_the_field(changes, match):
    sd = QuantizedLinear.from_linear(_linear(), compress_statistics=True).state_dict()
    bad = _record(sd, **changes)
    with pytest.raises(ValueError, match=match):
        QuantizedLinear.from_state_dict(bad)
    with pytest.raises(RuntimeError, match=match):  # collected by load_state_dict, not escaping it
        QuantizedLinear(128, 48).load_state_dict(bad)


def test_zero_element_layer_with_double_quant():
    # Builds and round-trips (gemm_4bit itself refuses k = 0 with a named error).
    with pytest.warns(UserWarning, match="zero-element"):
        lin = nn.Linear(0, 4)
    q = QuantizedLinear.from_linear(lin, compress_statistics=True)
    assert q.absmax.numel() == 0 and q.nested.absmax_q.numel() == 0
    q2 = QuantizedLinear.from_state_dict(q.state_dict())
    assert q2.absmax.numel() == 0 and q2.nested.absmax_q.numel() == 0 and torch.equal(q2.bias, q.bias)
    with pytest.raises(RuntimeError, match=r"weight shape \(n, k\) must be positive"):
        q(torch.randn(2, 0))


@pytest.mark.parametrize("double_quant", [False, True])
def test_load_state_dict_with_assign_into_a_meta_layer(double_quant):
    # The meta-then-assign pattern: assign was ignored, the copy into meta
    # buffers did nothing and "All keys matched" left the layer on meta.
    q = QuantizedLinear.from_linear(_linear(), compress_statistics=double_quant)
    x = torch.randn(3, 128)
    with torch.device("meta"):
        m = QuantizedLinear(128, 48)
    m.load_state_dict(q.state_dict(), assign=True)
    assert {t.device.type for t in (m.weight, m.absmax, m.bias)} == {"cpu"}
    assert torch.equal(m(x), q(x)) and (m.nested is not None) == double_quant


@pytest.mark.parametrize("double_quant", [False, True])
def test_module_casts_keep_the_4bit_format(double_quant):
    # .type(float16) turned the packed bytes into float16 values (then "packed
    # must be uint8"); to_empty on a double-quantized meta layer failed half-way
    # (its compressed scales were moved with .to, not to_empty's function).
    q = QuantizedLinear.from_linear(_linear(), compress_statistics=double_quant)
    x = torch.randn(3, 128)
    h = QuantizedLinear.from_linear(_linear(), compress_statistics=double_quant).type(torch.float16)
    assert (h.weight.dtype, h.absmax.dtype, h.bias.dtype) == (torch.uint8, torch.float32, torch.float16)
    assert torch.equal(h.weight, q.weight) and torch.equal(h.absmax, q.absmax)
    torch.testing.assert_close(h(x.half()).float(), q(x), rtol=2e-3, atol=2e-3)
    m = QuantizedLinear.from_linear(_linear(), compress_statistics=double_quant).to("meta").to_empty(device="cpu")
    assert {t.device.type for t in (m.weight, m.absmax, m.bias)} == {"cpu"}
    if double_quant:
        assert {t.device.type for t in (m.nested.absmax_q, m.nested.nested_absmax, m.nested.nested_quant_map)} == {"cpu"}


def test_state_dict_round_trip_with_a_parametrized_bias():
    # parametrize adds a child module; its keys were reported as unexpected.
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, b):
            return 2 * b

    q = QuantizedLinear.from_linear(_linear())
    parametrize.register_parametrization(q, "bias", Double())
    q2 = QuantizedLinear.from_linear(_linear(seed=1))
    parametrize.register_parametrization(q2, "bias", Double())
    q2.load_state_dict(q.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(q2(x), q(x))
