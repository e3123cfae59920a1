"""The ``pythia-native`` console script's entry point, outside the package.

Importing ``pythia_native`` imports torch (~1.5 s). A Ctrl-C in that time
raised KeyboardInterrupt before ``pythia_native.cli.main`` (which turns it
into a quiet exit 130) had started: a traceback of torch's import. Here the
import itself is inside the ``try``.
"""
from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        from pythia_native.cli import main as cli_main
    except KeyboardInterrupt:
        return 130
    return cli_main(argv)
