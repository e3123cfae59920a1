"""Shared fixtures: the devices to test on (CPU always, CUDA when a GPU is
visible) and the optional oracle (bitsandbytes)."""
import pytest
import torch

import pythia_native  # noqa: F401  (builds nothing: the extension must be built already)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Every CPU kernel family is tested under each instruction set this CPU has
# (`_C.set_cpu_isa` forces one); parametrize with indirect=True on `cpu_isa`.
CPU_ISAS = ["avx512_bf16", "avx512", "avx2", "scalar"]


def isa_supported(isa: str) -> bool:
    order = ["scalar", "avx2", "avx512", "avx512_bf16"]
    return order.index(isa) <= order.index(pythia_native.build_info()["cpu_isa_best"])


@pytest.fixture
def cpu_isa(request):
    """Force the CPU kernels to request.param for the test, then back to the best."""
    isa = request.param
    if not isa_supported(isa):
        pytest.skip(f"this CPU has no {isa}")
    pythia_native._C.set_cpu_isa(isa)
    yield isa
    pythia_native._C.set_cpu_isa("auto")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords or "[cuda" in item.nodeid or "-cuda" in item.nodeid:
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="session")
def bnb_functional():
    """bitsandbytes.functional, or skip (it is the oracle, installed by `make test`)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    return bnb
