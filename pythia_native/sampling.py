"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Definitions (the tests check the filtered distributions against them):

* temperature ``t`` (finite): ``p = softmax(logits / t)``; ``t == 0`` is greedy (argmax,
  the lowest id among equal maxima, as ``torch.argmax``).
* top-k ``k``: keep the ``k`` largest logits (ties with the ``k``-th kept
  too), the rest get probability 0.
* top-p ``p``: sort by probability (by logit: the same order, kept even where
  an extreme ``t`` rounds distinct quotients to equal; equal logits by id),
  keep the smallest prefix whose total (its float32 running sum) is ``>= p``
  (always at least the most likely token), the rest get 0. Which tokens go is
  decided on the logits as given, not on logits shifted by the row maximum
  (a float32 difference can merge two distinct logits into a tie).
* top-k is applied first, then top-p on what is left, then renormalization.

Only the first ``vocab_size`` logits are candidates: the logits of Pythia are
wider (50304+) than the tokenizer (50277), and the extra ids decode to nothing.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .errors import GenerationError


def is_int(v) -> bool:
    """An integer, not a bool (True would pass as 1 where a count is meant)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def int_scalar(t):
    """A 0-d integer tensor or numpy array / scalar as a Python int; anything
    else unchanged (a float one too, so that an error can name its type)."""
    if not isinstance(t, (str, bytes, bytearray)) and hasattr(t, "tolist") and getattr(t, "ndim", None) == 0:
        v = t.tolist()
        return v if is_int(v) else t
    return t


def is_real(v) -> bool:
    """A real number, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _as_float(v) -> Optional[float]:
    """A real number (not a bool) as a float, or None (also for one beyond float's range)."""
    if not is_real(v):
        return None
    try:
        return float(v)
    except (OverflowError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        # Any real number (an int, a Fraction, a numpy float) is taken as a
        # Python float, which the tensor arithmetic below accepts; one too large
        # for a float is refused here, not by torch later.
        # inf is refused too: an infinite temperature turns a -inf logit into NaN.
        t = _as_float(self.temperature)
        if t is None or not 0.0 <= t < math.inf:
            raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        object.__setattr__(self, "temperature", t)
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise GenerationError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None:
            p = _as_float(self.top_p)
            if p is None or not 0.0 < p <= 1.0:
                raise GenerationError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
            object.__setattr__(self, "top_p", p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(
    logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None, temperature: float = 1.0
) -> torch.Tensor:
    """``logits / temperature`` (``[B, V]``, float32) with the tokens top-k/top-p
    remove set to -inf.

    Which tokens go is decided on ``logits`` as given: a positive temperature
    keeps their order, but at an extreme one the float32 quotients of distinct
    logits can come out equal, and a tie would then widen top-k (ties with the
    k-th are kept) or leave top-p's order among them to the sort. top-p's mass
    is that of ``softmax(logits / temperature)``, the distribution sampled, in
    the vocabulary's order (so both implementations below see the same float32
    masses and keep the same tokens).
    """
    logits = logits.float()
    return _filter(logits, logits / temperature if temperature != 1.0 else logits, top_k, top_p)


def _filter(logits: torch.Tensor, scaled: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """filter_logits with the two roles apart: ``logits`` (float32) decide
    which tokens go, ``scaled`` (the same shape, in the same order) are the
    values kept and give top-p's masses (``probabilities`` passes them shifted
    by the row maximum: a float32 difference can merge two distinct logits,
    which must not become a tie)."""
    top_k = top_k if top_k is not None and top_k < logits.shape[-1] else None
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    if top_k is None and top_p is None:
        return scaled
    if logits.device.type == "cpu" and logits.dim() == 2:
        return _filter_cpu(logits, scaled, top_k, top_p)
    return _filter_torch(logits, scaled, top_k, top_p)


def _filter_torch(logits, scaled, top_k, top_p):
    """filter_logits in whole-row tensor ops, no host synchronization: the path
    on a GPU (where sorting 50k logits takes microseconds) and the oracle of
    ``_filter_cpu``."""
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        drop = logits < kth
        logits = logits.masked_fill(drop, float("-inf"))
        scaled = scaled.masked_fill(drop, float("-inf"))
    if top_p is not None:
        probs = torch.softmax(scaled, dim=-1)
        # Equal logits ranked by id.
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
        ranked = probs.gather(-1, order)
        # A token goes once the running total of those ranked above it reaches
        # top_p (cumsum - ranked for that mass rounds differently, and moved
        # the cut by a token where top_p equals a prefix's total).
        total = torch.cumsum(ranked, dim=-1)
        drop_sorted = torch.zeros_like(total, dtype=torch.bool)
        drop_sorted[:, 1:] = total[:, :-1] >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


# top-p on the CPU first ranks this many of the most likely tokens (the whole
# row if their mass falls short of top_p).
_TOP_P_FIRST_CANDIDATES = 256


def _filter_cpu(logits, scaled, top_k, top_p):
    """``_filter_torch``'s result (the same tokens kept, the same values) row
    by row in numpy. On a 2-vCPU Xeon, for a pythia row of 50k float32 logits,
    torch's stable sort took ~3.8 ms (40% of a pythia-160m decode step) and
    topk + masked_fill ~0.4 ms; top-p's prefix is often a few hundred tokens.

    top-k: the k-th largest logit by a partition. top-p: the candidates are
    every logit >= the c-th largest (ties with it included, so they are a
    prefix of the whole ranking; all finite logits if that falls short),
    ranked by ``_rank_desc``; the cumulative sum runs in float64 rounded to
    float32 at each step, as torch's CPU cumsum does, so the prefix's sums are
    bit for bit the whole row's. A NaN logit goes to ``_filter_torch``
    (whatever it gives: sampling refuses NaN)."""
    rows, n = logits.shape
    neg_inf = np.float32(-np.inf)
    a = logits.numpy(force=True)
    if np.isnan(a).any():
        return _filter_torch(logits, scaled, top_k, top_p)
    s = scaled.numpy(force=True)
    if top_k is not None:
        kth = np.partition(a, n - top_k, axis=-1)[:, n - top_k : n - top_k + 1]
        drop = a < kth
        a = np.where(drop, neg_inf, a)
        s = np.where(drop, neg_inf, s)
    if top_p is None:
        return torch.from_numpy(np.ascontiguousarray(s))
    # torch's softmax of the same values: the masses _filter_torch ranks.
    probs = torch.softmax(torch.from_numpy(np.ascontiguousarray(s)), dim=-1).numpy()
    out = np.full((rows, n), neg_inf, dtype=np.float32)
    for b in range(rows):
        ar, p = a[b], probs[b]
        c = _TOP_P_FIRST_CANDIDATES
        while True:
            # -inf as the c-th: every finite logit is a candidate (a row
            # without any keeps its first, as the whole sort does).
            cth = np.partition(ar, n - c)[n - c] if 2 * c < n else neg_inf
            ids = np.flatnonzero(ar >= cth) if cth > neg_inf else np.flatnonzero(ar > neg_inf)
            if ids.size == 0:
                ids = np.zeros(1, dtype=np.int64)
            ids = _rank_desc(ar[ids], ids)
            ranked = p[ids]
            total = np.cumsum(ranked, dtype=np.float64).astype(np.float32)
            reached = np.flatnonzero(total >= np.float32(top_p))  # the prefix up to the first stays
            if reached.size or cth == neg_inf:
                kept = ids[: int(reached[0]) + 1] if reached.size else ids
                out[b, kept] = s[b, kept]
                break
            c = n
    return torch.from_numpy(out)


def _rank_desc(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` (ascending int64) ordered by ``values`` (float32, no NaN)
    descending, equal values by id: a stable descending sort, done as np.sort
    of one unique int64 key per element, (-value as an ordered integer, id).
    On a 2-vCPU Xeon, for 50k values: 0.5 ms, where np.argsort(kind="stable")
    took 3.7 ms and torch.sort(stable=True) 3.7 ms."""
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)  # -0.0 as +0.0: equal values
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # integers in the floats' order
    shift = max(int(ids[-1]).bit_length(), 1)
    return np.sort((-ordered << shift) | ids) & ((1 << shift) - 1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)``: the lowest id among equal maxima, a NaN
    winning over any number. On the CPU through numpy's vectorized argmax
    (the same rule): for a pythia row of 50k float32 logits it took 7 us
    where ``torch.argmax`` took 107 us (2-vCPU AVX-512 Xeon), ~1% of a
    pythia-160m decode step."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64) and logits.dim() == 2:
        return torch.from_numpy(np.argmax(logits.detach().numpy(force=True), axis=-1).astype(np.int64))
    return torch.argmax(logits, dim=-1)


def probabilities(logits: torch.Tensor, params: SamplingParams, vocab_size: Optional[int] = None) -> torch.Tensor:
    """The distribution ``sample`` draws from (``params`` not greedy): ``[B, vocab_size]``."""
    logits = logits[:, :vocab_size].float()
    # The row maximum first, so that a tiny temperature cannot overflow to inf
    # (softmax is unchanged by the shift; the top token stays at 0, never NaN).
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    # The quotients are float32: a temperature below its smallest normal number
    # (~1.2e-38; 1e-46 rounded to 0, and 0 / 0 is NaN) acts as that number, one
    # above its largest as that (both the limit: one-hot on the maximum, uniform).
    f32 = torch.finfo(torch.float32)
    t = min(max(params.temperature, f32.tiny), f32.max)
    scaled = shifted / t if t != 1.0 else shifted
    # Which tokens top-k / top-p keep is decided on the logits as given.
    return torch.softmax(_filter(logits, scaled, params.top_k, params.top_p), dim=-1)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Next ids ``[B]`` (int64, same device) from logits ``[B, V]``; only ids
    ``< vocab_size`` can come out. Reproducible for a seeded ``generator``."""
    if params.greedy:
        return greedy(logits[:, :vocab_size])
    probs = probabilities(logits, params, vocab_size)
    if probs.device.type == "cpu":
        return _draw_cpu(probs, generator)
    try:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    except RuntimeError as e:  # (on a GPU a device-side assert)
        if "probability tensor contains" not in str(e):
            raise
        raise GenerationError(_NOT_FINITE) from None


_NOT_FINITE = (
    "cannot sample: a row of logits holds NaN or +inf, or is -inf throughout (the model's output is not finite)"
)

# _draw_cpu's block of the inverse CDF (the whole row if shorter).
_DRAW_BLOCK = 256


def _draw_cpu(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One id per row of ``probs`` ``[B, V]`` (float32, each row summing to ~1),
    drawn by inverse CDF from one float64 uniform per row (``torch.rand`` on
    ``generator``: a seeded generator gives the same ids in any process):
    the id is the first whose running total (float64) exceeds ``u * total``,
    so an id of probability 0 never comes out, and every other comes out with
    its probability to ~1e-16 (53 bits of u). On a GPU ``torch.multinomial``
    draws (no host synchronization); its seeded ids differ from these.

    Why not ``torch.multinomial``: for one sample it draws an exponential per
    id (50k on a pythia row) and took 1.4-1.6 ms per row on a 2-vCPU AMD
    EPYC (AVX2), ~10% of a pythia-160m decode step there; this draw takes
    0.15-0.25 ms. A whole-row float64 running sum (np.cumsum, a serial chain)
    took ~0.2 ms alone; so the row is cut into blocks of ``_DRAW_BLOCK``,
    their sums (vectorized) choose the block, and the running sum runs within
    it only."""
    u = torch.rand(probs.shape[0], dtype=torch.float64, generator=generator).numpy()
    return torch.from_numpy(_inverse_cdf(probs.numpy(force=True), u))


def _inverse_cdf(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``_draw_cpu``'s ids (int64 ``[B]``) for probabilities ``p`` ``[B, V]`` and
    uniforms ``u`` ``[B]`` in [0, 1): per row the first id whose running total
    exceeds ``u * total``."""
    rows, n = p.shape
    if rows == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.isfinite(p).all():
        raise GenerationError(_NOT_FINITE)
    s = min(_DRAW_BLOCK, n)
    nb = -(-n // s)
    if nb * s != n:
        p = np.concatenate([p, np.zeros((rows, nb * s - n), dtype=p.dtype)], axis=1)
    blocks = p.reshape(rows, nb, s)
    sums = blocks.sum(axis=2, dtype=np.float64)  # [B, nb]
    ends = np.cumsum(sums, axis=1)
    total = ends[:, -1]
    if not (total > 0).all():
        raise GenerationError(_NOT_FINITE)
    target = u * total
    r = np.arange(rows)
    # The first block whose end exceeds the target: one with mass, and one
    # exists, as u * total < total for any u < 1 (the product rounds down).
    j = (ends <= target[:, None]).sum(axis=1)
    block = blocks[r, j]  # [B, s]
    start = np.where(j > 0, ends[r, np.maximum(j - 1, 0)], 0.0)  # the running total before block j
    within = start[:, None] + np.cumsum(block, axis=1, dtype=np.float64)
    # The running sum within a block rounds apart from its pairwise sum, so
    # the target can lie past the block's end: then its last id with any mass.
    last_id = s - 1 - np.argmax(block[:, ::-1] > 0, axis=1)
    i = np.minimum((within <= target[:, None]).sum(axis=1), last_id)
    return (j * s + i).astype(np.int64)
