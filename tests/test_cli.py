"""The pythia-native command line: the happy paths on a local random
checkpoint, and every user error ending in one line and exit code 2."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neox import hf_model, tokenizer_path, trained_tokenizer
from pythia_native.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    hf_model("tiny", vocab_size=50304).save_pretrained(d)
    tok = tokenizer_path() or trained_tokenizer(tmp_path_factory.mktemp("tok"))
    shutil.copyfile(tok, d / "tokenizer.json")
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_and_matches_no_stream(capsys, ckpt):
    code, streamed, _ = run(capsys, "generate", "--model", ckpt, "--device", "cpu", "-n", "12", "--ignore-eos",
                            "Once upon a time")
    assert code == 0 and streamed.endswith("\n")
    code, whole, _ = run(capsys, "generate", "--model", ckpt, "--device", "cpu", "-n", "12", "--ignore-eos",
                         "--no-stream", "Once upon a time")
    assert code == 0 and whole == streamed and len(whole) > 1
    code, echoed, _ = run(capsys, "generate", "--model", ckpt, "--device", "cpu", "-n", "12", "--ignore-eos",
                          "--echo", "Once upon a time")
    assert echoed == "Once upon a time" + whole


def test_generate_reads_the_prompt_from_stdin(capsys, ckpt, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time"))
    code, out, _ = run(capsys, "generate", "--model", ckpt, "--device", "cpu", "-n", "5", "--ignore-eos", "-",
                       "--temperature", "0.9", "--top-p", "0.9", "--seed", "1")
    assert code == 0 and out.strip()


def test_score_prints_perplexity(capsys, ckpt, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Hello world.\nOnce upon a time.\n")
    code, out, _ = run(capsys, "score", "--model", ckpt, "--device", "cpu", f)
    assert code == 0 and "perplexity" in out
    code, out, _ = run(capsys, "score", "--model", ckpt, "--device", "cpu", "--per-line", f)
    assert code == 0 and out.count("line ") == 2


def test_revisions_lists_the_suite(capsys):
    code, out, _ = run(capsys, "revisions", "pythia-160m")
    lines = out.split()
    assert code == 0 and len(lines) == 154 and lines[0] == "step0" and lines[-1] == "step143000"
    code, out, _ = run(capsys, "revisions", "pythia-410m-deduped-v0")
    assert len(out.split()) == 143


def test_export_and_reload(capsys, ckpt, tmp_path):
    code, _, err = run(capsys, "export", "--model", ckpt, "--device", "cpu", tmp_path / "q")
    assert code == 0 and (tmp_path / "q" / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] is True
    code, out, _ = run(capsys, "generate", "--model", tmp_path / "q", "--device", "cpu", "-n", "4", "--ignore-eos", "Hi")
    assert code == 0


def test_export_to_an_unwritable_path_fails_before_the_load(capsys, tmp_path, monkeypatch):
    # The path is checked first: no model is loaded (a model name that would
    # need the network shows it) and nothing is written.
    (tmp_path / "a-file").write_text("x")
    loaded = []
    monkeypatch.setattr("pythia_native.cli._load", lambda *a, **k: loaded.append(1))
    one_line_error(capsys, "export", "--model", "pythia-160m", "--device", "cpu", tmp_path / "a-file",
                   match="it is a file")
    one_line_error(capsys, "export", "--model", "pythia-160m", "--device", "cpu", tmp_path / "a-file" / "sub",
                   match="which is a file")
    assert loaded == [] and (tmp_path / "a-file").read_text() == "x"


def test_bench_random_weights(capsys):
    code, out, _ = run(capsys, "bench", "--random-weights", "--size", "14m", "--device", "cpu", "--new-tokens", "4",
                       "--prompt-len", "8", "--repeats", "1", "--threads", "1")
    assert code == 0 and "decode" in out and "tok/s" in out


def test_bench_takes_what_generate_takes_at_the_context_limit(capsys, ckpt, tmp_path):
    # ckpt's context is 256: a 250-token prompt and 7 new tokens need 256
    # positions (the last new token is not fed back), as generate allows. bench
    # asked the engine for 257 and was refused with an error about max_len.
    common = ("bench", "--model", ckpt, "--device", "cpu", "--repeats", "1", "--threads", "1", "--prompt-len", "250")
    code, out, err = run(capsys, *common, "--new-tokens", "7")
    assert code == 0 and "decode" in out, err
    one_line_error(capsys, *common, "--new-tokens", "8",
                   match="--prompt-len 250 + --new-tokens 8 need 257 positions (the last new token is not fed back), "
                         f"more than {ckpt}'s context of 256")
    one_line_error(capsys, "bench", "--random-weights", "--size", "14m", "--device", "cpu", "--prompt-len", "2047",
                   "--new-tokens", "3", match="need 2049 positions (the last new token is not fed back), more than "
                                              "random pythia-14m's context of 2048")
    one_line_error(capsys, "bench", "--model", ckpt, "--device", "cpu", "--size", "14m",
                   match="--size 14m is the size of a --random-weights model; a checkpoint has its own")
    # Prompt ids come from the ids the engine takes: a model whose vocabulary is
    # narrower than the tokenizer's (512 here) was given ids up to 50,000.
    small = tmp_path / "small-vocab"
    hf_model("tiny").save_pretrained(small)
    shutil.copyfile(Path(ckpt) / "tokenizer.json", small / "tokenizer.json")
    code, out, err = run(capsys, "bench", "--model", small, "--device", "cpu", "--repeats", "1", "--threads", "1",
                         "--prompt-len", "8", "--new-tokens", "3")
    assert code == 0 and "decode" in out, err


def one_line_error(capsys, *argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("pythia-native: error:") and "Traceback" not in err, err
    assert match in err, err


def test_user_errors_are_one_line(capsys, ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    one_line_error(capsys, "generate", "--model", "pythia-161m", "hi", match="pythia-160m")
    one_line_error(capsys, "generate", "--model", "pythia-160m", "--revision", "step1500", "hi", match="step2000")
    one_line_error(capsys, "generate", "--model", "pythia-160m", "--offline", "--device", "cpu", "hi",
                   match="EleutherAI/pythia-160m")
    one_line_error(capsys, "revisions", "pythia-9000m", match="pythia")
    bad = tmp_path / "truncated"
    shutil.copytree(ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:1000])
    one_line_error(capsys, "generate", "--model", bad, "--device", "cpu", "hi", match="model.safetensors")
    notneox = tmp_path / "notneox"
    shutil.copytree(ckpt, notneox)
    cfg = json.loads((notneox / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (notneox / "config.json").write_text(json.dumps(cfg))
    one_line_error(capsys, "generate", "--model", notneox, "--device", "cpu", "hi", match="gpt2")
    notok = tmp_path / "notok"
    shutil.copytree(ckpt, notok)
    (notok / "tokenizer.json").unlink()
    one_line_error(capsys, "generate", "--model", notok, "--device", "cpu", "hi", match="tokenizer.json")
    one_line_error(capsys, "generate", "--model", ckpt, "--device", "cpu", "--temperature", "-1", "hi",
                   match="temperature")
    one_line_error(capsys, "score", "--model", ckpt, "--device", "cpu", tmp_path / "nope.txt", match="nope.txt")
    one_line_error(capsys, "score", "--model", ckpt, "--device", "cpu", "", match="the text file's path is empty")
    if not torch.cuda.is_available():
        one_line_error(capsys, "generate", "--model", ckpt, "--device", "cuda", "hi", match="no CUDA GPU")


def test_module_entry_point_runs():
    p = subprocess.run([sys.executable, "-m", "pythia_native", "revisions", "pythia-70m-v0"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and len(p.stdout.split()) == 143


def test_compute_flag_reaches_the_model(capsys, ckpt):
    from pythia_native import load

    code, int16, _ = run(capsys, "generate", "--model", ckpt, "--device", "cpu", "-n", "8", "--ignore-eos",
                         "--no-stream", "--compute", "int16", "Once upon a time")
    assert code == 0 and int16.strip()
    assert load(ckpt, device="cpu", compute="int16").model.compute == "int16"
    assert load(ckpt, device="cpu").model.compute == "float32"
    with pytest.raises(ValueError, match="compute must be one of"):
        load(ckpt, device="cpu", compute="int4")
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(ckpt), "--compute", "int4", "hi"])


def test_text_that_is_not_utf8_is_a_one_line_error(capsys, ckpt, monkeypatch):
    import io

    # A C-locale stdin (surrogateescape) and argv turn bytes that are not UTF-8
    # into lone surrogates, which the tokenizer refuses with a bare TypeError.
    monkeypatch.setattr(sys, "stdin", io.StringIO(b"\xff\xfehello".decode("utf-8", "surrogateescape")))
    one_line_error(capsys, "generate", "--model", ckpt, "--device", "cpu", "-", match="stdin: not UTF-8 text")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\udcffb"))
    one_line_error(capsys, "score", "--model", ckpt, "--device", "cpu", "-", match="stdin: not UTF-8 text")
    # A stdin decoding strictly raises UnicodeDecodeError while reading.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfehello"), encoding="utf-8"))
    one_line_error(capsys, "generate", "--model", ckpt, "--device", "cpu", match="stdin: not UTF-8 text")
    one_line_error(capsys, "generate", "--model", ckpt, "--device", "cpu", "a\udcff",
                   match="the prompt argument: not UTF-8 text")


def test_bytes_that_are_not_utf8_on_stdin_end_in_one_line(ckpt):
    p = subprocess.run([sys.executable, "-m", "pythia_native", "generate", "--model", str(ckpt), "--device", "cpu",
                        "-n", "2"], input=b"\xff\xfehello", capture_output=True, timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("pythia-native: error: stdin: not UTF-8 text"), err


def test_score_per_line_splits_at_newlines_only_and_numbers_file_lines(capsys, ckpt, tmp_path):
    f = tmp_path / "t.txt"
    # \f, \v, \x1c, \x85 and U+2028 inside a line do not end it; blank and
    # whitespace-only lines are skipped but counted; CRLF ends a line.
    lines = ["Hello\x0cworld.", "", "   ", "Once\x0bupon\x1ca\x85time\u2028now.", "Bye.\r", "\t", "End."]
    f.write_bytes("\n".join(lines).encode("utf-8"))
    code, out, _ = run(capsys, "score", "--model", ckpt, "--device", "cpu", "--per-line", f)
    assert code == 0
    numbered = [line.split("\t")[0] for line in out.splitlines() if line.startswith("line ")]
    assert numbered == ["line 1", "line 4", "line 5", "line 7"]
    from pythia_native import load

    engine = load(ckpt, device="cpu")
    want = [engine.score(t) for t in ("Hello\x0cworld.", "Once\x0bupon\x1ca\x85time\u2028now.", "Bye.", "End.")]
    tokens = [int(line.split("\t")[1].split()[1]) for line in out.splitlines() if line.startswith("line ")]
    assert tokens == [len(s.tokens) for s in want]


def _scores(out):
    """(tokens, logprob) of each line `score` prints ("line i\ttokens n\tlogprob x..."), then of the total
    ("tokens n\tlogprob x...")."""
    rows = [line.split("\t") for line in out.splitlines()]
    rows = [f[1:] if f[0].startswith("line ") else f for f in rows if f[0].startswith(("line ", "tokens "))]
    return [(int(f[0].split()[1]), float(f[1].split()[1])) for f in rows]


def test_score_reads_the_files_text_as_it_is(capsys, ckpt, tmp_path, monkeypatch):
    import io

    from pythia_native import load

    engine = load(ckpt, device="cpu")
    text = "Hello there.\r\nSecond line.\r\n"
    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_bytes(text.encode("utf-8"))
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # Notepad's / PowerShell's UTF-8
    want = engine.score(text)  # the file's text, "\r\n" and all; the BOM is no text
    for f in (plain, bom):
        code, out, _ = run(capsys, "score", "--model", ckpt, "--device", "cpu", f)
        assert code == 0 and _scores(out)[0] == (len(want.tokens), round(want.total, 4))
    # stdin: the same bytes give the same score, whatever the locale's encoding.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(bom.read_bytes()), encoding="latin-1"))
    code, out, _ = run(capsys, "score", "--model", ckpt, "--device", "cpu", "-")
    assert code == 0 and _scores(out)[0] == (len(want.tokens), round(want.total, 4))
    # --per-line: a lone "\r" (a progress bar's) does not end a line; "\r\n" does.
    f = tmp_path / "cr.txt"
    f.write_bytes(b"progress 10%\rprogress 100%\nnext line\r\n")
    code, out, _ = run(capsys, "score", "--model", ckpt, "--device", "cpu", "--per-line", f)
    assert [line.split("\t")[0] for line in out.splitlines() if line.startswith("line ")] == ["line 1", "line 2"]
    assert _scores(out)[0][0] == len(engine.score("progress 10%\rprogress 100%").tokens)


def test_closed_stdin_and_one_token_lines_are_one_line_errors(capsys, ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets when fd 0 is closed
    one_line_error(capsys, "generate", "--model", ckpt, "--device", "cpu", match="stdin is closed")
    one_line_error(capsys, "score", "--model", ckpt, "--device", "cpu", "-", match="stdin is closed")
    f = tmp_path / "lines.txt"
    f.write_text("A longer first line.\n\nH\n")  # "H": one token in the real and the fallback tokenizer
    one_line_error(capsys, "score", "--model", ckpt, "--device", "cpu", "--per-line", "--no-eos", f,
                   match="lines.txt, line 3: a text to score needs at least 2 tokens, or 1 with prepend_eos=True (the CLI without --no-eos)")


def test_a_closed_pipe_ends_quietly(tmp_path):
    # `pythia-native revisions ... | head -1`: exit 0, nothing on stderr (not
    # Python's "Exception ignored ... BrokenPipeError" and exit 120 at its last
    # flush). Buffered stdout, as outside this sandbox.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen([sys.executable, "-m", "pythia_native", "revisions", "pythia-160m"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first write
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == "", err


def test_text_goes_out_as_utf8_whatever_the_locale(ckpt):
    # A pipe or a file in an ASCII / Latin-1 locale: generated text may hold
    # any character; it is written as UTF-8, not a UnicodeEncodeError after the run.
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    p = subprocess.run([sys.executable, "-m", "pythia_native", "generate", "--model", str(ckpt), "--device", "cpu",
                        "-n", "3", "--ignore-eos", "--echo", "日本語 ✓"], capture_output=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode("utf-8").startswith("日本語 ✓")


@pytest.mark.parametrize("argv, match", [
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--repeats", "-2"], "--repeats must be >= 1, got -2"),
    (["--new-tokens", "1"], "--new-tokens must be >= 2 (decode tok/s is timed as N new tokens minus 1), got 1"),
    (["--new-tokens", "0"], "--new-tokens must be >= 2"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--prompt-len", "-5"], "--prompt-len must be >= 1, got -5"),
    # Flags that pick a checkpoint were accepted and ignored with --random-weights.
    (["--revision", "step5", "--offline"],
     "--random-weights builds a random model: --revision, --offline cannot apply; drop them, or --random-weights"),
    (["--model", "pythia-1b"], "--model cannot apply; drop it, or --random-weights"),
    (["--model", "EleutherAI/pythia-160m"], "--model cannot apply"),  # the default's name, given
    (["--quantized-cache", "q", "--cache-dir", "c"], "--cache-dir, --quantized-cache cannot apply"),
])
def test_bench_argument_errors_are_one_line(capsys, argv, match):
    one_line_error(capsys, "bench", "--random-weights", "--size", "14m", "--device", "cpu", "--prompt-len", "4",
                   *argv, match=match)


def test_export_refuses_an_empty_path_the_source_and_a_hub_snapshot(capsys, ckpt, tmp_path, monkeypatch):
    # "" wrote the checkpoint into the working directory; exporting into the
    # source replaced its dense weights by the 4-bit copy; a hub-cache
    # snapshot's files are symbolic links into blobs other revisions share.
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, "export", "--model", ckpt, "--device", "cpu", "", match="an empty path")
    assert list(tmp_path.iterdir()) == []
    src = tmp_path / "src"
    shutil.copytree(ckpt, src)
    before = (src / "model.safetensors").read_bytes()
    one_line_error(capsys, "export", "--model", src, "--device", "cpu", src, match="the directory the model was loaded from")
    assert (src / "model.safetensors").read_bytes() == before
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")  # a symbolic link loop: one line, not a traceback
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    one_line_error(capsys, "export", "--model", ckpt, "--device", "cpu", tmp_path / "loop-a" / "out",
                   match="cannot write a checkpoint to")
    snap = tmp_path / "hub" / "models--EleutherAI--pythia-14m" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    one_line_error(capsys, "export", "--model", ckpt, "--device", "cpu", snap / "q", match="Hugging Face cache snapshot")


def test_export_of_a_4bit_checkpoint_refuses_format_flags_it_cannot_apply(capsys, ckpt, tmp_path, monkeypatch):
    # A bitsandbytes checkpoint is exported byte for byte: --double-quant,
    # --quantize-embed-out or another --quant-type were silently ignored. A
    # local one is refused before the load.
    code, _, _ = run(capsys, "export", "--model", ckpt, "--device", "cpu", tmp_path / "q")
    assert code == 0
    import pythia_native.cli as cli

    real_load = cli._load
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("loaded before refusing"))
    one_line_error(capsys, "export", "--model", tmp_path / "q", "--device", "cpu", "--double-quant", tmp_path / "x",
                   match="--double-quant cannot apply")
    monkeypatch.setattr(cli, "_load", real_load)
    for flags in (["--double-quant"], ["--quantize-embed-out"], ["--quant-type", "fp4"]):
        one_line_error(capsys, "export", "--model", tmp_path / "q", "--device", "cpu", *flags, tmp_path / "again",
                       match=f"already a bitsandbytes 4-bit checkpoint (nf4, double quant off, embed_out dense), "
                             f"exported byte for byte: {' '.join(flags)} cannot apply")
        assert not (tmp_path / "again").exists()
    code, _, _ = run(capsys, "export", "--model", tmp_path / "q", "--device", "cpu", "--quant-type", "nf4",
                     tmp_path / "again")
    assert code == 0


def test_threads_beyond_the_cpus_and_a_closed_stdout_are_one_line_errors(capsys, ckpt):
    # --threads 100000 segfaulted in torch.set_num_threads (20000: libgomp
    # failed); with stdout closed, generate died on None.write after the load.
    most = max(64, 8 * len(os.sched_getaffinity(0)))
    one_line_error(capsys, "generate", "--model", ckpt, "--device", "cpu", "--threads", "100000", "hi",
                   match=f"--threads must be in [1, {most}]")
    p = subprocess.run([sys.executable, "-m", "pythia_native", "generate", "--model", str(ckpt), "--device", "cpu",
                        "-n", "2", "hi"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                       preexec_fn=lambda: os.close(1))
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and "stdout is closed" in err, err


def test_a_full_disk_is_a_one_line_error(ckpt):
    # Writing to /dev/full: an OSError traceback, "Exception ignored" and exit 120.
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "pythia_native", "revisions", "pythia-160m"], stdout=full,
                           stderr=subprocess.PIPE, timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and "No space left on device" in err, err


def test_perplexity_of_a_hopeless_text_is_inf_not_an_error():
    from pythia_native.generate import Score, perplexity

    assert perplexity(-1000.0) == float("inf") and perplexity(-1.0) == pytest.approx(2.718281828)
    assert perplexity(-709.5) == pytest.approx(1.3549863e308) and math.isnan(perplexity(float("nan")))
    assert Score([5, 6], torch.tensor([-800.0, -900.0])).perplexity == float("inf")  # math.exp raised OverflowError


def test_ctrl_c_while_importing_exits_quietly(monkeypatch):
    # The console script's module lies outside the package, so the ~1.5 s
    # import of torch (pythia_native's) is inside its try: a Ctrl-C there was
    # a traceback of torch's import. Simulated: that import raises KeyboardInterrupt.
    import importlib.abc

    import _pythia_native_cli

    class Interrupted(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "pythia_native.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "pythia_native.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    assert _pythia_native_cli.main(["revisions", "pythia-160m"]) == 130


def test_console_script_module_runs_the_cli(capsys):
    import _pythia_native_cli

    assert _pythia_native_cli.main(["revisions", "pythia-70m-v0"]) == 0
    assert capsys.readouterr().out.split()[0] == "step1000"
