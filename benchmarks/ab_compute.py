#!/usr/bin/env python
"""compute="float32" against compute="int16" end to end, in one process.

One random model (pythia-<size>-shaped, float32 activations, float16 head as
load() keeps a Pythia checkpoint's) decodes the same prompt in both modes,
alternated pair by pair (float32, int16, float32, int16, ...), so that this
VM's minute-to-minute swings (20-50%) fall on both sides of each ratio. Each
measurement is (t(64 new tokens) - t(1 new token)) / 63: ms per decode step.

    python benchmarks/ab_compute.py --threads 1 --shape 160m --pairs 8
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shape", default="160m", help="a suite size for PythiaConfig.for_size (160m, 1.4b, ...)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()

    from pythia_native.config import PythiaConfig
    from pythia_native.generate import Pythia
    from pythia_native.model import PythiaModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PythiaModel.random(PythiaConfig.for_size(args.shape), head_dtype=torch.float16)
    engine = Pythia(model, max_batch=1, max_len=32 + args.new)
    prompt = torch.randint(2, 50000, (1, 32)).tolist()

    def step_ms(n: int) -> float:
        t = time.perf_counter()
        engine.generate_ids(prompt, 1, ignore_eos=True)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        engine.generate_ids(prompt, n, ignore_eos=True)
        return (time.perf_counter() - t - t1) / (n - 1) * 1e3

    for mode in ("float32", "int16"):  # warm-up
        model.compute = mode
        step_ms(8)
    a, b = [], []
    for _ in range(args.pairs):
        model.compute = "float32"
        a.append(step_ms(args.new))
        model.compute = "int16"
        b.append(step_ms(args.new))
    r = [x / y for x, y in zip(a, b)]
    print(f"pythia-{args.shape}-shaped, {args.threads} thread(s), batch 1, {args.pairs} alternated pairs: "
          f"float32 {statistics.median(a):.2f} ms/step ({min(a):.2f}-{max(a):.2f}), "
          f"int16 {statistics.median(b):.2f} ({min(b):.2f}-{max(b):.2f}); float32 / int16 per pair: median "
          f"{statistics.median(r):.2f}x (range {min(r):.2f}-{max(r):.2f}), int16 faster in "
          f"{sum(x > 1 for x in r)} of {len(r)}")


if __name__ == "__main__":
    main()
