"""The exceptions pythia-native raises for bad input it can name.

The command line catches :class:`PythiaNativeError` and prints its message as
one line; everything else is a bug and keeps its traceback.
"""


class PythiaNativeError(Exception):
    """Base class: the message names the problem and, where there is one, the fix."""


class ConfigError(PythiaNativeError, ValueError):
    """A config.json that is missing, malformed, or not GPT-NeoX."""


class CheckpointError(PythiaNativeError, ValueError):
    """A weight file that is missing, truncated, corrupt, or does not fit the config."""


class GenerationError(PythiaNativeError, ValueError):
    """A generate/score request that cannot be served (too long for the context, bad arguments)."""
