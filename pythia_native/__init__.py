"""pythia-native: EleutherAI Pythia with bitsandbytes-format 4-bit weights.

The compiled core is ``pythia_native._C`` (ops under ``torch.ops.pythia_native``);
this package wraps each op (``pythia_native.ops``), keeps a pure-PyTorch twin of
each (``pythia_native.reference``) and builds modules on top of them.
"""
import os as _os

import torch as _torch  # first: _C links against the libraries torch loads

try:
    from . import _C
except ImportError as _e:  # not built, or built against another torch (its symbols missing)
    raise ImportError(
        f"pythia_native._C could not be loaded ({_e}): it must be built, against the torch installed here "
        f"({_torch.__version__}); rebuild it from the source tree with `make build`, or "
        "`pip install --no-build-isolation --no-deps -e .`"
    ) from _e
from . import ops  # noqa: F401  (registers the ops and their fake kernels)
from ._C import build_info
from .ops import set_cpu_isa

if _os.environ.get("PYTHIA_NATIVE_CPU_ISA"):
    set_cpu_isa(_os.environ["PYTHIA_NATIVE_CPU_ISA"], _source="PYTHIA_NATIVE_CPU_ISA")
from .format import QUANT_TYPES, code_table
from .ops import (
    decode_attention,
    dequantize_4bit,
    dequantize_absmax,
    gemm_4bit,
    gemm_f16w,
    gelu,
    quantize_4bit,
    rotary_kv_cache_,
)
from .quantized_linear import QuantizedLinear
from .config import PythiaConfig
from .model import KVCache, PythiaModel
from .generate import Pythia, Score
from .loading import load
from .sweep import select_revisions, sweep
from .errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    GenerationError,
    LoadInProgressError,
    OptionError,
    PythiaNativeError,
    RevisionError,
)
from . import reference  # noqa: F401  (pn.reference: the ops' pure-PyTorch twins, the tests' oracle)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DeviceError",
    "GenerationError",
    "LoadInProgressError",
    "OptionError",
    "PythiaNativeError",
    "RevisionError",
    "KVCache",
    "Pythia",
    "PythiaConfig",
    "PythiaModel",
    "QUANT_TYPES",
    "Score",
    "load",
    "select_revisions",
    "sweep",
    "QuantizedLinear",
    "build_info",
    "code_table",
    "decode_attention",
    "dequantize_4bit",
    "dequantize_absmax",
    "gemm_4bit",
    "gemm_f16w",
    "gelu",
    "quantize_4bit",
    "rotary_kv_cache_",
    "set_cpu_isa",
]
