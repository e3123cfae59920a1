"""Tokenization with the ``tokenizers`` library, from a checkpoint's ``tokenizer.json``.

Every Pythia model uses the GPT-NeoX-20B byte-level BPE tokenizer: ids
0..50276 (id 0 ``<|endoftext|>``, id 1 ``<|padding|>``), while the logits are
50304 or more wide. :attr:`Tokenizer.vocab_size` is what the sampler may pick
from; nothing beyond it decodes to text.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError, GenerationError

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A thin wrapper: ``encode`` (no special tokens added), ``decode``, ``vocab_size``."""

    def __init__(self, tokenizer: _HFTokenizer):
        # A tokenizer.json may carry truncation / padding settings (transformers
        # saves those of its last call): tokenizers would apply them to every
        # encode (a prompt cut to 8 ids, a short one padded with <|padding|>),
        # where transformers applies them only when a call asks. Off here (on the
        # tokenizers.Tokenizer given, which this wrapper owns from now on).
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """From ``tokenizer.json`` or a directory holding one."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            snapshot = Path(path).parent
            if snapshot.parent.name == "snapshots" and snapshot.parents[1].name.startswith("models--"):
                # A Hugging Face cache snapshot fetched without it (load_revision and
                # sweeps fetch weights only): the cache is not the user's to edit.
                repo = snapshot.parents[1].name[len("models--"):].replace("--", "/")
                raise CheckpointError(
                    f"{path}: this Hugging Face cache snapshot of {repo} has no tokenizer.json (later revisions "
                    f"of a sweep are fetched without one). Load it once with network access, or fetch it with "
                    f"`hf download {repo} tokenizer.json --revision {snapshot.name}`"
                )
            raise CheckpointError(
                f"{path}: no tokenizer.json (every Pythia repo ships the GPT-NeoX-20B tokenizer.json; "
                "copy it into the model directory)"
            )
        try:
            return cls(_HFTokenizer.from_file(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from None

    def encode(self, text: str) -> list[int]:
        # Pythia prompts start with no BOS: the GPT-NeoX tokenizer adds none.
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            # tokenizers says only "TextInputSequence must be str" (a lone surrogate
            # too): name the cause. Checked here, not up front: the usual text pays nothing.
            check_text(text)
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            for t in texts:
                check_text(t)
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save(os.fspath(path))

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)


def check_text(text) -> None:
    """Raise GenerationError unless ``text`` is a str that UTF-8 can encode
    (no lone surrogates: what ``errors="surrogateescape"`` makes of bytes that
    are not UTF-8, e.g. ``sys.argv`` or a C-locale stdin)."""
    if not isinstance(text, str):
        raise GenerationError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(
            f"text is not valid Unicode (lone surrogate {text[e.start]!r} at index {e.start}); "
            "decode the bytes as UTF-8 (errors='replace' keeps going) before passing them"
        ) from None


class StreamDecoder:
    """Turns a growing list of ids into text pieces without splitting a character.

    Byte-level BPE tokens can end in the middle of a UTF-8 sequence; decoding
    such a prefix yields U+FFFD. The decoder holds text back until the tail
    decodes cleanly, and re-decodes only a short window (the ids since the last
    emitted piece plus a few before it, so merges across the boundary are
    right), not the whole text each step.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: ids[_prefix:_read] decode to text already emitted
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self._prefix : self._read])
        text = self.tok.decode(self.ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT_CHAR):
            piece = text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self.tok.decode(self.ids[self._prefix : self._read])
        text = self.tok.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text) :]
