#!/usr/bin/env python
"""gemm_4bit against its peers on the Pythia layer shapes.

For each weight shape (K x N, W is [N, K]) and batch M (x is [M, K]) this
times, in the same run and on the same NF4 weights (blocksize 64, bias on):

  pn     pythia_native.gemm_4bit on pre-quantized weights (the op directly)
  pn16   the same with compute="int16" (CPU only: x rounded to int16 per 64
         values in the GEMV, M <= 16; other M compute in float32 as pn)
  l4b    bitsandbytes nn.Linear4bit, eval mode, under torch.inference_mode()
         (on a CPU with AVX-512 BF16 it repacks its weight into its bf16 CPU
         layout on the first call; that call is warm-up, not timed)
  mm4    bitsandbytes.matmul_4bit on bitsandbytes.functional.quantize_4bit
         weights (on the CPU: dequantize, then F.linear)
  dense  torch.nn.functional.linear with the unquantized weight, same dtype

and reports pn's weight bandwidth (GB/s, and % of the device's copy
bandwidth measured in the same run), its GFLOP/s, its speedup over l4b and mm4,
and the relative error of pn and l4b against an fp64 product with the
dequantized NF4 weight. A 4-bit GEMM at small M is a memory-bound weight
stream, so GB/s and % of copy bandwidth are the numbers to judge it by; at
large M it is compute-bound and GFLOP/s and the dense time are.

  python benchmarks/bench_gemm_4bit.py --device cpu --threads 1 2 --out benchmarks/results/gemm_4bit_cpu.md
  python benchmarks/bench_gemm_4bit.py --device cuda --out benchmarks/results/gemm_4bit_cuda.md
  python benchmarks/bench_gemm_4bit.py --quick            # a smoke run, seconds

--cpu-isa avx2 (or scalar) holds pythia-native's CPU kernels to that ISA, as
on a CPU without AVX-512. To hold torch's own kernels (dense, mm4's F.linear)
to AVX2 as well, set ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2 in the environment. bitsandbytes picks its CPU
gemv by its own cpuid check: with AVX-512 BF16 (l4b here) its bf16 kernel,
without it dequantize_4bit + F.linear, which is what mm4 times.

bitsandbytes is optional: without it the peer columns read n/a.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import hashlib
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# cpu_model: the header's CPU line; git_state: the commit measured (git, else $PN_COMMIT).
from _common import add_cpu_isa_arg, cpu_model, git_state, hold_cpu_isa  # noqa: E402

# K x N of the four quantized Linear layers of a GPT-NeoX block (PYTHIA.md).
SHAPES = [
    (768, 2304, "160m qkv"),
    (768, 768, "160m dense"),
    (768, 3072, "160m h->4h"),
    (3072, 768, "160m 4h->h"),
    (2048, 6144, "1b/1.4b qkv"),
    (2048, 8192, "1b/1.4b h->4h"),
    (8192, 2048, "1b/1.4b 4h->h"),
    (5120, 15360, "12b qkv"),
]
M_VALUES = [1, 4, 16, 128, 1024]
QUICK_SHAPES = [(768, 2304), (2048, 8192)]
QUICK_M = [1, 16, 128]
BLOCKSIZE = 64
QUANT_TYPE = "nf4"
CHECK_ROWS = 64  # rows of x checked against the fp64 reference, spread over all M
IMPLS = ("pn", "pn16", "l4b", "mm4", "dense")
# compute="int16" changes only the CPU GEMV, M <= build_info()["cpu_gemv_int16_max_m"];
# above, pn16 is pn and is not timed. Set from the build in main.
PN16_MAX_M = 0


# ----------------------------------------------------------------- imports --


def import_pythia_native(attempts: int = 4, wait_s: float = 30.0):
    """Import pythia_native (an installed or PYTHONPATH copy first, else this
    checkout), retrying: the extension may be rebuilt in place while a
    benchmark starts (the .so briefly missing or half-written)."""
    import importlib.util

    if importlib.util.find_spec("pythia_native") is None and REPO not in sys.path:
        sys.path.insert(0, REPO)
    for i in range(attempts):
        try:
            import pythia_native

            return pythia_native
        except (ImportError, OSError) as e:
            if i == attempts - 1:
                raise
            print(f"# import pythia_native failed ({e}); retrying in {wait_s:.0f} s", flush=True)
            for name in [m for m in sys.modules if m == "pythia_native" or m.startswith("pythia_native.")]:
                del sys.modules[name]
            time.sleep(wait_s)


def extension_fingerprint(pn) -> str:
    """sha256 prefix and mtime of the loaded extension file: which build was measured."""
    path = pn._C.__file__
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path)).astimezone().isoformat(timespec="seconds")
        return f"{os.path.basename(path)} sha256 {digest}, built {mtime}"
    except OSError as e:
        return f"{path} unreadable ({e})"


def import_bitsandbytes():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF

        return bnb, bnbF
    except Exception as e:  # not installed, or no library for this platform
        print(f"# bitsandbytes unavailable ({type(e).__name__}: {e}); peer columns will read n/a", flush=True)
        return None, None


# ------------------------------------------------------------------ timing --


def _calibrate(run_batch: Callable[[int], float], target_s: float) -> tuple[int, float]:
    """run_batch(n) runs the pool n times and returns the elapsed seconds.
    Returns (n, seconds per pool run) with n chosen so a batch takes about target_s."""
    run_batch(1)  # warm-up: first-call allocations, bitsandbytes' CPU repack, cuBLAS heuristics
    n, dt = 1, run_batch(1)
    while dt < min(0.01, target_s / 4) and n < (1 << 20):
        n *= 4
        dt = run_batch(n)
    per_run = dt / n
    return max(1, round(target_s / per_run)), per_run


def _median_per_call(run_batch: Callable[[int], float], calls_per_run: int, target_s: float, repeats: int) -> float:
    """Calibrates n so one repeat takes about target_s, then returns the median
    seconds per call over `repeats` repeats."""
    n, per_run = _calibrate(run_batch, target_s)
    if per_run > 2 * target_s:  # one call is already long: fewer repeats suffice
        repeats = min(repeats, 3)
    gc.collect()
    gc.disable()
    try:
        times = [run_batch(n) / (n * calls_per_run) for _ in range(repeats)]
    finally:
        gc.enable()
    return statistics.median(times)


def _cpu_batch(calls: list[Callable[[], object]]) -> Callable[[int], float]:
    def run_batch(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            for f in calls:
                f()
        return time.perf_counter() - t0

    return run_batch


def time_cpu(calls: list[Callable[[], object]], target_s: float, repeats: int) -> tuple[float, str]:
    return _median_per_call(_cpu_batch(calls), len(calls), target_s, repeats), "wall"


def time_cpu_paired(
    calls_a: list[Callable[[], object]], calls_b: list[Callable[[], object]], target_s: float, repeats: int
) -> tuple[float, float, float]:
    """Two pools timed in alternation (a, b, a, b, ...), so that a shared,
    noisy machine slows both alike. Returns the median seconds per call of a
    and of b, and the median over repeats of the ratio b / a (each ratio from
    two batches measured back to back)."""
    run_a, run_b = _cpu_batch(calls_a), _cpu_batch(calls_b)
    n_a, _ = _calibrate(run_a, target_s)
    n_b, _ = _calibrate(run_b, target_s)
    ta, tb = [], []
    gc.collect()
    gc.disable()
    try:
        for _ in range(max(repeats, 7)):
            ta.append(run_a(n_a) / (n_a * len(calls_a)))
            tb.append(run_b(n_b) / (n_b * len(calls_b)))
    finally:
        gc.enable()
    return statistics.median(ta), statistics.median(tb), statistics.median(b / a for a, b in zip(ta, tb))


def time_cuda(calls: list[Callable[[], object]], target_s: float, repeats: int, use_graphs: bool) -> tuple[float, str]:
    """Times the pool with CUDA events. With use_graphs the whole pool is
    captured into one CUDA graph (launch overhead out of the measurement, as
    in a graph-captured decode step); if capture fails it falls back to
    eager launches and says so."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(2):
            for f in calls:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    method = "eager"
    replay: Callable[[], None]
    if use_graphs:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for f in calls:
                    f()
            replay = graph.replay
            method = "graph"
        except Exception as e:  # an op that cannot be captured (a host sync, a CPU tensor)
            print(f"# CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing eager launches", flush=True)
            torch.cuda.synchronize()
    if method == "eager":

        def replay() -> None:
            for f in calls:
                f()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run_batch(n: int) -> float:
        start.record()
        for _ in range(n):
            replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return _median_per_call(run_batch, len(calls), target_s, repeats), method


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 7) -> float:
    """GB/s of a large device-to-same-device tensor copy: 2 * bytes / time
    (read once, written once). The roofline a weight-streaming kernel is held to."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        t, _ = time_cuda([lambda: dst.copy_(src)], 0.05, repeats, use_graphs=False)
    else:
        t, _ = time_cpu([lambda: dst.copy_(src)], 0.2, repeats)
    del src, dst
    return 2 * nbytes / t / 1e9


# ---------------------------------------------------------- implementations --


@dataclass
class Layer:
    """One weight shape, set up once for every implementation.
    `pool` copies of each weight are kept; calls rotate through them so that a
    measurement need not hit a cache a real model would miss."""

    K: int
    N: int
    name: str
    weight: torch.Tensor  # [N, K] in the benchmark dtype
    bias: torch.Tensor  # [N]
    packed: torch.Tensor
    absmax: torch.Tensor
    w_deq64: torch.Tensor  # [N, K] float64: the dequantized NF4 weight, for the reference
    calls: dict[str, Optional[Callable[[torch.Tensor], list[Callable[[], object]]]]] = field(default_factory=dict)
    pool: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def nf4_bytes(self) -> int:
        return self.N * self.K // 2 + 4 * (self.N * self.K // BLOCKSIZE)


def pool_size(bytes_per_copy: int, pool_bytes: int) -> int:
    return 1 if pool_bytes <= 0 else max(1, min(512, math.ceil(pool_bytes / bytes_per_copy)))


def setup_layer(pn, bnb, bnbF, K: int, N: int, name: str, device: torch.device, dtype: torch.dtype,
                pool_bytes: int) -> Layer:
    torch.manual_seed(K * 100003 + N)
    lin = torch.nn.Linear(K, N, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02)  # GPT-NeoX initializer_range
        lin.bias.normal_(0.0, 0.02)
    lin = lin.to(device=device, dtype=dtype).eval()
    w, b = lin.weight.detach(), lin.bias.detach()

    packed, absmax = pn.quantize_4bit(w, BLOCKSIZE, QUANT_TYPE)
    w_deq64 = pn.dequantize_4bit(packed, absmax, (N, K), BLOCKSIZE, QUANT_TYPE).double()
    layer = Layer(K, N, name, w, b, packed, absmax, w_deq64)
    shape = (N, K)

    # pythia-native: the op directly, on pre-quantized weights.
    n_pn = pool_size(layer.nf4_bytes, pool_bytes)
    pn_pool = [(packed, absmax)] + [(packed.clone(), absmax.clone()) for _ in range(n_pn - 1)]
    layer.pool["pn"] = n_pn
    layer.calls["pn"] = lambda x: [
        (lambda p=p, a=a: pn.gemm_4bit(x, p, a, shape, b, BLOCKSIZE, QUANT_TYPE)) for p, a in pn_pool
    ]
    # compute="int16" changes nothing on CUDA (the GPU kernels compute in float32).
    layer.calls["pn16"] = None if device.type == "cuda" else lambda x: [
        (lambda p=p, a=a: pn.gemm_4bit(x, p, a, shape, b, BLOCKSIZE, QUANT_TYPE, compute="int16"))
        for p, a in pn_pool
    ]

    # dense: F.linear with the unquantized weight.
    n_dense = pool_size(w.numel() * w.element_size(), pool_bytes)
    dense_pool = [w] + [w.clone() for _ in range(n_dense - 1)]
    layer.pool["dense"] = n_dense
    layer.calls["dense"] = lambda x: [(lambda wd=wd: F.linear(x, wd, b)) for wd in dense_pool]

    if bnb is None:
        layer.calls["l4b"] = layer.calls["mm4"] = None
        return layer

    # bitsandbytes Linear4bit, loaded from the same nn.Linear state dict.
    # compress_statistics=False: the same bytes and absmax as pn (no double
    # quantization), so both multiply exactly the same weight.
    l4b = bnb.nn.Linear4bit(K, N, bias=True, quant_type=QUANT_TYPE, compute_dtype=dtype, compress_statistics=False)
    l4b.load_state_dict({k: v.float().cpu() for k, v in lin.state_dict().items()})
    l4b = l4b.to(device)  # quantization happens here (Params4bit.to)
    if not (getattr(l4b.weight, "bnb_quantized", False) and l4b.weight.dtype == torch.uint8):
        raise RuntimeError(f"bnb.nn.Linear4bit {K}x{N}: .to({device}) did not quantize the weight")
    qs = l4b.weight.quant_state
    if qs.blocksize != BLOCKSIZE or qs.quant_type != QUANT_TYPE or list(qs.shape) != [N, K]:
        raise RuntimeError(f"bnb.nn.Linear4bit {K}x{N}: unexpected quant_state {qs.quant_type}/{qs.blocksize}/{qs.shape}")
    same = torch.equal(l4b.weight.data.reshape(-1), packed.reshape(-1)) and torch.equal(qs.absmax.float(), absmax)
    if not same:
        layer.notes.append(f"{K}x{N}: bnb Linear4bit's packed bytes/absmax differ from pythia-native's")
    l4b.eval()
    l4b.bias.requires_grad_(False)
    n_l4b = pool_size(layer.nf4_bytes, pool_bytes)
    # deepcopy keeps the quantized bytes (Params4bit.__deepcopy__) and quant_state.
    l4b_pool = [l4b] + [copy.deepcopy(l4b) for _ in range(n_l4b - 1)]
    layer.pool["l4b"] = n_l4b
    layer.calls["l4b"] = lambda x: [(lambda mod=mod: mod(x)) for mod in l4b_pool]

    # bitsandbytes matmul_4bit on its own quantize_4bit output: packed [(N*K+1)//2, 1]
    # from the [N, K] weight, passed transposed as bitsandbytes' own Linear4bit does.
    mm_pool = []
    for _ in range(pool_size(layer.nf4_bytes, pool_bytes)):
        wq, state = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=False, quant_type=QUANT_TYPE)
        mm_pool.append((wq, state))
    if not torch.equal(mm_pool[0][0].reshape(-1), packed.reshape(-1)):
        layer.notes.append(f"{K}x{N}: bitsandbytes.functional.quantize_4bit bytes differ from pythia-native's")
    layer.pool["mm4"] = len(mm_pool)
    layer.calls["mm4"] = lambda x: [
        (lambda wq=wq, st=st: bnb.matmul_4bit(x, wq.t(), quant_state=st, bias=b)) for wq, st in mm_pool
    ]
    return layer


def rel_error(y: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> float:
    """max |y - ref| / max |ref| over the checked rows."""
    return ((y[rows].double() - ref).abs().max() / ref.abs().max()).item()


# ------------------------------------------------------------------ report --


@dataclass
class Row:
    K: int
    N: int
    name: str
    M: int
    threads: int
    us: dict[str, Optional[float]]  # None: skipped / unavailable
    err: dict[str, Optional[float]]
    gbps: float
    pct_bw: Optional[float]
    gflops: float
    methods: dict[str, str]
    paired: dict[str, float] = field(default_factory=dict)  # peer -> median of paired ratios

    def speedup(self, peer: str, impl: str = "pn") -> Optional[float]:
        key = peer if impl == "pn" else f"{peer}/{impl}"
        if key in self.paired:
            return self.paired[key]
        t, p = self.us.get(impl), self.us.get(peer)
        return None if t is None or p is None else p / t


def fmt_us(v: Optional[float], skipped: bool = False) -> str:
    if v is None:
        return "skip" if skipped else "n/a"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_x(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_err(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1e}"


COLUMNS = [
    ("shape KxN", 11), ("layer", 13), ("M", 5), ("thr", 3), ("pn us", 9), ("pn16 us", 9), ("l4b us", 9),
    ("mm4 us", 9), ("dense us", 9), ("pn GB/s", 8), ("%bw", 5), ("pn GFLOP/s", 10), ("vs l4b", 7), ("vs mm4", 7),
    ("pn16 vs l4b", 11), ("err pn", 8), ("err pn16", 8), ("err l4b", 8),
]


def row_cells(r: Row, skipped: set[str]) -> list[str]:
    return [
        f"{r.K}x{r.N}", r.name, str(r.M), str(r.threads),
        *(fmt_us(r.us.get(k), k in skipped) for k in IMPLS),
        f"{r.gbps:.1f}", "n/a" if r.pct_bw is None else f"{r.pct_bw:.0f}", f"{r.gflops:.1f}",
        fmt_x(r.speedup("l4b")), fmt_x(r.speedup("mm4")), fmt_x(r.speedup("l4b", "pn16")),
        fmt_err(r.err.get("pn")), fmt_err(r.err.get("pn16")), fmt_err(r.err.get("l4b")),
    ]


def print_header() -> None:
    print("  ".join(h.rjust(w) for h, w in COLUMNS), flush=True)


def print_row(r: Row, skipped: set[str]) -> None:
    line = "  ".join(c.rjust(w) for c, (_, w) in zip(row_cells(r, skipped), COLUMNS))
    eager = [k for k, m in r.methods.items() if m == "eager"]
    if eager:
        line += "  (eager: " + ",".join(eager) + ")"
    print(line, flush=True)


def load_average() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def bnb_cpu_path(bnb) -> str:
    if bnb is None:
        return "not installed"
    try:
        from bitsandbytes.backends.cpu import ops as cpu_ops
        from bitsandbytes.functional import has_avx512bf16

        if not has_avx512bf16():
            return "no AVX-512 BF16: Linear4bit dequantizes then F.linear"
        hub = getattr(cpu_ops, "gemm_4bit_forward_kernel", None)
        return ("bf16 fused kernel from kernels-community" if hub is not None
                else "bf16 fused kernel gemv_4bit_inference_cpu_nf4_bf16 of libbitsandbytes_cpu (no kernels-community "
                     "kernel: the `kernels` package is missing, or could not fetch it from the hub)")
    except Exception as e:
        return f"unknown ({e})"


def write_markdown(path: str, device: torch.device, dtype: torch.dtype, pn, bnb, threads: list[int],
                   bw: dict[int, float], rows: list[Row], skipped_note: str, notes: list[str], runtime_s: float,
                   skipped: set[str], pool_bytes: int, env: dict[str, str]) -> None:
    if device.type == "cuda":
        dev_name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        dev_name = cpu_model()
    lines = [
        f"# gemm_4bit benchmark ({device.type}, {str(dtype).replace('torch.', '')})",
        "",
        *([f"**{env['partial']}**", ""] if env.get("partial") else []),
        f"- device: {dev_name}",
        f"- torch {torch.__version__}, bitsandbytes {getattr(bnb, '__version__', 'not installed')}, "
        f"python {platform.python_version()}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        (f"- threads: {', '.join(map(str, threads))} (torch.set_num_threads; bitsandbytes' OpenMP kernels "
         "share torch's OpenMP runtime)" if device.type == "cpu"
         else f"- host threads: {torch.get_num_threads()} (the thr column; no bearing on GPU times)"),
        f"- pythia-native {git_state()}, build_info: `{pn.build_info()}`",
        f"- extension: {env['fingerprint']}",
        f"- weights: NF4, blocksize {BLOCKSIZE}, bias; W is [N, K], x is [M, K], x and output in "
        f"{str(dtype).replace('torch.', '')}",
    ]
    if device.type == "cpu":
        lines.append(f"- bitsandbytes CPU path: {bnb_cpu_path(bnb)}")
        held = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
                if k in os.environ}
        lines.append(f"- pythia-native CPU ISA: {pn._C.cpu_isa()} (int16 kernel {pn.build_info()['cpu_gemv_int16_kernel']})"
                     + (f"; torch's kernels held by {held}" if held else ""))
    lines.append("- copy bandwidth (2 x bytes / time of a large tensor copy): "
                 + ", ".join(f"{bw[t]:.1f} GB/s" + (f" at {t} thread(s)" if device.type == "cpu" else "")
                             for t in sorted(bw)))
    if pool_bytes > 0:
        lines.append(f"- each implementation rotates through copies of its weight totalling >= {pool_bytes / 2**20:.0f} MiB "
                     "(at most 512 copies), so weights come from memory, not from a cache")
    else:
        lines.append("- the same weight is called repeatedly: weights that fit in the CPU's caches are read from "
                     "there, so GB/s above the copy bandwidth means a cache-resident weight")
    if device.type == "cuda":
        lines.append("- CUDA timing: CUDA events around CUDA-graph replays of the whole pool "
                     "(rows marked eager: that implementation could not be captured)")
    else:
        lines.append("- CPU timing: time.perf_counter around repeated calls, median per call over repeats; pn and "
                     "l4b are timed in alternation (pn, l4b, pn, l4b, ...; at least 7 pairs) and `vs l4b` is the "
                     "median of the per-pair ratios, so a noisy machine slows both sides of each ratio alike")
    if device.type == "cpu":
        lines.append(f"- load average (1/5/15 min): {env['load']} (other work on the machine inflates times)")
    lines.append(f"- command: `{' '.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}`, "
                 f"total runtime {runtime_s:.0f} s")
    if skipped_note:
        lines.append(f"- {skipped_note}")
    lines += ["", "| " + " | ".join(h for h, _ in COLUMNS) + (" | timing |" if device.type == "cuda" else " |"),
              "|" + "---|" * (len(COLUMNS) + (1 if device.type == "cuda" else 0))]
    for r in rows:
        cells = row_cells(r, skipped)
        if device.type == "cuda":
            eager = [k for k, m in r.methods.items() if m == "eager"]
            cells.append("eager: " + ",".join(eager) if eager else "graph")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Columns: `pn` pythia-native `gemm_4bit`; `l4b` bitsandbytes `nn.Linear4bit` (eval, inference mode); "
        "`pn16` the same op with `compute=\"int16\"` (x rounded to int16 per 64 values in the CPU GEMV, "
        f"M <= {PN16_MAX_M}; above that it computes as pn and reads skip); "
        "`mm4` `bitsandbytes.matmul_4bit`; `dense` `F.linear` with the unquantized weight. "
        "Times are microseconds per call. `pn GB/s` = (N*K/2 + 4*N*K/64) bytes of NF4 weight and absmax "
        "/ pn time; `%bw` = that as a percentage of the copy bandwidth above; `pn GFLOP/s` = 2*M*N*K / pn time. "
        "`vs l4b`, `vs mm4` = peer time / pn time (above 1x: pn is faster); `pn16 vs l4b` likewise for pn16, "
        "from its own alternated pairs with l4b. `err` = max |y - ref| / max |ref| "
        f"over {CHECK_ROWS} rows of x spread over M, ref = x.double() @ W_deq.double().T + b with W_deq the "
        "dequantized NF4 weight (so quantization error is not counted, only the arithmetic's).",
    ]
    summary = summarize(rows)
    if summary:
        lines += ["", "Summary: geometric-mean speedup of pn over the peers across shapes", ""] + summary
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def summarize(rows: list[Row]) -> list[str]:
    ms, threads = sorted({r.M for r in rows}), sorted({r.threads for r in rows})
    out = ["| M | threads | vs l4b | vs mm4 | vs dense | pn16 vs l4b | pn %bw (median) |",
           "|---|---|---|---|---|---|---|"]
    for m in ms:
        for t in threads:
            sel = [r for r in rows if r.M == m and r.threads == t]
            if not sel:
                continue

            def gmean(peer: str, impl: str = "pn") -> str:
                v = [r.speedup(peer, impl) for r in sel if r.speedup(peer, impl) is not None]
                return "n/a" if not v else f"{math.exp(sum(math.log(x) for x in v) / len(v)):.2f}x"

            pct = [r.pct_bw for r in sel if r.pct_bw is not None]
            pct_s = f"{statistics.median(pct):.0f}" if pct else "n/a"
            out.append(f"| {m} | {t} | {gmean('l4b')} | {gmean('mm4')} | {gmean('dense')} | "
                       f"{gmean('l4b', 'pn16')} | {pct_s} |")
    return out


# -------------------------------------------------------------------- main --


def parse_shapes(text: str) -> list[tuple[int, int, str]]:
    if text == "all":
        return SHAPES
    names = {(k, n): name for k, n, name in SHAPES}
    out = []
    for item in text.split(","):
        k, n = (int(v) for v in item.strip().lower().split("x"))
        out.append((k, n, names.get((k, n), "custom")))
    return out


def parse_ints(values: list[str]) -> list[int]:
    return [int(v) for item in values for v in item.split(",") if v.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", nargs="+", default=None,
                    help="CPU thread counts, each run via torch.set_num_threads (default: 1 and all cores)")
    ap.add_argument("--shapes", default=None, help="K x N list, e.g. 768x2304,3072x768 (default: all Pythia shapes)")
    ap.add_argument("--m", default=None, help="batch sizes M, e.g. 1,4,16 (default: 1,4,16,128,1024)")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                    help="x/output dtype (default: float32 on cpu, float16 on cuda)")
    ap.add_argument("--quick", action="store_true", help="two shapes, M 1/16/128, short measurements (a smoke run)")
    ap.add_argument("--out", default=None, help="write the table as Markdown to this file")
    ap.add_argument("--skip-slow-peers", action="store_true", help="CPU: skip matmul_4bit for M >= 128")
    ap.add_argument("--target-ms", type=float, default=None,
                    help="length of one timed repeat (default 40 ms; 10 ms with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement, median taken (default 5)")
    ap.add_argument("--pool-mb", type=float, default=None,
                    help="rotate through weight copies totalling this many MiB (default: cuda 4 x L2, cpu 0 = off)")
    ap.add_argument("--no-graphs", action="store_true", help="CUDA: time eager launches instead of CUDA graphs")
    add_cpu_isa_arg(ap)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    shapes = parse_shapes(args.shapes) if args.shapes else (
        [s for s in SHAPES if (s[0], s[1]) in QUICK_SHAPES] if args.quick else SHAPES)
    m_values = parse_ints([args.m]) if args.m else (QUICK_M if args.quick else M_VALUES)
    if device.type == "cpu":
        threads = parse_ints(args.threads) if args.threads else sorted({1, os.cpu_count() or 1})
    else:
        threads = [torch.get_num_threads()]
    target_s = (args.target_ms if args.target_ms else (10.0 if args.quick else 40.0)) / 1e3
    repeats = args.repeats or (3 if args.quick else 5)
    if args.pool_mb is not None:
        pool_bytes = int(args.pool_mb * 2**20)
    elif device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
        pool_bytes = 4 * l2
    else:
        pool_bytes = 0

    pn = import_pythia_native()
    hold_cpu_isa(ap, args.cpu_isa)
    bnb, bnbF = import_bitsandbytes()
    print(f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_model()}), "
          f"dtype {dtype}, torch {torch.__version__}, bitsandbytes {getattr(bnb, '__version__', 'n/a')}", flush=True)
    fingerprint = extension_fingerprint(pn)
    load_start = load_average()
    print(f"# pythia-native {git_state()} build_info {pn.build_info()}", flush=True)
    global PN16_MAX_M
    PN16_MAX_M = int(pn.build_info()["cpu_gemv_int16_max_m"])
    print(f"# extension {fingerprint}; load average {load_start}", flush=True)

    bw: dict[int, float] = {}
    for t in threads:
        torch.set_num_threads(t)
        bw[t] = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (256 << 20))
        print(f"# copy bandwidth{f' ({t} thread(s))' if device.type == 'cpu' else ''}: {bw[t]:.1f} GB/s", flush=True)

    timer = (lambda calls: time_cuda(calls, target_s, repeats, not args.no_graphs)) if device.type == "cuda" else (
        lambda calls: time_cpu(calls, target_s, repeats))
    skip_note = ""
    if args.skip_slow_peers and device.type == "cpu":
        skip_note = "--skip-slow-peers: matmul_4bit not timed for M >= 128 (cells read skip)"

    rows: list[Row] = []
    notes: list[str] = []
    skipped_cells: set[str] = set()
    n_rows = len(shapes) * len(m_values) * len(threads)

    def write(runtime_s: float, final: bool) -> None:
        # Rewritten after every row, so a run cut short still leaves its rows.
        env = {"fingerprint": fingerprint, "load": f"{load_start} at start, {load_average()} at end",
               "partial": "" if final else f"PARTIAL: {len(rows)} of {n_rows} rows so far"}
        write_markdown(args.out, device, dtype, pn, bnb, threads, bw, rows, skip_note, notes,
                       runtime_s, skipped_cells, pool_bytes, env)

    print_header()
    with torch.inference_mode():
        for K, N, name in shapes:
            layer = setup_layer(pn, bnb, bnbF, K, N, name, device, dtype, pool_bytes)
            notes += layer.notes
            for M in m_values:
                gen = torch.Generator(device="cpu").manual_seed(M * 7919 + K)
                x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
                # Correctness, once per (shape, M): rows spread over all of M.
                rows_idx = torch.linspace(0, M - 1, min(M, CHECK_ROWS)).round().long().unique().to(device)
                ref = x[rows_idx].double() @ layer.w_deq64.T + layer.bias.double()
                err: dict[str, Optional[float]] = {}
                for key in ("pn", "pn16", "l4b"):
                    mk = layer.calls.get(key)
                    err[key] = rel_error(mk(x)[0](), ref, rows_idx) if mk is not None else None
                del ref
                for t in threads:
                    if device.type == "cpu":
                        torch.set_num_threads(t)
                    us: dict[str, Optional[float]] = {}
                    methods: dict[str, str] = {}
                    paired: dict[str, float] = {}
                    if device.type == "cpu" and layer.calls.get("pn") and layer.calls.get("l4b"):
                        # The peer that matters, timed in alternation with pn (see time_cpu_paired).
                        a, b, paired["l4b"] = time_cpu_paired(layer.calls["pn"](x), layer.calls["l4b"](x),
                                                              target_s, repeats)
                        us["pn"], us["l4b"] = a * 1e6, b * 1e6
                        methods["pn"] = methods["l4b"] = "wall, alternated"
                        if layer.calls.get("pn16") and M <= PN16_MAX_M:
                            a16, _, paired["l4b/pn16"] = time_cpu_paired(
                                layer.calls["pn16"](x), layer.calls["l4b"](x), target_s, repeats)
                            us["pn16"], methods["pn16"] = a16 * 1e6, "wall, alternated"
                    for key in IMPLS:
                        if key in us:
                            continue
                        mk = layer.calls.get(key)
                        if mk is None:
                            us[key] = None
                            continue
                        if key == "pn16" and M > PN16_MAX_M:
                            us[key] = None
                            skipped_cells.add(key)
                            continue
                        if key == "mm4" and args.skip_slow_peers and device.type == "cpu" and M >= 128:
                            us[key] = None
                            skipped_cells.add(key)
                            continue
                        sec, methods[key] = timer(mk(x))
                        us[key] = sec * 1e6
                    t_pn = us["pn"] * 1e-6
                    gbps = layer.nf4_bytes / t_pn / 1e9
                    row = Row(K, N, name, M, t, us, err, gbps, 100 * gbps / bw[t] if bw.get(t) else None,
                              2 * M * N * K / t_pn / 1e9, methods, paired)
                    rows.append(row)
                    print_row(row, skipped_cells)
                    if args.out:
                        write(time.perf_counter() - t_start, final=False)
            del layer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if device.type == "cpu":
        torch.set_num_threads(max(threads))

    runtime = time.perf_counter() - t_start
    print(f"# total runtime {runtime:.0f} s", flush=True)
    now = extension_fingerprint(pn)
    if now != fingerprint:
        notes.append(f"the extension file changed on disk during this run (now {now}); this process kept the "
                     "build it loaded (header) unless the file was overwritten in place: rerun to be sure")
        print(f"# WARNING: {notes[-1]}", flush=True)
    if args.out:
        write(runtime, final=True)
        print(f"# wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
