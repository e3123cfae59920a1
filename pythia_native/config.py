"""The GPT-NeoX configuration, read from a Hugging Face ``config.json``.

Every size of the Pythia suite (and any GPT-NeoX checkpoint) is described by
its own ``config.json``; the suite's sizes written here (SUITE_ARCHITECTURES)
only shape random-weight models for benchmarks. Two spellings of the
rotary settings exist and both are read (../shared/docs/PYTHIA.md):

* transformers 4.x (the published Pythia configs):
  ``"rotary_pct": 0.25, "rotary_emb_base": 10000``
* transformers 5.x (anything re-saved today):
  ``"rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000, "rope_type": "default"}``
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from . import _C
from .errors import ConfigError

# Activations GPT-NeoX configs name, and whether each is the exact (erf) GELU.
# Pythia uses "gelu" (exact); the tanh forms are accepted for other GPT-NeoX checkpoints.
_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


# The architectures of the suite (../shared/docs/PYTHIA.md), for random-weight
# models (benchmarks, `pythia-native bench --random-weights`). Real checkpoints
# are always described by their own config.json, never by this table.
SUITE_ARCHITECTURES = {
    # size: (layers, hidden, heads, intermediate, vocab)
    "14m": (6, 128, 4, 512, 50304),
    "31m": (6, 256, 8, 1024, 50304),
    "70m": (6, 512, 8, 2048, 50304),
    "160m": (12, 768, 12, 3072, 50304),
    "410m": (24, 1024, 16, 4096, 50304),
    "1b": (16, 2048, 8, 8192, 50304),
    "1.4b": (24, 2048, 16, 8192, 50304),
    "2.8b": (32, 2560, 32, 10240, 50304),
    "6.9b": (32, 4096, 32, 16384, 50432),
    "12b": (36, 5120, 40, 20480, 50688),
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(where: dict, key: str) -> Optional[float]:
    """``where[key]`` as a float (None when absent); a ConfigError naming it when not a number."""
    if key not in where:
        return None
    v = where[key]
    if not _is_number(v):
        raise ConfigError(f"config: {key} must be a number, got {v!r:.60}")
    return float(v)


# The rotary settings: (name in a rope dict, its top-level 4.x name, default).
_ROPE_KEYS = (("partial_rotary_factor", "rotary_pct", 0.25), ("rope_theta", "rotary_emb_base", 10000.0))


def _read_rope(rope: dict, d: dict) -> tuple[float, float]:
    """(rotary_pct, rope_theta) as transformers' GPT-NeoX reads them: from a
    rope dict, else the 4.x top-level keys, else the defaults."""
    values = []
    for key, top, default in _ROPE_KEYS:
        v = _number(rope, key)
        v = _number(d, top) if v is None else v
        values.append(default if v is None else v)
    return values[0], values[1]


def _carries_values(rope: dict) -> bool:
    return any(key in rope for key, _, _ in _ROPE_KEYS)


def _check_token_id(name: str, v: Any, vocab_size: int) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size):
        raise ConfigError(f"config: {name} must be a token id in [0, vocab_size={vocab_size}), got {v!r}")


@dataclass(frozen=True)
class PythiaConfig:
    """The architecture facts the engine needs; field names follow transformers'."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    attention_bias: bool = True
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 0
    tie_word_embeddings: bool = False
    # transformers allows eos_token_id to be a list: the ids after the first
    # (each ends generation as the first does; config.json gets the list back).
    extra_eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config: {name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config: hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        multiple, largest = _C.attention_head_dims()
        if self.head_dim % multiple or self.head_dim > largest:
            # Refused here, not at the first decode step (the prefill's SDPA takes any).
            raise ConfigError(
                f"config: head_dim {self.head_dim} (hidden_size {self.hidden_size} / num_attention_heads "
                f"{self.num_attention_heads}) is not supported: the attention kernels take multiples of {multiple} "
                f"up to {largest} (the Pythia suite uses 32 to 256)"
            )
        if not (_is_number(self.rotary_pct) and 0.0 <= self.rotary_pct <= 1.0):
            raise ConfigError(f"config: rotary_pct must be in [0, 1], got {self.rotary_pct!r}")
        if self.rotary_ndims % 2:
            raise ConfigError(
                f"config: head_dim {self.head_dim} x rotary_pct {self.rotary_pct} gives an odd rotary_ndims {self.rotary_ndims}"
            )
        # JSON as Python reads it may hold NaN and Infinity: refused here, not
        # as NaN logits (or an op's error) at the first forward.
        if not (_is_number(self.rope_theta) and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"config: rope_theta (rotary_emb_base) must be a finite number > 0, got {self.rope_theta!r}")
        if not (_is_number(self.layer_norm_eps) and math.isfinite(self.layer_norm_eps) and self.layer_norm_eps >= 0):
            raise ConfigError(f"config: layer_norm_eps must be a finite number >= 0, got {self.layer_norm_eps!r}")
        # true/false only: the string "false" would otherwise count as true.
        for name in ("use_parallel_residual", "attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        # Token ids index the embedding and the logits: a -1 or an id past the vocabulary
        # would fail (or wrap around) deep inside score() or generate().
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) is not None:
                _check_token_id(name, getattr(self, name), self.vocab_size)
        if not isinstance(self.extra_eos_token_ids, tuple):
            raise ConfigError(f"config: extra_eos_token_ids must be a tuple of token ids, got {self.extra_eos_token_ids!r}")
        if self.extra_eos_token_ids and self.eos_token_id is None:
            raise ConfigError("config: extra_eos_token_ids given without an eos_token_id")
        for other in self.extra_eos_token_ids:
            _check_token_id("eos_token_id", other, self.vocab_size)
        if not isinstance(self.hidden_act, str) or self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"config: hidden_act {self.hidden_act!r} is not supported (expected one of {sorted(_ACTIVATIONS)})")
        if self.tie_word_embeddings:
            raise ConfigError("config: tie_word_embeddings=true is not GPT-NeoX as Pythia ships it (embed_out is its own matrix)")

    @classmethod
    def for_size(cls, size: str, **overrides) -> "PythiaConfig":
        """The architecture of a suite size ("160m", "1.4b", ...), for random-weight models."""
        if size not in SUITE_ARCHITECTURES:
            raise ConfigError(f"unknown Pythia size {size!r} (known: {', '.join(SUITE_ARCHITECTURES)})")
        layers, hidden, heads, inter, vocab = SUITE_ARCHITECTURES[size]
        kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=inter)
        kw.update(overrides)
        return cls(**kw)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a generated sequence: ``eos_token_id`` first, then
        the rest of the list a config.json may give (empty without an EOS)."""
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) + tuple(i for i in self.extra_eos_token_ids if i != self.eos_token_id)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """Dims of each head that get rotary: ``int(head_dim * rotary_pct)``, as transformers computes it."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def gelu_approximate(self) -> str:
        """The ``approximate`` argument of ``torch.nn.functional.gelu`` for ``hidden_act``."""
        return _ACTIVATIONS[self.hidden_act]

    # ------------------------------------------------------------------ I/O --

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PythiaConfig":
        """From the parsed ``config.json`` of a GPT-NeoX checkpoint."""
        model_type = d.get("model_type")
        if model_type != "gpt_neox":
            raise ConfigError(f"config: model_type is {model_type!r}, not 'gpt_neox' (pythia-native runs GPT-NeoX / Pythia only)")
        for key in ("rope_parameters", "rope_scaling"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"config: {key} must be an object, got {d[key]!r:.60}")
        # Either may carry a scaling (transformers applies rope_scaling even
        # beside a default rope_parameters): each is checked.
        ropes = [(key, d[key]) for key in ("rope_parameters", "rope_scaling") if d.get(key)]
        for key, r in ropes:
            kind = r.get("rope_type", r.get("type", "default"))
            if kind not in ("default", None):
                raise ConfigError(f"config: {key} has rope_type {kind!r}, which is not supported (only 'default')")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
                   if k not in d]
        if missing:
            raise ConfigError(f"config: missing {', '.join(missing)}")
        kw: dict[str, Any] = {
            k: d[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        }
        # The values come from one rope dict, else the top-level 4.x keys. With
        # both dicts, transformers 5 reads rope_scaling alone (it replaces
        # rope_parameters whole, values and all): where rope_parameters holds
        # values that reading drops, the file says two things, and it is refused.
        readings = {key: _read_rope(r, d) for key, r in ropes
                    if key == "rope_scaling" or _carries_values(r) or len(ropes) == 1}
        readings = readings or {"rotary_pct / rotary_emb_base (or their defaults)": _read_rope({}, d)}
        if len(set(readings.values())) > 1:
            (a, ra), (b, rb) = readings.items()
            raise ConfigError(
                f"config: {a} and {b} give different rotary settings (partial_rotary_factor, rope_theta: {ra} vs {rb}; "
                f"transformers 5 reads {b} alone): keep one of them")
        kw["rotary_pct"], kw["rope_theta"] = next(iter(readings.values()))
        # A top-level partial_rotary_factor or rope_theta (other models' spelling)
        # is ignored by transformers' GPT-NeoX: refused where it says otherwise.
        for (key, _, _), value in zip(_ROPE_KEYS, (kw["rotary_pct"], kw["rope_theta"])):
            top = _number(d, key)
            if top is not None and top != value:
                raise ConfigError(
                    f"config: a top-level {key} ({top:g}) differs from the rotary setting read ({value:g}, from "
                    f"{'/'.join(readings)}); transformers' GPT-NeoX ignores the top-level one: remove it, or move it "
                    "into rope_parameters")
        for k in ("max_position_embeddings", "layer_norm_eps", "use_parallel_residual", "hidden_act", "attention_bias",
                  "bos_token_id", "eos_token_id", "tie_word_embeddings"):
            if k in d and d[k] is not None:
                kw[k] = d[k]
        eos = kw.get("eos_token_id")
        if isinstance(eos, list):  # transformers allows several: each ends generation
            if not eos:
                raise ConfigError("config: eos_token_id is an empty list (expected a token id or a list of them)")
            kw["eos_token_id"] = eos[0]
            kw["extra_eos_token_ids"] = tuple(eos[1:])
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"config: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "PythiaConfig":
        """From a ``config.json`` file, or a directory holding one."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a GPT-NeoX checkpoint directory?)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` transformers reads (the 5.x spelling, plus the 4.x
        rotary keys so older readers agree)."""
        d = dataclasses.asdict(self)
        d.pop("extra_eos_token_ids")
        if len(self.eos_token_ids) > 1:
            d["eos_token_id"] = list(self.eos_token_ids)
        d.pop("rope_theta")
        d.pop("rotary_pct")
        d.update(
            architectures=["GPTNeoXForCausalLM"],
            model_type="gpt_neox",
            rope_parameters={"partial_rotary_factor": self.rotary_pct, "rope_theta": self.rope_theta, "rope_type": "default"},
            rotary_pct=self.rotary_pct,
            rotary_emb_base=self.rope_theta,
            use_cache=True,
        )
        return d
