"""Shared fixtures: the devices to test on (CPU always, CUDA when a GPU is
visible) and the optional oracle (bitsandbytes)."""
import pytest
import torch

import pythia_native  # noqa: F401  (builds nothing: the extension must be built already)

# The published EleutherAI/pythia-160m config.json (transformers 4.x spelling).
PYTHIA_160M_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu", "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "model_type": "gpt_neox",
    "num_attention_heads": 12, "num_hidden_layers": 12, "rotary_emb_base": 10000,
    "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.24.0", "use_cache": True,
    "use_parallel_residual": True, "vocab_size": 50304,
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Every CPU kernel family is tested under each instruction set this CPU has
# (`_C.set_cpu_isa` forces one); parametrize with indirect=True on `cpu_isa`.
CPU_ISAS = ["avx512", "avx2", "scalar"]


def isa_supported(isa: str) -> bool:
    order = ["scalar", "avx2", "avx512"]
    return order.index(isa) <= order.index(pythia_native.build_info()["cpu_isa_best"])


@pytest.fixture
def cpu_isa(request):
    """Force the CPU kernels to request.param for the test, then back to the ISA before."""
    isa = request.param
    if not isa_supported(isa):
        pytest.skip(f"this CPU has no {isa}")
    before = pythia_native._C.cpu_isa()  # PYTHIA_NATIVE_CPU_ISA may hold the run to one
    pythia_native._C.set_cpu_isa(isa)
    yield isa
    pythia_native._C.set_cpu_isa(before)


def pytest_collection_modifyitems(config, items):
    # `-m cuda` (benchmarks/gpu_check.sh's quick stage) selects every test that
    # runs on a GPU: the device-parametrized cases ([cuda], -cuda) and the
    # GPU-only tests, all of which say cuda in their names.
    for item in items:
        if "cuda" in item.keywords or "cuda" in item.nodeid:
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="session")
def bnb_functional():
    """bitsandbytes.functional, or skip (it is the oracle, installed by `make test`)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    return bnb
