"""What a checkpoint sweep costs: disk and load time of the quantized cache, and peak memory of loading.

For each size, a random checkpoint of that Pythia shape is built once with
transformers and saved in float16 safetensors, as the hub serves Pythia
(``GPTNeoXForCausalLM(config).half().save_pretrained(dir)``; no network).
Then, each measurement in a fresh Python process (so its peak RSS is its own):

- ``pn dense``: ``loading.build_model(dir)``, what ``load()`` does after the
  download: read the fp16 checkpoint and quantize the 4 Linear layers per
  block to NF4 (float32 model, CPU);
- ``pn cache``: ``build_model(entry)`` of the quantized-cache entry that
  ``quantized_cache.store`` wrote for it (4-bit bytes read as they are);
- ``hf fp32``: ``GPTNeoXForCausalLM.from_pretrained(dir, dtype=float32)``,
  the dense model a transformers user loads on the CPU.

Reported: bytes on disk; load time (median of ``--repeats`` processes, page
cache warm: the files were just written or read); peak RSS
(``VmHWM`` of ``/proc/self/status``: ``getrusage().ru_maxrss`` would do
in a process started fresh, but Linux carries ``ru_maxrss`` over ``execve``
from the forking parent, so a child of this script would report this
script's own peak) and, from a thread sampling
``/proc/self/status`` every 2 ms, the peak of its two parts: anonymous memory
(the process's own tensors) and file-backed pages (mmapped files, safetensors
included); the RSS after imports, before loading, is the baseline.

    PYTHONPATH=. python benchmarks/bench_sweep.py --sizes 160m 1.4b --out benchmarks/results/sweep_cache_cpu.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REVISION = "step1000"  # the cache entry's name; the weights are random


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakSampler(threading.Thread):
    """Peak RssAnon / RssFile of this process, sampled every 2 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.anon = self.file = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.anon = max(self.anon, status_kb("RssAnon"))
            self.file = max(self.file, status_kb("RssFile"))
            time.sleep(0.002)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def child(kind: str, path: str) -> None:
    """One measurement; prints a JSON line."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if kind.startswith("hf"):
        from transformers import GPTNeoXForCausalLM
    else:
        from pythia_native.loading import build_model
    base = {k: status_kb(k) for k in ("VmRSS", "RssAnon", "RssFile")}
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    if kind == "hf-fp32":
        model = GPTNeoXForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif kind in ("pn-dense", "pn-cache"):
        model = build_model(path, device=torch.device("cpu"), dtype=torch.float32)
    elif kind == "make-checkpoint":
        src, size = path.split("::")
        make_checkpoint(size, Path(src))
        print(json.dumps({}))
        return
    elif kind == "make-entry":
        from pythia_native import quantized_cache as qc
        from pythia_native.suite import resolve_model

        src, root, size = path.split("::")
        model = build_model(src, device=torch.device("cpu"), dtype=torch.float32)
        entry = qc.store(root, resolve_model(f"pythia-{size}"), REVISION, qc.QuantSettings(), model, src)
        print(json.dumps({"entry": str(entry)}))
        return
    else:
        raise SystemExit(f"unknown child kind {kind}")
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    print(json.dumps({
        # VmHWM: the peak RSS of this process image. ru_maxrss is not used: Linux carries it over
        # execve from the forked parent, so a child of a large parent reports the parent's peak.
        "seconds": seconds, "hwm_kb": status_kb("VmHWM"), "base_kb": base["VmRSS"],
        "base_anon_kb": base["RssAnon"], "base_file_kb": base["RssFile"],
        "peak_anon_kb": sampler.anon, "peak_file_kb": sampler.file, "model_bytes": model_bytes(model),
    }))


def run_child(kind: str, path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"child {kind} {path} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def make_checkpoint(size: str, directory: Path) -> None:
    if not (directory / "model.safetensors").is_file():
        import torch
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        from pythia_native.config import PythiaConfig

        cfg = PythiaConfig.for_size(size).to_dict()
        cfg.pop("architectures")
        torch.manual_seed(0)
        GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)).half().save_pretrained(directory)
    # A hub snapshot has its tokenizer, and a quantized-cache entry is stored
    # only with one: the real GPT-NeoX tokenizer (../shared/tokenizer), else a
    # small trained one (tests/neox.py), which serves the timing just as well.
    if not (directory / "tokenizer.json").is_file():
        sys.path.insert(0, str(HERE.parent / "tests"))
        from neox import tokenizer_path, trained_tokenizer

        src = tokenizer_path() or trained_tokenizer(directory)
        if src != directory / "tokenizer.json":
            shutil.copyfile(src, directory / "tokenizer.json")


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", nargs="+", default=["160m"])
    ap.add_argument("--repeats", type=int, default=3, help="processes per timed load (median)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers from_pretrained peer")
    ap.add_argument("--workdir", default="/tmp/pythia-native-bench-sweep")
    ap.add_argument("--out", default=None, help="write the markdown here (else stdout)")
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    import torch
    import transformers

    started, t_all = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    load_start = os.getloadavg()
    work = Path(args.workdir)
    rows_disk, rows_mem = [], []
    for size in args.sizes:
        src = work / f"pythia-{size}-fp16"
        run_child("make-checkpoint", f"{src}::{size}")
        info = run_child("make-entry", f"{src}::{work / 'q4'}::{size}")
        entry = Path(info["entry"])
        runs = {k: [run_child(k, p) for _ in range(args.repeats)]
                for k, p in (("pn-dense", src), ("pn-cache", entry)) + ((("hf-fp32", src),) if not args.no_hf else ())}
        t = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        dense_b, entry_b = dir_bytes(src), dir_bytes(entry)
        rows_disk.append(
            f"| {size} | {mib(dense_b)} | {mib(entry_b)} | {entry_b / dense_b:.2f}x | {t['pn-dense']:.2f} | "
            f"{t['pn-cache']:.2f} | {t['pn-dense'] / t['pn-cache']:.1f}x |"
        )
        for k, v in runs.items():
            r = max(v, key=lambda r: r["hwm_kb"])
            K = 1024
            rows_mem.append(
                f"| {size} | {k} | {mib(dense_b)} | {mib(r['model_bytes'])} | {mib(r['base_kb'] * K)} | "
                f"{mib(r['hwm_kb'] * K)} | {mib((r['hwm_kb'] - r['base_kb']) * K)} | "
                f"{mib((r['peak_anon_kb'] - r['base_anon_kb']) * K)} | "
                f"{mib((r['peak_anon_kb'] - r['base_anon_kb']) * K - r['model_bytes'])} | "
                f"{mib((r['peak_file_kb'] - r['base_file_kb']) * K)} | {t[k]:.2f} |"
            )
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem_total = status_meminfo("MemTotal")
    commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    out = [
        "# Checkpoint sweeps on the CPU: quantized-cache disk and load time, peak memory of loading",
        "",
        f"- machine: shared VM, {cpu}, {os.cpu_count()} logical CPUs, {mem_total / 2**20:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}; other work shares it (load average "
        f"{'/'.join(f'{x:.2f}' for x in load_start)} at start, {'/'.join(f'{x:.2f}' for x in os.getloadavg())} at end)",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
        f"pythia-native {commit}",
        f"- date: {started}; command: `{' '.join(['benchmarks/bench_sweep.py'] + sys.argv[1:])}`, "
        f"total {time.perf_counter() - t_all:.0f} s",
        "- checkpoints: random weights of each Pythia shape, built with transformers and saved as float16 "
        "safetensors (what the hub serves); quantized: NF4, blocksize 64, embed_out dense (the load() default); "
        "model dtype float32 (the CPU default)",
        f"- times: median of {args.repeats} fresh processes, page cache warm, {os.cpu_count()} threads; MiB = 2^20 bytes",
        "",
        "## Disk and load time: fp16 checkpoint vs quantized-cache entry",
        "",
        "| shape | fp16 checkpoint MiB | 4-bit entry MiB | entry/fp16 | load fp16 s (read + quantize) | "
        "load entry s | speed-up |",
        "|---|---|---|---|---|---|---|",
        *rows_disk,
        "",
        "## Peak memory of loading (one process per load)",
        "",
        "model MiB: the loaded model's parameters and buffers; base: RSS after imports, before loading; "
        "peak RSS: VmHWM; anon / file growth: sampled peak of RssAnon (the process's own memory) / RssFile "
        "(mapped file pages) minus its value at base; anon beyond model: the anonymous peak growth minus the "
        "model's bytes (the transient memory of loading).",
        "",
        "| shape | loader | fp16 file MiB | model MiB | base MiB | peak RSS MiB | peak - base | anon growth | "
        "anon beyond model | file growth | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows_mem,
        "",
    ]
    text = "\n".join(out)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def status_meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


if __name__ == "__main__":
    main()
