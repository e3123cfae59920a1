"""Registers, spills, stack and static shared memory of every CUDA kernel, as
ptxas reports them, and the occupancy that the registers allow: no GPU needed,
only nvcc (the .cu files are torch-free, so this takes seconds).

    python benchmarks/ptxas_report.py                    # sm_90, markdown on stdout
    python benchmarks/ptxas_report.py --arch sm_80 --out benchmarks/results/cuda_ptxas_sm80.md

Run it after changing a kernel: a spill (local-memory traffic in the GEMV's
inner loop) or a register count that halves the resident warps shows here
before any GPU time is spent. The occupancy column takes the block size
that each launcher in csrc/cuda/ passes (read from its source) and the
arch's per-SM limits (SM_LIMITS: registers allocated in 256-register warp
units); shared memory does not limit any kernel here.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAUNCH = re.compile(r"(\w+_kernel)<[^<>]*>\s*<<<[^,]+,\s*([^,]+),")
CONSTANT = re.compile(r"constexpr\s+(?:int|int64_t|unsigned)\s+(\w+)\s*=\s*([^;]+);")


def block_threads() -> dict[str, int]:
    """Threads per block of each kernel's launch, read from the launchers in
    csrc/cuda/*.cu (`kernel<T><<<grid, THREADS, ...>>>`), with THREADS'
    constants resolved from those files and csrc/common/*.h."""
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(
        os.path.join(ROOT, "csrc", "common", "*.h"))
    texts = [open(p).read() for p in sources]
    consts = {}
    for text in texts:
        for name, expr in CONSTANT.findall(text):
            consts.setdefault(name, re.sub(r"static_cast<\w+>", "", expr).strip())

    def value(expr: str, depth: int = 0) -> int:
        expr = re.sub(r"static_cast<\w+>", "", expr)
        expr = re.sub(r"\b(k\w+)\b", lambda m: f"({value(consts[m.group(1)], depth + 1)})", expr)
        if depth > 8 or not re.fullmatch(r"[0-9()+*/ -]+", expr):
            raise ValueError(expr)
        return int(eval(expr))  # digits and + - * / ( ) only, checked above

    threads = {}
    for text in texts:
        for kernel, expr in LAUNCH.findall(text):
            try:
                threads[kernel] = value(expr.strip())
            except (KeyError, ValueError):
                pass  # a block size computed at run time: no occupancy column
    return threads


DTYPES = {"13__nv_bfloat16": "bf16", "6__half": "f16", "f": "f32"}


def nvcc_path() -> str:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(path):
        sys.exit(f"ptxas_report: no nvcc at {path} (set CUDA_HOME to the toolkit)")
    return path


def kernel_name(mangled: str) -> tuple[str, str]:
    """(name, mangled template arguments) of an Itanium-mangled ``..._kernel<...>``:
    the name is the length-prefixed identifier that ends in ``_kernel`` (the
    digits before it can follow other digits of an anonymous namespace's hash,
    so the length that fits is the one taken)."""
    end = mangled.find("_kernelI")
    if end < 0:
        return mangled, ""
    end += len("_kernel")
    for start in range(end - 1, 0, -1):
        if mangled[start].isdigit() or not mangled[start - 1].isdigit():
            continue
        run_start = start
        while run_start > 0 and mangled[run_start - 1].isdigit():
            run_start -= 1
        run = mangled[run_start:start]
        if any(int(run[-k:]) == end - start for k in range(1, len(run) + 1)):
            return mangled[start:end], mangled[end + 1:]
    return mangled, ""


def ptxas_lines(nvcc: str, arch: str, source: str) -> list[str]:
    cmd = [nvcc, "-O3", "-std=c++17", "--expt-relaxed-constexpr", f"-arch={arch}",
           "-I", os.path.join(ROOT, "csrc"), "-Xptxas", "-v", "-c", source, "-o", os.devnull]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"ptxas_report: {os.path.relpath(source, ROOT)} did not compile:\n{run.stderr}")
    return run.stderr.splitlines()


def parse(lines: list[str]) -> list[dict]:
    rows, cur = [], None
    for line in lines:
        m = re.search(r"Compiling entry function '(\S+)' for", line)
        if m:
            mangled = m.group(1)
            name, targs = kernel_name(mangled)
            dtype = next((v for k, v in DTYPES.items() if targs.startswith(k)), "")
            mt = re.search(r"Li(\d+)E", targs)
            cur = {"kernel": name, "instance": dtype + (f", M <= {mt.group(1)}" if mt else "")}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            # "..., used 1 barriers[, 8 bytes lmem], 64 bytes smem" (lmem where a kernel spills)
            smem = re.search(r"(\d+) bytes smem", line)
            cur.update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
            rows.append(cur)
            cur = None
    return rows


# Per-SM limits by compute capability (CUDA occupancy tables): resident warps,
# resident blocks; every one of these has 65,536 32-bit registers per SM.
SM_LIMITS = {75: (32, 16), 80: (64, 32), 86: (48, 16), 87: (48, 16), 89: (48, 24), 90: (64, 32)}


def occupancy(regs: int, threads: int, arch: str) -> str:
    """Resident warps per SM as the registers allow, or "-" for an arch not in SM_LIMITS."""
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m or int(m.group(1)) not in SM_LIMITS:
        return "-"
    max_warps, max_blocks = SM_LIMITS[int(m.group(1))]
    warps = (threads + 31) // 32
    regs_per_warp = (regs * 32 + 255) // 256 * 256  # allocated per warp in units of 256
    blocks = min(max_blocks, max_warps // warps, 65536 // (regs_per_warp * warps))
    return f"{blocks * warps}/{max_warps} ({blocks} blocks of {threads})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", help="write the markdown here instead of stdout")
    args = ap.parse_args()
    nvcc = nvcc_path()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    threads_of = block_threads()
    rows = []
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        for row in parse(ptxas_lines(nvcc, args.arch, source)):
            row["file"] = os.path.basename(source)
            rows.append(row)
    out = [
        f"# CUDA kernel resources ({args.arch}, ptxas)",
        "",
        f"- nvcc: {version}; flags as setup.py builds the .cu files (-O3 -std=c++17 --expt-relaxed-constexpr)",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `python benchmarks/ptxas_report.py --arch {args.arch}`",
        "",
        "| file | kernel | instance | registers | spill st/ld bytes | stack bytes | static smem bytes | warps per SM (registers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        threads = threads_of.get(r["kernel"])
        occ = occupancy(r["regs"], threads, args.arch) if threads else "-"
        out.append(f"| {r['file']} | {r['kernel']} | {r['instance']} | {r['regs']} | "
                   f"{r['spill_st']}/{r['spill_ld']} | {r['stack']} | {r['smem']} | {occ} |")
    text = "\n".join(out) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    spills = [r for r in rows if r["spill_st"] or r["spill_ld"]]
    if spills:
        print(f"ptxas_report: {len(spills)} kernel instance(s) spill", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
