"""Measuring a model on text: perplexity, bits per byte, and agreement between two models' predictions.

All of it runs in sequence mode (chunks of tokens through matrix-matrix products), carrying the state."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .progress import Progress

EVAL_CHUNK = 512


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (accumulating thousands of positions needs the headroom)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def all_logits(model, ids, chunk: int = EVAL_CHUNK,
               progress: Progress | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, logits[start:start+n]) for every position of `ids`, chunk by chunk, state carried.
    progress(tokens read, tokens, None) after each chunk."""
    state = None
    for start in range(0, len(ids), chunk):
        block = ids[start:start + chunk]
        logits, state = model.forward(block, state, all_logits=True)
        yield start, logits
        if progress:
            progress(start + len(block), len(ids), None)


@dataclass
class Perplexity:
    tokens: int                 # tokens in the text
    predicted: int              # positions scored (tokens - 1: the first token has no context)
    nll: float                  # mean negative log-likelihood per predicted token, nats
    perplexity: float           # exp(nll)
    bits_per_byte: float | None  # total bits / UTF-8 bytes of the scored text, when the byte count is known

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def perplexity(model, ids, *, n_bytes: int | None = None, chunk: int = EVAL_CHUNK,
               progress: Progress | None = None) -> Perplexity:
    """Mean NLL of ids[1:] given the preceding tokens (the model starts from its initial state).
    progress(tokens read, tokens, "perplexity X") after each chunk."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size < 2:
        raise ValueError("perplexity needs a text of at least 2 tokens")
    total = 0.0
    read = 0
    for n, total in scoring_steps(model, ids, chunk):
        read += n
        if progress:
            progress(read, ids.size, f"perplexity {math.exp(total / (read - 1)):.3f}" if read > 1 else None)
    return perplexity_result(ids.size, ids.size - 1, total, n_bytes)


def scoring_steps(model, ids, chunk: int = EVAL_CHUNK) -> Iterator[tuple[int, float]]:
    """After each chunk: (tokens read in that chunk, total NLL in nats of the tokens predicted so far).

    Tokens read so far = the running sum of the first values; predicted = read - 1 (the first has no context).
    For callers that show a running score or keep a partial one when interrupted."""
    ids = np.asarray(ids, dtype=np.int64)
    total = 0.0
    for start, logits in all_logits(model, ids, chunk):
        targets = ids[start + 1:start + 1 + len(logits)]
        lp = log_softmax(logits[:len(targets)])
        total -= float(lp[np.arange(len(targets)), targets].sum())
        yield len(logits), total


def perplexity_result(tokens: int, predicted: int, total_nll: float, n_bytes: int | None) -> Perplexity:
    nll = total_nll / predicted
    bpb = total_nll / math.log(2) / n_bytes if n_bytes else None
    return Perplexity(int(tokens), int(predicted), nll, math.exp(nll), bpb)


@dataclass
class Agreement:
    positions: int
    mean_kl: float              # mean over positions of KL(p_reference || p_model), nats
    top1: float                 # fraction of positions whose argmax agrees
    bpb_reference: float        # mean -log2 p(next token) of each model (tokens are bytes for byte-level models)
    bpb_model: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def compare(reference_model, model, ids, chunk: int = EVAL_CHUNK) -> Agreement:
    """Quantization quality as defined in docs/quantization.md: KL, top-1 and bits per token vs a reference."""
    ids = np.asarray(ids, dtype=np.int64)
    kl = 0.0
    agree = 0
    nll_ref = nll_model = 0.0
    scored = 0
    for (start, ref_logits), (_, logits) in zip(all_logits(reference_model, ids, chunk), all_logits(model, ids, chunk)):
        lp_ref, lp = log_softmax(ref_logits), log_softmax(logits)
        kl += float((np.exp(lp_ref) * (lp_ref - lp)).sum())
        agree += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
        targets = ids[start + 1:start + 1 + len(logits)]
        n = len(targets)
        nll_ref -= float(lp_ref[np.arange(n), targets].sum())
        nll_model -= float(lp[np.arange(n), targets].sum())
        scored += n
    positions = len(ids)
    return Agreement(positions, kl / positions, agree / positions,
                     nll_ref / math.log(2) / scored, nll_model / math.log(2) / scored)
