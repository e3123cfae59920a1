"""The exceptions and warnings of pythia-native.

Every error the package raises on purpose derives from ``PythiaNativeError``,
so a command line can catch that one class and print ``str(error)``: each
message names the problem *and* the fix on its own. The subclasses also derive
from the closest built-in class, so ``except ValueError`` / ``except
FileNotFoundError`` in caller code keeps working.

| class | raised when |
| --- | --- |
| ``ModelNotFoundError`` | unknown Pythia name, repo not on the hub (or private/gated), missing local directory |
| ``RevisionError`` | a revision that the suite does not have (checked before any network access), or one the hub does not have |
| ``OfflineError`` | offline (``HF_HUB_OFFLINE=1`` / ``local_files_only``) and the revision or some of its files are not cached |
| ``HubConnectionError`` | the hub could not be reached (or answered with a server error) and nothing usable is cached |
| ``CheckpointError`` | a weight file is missing, truncated, corrupt, or an index names a shard that is not there |
| ``ConfigError`` | ``config.json`` missing, not JSON, or not a GPT-NeoX causal LM; a ``load()`` path option that is empty |
| ``GenerationError`` | a generate/score request that cannot be served (prompt + new tokens beyond the context, bad sampling values) |
| ``LoadInProgressError`` | a load into a model while another thread's load into it is under way (``load_revision`` through two engines over one model) |
| ``DeviceError`` | a device or dtype this machine or build cannot use (``cuda`` without a GPU, fp16 on the CPU) |
| ``OptionError`` | a quantization or arithmetic option the package does not have (``quant_type``, ``compute``, ``blocksize``), from ``load()``, ``sweep()``, a model, a module or an op wrapper alike |

The ops' other argument checks (shapes, dtypes, devices of the tensors given
to ``pythia_native.ops`` and the modules built on them) raise what torch raises
for such mistakes: ``ValueError`` / ``TypeError`` from Python, ``RuntimeError``
from the compiled kernels' checks.
"""
from __future__ import annotations


class PythiaNativeError(Exception):
    """Base class of the errors pythia-native raises on purpose (one-line, actionable messages)."""


class ModelNotFoundError(PythiaNativeError, LookupError):
    """The model name, hub repository or local directory does not exist (or is not accessible)."""


class RevisionError(PythiaNativeError, ValueError):
    """The revision is not one the model has (invalid ``stepN``, unknown branch, bad hash)."""


class OfflineError(PythiaNativeError, FileNotFoundError):
    """Network use is disabled and the requested revision (or some of its files) is not cached."""


class HubConnectionError(PythiaNativeError, ConnectionError):
    """The Hugging Face hub could not be reached and the files are not cached either."""


class CheckpointError(PythiaNativeError, OSError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent with its index."""


class ConfigError(PythiaNativeError, ValueError):
    """``config.json`` is missing, not valid JSON, or does not describe a GPT-NeoX causal LM."""


class LoadInProgressError(PythiaNativeError, RuntimeError):
    """Another thread is loading weights into the same model; loads into one model must not overlap."""


class PythiaNativeWarning(UserWarning):
    """Base class of the warnings pythia-native issues."""


class RenamedModelWarning(PythiaNativeWarning):
    """A Pythia name from before the January 2023 rename was used; the new name is used instead."""


class CheckpointDataWarning(PythiaNativeWarning):
    """The requested hub branch is known to hold wrong or duplicated weights (a data problem upstream)."""


class HubFallbackWarning(PythiaNativeWarning):
    """The Hugging Face hub could not be reached; a complete cached snapshot of the revision is used instead."""


class QuantizedCacheWarning(PythiaNativeWarning):
    """An entry of the on-disk quantized cache was unreadable or incomplete; it is rebuilt from the checkpoint."""


class GenerationError(PythiaNativeError, ValueError):
    """A generate/score request that cannot be served (too long for the context, bad arguments)."""


class DeviceError(PythiaNativeError, ValueError):
    """A device (or activation dtype) that this machine or this build cannot use."""


class OptionError(PythiaNativeError, ValueError):
    """A quantization or arithmetic option (quant_type, compute, blocksize) the package does not have."""
