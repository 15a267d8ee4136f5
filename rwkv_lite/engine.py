"""A continuous-batching generation engine: many requests, each with its own state and sampler, one model.

    engine = Engine(model, max_batch=8)
    handle = engine.submit(model.tokenizer.encode("And God said"), max_tokens=40,
                           params=SamplingParams(seed=1), on_step=print)
    while engine.has_work():
        engine.step()                         # or engine.start(): a thread that steps while there is work
    handle.text, handle.finish_reason, handle.usage

One `step()`:
  1. drops cancelled requests and admits waiting ones while fewer than `max_batch` are running;
  2. prefills ONE chunk (at most `prefill_chunk` tokens, sequence mode) of the oldest request still reading its
     prompt, so a new request delays the running streams by at most one chunk;
  3. decodes: every request whose prompt is read samples its next token from its last logits (its own penalties,
     RNG, stop strings, UTF-8 stream decoder: its own rwkv_lite.sequence.SequenceSampler, the one
     rwkv_lite.generate runs), and all the tokens that continue go
     through ONE Model.forward_batch call (each weight read once for the whole batch).

A request's text is the same alone and in any batch: prompts are read in chunks whose boundaries depend only on
the prompt (and the prefix cache hit), decode rows equal the single-sequence forward (kernels/batched.py), and
sampling uses only the request's own logits and RNG.

Thread safety: submit(), cancel() and the counters may be used from any thread; step() from one thread at a time
(the engine thread of start(), or the caller). `on_step` callbacks run in the stepping thread and must be quick.
"""
from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import RwkvLiteError
from .prefix_cache import PrefixCache
from .sampling import DIGITS_AND_SPACES, SamplingParams
from .sequence import GenerationError, SequenceSampler, Step, check_max_tokens, check_stop

DEFAULT_PREFILL_CHUNK = 128      # prompt tokens per engine step: bounds the stall a new request causes
MAX_TOP_LOGPROBS = 5
DEFAULT_MAX_TOKENS = 16          # a request's budget when neither submit() nor its params give one


class QueueFullError(RwkvLiteError):
    """The engine's waiting queue is full: try again later."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0           # prompt tokens whose state came from the prefix cache (not re-read)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Request:
    """A submitted generation. Read its fields after it finished (or live, from the stepping thread)."""

    def __init__(self, rid: int, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
                 stop: tuple[str, ...], logprobs: int | None, on_step, cache_points: Sequence[int], tokenizer,
                 ban_eot: bool, penalty_exempt_text, reply_suffix):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.logprobs = logprobs
        self.usage = Usage(prompt_tokens=len(prompt_ids))
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted = time.monotonic()
        self.first_token_time: float | None = None
        self.done = threading.Event()
        self._on_step = on_step
        self._cancelled = False
        self._cache_points = sorted({p for p in cache_points if 0 < p <= len(prompt_ids)} | {len(prompt_ids)})
        self._reply_suffix = reply_suffix
        self._snapshot = None                 # (tokens, state, logits, text) when the raw text last ended in the suffix
        self._sampler = SequenceSampler(tokenizer, params, max_tokens=max_tokens, stop=stop, ban_end_of_text=ban_eot,
                                        penalty_exempt_text=penalty_exempt_text, logprobs=logprobs)
        self.params = self._sampler.params
        self._state = None
        self._read = 0                        # prompt tokens the state has seen
        self._logits = None                   # after the last fed token

    @property
    def tokens(self) -> list[int]:
        """The generated ids (without a stopping end-of-text)."""
        return self._sampler.tokens

    def cancel(self) -> None:
        """Stop this request at the next engine step (its slot is freed then); harmless once finished."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.submitted

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def _emit(self, step: Step) -> None:
        if step.text:
            self.text += step.text
        if self._on_step is not None:
            self._on_step(step)


