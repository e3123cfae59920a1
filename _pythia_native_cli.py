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
        # The package's own errors at import (a bad PYTHIA_NATIVE_CPU_ISA) and
        # a failed import (an extension built against another torch, a missing
        # dependency) are one line, as the command's other user errors.
        if isinstance(e, ImportError) or type(e).__module__.startswith("pythia_native"):
            print(f"pythia-native: error: {e}", file=sys.stderr)
            return 2
        raise
    return cli_main(argv)
