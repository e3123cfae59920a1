"""Header facts every benchmark records: which CPU, which commit, which versions.

Shared by bench_gemm_4bit.py, bench_generate.py and profile_decode.py (each
puts this folder on sys.path before importing it). Imports only the standard
library and torch, so a benchmark's child processes pay nothing for it.
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    """The CPU's model name, family/model numbers, logical CPUs and the ISA
    extensions that matter here (platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine() or "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown CPU")
    flags_line = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[1].split()) if flags_line else set()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model\t")), "?")
    family = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("cpu family")), "?")
    return f"{name} (family {family} model {model}; {os.cpu_count()} logical CPUs; {', '.join(isa) or 'no AVX2'})"


def git_state() -> str:
    """The commit measured: `git rev-parse` of this checkout (+ whether files
    outside benchmarks/results differ from it), else $PN_COMMIT (set it where
    the repo is copied without .git, e.g. PN_COMMIT=$(git rev-parse --short HEAD)),
    else "unknown"."""
    head = ""
    try:
        # Only this repository's own .git: a copy without one must not report
        # the commit of some repository above it.
        top = subprocess.run(["git", "-C", REPO, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if top and os.path.realpath(top) == os.path.realpath(REPO):
            head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        if head:
            # The results folder is left out: a rerun rewrites the very file it reports in.
            dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "--",
                                    ".", ":(exclude)benchmarks/results"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return f"{head}{' + uncommitted changes' if dirty else ''}"
    except Exception:
        pass
    env = os.environ.get("PN_COMMIT", "").strip()
    if env:
        return f"{env} (from $PN_COMMIT: no git checkout here to check it against)"
    return "unknown (no git checkout and no $PN_COMMIT)"


def dist_version(name: str) -> str:
    """An installed distribution's version without importing it ("absent" if none)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"
    except Exception as e:  # a broken install
        return f"unknown ({type(e).__name__})"


def versions() -> str:
    """python, torch (+ its CUDA), transformers and bitsandbytes versions, one line."""
    import torch

    cuda = torch.version.cuda or "none"
    return (f"python {platform.python_version()}, torch {torch.__version__} (CUDA {cuda}), "
            f"transformers {dist_version('transformers')}, bitsandbytes {dist_version('bitsandbytes')}")


def build_info() -> str:
    """pythia_native.build_info(), or why it is not there."""
    try:
        import pythia_native

        return f"`{pythia_native.build_info()}`"
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {e})"


def command_line() -> str:
    """This process's command, the script's path relative to the repo."""
    script = sys.argv[0]
    try:
        script = os.path.relpath(script, REPO)
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in [script] + sys.argv[1:])


def add_cpu_isa_arg(ap) -> None:
    """The benchmarks' ``--cpu-isa``: any name ``pythia_native.set_cpu_isa``
    takes (checked by hold_cpu_isa, against this build and CPU)."""
    ap.add_argument("--cpu-isa", default=None,
                    help="hold pythia-native's CPU kernels to this ISA, a name pythia_native.set_cpu_isa takes (auto, "
                         "avx512, avx2, scalar; it checks this build and CPU); default: as imported, the best this "
                         "CPU has unless PYTHIA_NATIVE_CPU_ISA holds them")


def hold_cpu_isa(ap, isa) -> None:
    """Hold pythia-native's CPU kernels to ``isa`` (None: leave them), or stop
    with ``ap.error`` naming the ISAs there are."""
    if not isa:
        return
    import pythia_native

    try:
        pythia_native.set_cpu_isa(isa)
    except pythia_native.PythiaNativeError as e:
        ap.error(f"--cpu-isa: {e}")