class Engine:
    """Continuous batching over one model (see the module docstring).

    max_batch      requests decoding (or reading their prompt) at once
    max_queue      requests waiting for a slot (0: none, only free slots are taken); submit() raises
                   QueueFullError beyond it (None: unbounded)
    prefill_chunk  prompt tokens read per step for a new request
    cache          a PrefixCache (None: no prefix caching)
    """

    def __init__(self, model, *, max_batch: int = 8, max_queue: int | None = 64,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cache: PrefixCache | None = None):
        if model.tokenizer is None:
            raise GenerationError("this model has no tokenizer: it cannot generate text")
        if max_batch < 1 or prefill_chunk < 1 or (max_queue is not None and max_queue < 0):
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch = int(max_batch)
        self.max_queue = max_queue
        self.prefill_chunk = int(prefill_chunk)
        self.cache = cache
        self._eot = getattr(self.tokenizer, "eot_id", 0)
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self.metrics = EngineMetrics()
        self._spare_states: list = []        # states of finished requests, reset and reused (Model.reset_state)

    # -- submitting ----------------------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], *, max_tokens: int | None = None,
               params: SamplingParams | None = None, stop: Sequence[str] | str | None = None, logprobs: int | None = None,
               on_step: Callable[[Step], None] | None = None, cache_points: Sequence[int] = (),
               ban_end_of_text: bool = False, penalty_exempt_text: str | None = DIGITS_AND_SPACES,
               reply_suffix: str | None = None) -> Request:
        """Queue a generation; returns its Request at once. Raises QueueFullError when the queue is full,
        GenerationError for bad arguments.

        cache_points   prompt lengths after which the state is worth keeping in the prefix cache (e.g. the end
                       of a chat's system prompt and of each earlier turn); the whole prompt always is
        reply_suffix   when given (and a cache is in use): each time the generated text ends with this suffix the
                       state is kept aside, and if the request then ends by a stop string, the state after prompt +
                       that text is cached, provided the tokenizer encodes the text to exactly the generated ids.
                       A chat passes "\n\n": its next turn's prompt repeats the reply closed by "\n\n"
        """
        params = params if params is not None else SamplingParams()
        if max_tokens is None:          # as generate(): the argument, else params.max_tokens, else a default
            max_tokens = params.max_tokens if params.max_tokens is not None else DEFAULT_MAX_TOKENS
        max_tokens = check_max_tokens(max_tokens)
        stop = check_stop(params.stop if stop is None else stop)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise GenerationError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs!r}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            if self._eot is None:
                raise GenerationError("the prompt is empty: give at least one token to continue from")
            ids = [self._eot]
        V = self.model.config["vocab_size"]
        if min(ids) < 0 or max(ids) >= V:
            raise GenerationError(f"token id {[t for t in ids if not 0 <= t < V][0]} is outside the vocabulary")
        with self._lock:
            if not self._accepting:
                raise QueueFullError("the engine is shutting down")
            free_slots = max(0, self.max_batch - len(self._active))       # admitted at the next step
            if self.max_queue is not None and len(self._waiting) >= self.max_queue + free_slots:
                self.metrics.rejected += 1
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
            request = Request(next(self._ids), ids, max_tokens, params, stop, logprobs, on_step, cache_points,
                              self.tokenizer, ban_end_of_text, penalty_exempt_text,
                              reply_suffix if self.cache is not None else None)
            self._waiting.append(request)
            self.metrics.requests += 1
            self._lock.notify_all()
        return request

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    # -- the engine thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Step in a background thread (the only thread that computes) until shutdown()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rwkv-lite-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self._waiting or self._active):
                    self._lock.wait()
                if self._stopping and not (self._waiting or self._active):
                    return
            try:
                self.step()
            except Exception as e:                    # noqa: BLE001 - the engine thread must outlive a bad step
                for r in list(self._active):          # fail the running requests, keep serving the rest
                    self._finish(r, "error", f"internal error: {type(e).__name__}: {e}")
                self._active = []

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting requests, let running ones finish for up to `timeout` seconds, cancel the rest (their
        streams end with finish_reason "cancelled"), and stop the engine thread."""
        with self._lock:
            self._accepting = False
            for r in self._waiting:
                r.cancel()
            self._stopping = True
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                for r in list(self._active) + list(self._waiting):
                    r.cancel()
                self._thread.join()
            self._thread = None
        else:
            for r in list(self._active) + list(self._waiting):
                r.cancel()
            while self.has_work():
                self.step()

    # -- one step ------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One scheduling iteration (see the module docstring)."""
        for r in [r for r in self._active if r.cancelled]:
            self._finish(r, "cancelled")
        self._active = [r for r in self._active if r.finish_reason is None]
        with self._lock:
            for r in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(r)
                self._finish(r, "cancelled")
            while self._waiting and len(self._active) < self.max_batch:
                self._active.append(self._waiting.popleft())
        # 1. at most one chunk of prompt reading
        reading = next((r for r in self._active if r._logits is None and r.finish_reason is None), None)
        if reading is not None:
            self._prefill_chunk(reading)
        # 2. one decode step for every request that has read its prompt
        ready = [r for r in self._active if r._logits is not None and r.finish_reason is None]
        feed = []
        for r in ready:
            token = self._sample(r)
            if token is not None:
                feed.append((r, token))
        if feed:
            start = time.perf_counter()
            try:
                logits = self.model.forward_batch([t for _, t in feed], [r._state for r, _ in feed])
            except Exception as e:                    # noqa: BLE001 - one bad step must not kill the server
                for r, _ in feed:
                    self._finish(r, "error", f"{type(e).__name__}: {e}")
            else:
                for (r, _), row in zip(feed, logits):
                    r._logits = row
                    raw_text = r._sampler.raw_text
                    if r._reply_suffix and raw_text.endswith(r._reply_suffix):
                        r._snapshot = (list(r.tokens), r._state.copy(), row.copy(), raw_text)
                self.metrics.observe_decode(len(feed), time.perf_counter() - start)
        self._active = [r for r in self._active if r.finish_reason is None]

    def _prefill_chunk(self, r: Request) -> None:
        try:
            if r._state is None:
                hit = self.cache.lookup(r.prompt_ids) if self.cache is not None else None
                if hit is not None:
                    n, state, logits = hit
                    r._state, r._read = state, n
                    r.usage.cached_tokens = n
                    self.metrics.cache_hits += 1
                    self.metrics.cached_tokens += n
                    if n == len(r.prompt_ids):
                        r._logits = logits
                        return
                else:
                    r._state = self._blank_state()
                    if self.cache is not None:
                        self.metrics.cache_misses += 1
            end = min(len(r.prompt_ids), r._read + self.prefill_chunk)
            point = next((p for p in r._cache_points if p > r._read), end)
            end = min(end, point)                     # stop at a cache point so its state can be kept
            start = time.perf_counter()
            logits = self.model.forward_in_place(r.prompt_ids[r._read:end], r._state)
            self.metrics.observe_prefill(end - r._read, time.perf_counter() - start)
            r._read = end
            if self.cache is not None and end in r._cache_points:
                self.cache.store(r.prompt_ids[:end], r._state, logits)
            if end == len(r.prompt_ids):
                r._logits = logits
        except Exception as e:                        # noqa: BLE001
            self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _blank_state(self):
        """A state at the model's initial values: a finished request's, reset, or a new one."""
        if self._spare_states:
            state = self._spare_states.pop()
            self.model.reset_state(state)
            return state
        return self.model.new_state()

    def _sample(self, r: Request) -> int | None:
        """Sample r's next token from its logits and emit it; returns the token to feed (None: r finished)."""
        sampler = r._sampler
        if len(r.tokens) >= r.max_tokens:
            self._finish(r, "length")
            return None
        raw = np.asarray(r._logits, dtype=np.float32)
        if not np.isfinite(raw).all():
            self._finish(r, "error", "NaN or Inf in the output logits")
            return None
        try:
            step = sampler.next_step(raw)
        except RwkvLiteError as e:
            self._finish(r, "error", str(e))
            return None
        if r.first_token_time is None:
            r.first_token_time = time.monotonic()
            self.metrics.observe_ttft(r.first_token_time - r.submitted)
        if step.finish_reason is not None:           # end-of-text
            self._end(r, step)
            return None
        r.usage.completion_tokens += 1
        self.metrics.tokens += 1
        r._emit(step)
        if sampler.ending is not None:               # a stop string, or the last token of its budget
            self._finish(r, sampler.ending)
            return None
        return step.token

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        """End r: its final Step releases what the decoder and stop filter hold back (for "stop" and "length",
        unless a stop string ended it: as generate())."""
        if r.finish_reason is not None:
            return
        self._end(r, r._sampler.final_step(reason, error))

    def _end(self, r: Request, final: Step) -> None:
        if final.finish_reason == "stop" and r._sampler.ended_by_stop_string and r._snapshot is not None \
                and self.cache is not None:
            ids, state, logits, text = r._snapshot       # a reply the next turn of a conversation will repeat
            if self.tokenizer.encode(text) == ids:
                self.cache.store(r.prompt_ids + ids, state, logits)
        r._snapshot = None
        r.finish_reason = final.finish_reason
        r.error = final.error
        if r._state is not None and len(self._spare_states) < self.max_batch:
            self._spare_states.append(r._state)      # the next request's state, without new pages to fault in
        r._state = None
        r._logits = None
        self.metrics.finished[r.finish_reason] = self.metrics.finished.get(r.finish_reason, 0) + 1
        r._emit(final)
        r.done.set()


