"""End-to-end decode speed and peak memory: pythia-native NF4 vs transformers
(fp32, bf16) vs transformers + bitsandbytes NF4, on random models shaped like
pythia-160m and pythia-1.4b, measured in the same run.

Decode tokens/s excludes the prompt: each variant generates ``1`` and then
``new`` tokens after the same prompt, and ``(new - 1) * batch / (t_new - t_1)``
is the rate (median of ``--repeats`` runs); "first token ms" is ``t_1``, the
prompt's prefill plus one token (time to first token). Every variant runs in its own
process so its peak memory (max RSS on the CPU, max allocated on CUDA) is its
own. "Bandwidth achieved" is the bytes of weights one decode step reads
(4-bit layers, their absmax, the dense embed_out row block) over the step time,
beside the copy bandwidth measured on this machine.

A shared machine's speed drifts by 20-50% within minutes, and each variant
runs at a different time. ``--rounds R`` runs the whole list of variants R
times, one after another (a, b, c, a, b, c, ...): each number in the table is
then the median over the rounds, and "vs transformers+bnb" the median of the
ratios within each round (with their range), so a slow phase that hits both
sides of one round cancels out.

    python benchmarks/bench_generate.py --device cpu --threads 2 --shapes 160m
    python benchmarks/bench_generate.py --device cuda --shapes 160m 1.4b --batch 1 8

``--cpu-isa avx2`` holds pythia-native's CPU kernels to AVX2, as on a CPU
without AVX-512; ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2 in the environment hold torch's (every variant runs in
a child process that inherits them). bitsandbytes chooses its CPU gemv by its
own cpuid check (its bf16 kernel needs AVX-512 BF16, else dequantize +
F.linear) and cannot be held.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

import torch

SHAPES = {
    "160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "1.4b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192),
}
# pythia-native-nf4: activations float32 on the CPU, float16 on CUDA; -bf16: bfloat16
# activations; -qhead: embed_out in 4 bits too (costs logit accuracy, see --head-error);
# -int16: the 4-bit Linears with compute="int16" (the CPU decode GEMV rounds x to int16
# per 64 values; see --int16-error for what it costs in logits).
# On the CPU the dense embed_out of the first two is kept in float16, as load() keeps a
# Pythia checkpoint's (its files are float16: the same values as a float32 head).
VARIANTS = ["pythia-native-nf4", "pythia-native-nf4-bf16", "pythia-native-nf4-qhead", "pythia-native-nf4-int16",
            "transformers-fp32", "transformers-bf16", "transformers-bnb-nf4"]


def hf_config(shape: str):
    import transformers

    return transformers.GPTNeoXConfig(
        vocab_size=50304, max_position_embeddings=2048, eos_token_id=0, bos_token_id=0, pad_token_id=1, **SHAPES[shape]
    )


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """GB/s of a large tensor copy (read + write counted), the practical ceiling.
    On CUDA 1 GiB timed with events (a 256 MiB copy takes ~0.2 ms on an H100,
    where a host-side timer and synchronize would add a visible share)."""
    n = (2**30 if device == "cuda" else 256 * 2**20) // 4
    a = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    times = []
    for _ in range(10):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            b.copy_(a)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            b.copy_(a)
            sync(device)
            times.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / min(times) / 1e9


def weight_bytes_per_token(config, dense_head_bytes: int) -> int:
    """Bytes a decode step must read: packed 4-bit weights + float32 absmax
    (blocksize 64) of the four Linears of every block, plus the dense embed_out."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    params = L * (3 * h * h + h * h + 2 * h * i)
    return int(params // 2 + params // 64 * 4 + config.vocab_size * h * dense_head_bytes)


def run_variant(variant: str, shape: str, device: str, batch: int, prompt: int, new: int, repeats: int, threads: int,
                cpu_isa: str = "auto"):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import transformers

    config = hf_config(shape)
    ids = torch.randint(2, 50000, (batch, prompt), device=device)
    if variant.startswith("pythia-native-nf4"):
        from pythia_native.generate import Pythia
        from pythia_native.model import PythiaModel

        from pythia_native import _C
        from pythia_native.config import PythiaConfig

        _C.set_cpu_isa(cpu_isa)
        dtype = torch.float32 if device == "cpu" else torch.float16
        options = variant.split("-")[3:]  # after pythia-native-nf4
        if "bf16" in options:
            dtype = torch.bfloat16
        qhead = "qhead" in options
        compute = "int16" if "int16" in options else "float32"
        # Random weights quantized straight into the model (no transformers copy in
        # memory, so the peak below is the engine's own).
        # On the CPU a dense head stays float16, as pythia_native.load() keeps
        # a Pythia (float16) checkpoint's: the same values as a float32 head.
        head_dtype = torch.float16 if device == "cpu" and not qhead else None
        model = PythiaModel.random(PythiaConfig.from_dict(config.to_dict()), dtype=dtype, quantize_embed_out=qhead,
                                   device=device, head_dtype=head_dtype, compute=compute)
        engine = Pythia(model, max_batch=batch, max_len=prompt + new)
        prompts = ids.tolist()

        def gen(n):
            engine.generate_ids(prompts, n, ignore_eos=True)

        head_bytes = 0.5 + 4 / 64 if qhead else model.embed_out.weight.element_size()
    else:
        if variant == "transformers-bnb-nf4":
            # bitsandbytes quantizes while loading: save the random model, load it 4-bit.
            # The checkpoint (0.6 GB for 160m, 5.3 GB for 1.4b) goes once loaded.
            compute = torch.float32 if device == "cpu" else torch.float16
            q = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
            with tempfile.TemporaryDirectory() as tmp:
                transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp)
                # On the CPU no device_map (that would need accelerate); on CUDA bitsandbytes quantizes on the GPU.
                hf = transformers.GPTNeoXForCausalLM.from_pretrained(
                    tmp, quantization_config=q, **({"device_map": device} if device == "cuda" else {})
                )
            head_bytes = 4 if device == "cpu" else 2
        else:
            dtype = torch.float32 if variant == "transformers-fp32" else torch.bfloat16
            hf = transformers.GPTNeoXForCausalLM(config).to(device=device, dtype=dtype)
            head_bytes = torch.tensor([], dtype=dtype).element_size()
        hf.eval()
        mask = torch.ones_like(ids)

        def gen(n):
            with torch.inference_mode():
                hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=1)

    gen(2)  # warm-up (and CUDA graph capture for ours)
    gen(new)
    t1, tn = [], []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        gen(1)
        sync(device)
        t1.append(time.perf_counter() - t)
        t = time.perf_counter()
        gen(new)
        sync(device)
        tn.append(time.perf_counter() - t)
    decode_s = max(statistics.median(tn) - statistics.median(t1), 1e-9)
    tok_s = (new - 1) * batch / decode_s
    step_s = decode_s / (new - 1)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        # VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss into an exec'd child.
        with open("/proc/self/status") as f:
            peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    if variant.startswith("transformers-") and variant != "transformers-bnb-nf4":
        h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        read = (L * (4 * h * h + 2 * h * i) + config.vocab_size * h) * head_bytes
    else:
        read = weight_bytes_per_token(config, head_bytes)
    return dict(variant=variant, shape=shape, batch=batch, tok_s=tok_s, step_ms=step_s * 1e3, peak_mb=peak / 2**20,
                weight_gb_s=read / step_s / 1e9, first_ms=statistics.median(t1) * 1e3)


