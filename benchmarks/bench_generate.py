"""End-to-end decode speed and peak memory: pythia-native NF4 vs transformers
(fp32, bf16) vs transformers + bitsandbytes NF4, on random models shaped like
pythia-160m and pythia-1.4b, measured in the same run.

Decode tokens/s excludes the prompt: each variant generates ``1`` and then
``new`` tokens after the same prompt, and ``(new - 1) * batch / (t_new - t_1)``
is the rate (median of ``--repeats`` runs); "first token ms" is ``t_1``, the
prompt's prefill plus one token (time to first token). Every variant runs in its own
process so its peak memory (max RSS on the CPU, max allocated on CUDA) is its
own. "weights GB/s" is the bytes of weights one decode step reads over the
step time, beside the copy bandwidth measured on this machine; the bytes are
summed from the loaded model's own tensors (see weight_bytes_read): every
Linear's weight as stored (packed 4-bit bytes, or dense elements of whatever
dtype the variant loaded, embed_out included) plus the 4-bit layers' absmax.

The peers load as a user would: transformers-fp32 in float32,
transformers-bf16 in bfloat16, and transformers + bitsandbytes NF4 with
``dtype`` = its compute dtype (float32 on the CPU, float16 on CUDA, as
pythia-native-nf4's activations), so its embeddings, LayerNorms and embed_out
are in that dtype too.

With ``--out`` the table is written after every variant's run (this
invocation's section of the file rewritten in place, marked PARTIAL until the
last run is in), and on SIGTERM or Ctrl-C (e.g. ``timeout``) the runs finished
so far are written before it exits: a run cut short keeps its rows.

A shared machine's speed drifts by 20-50% within minutes, and each variant
runs at a different time. ``--rounds R`` runs the whole list of variants R
times, one after another (a, b, c, a, b, c, ...): each number in the table is
then the median over the rounds, and "vs transformers+bnb" the median of the
ratios within each round (with their range), so a slow phase that hits both
sides of one round cancels out.

    python benchmarks/bench_generate.py --device cpu --threads 2 --shapes 160m
    python benchmarks/bench_generate.py --device cuda --shapes 160m 1.4b --batch 1 8

``--temperature T`` (with ``--top-k K``, ``--top-p P``) samples instead of
decoding greedily, every variant with the same settings and a fixed seed
(transformers' generate gets top_k=0 where no K is given: its default is 50).
The sampler is then part of each step's time.

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
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_cpu_isa_arg, build_info, command_line, cpu_model, git_state, hold_cpu_isa, versions  # noqa: E402

# The suite sizes measured (architectures: pythia_native.config.SUITE_ARCHITECTURES).
SHAPES = ("160m", "1.4b")
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

    from pythia_native.config import PythiaConfig

    # The suite's architecture, as its config.json has it; pad id 1 for transformers' batches.
    return transformers.GPTNeoXConfig(**PythiaConfig.for_size(shape).to_dict(), pad_token_id=1)


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


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads, from the model's tensors as loaded:
    the weight of every Linear-like module (anything with a weight but an
    Embedding or a LayerNorm: nn.Linear in its dtype, bitsandbytes' Linear4bit
    and pythia-native's QuantizedLinear as their packed uint8 bytes), embed_out
    included, plus the 4-bit layers' absmax (pythia-native's ``absmax`` /
    ``nested_absmax`` buffers, bitsandbytes' quant_state; nested statistics too).
    Left out: the input embedding (a step reads one row of it per sequence),
    biases and LayerNorms (under 0.5% of the bytes of these models)."""
    seen: set[int] = set()

    def size(t) -> int:
        if not isinstance(t, torch.Tensor) or t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    total = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or isinstance(m, (torch.nn.Embedding, torch.nn.LayerNorm)):
            continue
        total += size(w)
        for name in ("absmax", "nested_absmax"):  # pythia-native's QuantizedLinear
            total += size(getattr(m, name, None))
        qs = getattr(w, "quant_state", None)  # bitsandbytes' Params4bit
        while qs is not None:
            total += size(getattr(qs, "absmax", None))
            qs = getattr(qs, "state2", None) if getattr(qs, "nested", False) else None
    return total