@dataclass
class EngineMetrics:
    """Counters for /metrics (updated by the stepping thread; plain reads are fine for reporting)."""
    requests: int = 0
    rejected: int = 0
    tokens: int = 0
    prompt_tokens_read: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0
    decode_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    cached_tokens: int = 0
    ttft_count: int = 0
    ttft_sum: float = 0.0
    ttft_buckets: dict = field(default_factory=lambda: {b: 0 for b in TTFT_BUCKETS})
    finished: dict = field(default_factory=dict)

    def observe_decode(self, rows: int, seconds: float) -> None:
        self.decode_steps += 1
        self.decode_rows += rows
        self.decode_seconds += seconds

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self.prompt_tokens_read += tokens
        self.prefill_seconds += seconds

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_count += 1
        self.ttft_sum += seconds
        for b in TTFT_BUCKETS:
            if seconds <= b:
                self.ttft_buckets[b] += 1


TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf)


# ---------------------------------------------------------------------------------------------------------------
# The offline path

@dataclass
class BatchResult:
    """One prompt's outcome in generate_batch: text, generated ids, why it stopped, token counts."""
    text: str
    tokens: list[int]
    finish_reason: str
    usage: Usage
    error: str | None = None


def generate_batch(model, prompts: Sequence[str | Sequence[int]], *, max_tokens: int | None = None,
                   params: SamplingParams | Sequence[SamplingParams] | None = None,
                   stop: Sequence[str] | str | None = None, max_batch: int = 16,
                   progress=None) -> list[BatchResult]:
    """Generate for every prompt with the batched engine; results in prompt order.

    `params` is one SamplingParams for all prompts or one per prompt (give each its own seed for reproducible
    sampling: a prompt's result does not depend on the others). Each result equals what
    `rwkv_lite.generate.generate(model, prompt, ...)` gives for that prompt alone (prompts are read in the same
    chunks; batched decode rows equal single-sequence decode, kernels/batched.py: exactly, except int4's
    zero-point sum, which may be reassociated). `max_tokens` and `stop` default to each params' own (then 64 and
    none). `progress(done, total, None)` is called as prompts finish."""
    from .model import CHUNK_TOKENS
    prompts = list(prompts)
    if isinstance(params, SamplingParams) or params is None:
        per_prompt = [params or SamplingParams()] * len(prompts)
    else:
        per_prompt = list(params)
        if len(per_prompt) != len(prompts):
            raise GenerationError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
    engine = Engine(model, max_batch=max_batch, max_queue=None, prefill_chunk=CHUNK_TOKENS)
    requests = [engine.submit(p, max_tokens=max_tokens if max_tokens is not None or sp.max_tokens is not None
                              else 64, params=sp, stop=stop) for p, sp in zip(prompts, per_prompt)]
    done = 0
    while engine.has_work():
        engine.step()
        if progress is not None:
            now = sum(r.finish_reason is not None for r in requests)
            if now != done:
                done = now
                progress(done, len(requests), None)
    return [BatchResult(r.text, list(r.tokens), r.finish_reason, r.usage, r.error) for r in requests]
