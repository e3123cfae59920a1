"""Where a decode step's time goes: torch profiler over pythia-native's generate
loop on a random pythia-shaped model, per op (CPU) or per kernel (CUDA).

The profiler records the decode steps only: it starts when the prompt's
prefill has returned (the engine's ``_prefill``, wrapped for the run; the
device synchronized first, so no prefill kernel is in the window) and stops
after the last token. Two such runs of the same prompt, one generating 1 token
(the window holds only the first token's sampling) and one 1 + ``--steps``
tokens (``--steps`` decode steps, each a forward and the sampling after it);
their difference divided by ``--steps`` is one decode step. An op whose call
count does not grow with the steps is left out of the table (its time is noise
between the two runs) and its total reported under it. Besides the table: the step time measured without
the profiler (the profiler adds a few microseconds per op), and on CUDA the
number of kernels (and memory copies) per step: a graph replay still runs each one.

    PYTHONPATH=. python benchmarks/profile_decode.py --device cpu --shape 160m
    PYTHONPATH=. python benchmarks/profile_decode.py --device cuda --shape 1.4b --out benchmarks/results/profile_cuda.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import build_info, command_line, cpu_model, git_state, versions  # noqa: E402
from bench_generate import hf_config  # noqa: E402  (the shapes of the generate benchmark)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(args):
    from pythia_native.config import PythiaConfig
    from pythia_native.generate import Pythia
    from pythia_native.model import PythiaModel

    default = torch.float32 if args.device == "cpu" else torch.float16
    dtype = getattr(torch, args.dtype) if args.dtype else default
    config = PythiaConfig.from_dict(hf_config(args.shape).to_dict())
    # As bench_generate: on the CPU a dense head stays float16 (a Pythia checkpoint's).
    head_dtype = torch.float16 if args.device == "cpu" and not args.qhead else None
    model = PythiaModel.random(config, dtype=dtype, quantize_embed_out=args.qhead, device=args.device,
                               head_dtype=head_dtype, compute=args.compute)
    model.fuse_decode = not args.unfused
    engine = Pythia(model, max_batch=args.batch, max_len=args.prompt + args.steps + 2)
    torch.manual_seed(0)
    prompts = torch.randint(2, 50000, (args.batch, args.prompt)).tolist()
    return engine, prompts, dtype


def step_ms(engine, prompts, steps: int, device: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        engine.generate_ids(prompts, 1, ignore_eos=True)
        sync(device)
        t1 = time.perf_counter()
        engine.generate_ids(prompts, steps + 1, ignore_eos=True)
        sync(device)
        t2 = time.perf_counter()
        times.append(((t2 - t1) - (t1 - t0)) / steps * 1e3)
    return sorted(times)[len(times) // 2]


def profile_totals(engine, prompts, new_tokens: int, device: str) -> tuple[dict[str, tuple[int, float]], bool]:
    """name -> (calls, microseconds): CPU self time per op, or CUDA time per kernel,
    of generate_ids(prompts, new_tokens) after the prefill; and whether the
    prefill was kept out (False: the engine has no ``_prefill`` to wrap, so the
    whole call was profiled and the prefill only cancels in the difference)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=activities)
    started = []
    prefill = getattr(engine, "_prefill", None)

    def prefill_then_profile(*a, **k):
        out = prefill(*a, **k)
        sync(device)  # the prefill's kernels finish outside the window
        if not started:
            prof.start()
            started.append(True)
        return out

    sync(device)
    if prefill is not None:
        engine._prefill = prefill_then_profile  # an instance attribute, shadowing the method for this call
    else:
        prof.start()
        started.append(True)
    try:
        engine.generate_ids(prompts, new_tokens, ignore_eos=True)
        sync(device)
    finally:
        if prefill is not None:
            del engine._prefill
        if started:
            prof.stop()
    if not started:
        sys.exit("profile_decode: generate_ids never called the engine's _prefill; nothing was profiled")
    totals = {}
    for e in prof.key_averages():
        if device == "cuda":
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = e.self_cuda_time_total
            if e.device_type.name != "CUDA" or us <= 0:
                continue
        else:
            us = e.self_cpu_time_total
        totals[e.key] = (e.count, us)
    return totals, prefill is not None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="160m", choices=["160m", "1.4b"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="activations (default: float32 on the CPU, float16 on CUDA)")
    ap.add_argument("--qhead", action="store_true", help="embed_out in 4 bits too")
    ap.add_argument("--unfused", action="store_true",
                    help="compose each decode block from the per-op kernels instead of the fused neox_block_ "
                    "(a per-op breakdown of the blocks; model.fuse_decode = False)")
    ap.add_argument("--compute", default="float32", choices=["float32", "int16"],
                    help="the 4-bit Linears' arithmetic (gemm_4bit's compute; model.compute)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", help="append the markdown to this file")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("profile_decode: --device cuda but no CUDA GPU is visible")
    torch.set_num_threads(args.threads)

    engine, prompts, dtype = build(args)
    engine.generate_ids(prompts, args.steps + 1, ignore_eos=True)  # warm-up (and the CUDA graph)
    ms = step_ms(engine, prompts, args.steps, args.device)
    first, _ = profile_totals(engine, prompts, 1, args.device)
    full, prefill_out = profile_totals(engine, prompts, args.steps + 1, args.device)
    rows = []
    noise_us, noise_n = 0.0, 0  # ops whose call count did not grow with the steps
    for key, (count, us) in full.items():
        c0, u0 = first.get(key, (0, 0.0))
        per_step_us = (us - u0) / args.steps
        if count - c0 <= 0:
            noise_us += per_step_us
            noise_n += 1
        elif per_step_us > 0:
            rows.append((per_step_us, (count - c0) / args.steps, key))
    rows.sort(reverse=True)
    profiled_ms = sum(r[0] for r in rows) / 1e3
    if not rows:
        sys.exit(f"profile_decode: the profiler recorded no {'CUDA kernels' if args.device == 'cuda' else 'ops'} "
                 f"in the decode steps (step time without it: {ms:.2f} ms)")

    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{cpu_model()}, {args.threads} thread(s)"
    what = "CUDA kernel time" if args.device == "cuda" else "CPU self time"
    lines = [
        f"## Decode step profile: {args.shape}-shaped, {args.device} ({where}), batch {args.batch}, "
        f"{str(dtype).replace('torch.', '')} activations{', 4-bit embed_out' if args.qhead else ''}"
        f"{', blocks unfused' if args.unfused else ''}{', compute=int16' if args.compute == 'int16' else ''}",
        "",
        f"{versions()}, {date.today()}; pythia-native {git_state()}, build_info {build_info()}.",
        f"Command: `{command_line()}`.",
        "",
        f"Prompt {args.prompt}, {args.steps} decode steps profiled "
        + ("(the profiler started after the prefill; the window of a 1-token run subtracted)."
           if prefill_out else "(the whole generate call profiled, prefill included, and a 1-token run's "
           "profile subtracted: the engine had no _prefill to start after).")
        + (f" Left out: {noise_n} op(s) whose call count did not grow with the steps, {noise_us:+.1f} us per step "
           "in all (noise between the two runs)." if noise_n else ""),
        "",
        f"Step time without the profiler: **{ms:.2f} ms** ({args.batch * 1e3 / ms:.1f} tokens/s). "
        f"Profiled {what} per step: {profiled_ms:.2f} ms"
        + (f", {sum(r[1] for r in rows):.0f} kernels (and copies) per step" if args.device == "cuda" else "")
        + ".",
        "",
        f"| {'kernel' if args.device == 'cuda' else 'op'} | calls per step | us per step | % of profiled |",
        "|---|---|---|---|",
    ]
    for per_step_us, calls, key in rows[: args.top]:
        name = key if len(key) <= 90 else key[:87] + "..."
        lines.append(f"| `{name}` | {calls:g} | {per_step_us:.1f} | {100 * per_step_us / 1e3 / profiled_ms:.1f}% |")
    rest = sum(r[0] for r in rows[args.top:])
    if rest > 0:
        lines.append(f"| (the other {len(rows) - args.top}) | | {rest:.1f} | {100 * rest / 1e3 / profiled_ms:.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
