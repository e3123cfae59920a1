"""The generate loop: prefill, decode steps over the static KV cache, sampling,
stop conditions, streaming; and scoring (log-probabilities, perplexity).

:class:`Pythia` holds a :class:`~pythia_native.model.PythiaModel`, its
tokenizer and one preallocated :class:`~pythia_native.model.KVCache`. On CUDA
each decode step (one token per sequence) is captured as a CUDA graph the
first time a batch size is seen (with the model's current fuse_decode and
compute: Pythia._graph_key), and replayed after: the step's inputs are
copied into static tensors, nothing is allocated, and Python launches one
graph instead of ~15 kernels per layer.

Batches of prompts of different lengths are left-padded; padding tokens get
position -1, so they are neither written to the cache nor attended to, and
every sequence's positions start at 0 at its own first token.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from . import _C, ops
from .errors import GenerationError
from .model import PythiaModel, tensor_addresses
from .sampling import SamplingParams, int_scalar, is_int, sample
from .tokenizer import StreamDecoder, Tokenizer, check_text

Prompt = Union[str, Sequence[int]]


class _CaptureStream:
    """A CUDA stream of one engine's own, for capturing its decode graphs.

    Not one of torch's pooled streams (``torch.cuda.Stream()`` hands those out
    round-robin, 32 per device, so two engines can get the same one): torch
    keys cuBLAS workspaces by stream and, when a graph is reset, frees those of
    the stream it was captured on, including workspaces other live graphs
    captured on that stream still use (pytorch issue #193402; the head's
    ``F.linear`` and the M > 16 ``gemm_4bit`` path call cuBLAS). Every graph
    holds its stream, so the stream is released after the last of them."""

    def __init__(self, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.handle = _C.cuda_stream_create(index)
        # Held by the instance: at interpreter exit this module's globals (_C)
        # may already be cleared when the last graph, and so this, goes.
        self._destroy = _C.cuda_stream_destroy
        self.stream = torch.cuda.ExternalStream(self.handle, device=self.device)

    def __del__(self):
        handle, self.handle = getattr(self, "handle", 0), 0
        if handle:
            self._destroy(handle)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    ids: torch.Tensor  # [B, 1] static input
    positions: torch.Tensor  # [B, 1]
    logits: torch.Tensor  # [B, V] static output
    stream: _CaptureStream  # captured on: kept while any graph captured on it lives


class Pythia:
    """A model ready to generate and score.

    Args:
        model: the network (see :func:`pythia_native.load` to get one from a checkpoint).
        tokenizer: its tokenizer (None: ids in, ids out).
        max_batch, max_len: the KV cache to preallocate (``max_len`` at most the
            model's ``max_position_embeddings``, its default). A request for a
            larger batch reallocates the cache once (and drops captured graphs).
        cuda_graphs: capture decode steps as CUDA graphs (CUDA only).

    One request at a time: :meth:`generate`, :meth:`generate_ids`,
    :meth:`score` and a :meth:`stream` (from its first item until it is
    exhausted, closed or garbage-collected) each hold the engine, as they all
    decode on its one KV cache. A call from another thread waits its turn; a
    call from the thread that holds the engine (e.g. ``generate`` inside a
    ``for piece in stream(...)`` loop, or two interleaved streams; for a stream
    handed between threads, the one that resumed it last, while it is
    suspended) raises GenerationError. :meth:`load_revision` waits its turn
    like a request, but runs at once between two steps of the calling
    thread's own stream (suspended, resumed last by that thread). For
    concurrent requests, make one engine per thread over the same model
    (``Pythia(engine.model, engine.tokenizer)``: weights shared, caches
    separate). Only the engine :func:`pythia_native.load` made can
    :meth:`load_revision` (the others lack its source); its load does not
    wait for the other engines: a request of another engine that overlaps
    it, or has a stream open across it, raises GenerationError rather than
    mix two revisions (``_check_weights``).
    """

    def __init__(
        self,
        model: PythiaModel,
        tokenizer: Optional[Tokenizer] = None,
        *,
        max_batch: int = 1,
        max_len: Optional[int] = None,
        cuda_graphs: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_len = self.config.max_position_embeddings if max_len is None else max_len
        if not is_int(self.max_len) or not 1 <= self.max_len <= self.config.max_position_embeddings:
            raise GenerationError(
                f"max_len must be an integer in [1, {self.config.max_position_embeddings}] (max_position_embeddings), "
                f"got {max_len!r}"
            )
        if not is_int(max_batch) or max_batch < 1:
            raise GenerationError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.max_len, max_batch = int(self.max_len), int(max_batch)  # numpy integers wrap in arithmetic
        self.cache = model.new_cache(max_batch, self.max_len)
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self._graphs: dict[tuple[int, bool, str], _Graph] = {}  # by _graph_key
        # model.weights_generation after this engine's own last load_revision: a
        # stream may load one between two of its steps (_check_weights).
        self._own_generation: Optional[int] = None
        self._graph_pool = None
        self._capture_stream = None
        # What the captured graphs read (_addresses at their capture), checked per request.
        self._graph_addresses: Optional[list] = None
        # Ids the sampler may choose: those the tokenizer can decode.
        self.vocab_size = min(tokenizer.vocab_size, self.config.vocab_size) if tokenizer else self.config.vocab_size
        # The one-request-at-a-time guard (_hold). A Lock, not an RLock: a stream's
        # hold may be released from another thread (the one that closes or collects it).
        self._lock = threading.Lock()
        # While held: (what, the thread, the stream's generator in a list or None); see _held_here.
        self._holder: Optional[tuple[str, threading.Thread, Optional[list]]] = None

    # --------------------------------------------------------------- guard --

    def _held_here(self) -> Optional[str]:
        """What holds the engine such that the calling thread must not wait for
        it (None if nothing does): its own call in progress, or an open stream
        that this thread resumed last and that is suspended, as between two
        items of a ``for piece in stream(...)`` loop (only this thread is then
        known to go on with it: waiting would wait for itself). A stream that
        another thread is running a step of, or that another thread resumed
        last, is waited for (a thread pool's workers take turns with one).
        Only the holder writes ``_holder`` (one tuple, replaced whole), so no
        lock is needed. Thread objects, not ids: an id is reused once its
        thread has ended, and an unrelated thread was refused as if it held
        the stream."""
        held = self._holder
        if held is None or held[1] is not threading.current_thread():
            return None
        gen = held[2][0]() if held[2] else None
        if gen is not None and gen.gi_running:
            # Running a step: in another thread (wait for it), or in this one,
            # a call from inside that step (a signal handler, say): refused.
            f = sys._getframe(1)
            while f is not None:
                if f is gen.gi_frame:
                    return held[0]
                f = f.f_back
            return None
        return held[0]

    def _check_not_held_here(self, what: str) -> None:
        """Refuse a nested call: waiting for the engine would wait for this thread."""
        held = self._held_here()
        if held == "stream()":
            raise GenerationError(
                f"{what} while a stream() of this engine is still open; exhaust or close() it first "
                "(they share one KV cache), or use a second Pythia over the same model"
            )
        if held is not None:
            raise GenerationError(f"{what} inside {held} of the same engine (they share one KV cache)")

    @contextlib.contextmanager
    def _hold(self, what: str):
        """Hold the engine (its KV cache) for one call; see the class docstring.
        A thread's nested call raises; another thread's waits. ``with`` on the
        lock: a KeyboardInterrupt cannot land between taking it and the block
        that gives it back (after a bare acquire() it could, and the engine
        stayed locked for good)."""
        self._check_not_held_here(what)
        with self._lock:
            try:
                self._holder = (what, threading.current_thread(), None)
                yield
            finally:
                self._holder = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------ batching --

    def _encode(self, prompts: Union[Prompt, Sequence[Prompt]], what: str = "prompt") -> tuple[list[list[int]], bool]:
        """Prompts as id lists, and whether a single prompt was given; errors call each a ``what``."""
        if not isinstance(prompts, (str, list, tuple)) and hasattr(prompts, "tolist"):
            prompts = prompts.tolist()  # a torch.Tensor or numpy array of ids (0-d: a scalar)
        if isinstance(prompts, (list, tuple)):
            prompts = [int_scalar(t) for t in prompts]  # [tensor(5), tensor(6)] is one prompt, as [5, 6]
        if not isinstance(prompts, (str, list, tuple)):
            hint = " (decode bytes to str first)" if isinstance(prompts, (bytes, bytearray)) else ""
            raise GenerationError(
                f"{what}s must be a string, a list of token ids, or a list of either (a batch), "
                f"got {type(prompts).__name__}{hint}"
            )
        single = isinstance(prompts, str) or (len(prompts) > 0 and all(is_int(t) for t in prompts))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise GenerationError(f"no {what}s given")
        out = []
        for i, p in enumerate(batch):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise GenerationError(f"{what}s given as strings need a tokenizer; pass token ids or load one")
                ids = self.tokenizer.encode(p)
            else:
                p = p.tolist() if hasattr(p, "tolist") else p  # a tensor or numpy row
                if not isinstance(p, (list, tuple)):
                    hint = " (decode bytes to str first)" if isinstance(p, (bytes, bytearray)) else ""
                    raise GenerationError(
                        f"{what} {i}: expected a string or a list of token ids, got {type(p).__name__}{hint}"
                    )
                p = [int_scalar(t) for t in p]
                # Integers only: int() would truncate 5.9 to 5, parse "12", take True as 1.
                bad = next((j for j, t in enumerate(p) if not is_int(t)), None)
                if bad is not None:
                    raise GenerationError(
                        f"{what} {i}: expected a string or a list of token ids (integers); item {bad} is "
                        f"{p[bad]!r}, a {type(p[bad]).__name__}"
                    )
                ids = [int(t) for t in p]
            if not ids:
                raise GenerationError(f"{what} {i} is empty (it needs at least one token)")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise GenerationError(f"{what} {i}: token id(s) {bad[:5]} outside [0, {self.config.vocab_size})")
            out.append(ids)
        return out, single

    def _fit(self, batch: list[list[int]], new_tokens: int, truncate: bool) -> list[list[int]]:
        """Check every prompt plus ``new_tokens`` fits the context; cut prompts from the left if ``truncate``."""
        # The last new token is never fed back, so a sequence occupies len + new_tokens - 1 slots.
        room = self.max_len - max(new_tokens - 1, 0)
        if room < 1:
            raise GenerationError(f"max_new_tokens={new_tokens} leaves no room for a prompt in a context of {self.max_len}")
        longest = max(len(p) for p in batch)
        if longest > room:
            if not truncate:
                raise GenerationError(
                    f"prompt of {longest} tokens + {new_tokens} new tokens exceeds the context of {self.max_len} "
                    f"tokens (it needs {longest + new_tokens - 1} positions: the last new token is not fed back); "
                    f"shorten the prompt, lower max_new_tokens, or pass truncate=True (--truncate) to keep the last "
                    f"{room} prompt tokens"
                )
            batch = [p[-room:] for p in batch]
        return batch

    def _ensure_cache(self, batch_size: int) -> None:
        current = 0 if self.cache is None else self.cache.max_batch
        if batch_size <= current:
            return
        # The old cache (and the graphs that read it) are released before the
        # larger one is allocated, so the peak is the new cache, not both: on a
        # GPU near its limit both may not fit where the new one alone does.
        self._drop_graphs()
        self.cache = None
        try:
            self.cache = self.model.new_cache(batch_size, self.max_len)
        except BaseException:
            # E.g. out of memory: the engine keeps working at the old size (its
            # contents need not survive: every call prefills its own prompts).
            if current:
                try:
                    self.cache = self.model.new_cache(current, self.max_len)
                except Exception:
                    pass  # still None: the next call allocates again; the first error is raised
            raise

    def _check_weights(self, seen: Optional[int], own_load_allowed: bool = False) -> int:
        """``model.weights_generation``, which must still be ``seen`` (None: at the
        start of a request) unless ``own_load_allowed`` (between two steps of a
        stream, before the next model call) and this engine's own
        load_revision changed it. After a model call it must be unchanged: a
        load that overlapped the call (from the stream's own thread while
        another ran the step) is an error too. Engines over one model share its
        weights but not their guard: a load_revision of another engine that
        overlapped this request's model calls, or came between two of its
        steps, gave results from a mix of two revisions, or from a half-written
        model after a failed load; it is an error instead. Checked around every
        model call (an attribute read)."""
        g = self.model.weights_generation
        if seen is None and self.model.loading:
            raise GenerationError(
                "another engine over this model is loading a revision into it (load_revision); "
                "wait for it to finish before a request"
            )
        if seen is not None and g != seen and not (own_load_allowed and g == self._own_generation):
            raise GenerationError(
                "the model's weights were reloaded during this request (load_revision through another engine "
                "over the same model, or model.load_tensors), so the result would mix two revisions; load "
                "revisions while no other request on the model is running"
            )
        return g

    def _drop_graphs(self) -> None:
        """Forget the captured CUDA graphs (recaptured on next use) and their
        memory pool: a new capture gets a fresh pool rather than the id of one
        whose graphs are all gone (which torch's allocator may have erased, or
        hold still in use by a lingering workspace)."""
        self._graphs.clear()
        self._graph_pool = None
        self._graph_addresses = None

    def _addresses(self) -> list:
        """What a captured decode step reads: the model's parameters and buffers, and the KV cache."""
        cache = None if self.cache is None else (self.cache.k.data_ptr(), self.cache.v.data_ptr())
        return [*tensor_addresses(self.model), ("cache", cache)]

    def _check_graphs(self) -> None:
        """Drop the captured graphs if what they read has moved since: a graph
        replays the addresses it recorded, so after ``model.cpu(); model.cuda()``
        (or ``load_state_dict(..., assign=True)``) it would read freed memory.
        Once per request (0.6 ms for pythia-160m's 197 tensors on a 2-vCPU Xeon), not per step; a revision
        loaded between two steps of a stream is checked by load_revision."""
        if self._graphs and self._addresses() != self._graph_addresses:
            self._drop_graphs()

    # -------------------------------------------------------------- decode --

    def _prefill(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad, run all prompt tokens; returns logits ``[B, V]`` of each last
        token and the next position of each sequence ``[B]`` (its length)."""
        B, T = len(batch), max(len(p) for p in batch)
        ids = torch.zeros(B, T, dtype=torch.int64)
        positions = torch.full((B, T), -1, dtype=torch.int64)
        for b, p in enumerate(batch):
            ids[b, T - len(p) :] = torch.tensor(p, dtype=torch.int64)
            positions[b, T - len(p) :] = torch.arange(len(p))
        ids, positions = ids.to(self.device), positions.to(self.device)
        logits = self.model(ids, positions, self.cache, span=T)
        lengths = torch.tensor([len(p) for p in batch], dtype=torch.int64, device=self.device)
        return logits, lengths

    def _graphed(self) -> bool:
        """Whether decode steps replay CUDA graphs (checked per call: the model may have moved)."""
        return self.cuda_graphs and self.device.type == "cuda"

    def _graph_step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence through this batch size's CUDA graph (captured
        on first use): ids, positions ``[B, 1]`` -> logits ``[B, V]``."""
        # The model's device, not the current one: on cuda:1 while cuda:0 is current,
        # the ops run on cuda:1's stream, which is the one that must be captured and
        # replayed on. Inference mode: the static inputs are cloned inside it, so they
        # are inference tensors, and an in-place copy into one is refused outside it.
        with torch.cuda.device(self.device), torch.inference_mode():
            key = self._graph_key(ids.shape[0])
            g = self._graphs.get(key)
            if g is None:
                g = self._capture(ids, positions)
                self._graphs[key] = g
            g.ids.copy_(ids)
            g.positions.copy_(positions)
            g.graph.replay()
            return g.logits

    def _graph_key(self, batch_size: int) -> tuple[int, bool, str]:
        """What a captured decode step was recorded with besides its tensors:
        the batch size and the settings the model reads when it is bound
        (``model.fuse_decode``, ``model.compute``). A graph replays what it
        recorded, so a change to either after a capture must capture anew, as
        it takes effect at the next call when decoding eagerly (the graphs of
        the earlier settings stay, for when they come back)."""
        return batch_size, bool(self.model.fuse_decode), ops.check_compute(self.model.compute)

    def _capture(self, ids: torch.Tensor, positions: torch.Tensor) -> _Graph:
        """Capture the decode step for this batch size. The warm-up runs use the
        real inputs, so the cache slots they write are the ones the step writes."""
        addresses = self._addresses()
        if addresses != self._graph_addresses:  # graphs of other addresses must not stay beside this one
            self._drop_graphs()
            self._graph_addresses = addresses
        static_ids, static_pos = ids.clone(), positions.clone()
        dev = self.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialization (cuBLAS handles, allocator) outside the capture
                self.model(static_ids, static_pos, self.cache)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        if self._capture_stream is None or self._capture_stream.device != dev:
            # Not torch.cuda.graph's default capture stream, which is one per process
            # (made on whichever device was current at the first capture anywhere),
            # nor a pooled one that another engine may share: see _CaptureStream.
            self._capture_stream = _CaptureStream(dev)
        # thread_local: CUDA calls that are illegal during a capture (cudaMalloc,
        # a synchronize) fail the capture only when this thread makes them. The
        # default, "global", also fails it when another thread does, e.g. a second
        # engine decoding eagerly or allocating its cache while this one captures
        # (torch's own CUDA graph trees capture thread-locally for the same reason).
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=self._capture_stream.stream,
                              capture_error_mode="thread_local"):
            logits = self.model(static_ids, static_pos, self.cache)
        return _Graph(graph, static_ids, static_pos, logits, self._capture_stream)

    def _token_stream(
        self,
        batch: list[list[int]],
        max_new_tokens: int,
        params: SamplingParams,
        seed: Optional[int],
        done: list[bool],
    ) -> Iterator[list[int]]:
        """Yield the next id of every sequence, step by step, until
        ``max_new_tokens`` or every entry of ``done`` (which the caller sets) is true.
        Finished sequences keep decoding (the batch is static) but are ignored."""
        self._ensure_cache(len(batch))
        self._check_graphs()
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()  # a fresh random seed for this call; torch's global RNG is left alone
            else:
                generator.manual_seed(generator_seed(seed, self.device))
        weights = self._check_weights(None)
        logits, lengths = self._prefill(batch)
        positions = lengths.view(-1, 1).clone()
        # Without CUDA graphs, decode steps call the model bound once (PythiaModel.bind:
        # no per-step module overhead), and again when the weights generation moved:
        # a load_revision of this engine's own between two steps of a stream (a
        # buffer may have been reallocated; any other change raised above).
        step_fn, bound_weights = None, None
        for step in range(max_new_tokens):
            weights = self._check_weights(weights)  # the logits in hand come from one revision
            next_ids = sample(logits, params, generator, self.vocab_size)
            host_ids = next_ids.tolist()
            yield host_ids
            if step + 1 == max_new_tokens or all(done):
                return
            # Before the call (a graph must not replay moved weights); the one
            # place where a load_revision of this engine's own is accepted.
            weights = self._check_weights(weights, own_load_allowed=True)
            if self._graphed():
                logits = self._graph_step(next_ids.view(-1, 1), positions)
            else:
                if bound_weights != weights:
                    step_fn, bound_weights = self.model.bind(), weights
                logits = step_fn(next_ids.view(-1, 1), positions, self.cache)
            positions += 1

    # -------------------------------------------------------------- public --

    def generate_ids(
        self,
        prompts: Union[Prompt, Sequence[Prompt], torch.Tensor],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[None, int, str, Sequence[Union[int, str]]] = None,
        ignore_eos: bool = False,
        truncate: bool = False,
    ) -> Union[list[int], list[list[int]]]:
        """The new token ids of each prompt (the stop id or EOS that ended a
        sequence is not included). See :meth:`generate` for the arguments."""
        return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos, truncate)[0]

    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt], torch.Tensor],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[None, int, str, Sequence[Union[int, str]]] = None,
        ignore_eos: bool = False,
        truncate: bool = False,
    ) -> Union[str, list[str]]:
        """Continue each prompt; returns the new text (a list for a list of prompts).

        Args:
            prompts: a string, a list of ids, or a list of either (a batch; left-padded).
            max_new_tokens: at most this many new tokens per prompt.
            temperature: 0 is greedy; otherwise sample from ``softmax(logits / temperature)``.
            top_k, top_p: filters applied before sampling (see ``pythia_native.sampling``).
            seed: makes sampling reproducible (same seed, same prompts, same device -> same output);
                an integer in [-2**63, 2**64), taken modulo 2**64 as torch.Generator does
                (-1 and 2**64 - 1 are the same seed); every bit of it counts (see ``generator_seed``).
            stop: ids and/or strings that end a sequence (not included in the output);
                strings are searched in the generated text only, not across the prompt's end.
            ignore_eos: keep going after EOS (benchmarks).
            truncate: cut prompts from the left to fit the context instead of raising. A prompt
                of P tokens fits with N new tokens when P + N - 1 <= max_len (the last new
                token is never fed back), as in transformers.
        """
        if self.tokenizer is None:
            raise GenerationError("generate() returns text and needs a tokenizer; use generate_ids() for token ids")
        ids, texts, single = self._generate(
            prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos, truncate, want_text=True
        )
        return texts[0] if single else texts

    def _generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos, truncate,
                  want_text=False):
        params = SamplingParams(temperature, top_k, top_p)
        max_new_tokens = _check_count_and_seed(max_new_tokens, seed)
        _check_flags(ignore_eos=ignore_eos, truncate=truncate)
        batch, single = self._encode(prompts)
        stop_ids, stop_strings = self._stop_set(stop, ignore_eos)
        if stop_strings and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer")
        out: list[list[int]] = [[] for _ in batch]
        if max_new_tokens == 0:
            texts = [""] * len(batch) if want_text else None
            return (out[0] if single else out), texts, single
        batch = self._fit(batch, max_new_tokens, truncate)
        done = [False] * len(batch)
        decoders = [StreamDecoder(self.tokenizer) for _ in batch] if stop_strings else None
        texts_so_far = [""] * len(batch)
        with self._hold("generate()" if want_text else "generate_ids()"):
            for step_ids in self._token_stream(batch, max_new_tokens, params, seed, done):
                for b, t in enumerate(step_ids):
                    if done[b]:
                        continue
                    if t in stop_ids:
                        done[b] = True
                        continue
                    out[b].append(t)
                    if decoders is not None:
                        piece = decoders[b].push(t)
                        texts_so_far[b] += piece
                        # A new occurrence ends inside the new piece: search it and the
                        # len(s) - 1 characters before it (pieces can be long: one
                        # Pythia token is a newline and 19 spaces).
                        tail = texts_so_far[b]
                        if any(s in tail[max(len(tail) - len(piece) - len(s) + 1, 0) :] for s in stop_strings):
                            done[b] = True
        texts = None
        if want_text:
            texts = [_cut_at_stop(self.tokenizer.decode(ids), stop_strings) for ids in out]
        elif stop_strings:
            out = [_ids_before_stop(self.tokenizer, ids, stop_strings) for ids in out]
        return (out[0] if single else out), texts, single

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[None, int, str, Sequence[Union[int, str]]] = None,
        ignore_eos: bool = False,
        truncate: bool = False,
    ) -> Iterator[str]:
        """Generate for one prompt, yielding text as it is decoded. A piece never
        ends inside a UTF-8 character, and text that could be the start of a
        stop string is held back until it is known not to be one. The pieces
        join to what :meth:`generate` returns.

        The arguments are checked here, at the call; the stream holds the
        engine from its first item until it ends, is closed or is
        garbage-collected: see the class docstring."""
        if self.tokenizer is None:
            raise GenerationError("streaming text needs a tokenizer")
        params = SamplingParams(temperature, top_k, top_p)
        max_new_tokens = _check_count_and_seed(max_new_tokens, seed)
        _check_flags(ignore_eos=ignore_eos, truncate=truncate)
        batch, single = self._encode(prompt)
        if not single:
            raise GenerationError("stream() takes one prompt; use generate() for a batch")
        stop_ids, stop_strings = self._stop_set(stop, ignore_eos)
        if max_new_tokens > 0:
            batch = self._fit(batch, max_new_tokens, truncate)
        # A weak reference to the generator, for the guard to tell a running
        # stream from a suspended one (a strong one, held by the generator's
        # own frame, would keep a dropped stream, and the engine, until gc).
        box: list = []
        gen = self._stream(batch, max_new_tokens, params, seed, stop_ids, stop_strings, box)
        box.append(weakref.ref(gen))
        return gen

    def _stream(self, batch, max_new_tokens, params, seed, stop_ids, stop_strings, box: list) -> Iterator[str]:
        """stream()'s generator (``box[0]()`` once made), its arguments checked."""
        if max_new_tokens == 0:
            return
        # Taken here, in the generator's body (so at the first next(), not at
        # stream()), and given back however the generator ends, close() and
        # garbage collection (GeneratorExit) included (see _hold).
        self._check_not_held_here("stream()")
        with self._lock:
            try:
                self._holder = ("stream()", threading.current_thread(), box)
                yield from self._stream_pieces(batch, max_new_tokens, params, seed, stop_ids, stop_strings, box)
            finally:
                self._holder = None

    def _stream_pieces(self, batch, max_new_tokens, params, seed, stop_ids, stop_strings, box) -> Iterator[str]:
        """stream()'s pieces, for a checked request, with the engine held."""
        decoder = StreamDecoder(self.tokenizer)
        done = [False]
        text, emitted = "", 0
        cut_by_string = False
        for (t,) in self._token_stream(batch, max_new_tokens, params, seed, done):
            if t in stop_ids:
                done[0] = True
                break
            text += decoder.push(t)
            cut = _cut_at_stop(text, stop_strings)
            if len(cut) < len(text):
                done[0] = cut_by_string = True
                text = cut
                break
            # Held back: only an end of the text that could begin a stop string
            # (text emitted earlier could not have: it is never taken back).
            safe = len(text) - _held_back(text, stop_strings)
            if safe > emitted:
                yield text[emitted:safe]
                # A generator may be handed to another thread between two
                # items: the one that resumed it last holds it (_held_here).
                self._holder = ("stream()", threading.current_thread(), box)
                emitted = safe
        if not cut_by_string:
            # Bytes held for an unfinished UTF-8 character come out as generate()
            # decodes them (U+FFFD), whether the sequence ended on a stop id,
            # EOS or max_new_tokens.
            text += decoder.flush()
        text = _cut_at_stop(text, stop_strings)
        if len(text) > emitted:
            yield text[emitted:]

    def _stop_set(self, stop, ignore_eos: bool) -> tuple[set[int], list[str]]:
        if stop is None:
            items = []
        elif isinstance(stop, (str, bytes, bytearray)) or is_int(stop):
            items = [stop]
        elif hasattr(stop, "tolist"):  # a tensor or numpy array of ids, or a numpy scalar
            items = stop.tolist()
            items = items if isinstance(items, list) else [items]
        elif isinstance(stop, (list, tuple, set, frozenset)):
            items = list(stop)
        else:
            items = [stop]  # reported below as a bad entry
        ids, strings = set(), []
        V = self.config.vocab_size
        for s in items:
            s = int_scalar(s)  # a 0-d tensor or a numpy scalar
            if isinstance(s, str):
                if s == "":
                    raise GenerationError("stop strings must not be empty")
                try:  # a lone surrogate: never in generated text, so never a stop
                    check_text(s)
                except GenerationError as e:
                    raise GenerationError(f"stop string {s!r}: {e}") from None
                strings.append(s)
            elif is_int(s):
                if not 0 <= s < V:
                    raise GenerationError(f"stop id {s} is outside the vocabulary [0, {V})")
                ids.add(int(s))
            else:
                # int() would truncate 9.9, read b"\n" as the id 10 and True as 1.
                hint = " (give stop strings as str)" if isinstance(s, (bytes, bytearray)) else ""
                raise GenerationError(
                    f"stop entry {s!r} ({type(s).__name__}) is neither a token id (an integer in [0, {V})) "
                    f"nor a non-empty string{hint}"
                )
        if not ignore_eos:
            ids.update(self.config.eos_token_ids)
        return ids, strings

    # ------------------------------------------------------------- loading --

    def load_revision(self, revision: Union[str, int, None]) -> "Pythia":
        """Load another revision of the same model into this engine, in place.

        Parameters, buffers and the KV cache keep their storage, so captured
        CUDA graphs replay with the new weights; the tokenizer is kept. Needs
        an engine made by :func:`pythia_native.load` (it reuses its name,
        quantization and cache options). See ``loading.load_revision_``.

        It holds the engine like a request: a call from another thread waits
        for the one in flight (a score must not see half of each revision's
        weights). From the thread that resumed an open stream() last, while
        the stream is suspended, it runs at once, between two of its steps.
        """
        from .loading import load_revision_

        if self._held_here() == "stream()":
            return load_revision_(self, revision)
        with self._hold("load_revision()"):
            return load_revision_(self, revision)

    # -------------------------------------------------------------- export --

    def save_pretrained(self, directory) -> "os.PathLike":
        """Write a bitsandbytes-format 4-bit checkpoint (config, safetensors,
        tokenizer) that transformers + bitsandbytes and :func:`pythia_native.load` read."""
        from .export import save_pretrained

        source = getattr(self, "source", None)
        out = save_pretrained(self.model, directory, tokenizer_dir=source[2] if source else None)
        if self.tokenizer is not None and not (out / "tokenizer.json").is_file():
            self.tokenizer.save(out / "tokenizer.json")
        return out

    # ------------------------------------------------------------- scoring --

    def score(
        self, texts: Union[Prompt, Sequence[Prompt]], *, prepend_eos: bool = True
    ) -> Union["Score", list["Score"]]:
        """Per-token log-probabilities of each text under the model (no generation).

        With ``prepend_eos`` (the lm-evaluation-harness convention for Pythia)
        the text is scored after the config's ``bos_token_id`` (its
        ``eos_token_id`` where it has none; both are ``<|endoftext|>``, id 0,
        in Pythia), so its first token gets a log-probability too; otherwise
        the first token is the context.
        Texts longer than the context are scored in windows of ``max_len``
        tokens, each after the previous window's last tokens (stride max_len // 2).
        A token's log-probability can differ in its last bits between a text
        and a prefix of it (up to 1.1e-5 measured: the kernels are chosen by the
        number of tokens); one text scored under two revisions is summed alike.
        Returns a :class:`Score` (a list of them for a list of texts).
        """
        _check_flags(prepend_eos=prepend_eos)
        batch, single = self._encode(texts, "text")
        with self._hold("score()"):
            weights = self._check_weights(None)  # one revision for every text of the call
            results = [self._score_one(ids, prepend_eos, weights) for ids in batch]
        return results[0] if single else results

    def _score_one(self, ids: list[int], prepend_eos: bool, weights: int) -> "Score":
        if prepend_eos:
            bos = self.config.bos_token_id if self.config.bos_token_id is not None else self.config.eos_token_id
            if bos is None:
                raise GenerationError(
                    "prepend_eos=True needs a bos_token_id or eos_token_id, and this model's config has neither: "
                    "score with prepend_eos=False (the CLI's --no-eos)"
                )
            ids = [int(bos)] + ids
        if len(ids) < 2:
            raise GenerationError("a text to score needs at least 2 tokens, or 1 with prepend_eos=True (the CLI without --no-eos)")
        if self.max_len < 2:
            # A window of one token holds a context but no target to score.
            raise GenerationError(f"scoring needs a context of at least 2 tokens; this engine has max_len={self.max_len}")
        # Made outside inference_mode, so the caller gets an ordinary tensor
        # (one made inside refuses in-place updates and autograd outside it).
        logprobs = torch.empty(len(ids) - 1, dtype=torch.float32)
        self._ensure_cache(1)  # outside too, as generate makes it: one kind of cache whichever call comes first
        with torch.inference_mode():
            self._score_windows(ids, logprobs, weights)
        return Score(ids[1:], logprobs)

    def _score_windows(self, ids: list[int], logprobs: torch.Tensor, weights: int) -> None:
        window, stride = self.max_len, max(self.max_len // 2, 1)
        start, scored = 0, 0  # window start; targets 1..scored already have a log-prob
        while scored < len(ids) - 1:
            end = min(start + window, len(ids))
            chunk = torch.tensor(ids[start:end], device=self.device).view(1, -1)
            positions = torch.arange(end - start, device=self.device).view(1, -1)
            h = self.model(chunk, positions, self.cache, span=end - start, last_only=False, head=False)[0]
            # Rows [first, n) of this window are scored (a later window's first
            # rows were scored by the one before): the head and log-softmax
            # over them a few hundred rows at a time. All at once, a window's
            # logits are T x vocab float32 (2 x 412 MB at T = 2048 with the
            # log-softmax), more than pythia-160m's whole model. A last piece
            # of up to _SCORE_FOLD rows joins the one before, so that every
            # piece takes the head kernel that the rows [first, n) would in one
            # piece (the CPU kernels are chosen by row count: GEMV, tiles,
            # panels): the values of one piece.
            first, n = scored - start, end - start - 1
            edges = [*range(first, n, _SCORE_ROWS), n]
            if len(edges) > 2 and edges[-1] - edges[-2] <= _SCORE_FOLD:
                del edges[-2]
            targets = torch.tensor(ids[start + 1 : end], device=self.device).view(-1, 1)
            token_lp = torch.cat([
                torch.log_softmax(self.model.logits(h[a:b])[:, : self.config.vocab_size], dim=-1)
                .gather(1, targets[a:b]).squeeze(1)
                for a, b in zip(edges, edges[1:])
            ]).cpu()
            self._check_weights(weights)  # the whole window, head included, on one revision
            logprobs[scored : end - 1] = token_lp
            scored = end - 1
            start += stride


# Rows of logits scored at a time (score): 256 x 50304 float32 = 51 MB; a
# last piece of up to _SCORE_FOLD rows (the CPU head's largest tile) joins the
# one before.
_SCORE_ROWS = 256
_SCORE_FOLD = 64


@dataclass
class Score:
    """Log-probabilities of ``tokens`` (each given everything before it)."""

    tokens: list[int]
    logprobs: torch.Tensor  # float32 [len(tokens)]

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def perplexity(self) -> float:
        return perplexity(float(self.logprobs.mean()))


def perplexity(mean_logprob: float) -> float:
    """``exp(-mean_logprob)``, inf where that overflows a float (math.exp raised); NaN stays NaN."""
    try:
        return math.exp(-mean_logprob)
    except OverflowError:
        return math.inf


def _check_flags(**flags) -> None:
    """Each a bool (numpy's too): "no" or 0 would pass as a truth value."""
    for name, v in flags.items():
        if not isinstance(v, (bool, np.bool_)):
            raise GenerationError(f"{name} must be True or False, got {v!r}")


def _check_count_and_seed(max_new_tokens, seed) -> int:
    """Check both; returns max_new_tokens as a Python int (a numpy uint16 would
    wrap in the context arithmetic of _fit, a uint8 overflow)."""
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    # torch.Generator.manual_seed takes [-2^63, 2^64) and raises a bare RuntimeError otherwise.
    if seed is not None and (not is_int(seed) or not -(2**63) <= seed < 2**64):
        raise GenerationError(f"seed must be None or an integer in [-2**63, 2**64), got {seed!r}")
    return int(max_new_tokens)


def generator_seed(seed, device: torch.device) -> int:
    """What ``generate(seed=...)`` gives ``torch.Generator.manual_seed`` on
    ``device``: ``seed`` modulo 2**64, except on the CPU above 2**32. torch's
    CPU generator (mt19937) keeps only a seed's low 32 bits, so ``s`` and
    ``s + 2**32`` (or ``-1`` and ``2**32 - 1``) drew the same stream, and random
    64-bit seeds collided after ~2**16 of them. There a seed of 2**32 or more
    (negative ones included, modulo 2**64) is mixed into 32 bits (splitmix64's
    finalizer): every bit counts, and seeds below 2**32 keep their streams.
    CUDA's generator (Philox) takes all 64 bits as they are."""
    s = int(seed) % 2**64  # int(): a numpy integer is a TypeError in manual_seed
    if torch.device(device).type != "cpu" or s < 2**32:
        return s
    s = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    s = ((s ^ (s >> 27)) * 0x94D049BB133111EB) % 2**64
    s ^= s >> 31
    return (s ^ (s >> 32)) & 0xFFFFFFFF


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that is the start of a stop
    string (shorter than it: a whole one is cut before this is asked)."""
    best = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _ids_before_stop(tokenizer: Tokenizer, ids: list[int], stop_strings: Sequence[str]) -> list[int]:
    """The longest prefix of ids whose text ends before the first stop string
    (ids are cut at token boundaries, so a token that holds the start of the
    stop string goes too: the ids' text is a prefix of what generate() returns)."""
    cut = _cut_at_stop(tokenizer.decode(ids), stop_strings)
    n = len(ids)
    while n > 0 and not cut.startswith(tokenizer.decode(ids[:n])):
        n -= 1
    return ids[:n]
