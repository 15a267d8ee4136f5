"""One sequence's decisions during generation: from the logits after its last token to its next Step.

A `SequenceSampler` holds everything that belongs to one sequence and not to the model: its sampling
parameters and random generator, its repetition penalties, its UTF-8 stream decoder, its stop strings and its
token budget. Whoever runs the model calls `next_step(logits)` once per position:

    sampler = SequenceSampler(tokenizer, params, max_tokens=40, stop=("\\n\\n",))
    logits, state = model.forward(prompt_ids)
    while True:
        step = sampler.next_step(logits)         # a token Step, or the final Step (token None)
        ...emit step...
        if step.finish_reason is not None:
            break
        if sampler.ending is not None:           # that token ended it (stop string, budget): close it
            ...emit sampler.final_step()...
            break
        logits, state = model.forward([step.token], state)

rwkv_lite.generate (one sequence, Model.forward) and rwkv_lite.engine (many sequences, each with its own
SequenceSampler and state, advanced together by one Model.forward_batch call) both run this loop, so a
prompt's text is the same whichever runs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import RwkvLiteError
from .sampling import DIGITS_AND_SPACES, Penalties, SamplingParams, sample
from .tokenizer import StreamDecoder


class GenerationError(RwkvLiteError, ValueError):
    """A generation or chat request that cannot be run (empty prompt, bad stop strings, nothing to save...)."""


@dataclass
class Step:
    """One event of a generated sequence: a generated token (with the text it completed), or the end.

    token          the generated id; None for the final step
    text           text completed by this step (UTF-8 safe; may be "" while a character or a possible stop
                   string is held back; the final step carries whatever was held back and is not a stop string)
    logprob        log-probability of `token` under the model's distribution (log-softmax of the raw logits,
                   before penalties and temperature), when asked for; top_logprobs: the most likely
                   (id, logprob) pairs, when asked for
    finish_reason  None until the final step, then "stop" (a stop string or end-of-text), "length" (max_tokens);
                   the engine also ends sequences with "cancelled" and "error" (then `error` says why)
    """
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None


class IdsAsText:
    """The text of a model that has no tokenizer: each generated id is written as its number and a space
    ("12 345 6 "), so such a model still generates (from a prompt given as ids)."""

    eot_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise GenerationError("this model has no tokenizer: give the prompt as token ids")

    def decode_bytes(self, ids) -> bytes:
        return "".join(f"{int(i)} " for i in ids).encode()

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode()


def text_of(model):
    """The tokenizer a generation uses for `model`: its own, or IdsAsText for a model that has none."""
    return model.tokenizer if model.tokenizer is not None else IdsAsText(model.config["vocab_size"])


def check_max_tokens(max_tokens) -> int:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise GenerationError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
    return int(max_tokens)


def check_stop(stop) -> tuple[str, ...]:
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(s, str) or not s for s in stop):
        raise GenerationError(f"stop strings must be non-empty strings, got {stop!r}")
    return stop


class SequenceSampler:
    """Picks one sequence's tokens and turns them into Steps (see the module docstring).

    tokenizer            decodes the generated ids (eot_id: the end-of-text id, None for byte vocabularies;
                         vocab_size: ids at or beyond it have no text and are never sampled)
    params               SamplingParams; rng: the random generator (default params.make_rng())
    max_tokens, stop     the budget and the stop strings (see check_max_tokens, check_stop)
    ban_end_of_text      never sample end-of-text (the chat demos suppress it during a reply)
    penalty_exempt_text  see sampling.Penalties (None: every generated token counts with weight 1)
    logprobs             None: no log-probabilities; n >= 0: each token Step has its logprob and the n most
                         likely (id, logprob) pairs (n = 0: an empty list)
    """

    def __init__(self, tokenizer, params: SamplingParams | None = None, *, max_tokens: int, stop: Sequence[str] = (),
                 rng: np.random.Generator | None = None, ban_end_of_text: bool = False,
                 penalty_exempt_text: str | None = DIGITS_AND_SPACES, logprobs: int | None = None):
        params = params if params is not None else SamplingParams()
        self.eot = getattr(tokenizer, "eot_id", 0)     # id 0 for World/HF vocabularies; None for byte-level ones
        if ban_end_of_text and self.eot is not None:
            params = params.with_banned(self.eot)
        self.params = params
        self.max_tokens = check_max_tokens(max_tokens)
        self.logprobs = logprobs
        self.tokens: list[int] = []
        self.raw_text = ""                  # decoded text of every generated token, before stop filtering
        self.ending: str | None = None      # set when the last token Step ended the sequence: call final_step()
        self.finish_reason: str | None = None
        self.cause = ""                     # why it ended, in detail: "end_of_text", "stop" (a stop string),
        #                                     "max_tokens", or the final reason given (cancelled, error, ...)
        self._flush = True                  # release held-back text at the end (not after a stop string)
        self._rng = rng if rng is not None else params.make_rng()
        self._penalties = Penalties.from_params(params, tokenizer, exempt_text=penalty_exempt_text)
        self._decoder = StreamDecoder(tokenizer)
        self._n_decodable = int(getattr(tokenizer, "vocab_size", 1 << 62))
        self._stops = StopFilter(check_stop(stop))

    @property
    def ended_by_stop_string(self) -> bool:
        return not self._flush

    def next_step(self, logits) -> Step:
        """The step after `logits` (the model's output after this sequence's last token): a token Step, or the
        final Step when the sequence ends without another token (its budget was 0, or it sampled end-of-text).

        Raises NumericalError for NaN logits and SamplingError when nothing can be sampled."""
        if self.finish_reason is not None or self.ending is not None:
            raise GenerationError("this sequence has ended")
        if len(self.tokens) >= self.max_tokens:
            return self.final_step("length")
        raw = np.asarray(logits, dtype=np.float32)
        x = raw.copy()                      # penalties are applied in place
        x[self._n_decodable:] = -np.inf     # rows without text (World: 65536 rows, 65530 tokens)
        self._penalties.apply(x)
        token = sample(x, self.params, self._rng)
        if token == self.eot:
            self.cause = "end_of_text"
            return self.final_step("stop")
        logprob, top = log_probabilities(raw, token, self.logprobs) if self.logprobs is not None else (None, None)
        self.tokens.append(token)
        self._penalties.update(token)
        text = self._decoder.push(token)
        self.raw_text += text
        piece, stopped = self._stops.push(text)
        if stopped:
            self.ending, self._flush = "stop", False
        elif len(self.tokens) >= self.max_tokens:
            self.ending = "length"
        return Step(text=piece, token=token, logprob=logprob, top_logprobs=top)

    def final_step(self, reason: str | None = None, error: str | None = None) -> Step:
        """End the sequence: the final Step, with the text held back so far (for "stop" and "length", unless a
        stop string ended it). `reason` defaults to `ending`."""
        reason = reason or self.ending or "stop"
        if not self.cause:
            self.cause = {"stop": "stop", "length": "max_tokens"}.get(reason, reason)
        tail = ""
        if reason in ("length", "stop") and self._flush:
            tail, stopped = self._stops.push(self._decoder.flush())
            if stopped:
                reason = self.cause = "stop"
            else:
                tail += self._stops.flush()
        self.finish_reason = reason
        return Step(text=tail, finish_reason=reason, error=error)


def log_probabilities(logits: np.ndarray, token: int, n: int):
    """log softmax of the raw logits at `token`, and the n most likely (id, logprob) pairs."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    lse = m + math.log(np.exp(x - m).sum())
    top = []
    if n:
        ids = np.argpartition(-x, n - 1)[:n]
        ids = ids[np.argsort(-x[ids], kind="stable")]
        top = [(int(i), float(x[i] - lse)) for i in ids]
    return float(x[token] - lse), top


class StopFilter:
    """Passes text through until a stop string appears, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text that is safe to show, whether a stop string was found)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        hold = max(prefix_overlap(buf, s) for s in self.stops)
        self.held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


def prefix_overlap(text: str, stop: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
