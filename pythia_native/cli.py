"""The ``pythia-native`` command line.

    pythia-native generate "Once upon a time"                     # pythia-160m, streamed
    pythia-native generate --model pythia-1.4b-deduped --revision step71000 --temperature 0.8 "..."
    pythia-native score --model pythia-410m text.txt              # perplexity
    pythia-native score --model pythia-160m --every 20000 --quantized-cache ~/pn4 text.txt   # perplexity by revision
    pythia-native revisions pythia-160m                           # the 154 branches
    pythia-native export --model pythia-160m out/                 # a bitsandbytes 4-bit checkpoint
    pythia-native bench --random-weights --size 160m              # tokens/s, no download

Errors a user can fix (unknown model, bad revision, offline without a cache,
corrupt file, not GPT-NeoX, missing tokenizer, no GPU) end with one line on
stderr and exit code 2; no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Optional, Sequence

DEFAULT_MODEL = "EleutherAI/pythia-160m"


def _add_model_args(p: argparse.ArgumentParser, positional_model: bool = False) -> None:
    if not positional_model:
        # None until main() fills in DEFAULT_MODEL, so that bench can tell a
        # --model given (even as the default's name) from none.
        p.add_argument("--model", "-m", default=None,
                       help=f"Pythia name, hub repo id or local directory (default {DEFAULT_MODEL})")
    p.add_argument("--revision", "-r", default=None, help="main (default), stepN, or a commit hash")
    # (format.QUANT_TYPES / DEFAULT_QUANT_TYPE, spelled out: --help imports no torch)
    p.add_argument("--quant-type", default=None, choices=["nf4", "fp4"],
                   help="4-bit format for dense checkpoints (default nf4)")
    p.add_argument("--double-quant", action="store_true", help="double-quantize the block scales (saving)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when visible)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="activation dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache directory")
    p.add_argument("--quantized-cache", default=None, metavar="DIR",
                   help="keep 4-bit copies of loaded revisions here and load them from here (no download)")
    p.add_argument("--offline", action="store_true", help="use the local cache only (like HF_HUB_OFFLINE=1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads; at most 8 per CPU this process may use, or 64 "
                   "where that is more)")
    p.add_argument("--compute", default="float32", choices=["float32", "int16"],
                   help="4-bit Linear arithmetic: float32 (default), or int16 (x rounded to int16 per 64 "
                   "values in the CPU decode GEMV: 1.6-2.4x faster at M = 1 with AVX-512 VNNI, 2.4-4.4x with AVX2 only (README: Arithmetic); ~1e-4 relative error "
                   "per layer)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=64, help="at most this many new tokens (default 64)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding this mass")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable), matched in the new text only, "
                   "taken literally: a newline is --stop $'\\n' in bash, not '\\n'")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--truncate", action="store_true", help="cut the prompt from the left to fit the context")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pythia-native", description="EleutherAI Pythia with 4-bit weights.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt (streamed to stdout)")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' or omitted reads stdin")
    _add_model_args(g)
    _sampling_args(g)
    g.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")

    s = sub.add_parser("score", help="log-probability and perplexity of a text file (or of each line)")
    s.add_argument("file", help="text file ('-' for stdin)")
    _add_model_args(s)
    s.add_argument("--per-line", action="store_true", help="score each non-empty line as its own text")
    s.add_argument("--no-eos", action="store_true", help="do not score the first token after <|endoftext|>")
    s.add_argument("--revisions", default=None, metavar="LIST",
                   help="score under each of these revisions, comma-separated (step1000,step2000,main): one line each")
    s.add_argument("--every", type=int, default=None, metavar="N",
                   help="score under every suite branch whose step is a multiple of N, one line each")
    s.add_argument("--free-hub-files", action="store_true",
                   help="with --revisions/--every: delete each revision's files from the Hugging Face cache once loaded")

    r = sub.add_parser("revisions", help="list the valid revisions of a Pythia model")
    r.add_argument("model", help="a Pythia name (pythia-160m, EleutherAI/pythia-1b-deduped-v0, ...)")

    e = sub.add_parser("export", help="write a bitsandbytes 4-bit checkpoint (transformers + bitsandbytes load it)")
    e.add_argument("output", help="output directory")
    _add_model_args(e)
    e.add_argument("--quantize-embed-out", action="store_true", help="store embed_out in 4 bits too")

    b = sub.add_parser("bench", help="quick decode tokens/s")
    _add_model_args(b)
    b.add_argument("--random-weights", action="store_true", help="a random model of --size (no download)")
    b.add_argument("--size", default=None, help="suite size for --random-weights (default 160m)")
    b.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    b.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (default 32)")
    b.add_argument("--new-tokens", type=int, default=128, help="new tokens per sequence, >= 2 (default 128)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    return ap


def _load(args, **extra):
    from .format import DEFAULT_QUANT_TYPE
    from .loading import load

    return load(
        args.model, args.revision, quant_type=args.quant_type or DEFAULT_QUANT_TYPE, double_quant=args.double_quant, device=args.device,
        dtype=args.dtype, cache_dir=args.cache_dir, local_files_only=True if args.offline else None,
        quantized_cache=args.quantized_cache, compute=args.compute, **extra,
    )


def _read_text(path: Optional[str]) -> str:
    from .errors import PythiaNativeError

    if path is None or path == "-":
        from .errors import GenerationError

        if sys.stdin is None:  # fd 0 closed (cron, a daemon): Python sets no stdin
            raise GenerationError("no input: stdin is closed; give the text as an argument or a file")
        if sys.stdin.isatty() and path is None:
            raise GenerationError("no prompt: give one as an argument or pipe it on stdin")
        # The bytes, decoded as UTF-8 as files are (a BOM dropped, line ends
        # kept), not in the locale's encoding with newlines translated.
        raw = getattr(sys.stdin, "buffer", None)
        try:
            text = raw.read().decode("utf-8-sig") if raw is not None else sys.stdin.read()
            return _check_utf8(text, "stdin")
        except UnicodeDecodeError:  # not UTF-8 (or a text stdin decoding strictly)
            raise PythiaNativeError("stdin: not UTF-8 text") from None
    if not path:  # open("") says "No such file or directory" about no name at all
        raise PythiaNativeError("the text file's path is empty: give a file, or '-' for stdin")
    try:
        # The file's text as it is: a UTF-8 BOM (Notepad, PowerShell) is not
        # text to score, and "\r\n" stays (newline="": no translation).
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except OSError as e:
        raise PythiaNativeError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise PythiaNativeError(f"{path}: not UTF-8 text") from None


def _check_utf8(text: str, where: str) -> str:
    """``text`` unless it holds lone surrogates: what Python makes of bytes that
    are not UTF-8 in argv and (in the C/POSIX locale) stdin."""
    from .errors import PythiaNativeError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PythiaNativeError(f"{where}: not UTF-8 text") from None
    return text


def cmd_generate(args) -> int:
    if args.prompt not in (None, "-"):
        prompt = _check_utf8(args.prompt, "the prompt argument")
    else:
        prompt = _read_text(args.prompt)
    engine = _load(args)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
              ignore_eos=args.ignore_eos, truncate=args.truncate)
    out = sys.stdout
    if args.echo:
        out.write(prompt)
    if args.no_stream:
        out.write(engine.generate(prompt, args.max_new_tokens, **kw))
    else:
        for piece in engine.stream(prompt, args.max_new_tokens, **kw):
            out.write(piece)
            out.flush()
    out.write("\n")
    return 0


def cmd_score(args) -> int:
    if args.revisions is not None or args.every is not None:
        return _score_revisions(args)
    if args.free_hub_files:
        from .errors import RevisionError

        raise RevisionError("--free-hub-files applies to a sweep: give --revisions or --every too")
    text = _read_text(args.file)
    line_numbers, texts = _texts_to_score(args, text)
    engine = _load(args)
    if args.per_line:  # one text per line: an error names its line
        from .errors import GenerationError

        scores = []
        for i, t in zip(line_numbers, texts):
            try:
                scores.append(engine.score(t, prepend_eos=not args.no_eos))
            except GenerationError as e:
                where = "stdin" if args.file in (None, "-") else args.file
                raise GenerationError(f"{where}, line {i}: {e}") from None
    else:
        scores = [engine.score(texts[0], prepend_eos=not args.no_eos)]
    total_lp = sum(s.total for s in scores)
    total_n = sum(len(s.tokens) for s in scores)
    if args.per_line:
        for i, s in zip(line_numbers, scores):
            print(f"line {i}\ttokens {len(s.tokens)}\tlogprob {s.total:.4f}\tppl {s.perplexity:.4f}")
    from .generate import perplexity

    print(f"tokens {total_n}\tlogprob {total_lp:.4f}\tmean {total_lp / total_n:.6f}\tperplexity {perplexity(total_lp / total_n):.4f}")
    return 0


def _texts_to_score(args, text: str) -> tuple[list[int], list[str]]:
    """The texts to score and their 1-based line numbers in the file (1 without --per-line)."""
    if args.per_line:
        # Lines end at "\n" only (a "\r" before it goes too): str.splitlines() also
        # splits at \f, \v, \x1c-\x1e, \x85, U+2028/9, which a text may hold mid-line.
        lines = [(i, line.removesuffix("\r")) for i, line in enumerate(text.split("\n"), 1)]
        numbered = [(i, line) for i, line in lines if line.strip()]
    else:
        numbered = [(1, text)]
    if not numbered or not any(t.strip() for _, t in numbered):
        from .errors import GenerationError

        raise GenerationError(f"{args.file}: nothing to score (empty text)")
    return [i for i, _ in numbered], [t for _, t in numbered]


def _score_revisions(args) -> int:
    """One line per revision: ``revision, tokens, logprob, mean, perplexity`` (a sweep, one model in memory)."""
    from .errors import RevisionError
    from .format import DEFAULT_QUANT_TYPE
    from .generate import perplexity
    from .sweep import sweep

    if args.revision is not None:
        raise RevisionError("--revision names one revision; with --revisions/--every, list them all there")
    if args.revisions is not None and args.every is not None:
        raise RevisionError("give either --revisions or --every, not both")
    _, texts = _texts_to_score(args, _read_text(args.file))
    revs = sweep(args.model, args.revisions, every=args.every, quant_type=args.quant_type or DEFAULT_QUANT_TYPE,
                 double_quant=args.double_quant, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
                 quantized_cache=args.quantized_cache, local_files_only=True if args.offline else None,
                 free_hub_files=args.free_hub_files)
    print("revision\ttokens\tlogprob\tmean\tperplexity")
    for rev, engine in revs:
        engine.model.compute = args.compute
        scores = engine.score(texts, prepend_eos=not args.no_eos)
        lp, n = sum(s.total for s in scores), sum(len(s.tokens) for s in scores)
        print(f"{rev}\t{n}\t{lp:.4f}\t{lp / n:.6f}\t{perplexity(lp / n):.4f}", flush=True)
    return 0


def cmd_revisions(args) -> int:
    from .suite import resolve_model, revisions

    ref = resolve_model(args.model)
    if not ref.is_pythia:
        from .errors import ModelNotFoundError

        raise ModelNotFoundError(f"{args.model}: not a model of the Pythia suite; its revisions are its hub branches")
    print("\n".join(revisions(ref)))
    return 0


def cmd_export(args) -> int:
    from .export import check_output_dir
    from .quantized_linear import QuantizedLinear

    # Before the load: an unwritable path fails in a second, not after minutes.
    local = os.path.isdir(args.model)
    check_output_dir(args.output, source=args.model if local else None)
    if local:  # a local bitsandbytes checkpoint: its format flags are known before the load too
        from .config import PythiaConfig
        from .loading import bnb_quantization
        from .weights import CheckpointReader, read_config

        raw = read_config(args.model)
        q = bnb_quantization(raw)
        if q is not None:
            with CheckpointReader(args.model) as reader:
                head_4bit = any(k in reader.keys() for k in ("embed_out.weight.absmax", "lm_head.weight.absmax"))
            PythiaConfig.from_dict(raw)  # a config that is not GPT-NeoX fails as the load would
            _refuse_format_flags(args, q.get("bnb_4bit_quant_type", "fp4"),
                                 bool(q.get("bnb_4bit_use_double_quant", False)), head_4bit)
    engine = _load(args, quantize_embed_out=args.quantize_embed_out)
    model = engine.model
    if model.source_quantization is not None:
        _refuse_format_flags(args, model.quant_type, model.double_quant, isinstance(model.embed_out, QuantizedLinear))
    out = engine.save_pretrained(args.output)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _refuse_format_flags(args, quant_type: str, double_quant: bool, head_4bit: bool) -> None:
    """A bitsandbytes checkpoint's bytes are exported as they are: a format flag
    that asks for another format cannot apply (it was silently ignored)."""
    from .errors import CheckpointError

    asked = [flag for flag, differs in (
        (f"--quant-type {args.quant_type}", args.quant_type not in (None, quant_type)),
        ("--double-quant", args.double_quant and not double_quant),
        ("--quantize-embed-out", args.quantize_embed_out and not head_4bit),
    ) if differs]
    if asked:
        raise CheckpointError(
            f"{args.model} is already a bitsandbytes 4-bit checkpoint ({quant_type}, double quant "
            f"{'on' if double_quant else 'off'}, embed_out {'4-bit' if head_4bit else 'dense'}), exported byte for "
            f"byte: {', '.join(asked)} cannot apply; export from the dense checkpoint instead, or drop it. "
            "Nothing written."
        )


def cmd_bench(args) -> int:
    import torch

    from .errors import GenerationError
    from .generate import Pythia
    from .loading import check_dtype, resolve_device

    for flag, value in (("--repeats", args.repeats), ("--batch", args.batch), ("--prompt-len", args.prompt_len)):
        if value < 1:  # named by flag (the engine's checks name max_batch / max_len)
            raise GenerationError(f"{flag} must be >= 1, got {value}")
    if args.new_tokens < 2:
        # Decode speed is (time of N tokens - time of 1 token) / (N - 1) steps.
        raise GenerationError(
            f"--new-tokens must be >= 2 (decode tok/s is timed as N new tokens minus 1), got {args.new_tokens}"
        )
    # What would pick the checkpoint means nothing for a random model (and
    # --size nothing for a checkpoint): refused rather than silently ignored.
    where = [flag for flag, given in (
        ("--model", args.model_given), ("--revision", args.revision is not None),
        ("--cache-dir", args.cache_dir is not None), ("--quantized-cache", args.quantized_cache is not None),
        ("--offline", args.offline),
    ) if given]
    if args.random_weights and where:
        raise GenerationError(f"--random-weights builds a random model: {', '.join(where)} cannot apply; drop "
                              f"{'it' if len(where) == 1 else 'them'}, or --random-weights")
    if not args.random_weights and args.size is not None:
        raise GenerationError(f"--size {args.size} is the size of a --random-weights model; a checkpoint has its "
                              "own (drop --size, or add --random-weights)")
    if args.random_weights:
        from .config import PythiaConfig
        from .format import DEFAULT_QUANT_TYPE
        from .model import PythiaModel

        size = args.size or "160m"
        dev = resolve_device(args.device)
        dt = check_dtype(args.dtype, dev)
        # float16 values and, on the CPU, a float16 head: what load() gives for a Pythia checkpoint.
        head = torch.float16 if dev.type == "cpu" and dt != torch.float16 else None
        model = PythiaModel.random(PythiaConfig.for_size(size), quant_type=args.quant_type or DEFAULT_QUANT_TYPE,
                                   double_quant=args.double_quant, dtype=dt, device=dev, head_dtype=head,
                                   compute=args.compute)
        tokenizer = None
        name = f"random pythia-{size}"
    else:
        # A one-slot cache: the engine that runs is built below, once the
        # model's context is known.
        loaded = _load(args, max_len=1)
        model, tokenizer, name = loaded.model, loaded.tokenizer, args.model
        del loaded
    # The engine's rule: the last new token is never fed back.
    needed = args.prompt_len + args.new_tokens - 1
    if needed > model.config.max_position_embeddings:
        raise GenerationError(
            f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} need {needed} positions (the last new "
            f"token is not fed back), more than {name}'s context of {model.config.max_position_embeddings}"
        )
    engine = Pythia(model, tokenizer, max_batch=args.batch, max_len=needed)
    g = torch.Generator().manual_seed(0)
    # Ids the engine may take (the tokenizer's and the model's), above
    # <|endoftext|> and <|padding|> (0 and 1 in Pythia's vocabulary) where there are any.
    prompts = torch.randint(min(2, engine.vocab_size - 1), engine.vocab_size, (args.batch, args.prompt_len),
                            generator=g).tolist()

    def timed(n):
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        t = time.perf_counter()
        engine.generate_ids(prompts, n, ignore_eos=True)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return time.perf_counter() - t

    timed(2)
    t1 = sorted(timed(1) for _ in range(args.repeats))[args.repeats // 2]
    tn = sorted(timed(args.new_tokens) for _ in range(args.repeats))[args.repeats // 2]
    decode = (args.new_tokens - 1) * args.batch / max(tn - t1, 1e-9)
    print(f"{name} ({engine.model.quant_type or 'dense'}, {engine.model.dtype}, {engine.device}, "
          f"{torch.get_num_threads()} threads): batch {args.batch}, prompt {args.prompt_len}: "
          f"prefill {args.batch * args.prompt_len / t1:.1f} tok/s, decode {decode:.1f} tok/s")
    return 0


COMMANDS = {"generate": cmd_generate, "score": cmd_score, "revisions": cmd_revisions, "export": cmd_export,
            "bench": cmd_bench}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "model"):
        args.model_given = args.model is not None
        if args.model is None:
            args.model = DEFAULT_MODEL
    threads = getattr(args, "threads", None)
    if threads is not None:
        # torch.set_num_threads crashes for huge counts (libgomp: 20000 failed,
        # 100000 segfaulted). More threads than CPUs only slows a decode down,
        # but stays allowed up to 8 per CPU this process may use (64 at least).
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        most = max(64, 8 * cpus)
        if not 1 <= threads <= most:
            print(f"pythia-native: error: --threads must be in [1, {most}] (this process may use {cpus} CPUs), "
                  f"got {threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(threads)
    from .errors import PythiaNativeError, PythiaNativeWarning

    # Our own warnings (renamed models, known data problems) as one line each.
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PythiaNativeWarning):
            print(f"pythia-native: warning: {message}", file=sys.stderr)
        else:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show
    if sys.stdout is None and args.command != "export":  # fd 1 closed: say so before loading a model
        print(f"pythia-native: error: stdout is closed, so {args.command} has nowhere to write its output",
              file=sys.stderr)
        return 2
    _text_stdout()
    try:
        code = COMMANDS[args.command](args)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, so a closed pipe is caught below, not at exit
        return code
    except PythiaNativeError as e:
        print(f"pythia-native: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pythia-native generate ... | head`: the reader is done
        _silence_stdout()
        return 0
    except OSError as e:  # writing the output to a full disk (ENOSPC), an I/O error
        print(f"pythia-native: error: {e}", file=sys.stderr)
        _silence_stdout()
        return 2


def _silence_stdout() -> None:
    """Python flushes stdout again at exit, which would hit the closed pipe or
    full disk again, print "Exception ignored ..." and exit 120: point the
    descriptor at /dev/null first (the recipe in Python's signal docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a descriptor (tests)
        pass


def _text_stdout() -> None:
    """Generated text may hold any character: written to a pipe or a file it is
    UTF-8 (as the files read are), whatever the locale; on a terminal whose
    encoding lacks a character it shows as "?" instead of a UnicodeEncodeError
    after the model has run."""
    out = sys.stdout
    if out is None or not hasattr(out, "reconfigure") or (out.encoding or "").lower().replace("-", "") == "utf8":
        return
    try:
        if out.isatty():
            out.reconfigure(errors="replace")
        else:
            out.reconfigure(encoding="utf-8")
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
