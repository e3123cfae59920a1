"""The ``pythia-native`` console script's entry point, outside the package.

Importing ``pythia_native`` imports torch (~1.5 s). A Ctrl-C in that time
raised KeyboardInterrupt before ``pythia_native.cli.main`` (which turns it
into a quiet exit 130) had started: a traceback of torch's import. Here the
import itself is inside the ``try``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        from pythia_native.cli import main as cli_main
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if _user_error_at_import(e):
            print(f"pythia-native: error: {e}", file=sys.stderr)
            return 2
        raise  # a bug: its traceback
    return cli_main(argv)


def _user_error_at_import(e: Exception) -> bool:
    """Whether an exception importing the package is the user's to fix, told in
    one line as the command's other user errors: the package's own errors (a bad
    PYTHIA_NATIVE_CPU_ISA), an extension that does not load (not built, or
    built against another torch), a dependency that is not installed."""
    if any(c.__name__ == "PythiaNativeError" for c in type(e).__mro__):
        return True
    if isinstance(e, ImportError) and str(e).startswith("pythia_native._C could not be loaded"):
        return True
    return isinstance(e, ModuleNotFoundError) and not (e.name or "pythia_native").startswith("pythia_native")
