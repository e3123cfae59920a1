"""Builds pythia_native._C: the C++ CPU kernels always, the CUDA kernels when a
CUDA toolkit and a CUDA build of torch are present.

Environment:
  PYTHIA_NATIVE_CUDA=0|1   force the CUDA part off / on (on fails loudly if it cannot build)
  CUDA_HOME                the toolkit; default /usr/local/cuda, else the folder of the
                           `nvcc` on PATH, but only a real one (links resolved, beside
                           include/cuda_runtime.h): on some machines it is a wrapper
                           script, and torch would derive a wrong CUDA_HOME from it. A CUDA_HOME (or
                           CUDA_PATH) without bin/nvcc is an error where CUDA
                           would be built (a CUDA torch, or PYTHIA_NATIVE_CUDA=1).
  TORCH_CUDA_ARCH_LIST     GPU architectures (default: DEFAULT_CUDA_ARCHS below when
                           no GPU is visible, else torch's choice for the visible GPU)
  MAX_JOBS                 parallel compile jobs (ninja)

Sources are every *.cpp under csrc/ (files named *_cuda.cpp only with CUDA) and
every *.cu under csrc/cuda/: there is no hand-kept list to drift from
CMakeLists.txt, which globs the same folders.
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _named_cuda_home():
    """(variable, value) of a CUDA_HOME / CUDA_PATH the user set, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return var, os.environ[var]
    return None


def _find_cuda_home():
    named = _named_cuda_home()
    if named:
        # Named but wrong (no bin/nvcc): None, and _want_cuda refuses to build
        # CUDA with another toolkit or none, which would hide the mistake.
        return named[1] if os.path.exists(os.path.join(named[1], "bin", "nvcc")) else None
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return os.path.realpath("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        # Only trust a real binary, not a wrapper script: resolve links and
        # require a toolkit layout (include/cuda_runtime.h) next to it.
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cuda_choice():
    """(whether to build the CUDA part, why it cannot be built as asked or None;
    with a reason, False: the reason is what stops the build).

    The error is raised when the extension is built (build_ext), not here:
    `setup.py sdist` or pip's metadata step compiles nothing and need not fail.
    """
    flag = os.environ.get("PYTHIA_NATIVE_CUDA")
    if flag == "0":
        return False, None
    named = _named_cuda_home()
    problems = []
    if flag == "1" and torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)")
    if _cuda_home is None and named and (flag == "1" or torch.version.cuda is not None):
        problems.append(f"{named[0]}={named[1]!r} has no bin/nvcc (point it at the CUDA toolkit, unset it: "
                        "/usr/local/cuda is the default, or set PYTHIA_NATIVE_CUDA=0 to build without CUDA)")
    elif flag == "1" and _cuda_home is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME to it)")
    if problems:
        why = "PYTHIA_NATIVE_CUDA=1 but " if flag == "1" else ""
        return False, f"{why}CUDA cannot be built: " + "; ".join(problems)
    return flag == "1" or (torch.version.cuda is not None and _cuda_home is not None), None


WITH_CUDA, CUDA_ERROR = _cuda_choice()


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    with_cuda = WITH_CUDA
    cpp = _rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    cpp = [p for p in cpp if with_cuda or not p.endswith("_cuda.cpp")]
    cu = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) if with_cuda else []
    # torch >= 2.12 headers need C++20; the torch-free .cu files stay C++17 (faster nvcc).
    # -fopenmp: at::parallel_for is a header template that runs serially unless the
    # including file is compiled with OpenMP (_OPENMP defined); torch's CPU build
    # uses OpenMP, so this is what makes our kernels use torch's thread pool.
    # CMakeLists.txt compiles the kernels for the native tests with the same flags (less -fopenmp).
    cxx_flags = ["-O3", "-std=c++20", "-fno-fast-math", "-Wall", "-Wno-unused-function", "-fopenmp"]
    link_flags = ["-fopenmp"]
    define_macros = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if not archs:
            major, minor = torch.cuda.get_device_capability()
            archs = f"{major}.{minor}"
        define_macros += [("PN_WITH_CUDA", None), ("PN_CUDA_ARCHS", f'"{archs}"')]
        return CUDAExtension(
            "pythia_native._C",
            cpp + cu,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"],
            },
            extra_link_args=link_flags,
        )
    return CppExtension(
        "pythia_native._C",
        cpp,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    def run(self):
        if CUDA_ERROR:
            raise RuntimeError(CUDA_ERROR)
        super().run()


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
)