def head_error(shape: str, seed: int = 0) -> str:
    """What a 4-bit embed_out costs in logits: the same model with a dense and a
    4-bit head, on random prompts (random weights: a real checkpoint's numbers differ)."""
    import transformers

    from pythia_native.model import PythiaModel

    torch.manual_seed(seed)
    hf = transformers.GPTNeoXForCausalLM(hf_config(shape))
    dense = PythiaModel.from_hf(hf)
    quant = PythiaModel.from_hf(hf, quantize_embed_out=True)
    ids = torch.randint(2, 50000, (4, 32))
    pos = torch.arange(32).expand(4, 32)
    a = dense(ids, pos, dense.new_cache(4, 32), span=32, last_only=False)
    b = quant(ids, pos, quant.new_cache(4, 32), span=32, last_only=False)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    rms = ((a - b).pow(2).mean().sqrt() / a.std()).item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return (f"4-bit embed_out ({shape}-shaped random weights, 4 x 32 tokens): max |dlogit| / max |logit| = {rel:.2e}, "
            f"rms dlogit / logit std = {rms:.2e}, top-1 agreement {100 * top1:.1f}%, KL(dense || 4-bit) = {kl:.2e} nats/token")


def int16_error(shape: str, steps: int = 32, seed: int = 0) -> str:
    """What compute="int16" costs in logits: one random model decoding the same
    tokens (float32's greedy choices, teacher-forced) in both modes, logits of
    every decode step compared (the prefill computes in float32 in both)."""
    from pythia_native.config import PythiaConfig
    from pythia_native.model import PythiaModel

    torch.manual_seed(seed)
    model = PythiaModel.random(PythiaConfig.from_dict(hf_config(shape).to_dict()), head_dtype=torch.float16)
    prompt = torch.randint(2, 50000, (1, 32))
    out = {}
    for mode in ("float32", "int16"):
        model.compute = mode
        cache = model.new_cache(1, 32 + steps)
        logits = [model(prompt, torch.arange(32).view(1, 32), cache, span=32)]
        for t in range(steps):
            tok = out["float32"][t].argmax(-1, keepdim=True) if mode == "int16" else logits[-1].argmax(-1, keepdim=True)
            logits.append(model(tok, torch.tensor([[32 + t]]), cache))
        out[mode] = logits
    a = torch.cat(out["float32"][1:]).double()
    b = torch.cat(out["int16"][1:]).double()
    rel = ((a - b).abs().max() / a.abs().max()).item()
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return (f"compute=int16 ({shape}-shaped random weights, float32 activations, {steps} teacher-forced decode steps "
            f"after a 32-token prompt): max |dlogit| / max |logit| = {rel:.2e} against compute=float32, "
            f"top-1 agreement {100 * top1:.1f}%, KL(float32 || int16) = {kl:.2e} nats/token")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", nargs="+", default=["160m"], choices=list(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the list of variants this many times in turn; report medians over the rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--out", help="append the markdown table to this file")
    ap.add_argument("--head-error", action="store_true", help="also measure the logit error of a 4-bit embed_out")
    ap.add_argument("--int16-error", action="store_true", help="also measure the logit error of compute=int16")
    ap.add_argument("--cpu-isa", default="auto", choices=["auto", "avx512", "avx2", "scalar"],
                    help="hold pythia-native's CPU kernels to this ISA (default: the best this CPU has)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = ap.parse_args()

    if args.one:
        v, shape, batch = args.one.split(",")
        r = run_variant(v, shape, args.device, int(batch), args.prompt, args.new, args.repeats, args.threads,
                        args.cpu_isa)
        print("RESULT " + json.dumps(r))
        return

    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if "transformers-bnb-nf4" in args.variants and importlib.util.find_spec("bitsandbytes") is None:
        # Its child would build and save the whole model before failing to import it.
        print("bitsandbytes is not installed: transformers-bnb-nf4 skipped", file=sys.stderr)
        args.variants = [v for v in args.variants if v != "transformers-bnb-nf4"]
    bw = copy_bandwidth(args.device)
    # runs[(shape, batch, variant)] = one result dict per round (or an error).
    runs: dict[tuple, list] = {}
    for rnd in range(args.rounds):
        for shape in args.shapes:
            for batch in args.batch:
                for v in args.variants:
                    cmd = [sys.executable, __file__, "--one", f"{v},{shape},{batch}", "--device", args.device,
                           "--prompt", str(args.prompt), "--new", str(args.new), "--repeats", str(args.repeats),
                           "--threads", str(args.threads), "--cpu-isa", args.cpu_isa]
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
                    if line is None:
                        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
                        print(f"{v} {shape} b{batch}: FAILED ({err})", file=sys.stderr)
                        runs.setdefault((shape, batch, v), []).append(dict(error=err))
                        continue
                    r = json.loads(line[7:])
                    runs.setdefault((shape, batch, v), []).append(r)
                    print(f"round {rnd + 1}: {v:22s} {shape:5s} b{batch}: {r['tok_s']:9.1f} tok/s  "
                          f"{r['step_ms']:7.2f} ms/step  first token {r['first_ms']:7.1f} ms  "
                          f"peak {r['peak_mb']:8.0f} MB  weights {r['weight_gb_s']:6.1f} GB/s", file=sys.stderr)
    rows = []
    for (shape, batch, v), rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append(dict(variant=v, shape=shape, batch=batch, error=rs[0]["error"]))
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in ("tok_s", "step_ms", "weight_gb_s", "first_ms", "peak_mb")}
        # The ratio to the peer within each round (both measured minutes apart at most).
        peer = runs.get((shape, batch, "transformers-bnb-nf4"), [])
        ratios = [r["tok_s"] / q["tok_s"] for r, q in zip(rs, peer) if "error" not in r and "error" not in q]
        rows.append(dict(variant=v, shape=shape, batch=batch, ratios=ratios, **med))

    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    try:
        import bitsandbytes

        bnb_v = bitsandbytes.__version__
    except Exception:
        bnb_v = "absent"
    import transformers

    lines = [
        f"## Decode, {args.device} ({dev}), {args.threads} thread(s), prompt {args.prompt}, {args.new} new tokens, "
        f"median of {args.repeats}" + (f", {args.rounds} rounds (medians over them)" if args.rounds > 1 else ""),
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb_v}, {date.today()}; "
        f"measured copy bandwidth {bw:.1f} GB/s."
        + (f" pythia-native's CPU kernels held to {args.cpu_isa}." if args.cpu_isa != "auto" else "")
        + "".join(f" {k}={os.environ[k]}." for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                     "ONEDNN_MAX_CPU_ISA") if k in os.environ),
        "",
        "| shape | batch | variant | decode tok/s | ms/step | vs transformers+bnb | weights GB/s | % of copy bw | "
        "first token ms | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['variant']} | failed: {r['error']} | | | | | | |")
            continue
        ratios = r["ratios"]
        ratio = "n/a"
        if len(ratios) == 1 or r["variant"] == "transformers-bnb-nf4":
            ratio = f"{ratios[0]:.2f}x"
        elif ratios:
            ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['variant']} | {r['tok_s']:.1f} | {r['step_ms']:.2f} | {ratio} | "
            f"{r['weight_gb_s']:.1f} | {100 * r['weight_gb_s'] / bw:.0f}% | {r['first_ms']:.1f} | {r['peak_mb']:.0f} |"
        )
    if args.head_error:
        lines += ["", head_error(args.shapes[0])]
    if args.int16_error:
        lines += ["", int16_error(args.shapes[0])]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