def run_variant(variant: str, shape: str, device: str, batch: int, prompt: int, new: int, repeats: int, threads: int,
                cpu_isa: Optional[str] = None, sampling: Optional[dict] = None):
    """One variant's run in this process. ``sampling``: None for greedy, else
    ``temperature``, ``top_k`` (None: off), ``top_p`` (None: off), the same for
    every variant (seeded: ours by generate's seed, transformers' by torch's)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import transformers

    config = hf_config(shape)
    ids = torch.randint(2, 50000, (batch, prompt), device=device)
    if variant.startswith("pythia-native-nf4"):
        from pythia_native.generate import Pythia
        from pythia_native.model import PythiaModel

        from pythia_native import set_cpu_isa
        from pythia_native.config import PythiaConfig

        if cpu_isa:  # else as imported (PYTHIA_NATIVE_CPU_ISA, or the best)
            set_cpu_isa(cpu_isa)
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
            engine.generate_ids(prompts, n, ignore_eos=True, **(dict(sampling, seed=0) if sampling else {}))

        read = weight_bytes_read(model)
    else:
        if variant == "transformers-bnb-nf4":
            # bitsandbytes quantizes while loading: save the random model, load it 4-bit.
            # The checkpoint (0.6 GB for 160m, 5.3 GB for 1.4b) goes once loaded.
            # dtype = the compute dtype, as a user would load it: the embeddings,
            # LayerNorms and embed_out in it too (transformers' default, dtype="auto",
            # would keep this float32 checkpoint's float32 and run float32 activations
            # on CUDA). On the CPU float32 either way (as in earlier CPU runs).
            compute = torch.float32 if device == "cpu" else torch.float16
            q = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
            with tempfile.TemporaryDirectory() as tmp:
                transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp)
                # On the CPU no device_map (that would need accelerate); on CUDA bitsandbytes quantizes on the GPU.
                hf = transformers.GPTNeoXForCausalLM.from_pretrained(
                    tmp, quantization_config=q, dtype=compute, **({"device_map": device} if device == "cuda" else {})
                )
        else:
            dtype = torch.float32 if variant == "transformers-fp32" else torch.bfloat16
            hf = transformers.GPTNeoXForCausalLM(config).to(device=device, dtype=dtype)
        read = weight_bytes_read(hf)
        hf.eval()
        mask = torch.ones_like(ids)

        # transformers' generation config defaults top_k to 50: 0 turns it off.
        options = dict(do_sample=False)
        if sampling:
            options = dict(do_sample=True, temperature=sampling["temperature"], top_k=sampling["top_k"] or 0,
                           top_p=sampling["top_p"] if sampling["top_p"] is not None else 1.0)

        def gen(n):
            with torch.inference_mode():
                torch.manual_seed(0)
                hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=1, **options)

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
    decode_s = statistics.median(tn) - statistics.median(t1)
    if decode_s <= 0:
        # Noise larger than the decode itself (tiny --new, a busy machine): no rate to report.
        sys.exit(f"not measurable: {new} tokens took {statistics.median(tn) * 1e3:.1f} ms, no more than 1 token's "
                 f"{statistics.median(t1) * 1e3:.1f} ms (raise --new or --repeats)")
    tok_s = (new - 1) * batch / decode_s
    step_s = decode_s / (new - 1)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        # VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss into an exec'd child.
        with open("/proc/self/status") as f:
            peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    return dict(variant=variant, shape=shape, batch=batch, tok_s=tok_s, step_ms=step_s * 1e3, peak_mb=peak / 2**20,
                weight_gb_s=read / step_s / 1e9, weight_mb=read / 1e6, first_ms=statistics.median(t1) * 1e3)


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
    ap.add_argument("--shapes", nargs="+", default=["160m"], choices=SHAPES)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the list of variants this many times in turn; report medians over the rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--out", help="add this invocation's markdown section to this file (kept what it held before; "
                    "the section is rewritten after every run, marked PARTIAL until done)")
    ap.add_argument("--head-error", action="store_true", help="also measure the logit error of a 4-bit embed_out")
    ap.add_argument("--int16-error", action="store_true", help="also measure the logit error of compute=int16")
    add_cpu_isa_arg(ap)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (with --top-k / --top-p) instead of greedy decoding, every "
                         "variant alike")
    ap.add_argument("--top-k", type=int, default=None, help="with --temperature: top-k (default off)")
    ap.add_argument("--top-p", type=float, default=None, help="with --temperature: top-p (default off)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = ap.parse_args()
    # Checked here, before any model is built: a value our sampler refuses
    # would fail only in our variants' processes, and transformers would run
    # something else (its top_k=0 is "off").
    if not math.isfinite(args.temperature) or args.temperature < 0:
        ap.error(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        ap.error("--top-k / --top-p need a --temperature > 0 (0: greedy)")
    if args.top_k is not None and args.top_k < 1:
        ap.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        ap.error(f"--top-p must be in (0, 1], got {args.top_p}")
    sampling = (dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
                if args.temperature > 0 else None)
    if not args.one:
        hold_cpu_isa(ap, args.cpu_isa)  # checked once here, not in every variant's process

    if args.one:
        v, shape, batch = args.one.split(",")
        r = run_variant(v, shape, args.device, int(batch), args.prompt, args.new, args.repeats, args.threads,
                        args.cpu_isa, sampling)
        print("RESULT " + json.dumps(r))
        return

    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_generate: --device cuda but no CUDA GPU is visible")
    notes = []
    if "transformers-bnb-nf4" in args.variants and importlib.util.find_spec("bitsandbytes") is None:
        # Its child would build and save the whole model before failing to import it.
        print("bitsandbytes is not installed: transformers-bnb-nf4 skipped", file=sys.stderr)
        notes.append("bitsandbytes is not installed: transformers-bnb-nf4 skipped.")
        args.variants = [v for v in args.variants if v != "transformers-bnb-nf4"]
    bw = copy_bandwidth(args.device)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the copy's 2 GiB, not held while the children run

    # Stopped by SIGTERM (timeout's signal) or Ctrl-C: write what ran, then exit.
    class Stopped(Exception):
        pass

    stopping: list[str] = []  # set once: a second signal (the group's, after the child's) is ignored

    def stop(why: str):
        if not stopping:
            stopping.append(why)
            raise Stopped(why)

    def on_signal(signum, frame):
        stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # This invocation's section is rewritten in place after every run: what the
    # file held before it is kept as it was.
    before = ""
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            before = f.read()
        if before and not before.endswith("\n"):
            before += "\n"
    header = dict(
        dev=(f"{torch.cuda.get_device_name()}" if args.device == "cuda" else cpu_model()),
        versions=versions(), commit=git_state(), build=build_info(), cmd=command_line(), day=str(date.today()),
    )
    n_runs = args.rounds * len(args.shapes) * len(args.batch) * len(args.variants)
    # runs[(shape, batch, variant)] = one result dict per round (or an error).
    runs: dict[tuple, list] = {}
    done = 0

    def write(status: str, extra: list[str] = ()) -> str:
        text = render(args, header, bw, runs, status, notes + list(extra))
        if args.out:
            # Beside, then renamed: a kill during the write leaves the last good copy.
            tmp = os.path.join(os.path.dirname(os.path.abspath(args.out)), f".{os.path.basename(args.out)}.tmp")
            with open(tmp, "w") as f:
                f.write(before + text + "\n")
            os.replace(tmp, args.out)
        return text

    current = None
    try:
        for rnd in range(args.rounds):
            for shape in args.shapes:
                for batch in args.batch:
                    for v in args.variants:
                        current = f"{v} {shape} batch {batch}" + (f" (round {rnd + 1})" if args.rounds > 1 else "")
                        cmd = [sys.executable, __file__, "--one", f"{v},{shape},{batch}", "--device", args.device,
                               "--prompt", str(args.prompt), "--new", str(args.new), "--repeats", str(args.repeats),
                               "--threads", str(args.threads)] + (["--cpu-isa", args.cpu_isa] if args.cpu_isa else [])
                        cmd += ["--temperature", str(args.temperature)] + sum(
                            ([f"--{k}", str(val)] for k, val in (("top-k", args.top_k), ("top-p", args.top_p))
                             if val is not None), [])
                        p = subprocess.run(cmd, capture_output=True, text=True)
                        if p.returncode in (-signal.SIGTERM, -signal.SIGINT):
                            # timeout signals the whole process group: the child first, maybe.
                            stop(f"{signal.Signals(-p.returncode).name} (to the child)")
                        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
                        if line is None:
                            tail = p.stderr.strip().splitlines() or [f"no output (exit {p.returncode})"]
                            err = tail[-1]
                            print(f"{v} {shape} b{batch}: FAILED (exit {p.returncode}); its stderr ends:\n  "
                                  + "\n  ".join(tail[-8:]), file=sys.stderr)
                            runs.setdefault((shape, batch, v), []).append(dict(error=err))
                        else:
                            r = json.loads(line[7:])
                            runs.setdefault((shape, batch, v), []).append(r)
                            print(f"round {rnd + 1}: {v:22s} {shape:5s} b{batch}: {r['tok_s']:9.1f} tok/s  "
                                  f"{r['step_ms']:7.2f} ms/step  first token {r['first_ms']:7.1f} ms  "
                                  f"peak {r['peak_mb']:8.0f} MB  weights {r['weight_gb_s']:6.1f} GB/s", file=sys.stderr)
                        done += 1
                        current = None
                        if done < n_runs or args.head_error or args.int16_error:
                            write(f"PARTIAL: {done} of {n_runs} runs so far (still running, or cut off)")
        extra = []
        if args.head_error:
            current = "--head-error"
            extra += ["", head_error(args.shapes[0])]
        if args.int16_error:
            current = "--int16-error"
            extra += ["", int16_error(args.shapes[0])]
        current = None
        # Every run is in: the last write is not to be cut short (a signal before
        # this line still lands in the handler below).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        text = write("", extra)
    except Stopped as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        status = (f"PARTIAL: stopped by {e} after {done} of {n_runs} runs"
                  + (f"; {current} was running and has no row" if current else ""))
        print(f"bench_generate: {status}", file=sys.stderr)
        text = write(status)
        print(text, flush=True)
        sys.exit(143 if "SIGTERM" in str(e) else 130)
    print(text)


def render(args, header: dict, bw: float, runs: dict, status: str, notes: list[str]) -> str:
    """This invocation's Markdown section from the runs so far (medians over rounds)."""
    rows = []
    for (shape, batch, v), rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append(dict(variant=v, shape=shape, batch=batch, error=rs[0]["error"]))
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in ("tok_s", "step_ms", "weight_gb_s", "first_ms", "peak_mb")}
        mb = sorted({round(r.get("weight_mb", 0), 1) for r in ok})
        # The ratio to the peer within each round (both measured minutes apart at most).
        peer = runs.get((shape, batch, "transformers-bnb-nf4"), [])
        ratios = [r["tok_s"] / q["tok_s"] for r, q in zip(rs, peer) if "error" not in r and "error" not in q]
        rows.append(dict(variant=v, shape=shape, batch=batch, ratios=ratios, weight_mb=mb, **med))

    held_isa = args.cpu_isa or os.environ.get("PYTHIA_NATIVE_CPU_ISA")  # the variants' processes inherit it
    lines = [
        f"## Decode, {args.device} ({header['dev']}), {args.threads} thread(s), prompt {args.prompt}, "
        f"{args.new} new tokens, "
        + (f"sampled (temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}), "
           if args.temperature > 0 else "greedy, ")
        + f"median of {args.repeats}"
        + (f", {args.rounds} rounds (medians over them)" if args.rounds > 1 else ""),
        "",
        *([f"**{status}**", ""] if status else []),
        f"{header['versions']}, {header['day']}; measured copy bandwidth {bw:.1f} GB/s."
        + (f" pythia-native's CPU kernels held to {held_isa}." if held_isa not in (None, "", "auto") else "")
        + "".join(f" {k}={os.environ[k]}." for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                     "ONEDNN_MAX_CPU_ISA") if k in os.environ),
        f"pythia-native {header['commit']}, build_info {header['build']}.",
        f"Command: `{header['cmd']}`.",
        "",
        "| shape | batch | variant | decode tok/s | ms/step | vs transformers+bnb | weights GB/s | % of copy bw | "
        "first token ms | peak MB | weights MB/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['variant']} | failed: {r['error']} | | | | | | | |")
            continue
        ratios = r["ratios"]
        ratio = "n/a"
        if len(ratios) == 1 or (ratios and r["variant"] == "transformers-bnb-nf4"):
            ratio = f"{ratios[0]:.2f}x"
        elif ratios:
            ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['variant']} | {r['tok_s']:.1f} | {r['step_ms']:.2f} | {ratio} | "
            f"{r['weight_gb_s']:.1f} | {100 * r['weight_gb_s'] / bw:.0f}% | {r['first_ms']:.1f} | {r['peak_mb']:.0f} | "
            f"{'/'.join(f'{m:.1f}' for m in r['weight_mb'])} |"
        )
    lines += [
        "",
        "weights MB/step: the bytes counted for `weights GB/s`, summed from the loaded model's tensors (every "
        "Linear's weight as stored, embed_out included, plus the 4-bit layers' absmax; not the input embedding, "
        "biases or LayerNorms). `vs transformers+bnb`: tokens/s over the transformers + bitsandbytes NF4 "
        "variant's in the same round of this invocation (n/a where that peer did not run here).",
    ]
    if notes:
        lines += [""] + [n for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
