"""Shared fixtures: the devices to test on (CPU always, CUDA when a GPU is
visible) and the optional oracle (bitsandbytes)."""
import pytest
import torch

import pythia_native  # noqa: F401  (builds nothing: the extension must be built already)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
