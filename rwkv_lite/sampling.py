"""Sampling: turn one step's logits into a token id.

One generation step (generate.py drives it):

    logits (float32, from the model)
      -> Penalties.apply(logits)        in place: presence + frequency * decayed count (reference convention)
      -> sample(logits, params, rng):
           banned tokens -> -inf
           p = softmax(logits)          the distribution at temperature 1
           keep the tokens that pass every filter, all measured on p:
               top-k   the k most probable tokens                      (top_k = 0: off)
               top-p   the minimal nucleus: the fewest most-probable tokens whose mass reaches top_p
                       (top_p >= 1: off)
               min-p   tokens with p >= min_p * max(p)                 (min_p = 0: off)
           temperature reshapes the kept probabilities: q ∝ p ** (1 / T)   (T = 0: greedy argmax)
           draw one id from q

Choices (and where they differ from `rwkv.utils.PIPELINE` of the reference `rwkv` package; tests/test_sampling.py
checks the parity):

* Order: truncation first (at temperature 1), temperature last -- the reference's order. Users' RWKV settings
  keep their meaning, and raising the temperature spreads the choice over the plausible tokens without ever
  admitting tokens the model itself finds implausible. The kept set does not depend on T, so T -> 0 is greedy
  and T -> inf is uniform over the kept set. (Most other stacks apply T before top-p; with our order a high T
  is much safer.) The three filters are an intersection, so their relative order does not matter.
* top_p >= 1 keeps everything. The reference's float32 cumulative sum usually never reaches 1.0, which turns
  top_p = 1.0 into greedy decoding; we do not reproduce that. Cumulative sums here are float64.
* top-p keeps exactly the minimal nucleus: ties at the boundary are broken by lower token id (the reference
  keeps every token tied with the boundary probability). top_p = 0 keeps only the most probable token.
* Greedy (temperature 0) is argmax; ties go to the lowest id (the reference picks randomly among ties).
* Numerics: the softmax is computed as exp(logit - max) in float32 (values in [0, 1]; the top token is exactly 1),
  sums and the tempered weights in float64. No NaN for any temperature in [0, inf), -inf logits or banned
  tokens; NaN logits raise NumericalError; nothing left to sample raises SamplingError.

Defaults are the reference's (temperature 1.0, top_p 0.85, top_k 0, presence 0.2, frequency 0.2, decay 0.996),
plus min_p 0 (off) and seed None (fresh entropy). `SamplingParams.chat()` gives the reference chat demo's values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numba import njit

from rwkv_lite.errors import NumericalError, RwkvLiteError

# Tokens whose text is a substring of this string (one space, a tab, digits and digit runs such as "12" or
# "789", but not "13") count with weight 0 in the reference's occurrence table.
DIGITS_AND_SPACES = " \t0123456789"

# Candidate thresholds (relative to the top token's probability) tried before a full sort when looking for the
# top-p nucleus; see _nucleus.
_NUCLEUS_THRESHOLDS = (1e-3, 1e-6)


class SamplingError(RwkvLiteError, ValueError):
    """Bad sampling parameters, or logits that leave nothing to sample."""


@dataclass
class SamplingParams:
    """How to pick each token. See the module docstring for the exact semantics and order.

    temperature        0 = greedy (argmax); otherwise q ∝ p ** (1/T) over the kept tokens. Default 1.0.
    top_p              keep the minimal nucleus of mass >= top_p; >= 1 = off. Default 0.85 (reference).
    top_k              keep the k most probable tokens; 0 = off. Default 0.
    min_p              keep tokens with p >= min_p * p_max; 0 = off. Default 0.
    presence_penalty   subtracted from the logit of every token already generated. Default 0.2 (reference).
    frequency_penalty  additionally subtracted per (decayed) occurrence. Default 0.2 (reference).
    penalty_decay      every step, all occurrence counts are multiplied by this. Default 0.996 (reference).
    banned_tokens      ids that are never sampled.
    seed               seed of the random generator (None: fresh entropy each run).
    max_tokens         the most tokens a generation may produce (None: the caller's default).
    stop               strings that end a generation (not part of its text).
    """

    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.2
    frequency_penalty: float = 0.2
    penalty_decay: float = 0.996
    banned_tokens: tuple[int, ...] = ()
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        self.temperature = _number("temperature", self.temperature, low=0.0)
        self.top_p = _number("top_p", self.top_p, low=0.0, high=1.0)
        self.min_p = _number("min_p", self.min_p, low=0.0, high=1.0)
        self.presence_penalty = _number("presence_penalty", self.presence_penalty)
        self.frequency_penalty = _number("frequency_penalty", self.frequency_penalty)
        self.penalty_decay = _number("penalty_decay", self.penalty_decay, low=0.0, high=1.0)
        self.top_k = _whole("top_k", self.top_k)
        if self.seed is not None:
            self.seed = _whole("seed", self.seed)
        banned = self.banned_tokens
        if isinstance(banned, (int, np.integer)):
            banned = (banned,)
        self.banned_tokens = tuple(_whole("banned token id", t) for t in banned)
        if self.max_tokens is not None:
            self.max_tokens = _whole("max_tokens", self.max_tokens)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise SamplingError(f"stop strings must be non-empty strings, got {stop!r}")
        self.stop = stop

    @classmethod
    def greedy(cls, **overrides) -> "SamplingParams":
        """Plain argmax decoding: temperature 0 and no repetition penalties."""
        return cls(**{"temperature": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, **overrides})

    @classmethod
    def chat(cls, **overrides) -> "SamplingParams":
        """The reference chat demo's settings (API_DEMO_CHAT.py): T 1.0, top_p 0.3, penalties 0.5/0.5/0.996."""
        values = {"temperature": 1.0, "top_p": 0.3, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                  "penalty_decay": 0.996}
        return cls(**{**values, **overrides})

    def with_banned(self, *token_ids: int) -> "SamplingParams":
        """A copy that also bans `token_ids`."""
        return replace(self, banned_tokens=self.banned_tokens + tuple(token_ids))

    def make_rng(self) -> np.random.Generator:
        """The random generator for one generation: seeded with `seed` (None: fresh entropy)."""
        return np.random.default_rng(self.seed)


def _number(name, value, low=-math.inf, high=math.inf) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SamplingError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        bounds = f" in [{low:g}, {high:g}]" if math.isfinite(high) else (f" >= {low:g}" if math.isfinite(low) else "")
        raise SamplingError(f"{name} must be a finite number{bounds}, got {value!r}")
    return value


def _whole(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise SamplingError(f"{name} must be a whole number >= 0, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
# Sampling

def sample(logits, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token id from `logits` (1-D, one per vocabulary entry). `logits` is not modified.

    `rng` is a numpy Generator (`params.make_rng()`); the same seed and logits give the same ids."""
    ids, probs = sampling_distribution(logits, params)
    if ids.size == 1:
        return int(ids[0])
    i = _inverse_cdf(probs, rng.random())
    return int(ids[min(i, ids.size - 1)])


@njit(cache=True)
def _inverse_cdf(probs, u):
    """The first i whose cumulative sum probs[0] + ... + probs[i] exceeds u times the total: what
    np.searchsorted(np.cumsum(probs), u * np.cumsum(probs)[-1], side="right") returns, with the same float64 sums
    in the same order (so the same draw), without writing out the cumulative sums (0.2 ms for a 65536-token
    vocabulary, per sampled token)."""
    total = 0.0
    for i in range(probs.size):
        total += probs[i]
    target = u * total
    acc = 0.0
    for i in range(probs.size):
        acc += probs[i]
        if acc > target:
            return i
    return probs.size


def sampling_distribution(logits, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The distribution `sample` draws from: (token ids int64, probabilities float64 summing to 1).

    Only the kept tokens are listed, in no particular order (a kept token may still have probability 0 when
    nothing is truncated and its logit is far below the top one)."""
    x = np.array(logits, dtype=np.float32).reshape(-1)  # a copy: the caller's logits stay untouched
    if x.size == 0:
        raise SamplingError("cannot sample from empty logits")
    if params.banned_tokens:
        banned = np.fromiter(params.banned_tokens, dtype=np.int64)
        if banned.max() >= x.size:
            raise SamplingError(f"banned token id {int(banned.max())} is outside the vocabulary (0..{x.size - 1})")
        x[banned] = -np.inf
    if np.isnan(x).any():
        raise NumericalError(f"logits contain NaN (first at token {int(np.flatnonzero(np.isnan(x))[0])})")
    top = int(np.argmax(x))
    x_max = x[top]
    if x_max == -np.inf:
        raise SamplingError("no token can be sampled: every logit is -inf or banned")
    if params.temperature == 0.0:
        return np.array([top], dtype=np.int64), np.ones(1)
    if x_max == np.inf:
        # +inf outranks everything: the +inf tokens share all the probability, equally.
        x = np.where(x == np.inf, np.float32(0), np.float32(-np.inf))
        x_max = np.float32(0)
    weights = np.exp(x - x_max)  # float32, p ∝ weights, weights[top] == 1 (so weights are p / p_max)
    kept = _kept_tokens(x, weights, params)
    if kept is None:             # every token, in id order: the arrays themselves, not a gather through the ids
        kept, w, xk = np.arange(x.size, dtype=np.int64), weights, x
    else:
        w, xk = weights[kept], x[kept]
    if params.temperature == 1.0:
        q = w.astype(np.float64)
    else:
        # p ** (1/T) up to normalisation, computed in log space so it neither overflows nor underflows to 0/0:
        # the top token always gets exp(0) = 1.
        q = np.exp((xk.astype(np.float64) - float(x_max)) / params.temperature)
    return kept, q / q.sum()


def _kept_tokens(x: np.ndarray, weights: np.ndarray, params: SamplingParams) -> np.ndarray | None:
    """Ids that pass top-k, min-p and top-p (all measured at temperature 1); None when no filter is on (every
    token passes).

    Never empty: a most probable token always passes."""
    vocab = x.size
    candidates = None  # None means "every token"
    if 0 < params.top_k < vocab:
        # the k largest logits, without sorting the vocabulary (ties at the k-th place: numpy's choice)
        candidates = np.argpartition(x, vocab - params.top_k)[vocab - params.top_k:]
    if params.min_p > 0.0:
        threshold = np.float32(params.min_p)  # p >= min_p * p_max  <=>  weights >= min_p
        candidates = (np.flatnonzero(weights >= threshold) if candidates is None
                      else candidates[weights[candidates] >= threshold])
    if params.top_p < 1.0:
        candidates = _nucleus(weights, candidates, params.top_p)
    return None if candidates is None else candidates.astype(np.int64)


def _nucleus(weights: np.ndarray, candidates: np.ndarray | None, top_p: float) -> np.ndarray:
    """The minimal nucleus: the fewest most-probable tokens whose total probability reaches top_p.

    Probability is always measured against the whole vocabulary (like the reference), so with top-k/min-p the
    result is the intersection of their sets with the nucleus. Ties are broken by lower token id."""
    target = top_p * weights.sum(dtype=np.float64)
    if candidates is None:
        # The nucleus is a prefix of the tokens ordered by probability, so it lies inside {weights >= t} as soon
        # as that set's mass reaches the target. Trying a few thresholds avoids sorting 65536 probabilities on
        # most steps; a flat distribution falls through to the full sort.
        candidates = np.arange(weights.size)
        for threshold in _NUCLEUS_THRESHOLDS:
            subset = np.flatnonzero(weights >= np.float32(threshold))
            if weights[subset].sum(dtype=np.float64) >= target:
                candidates = subset
                break
    else:
        candidates = np.sort(candidates)  # ascending ids, for the tie-break below
    w = weights[candidates]
    ranked = np.sort(w)[::-1]  # sorting values (SIMD) is several times faster than argsort
    cdf = np.cumsum(ranked, dtype=np.float64)
    n_kept = min(int(np.searchsorted(cdf, target, side="left")) + 1, w.size)  # first prefix reaching the target
    cutoff = ranked[n_kept - 1]
    above = candidates[w > cutoff]
    tied = candidates[w == cutoff]  # ascending ids: the lowest ones are kept
    return np.concatenate([above, tied[:n_kept - above.size]])


# ---------------------------------------------------------------------------------------------------------------
# Repetition penalties

class Penalties:
    """The reference's occurrence table: discourages repeating generated tokens.

    Before each sample, every token n in the table gets  logit_n -= presence + frequency * count_n.
    After a token t is sampled: every count is multiplied by `decay`, then count_t += weight(t), where weight(t)
    is 0 if the decoded text of t is a substring of `exempt_text` (default DIGITS_AND_SPACES: one space, a tab,
    digits, digit runs like "12") and 1 otherwise. A token added with weight 0 is still in the table, so it still
    gets the presence penalty -- exactly as the reference does. `exempt_text=None` (the reference chat demo's
    convention) or no tokenizer gives every token weight 1. The prompt's tokens are not counted.
    """

    def __init__(self, presence: float = 0.2, frequency: float = 0.2, decay: float = 0.996, *,
                 tokenizer=None, exempt_text: str | None = DIGITS_AND_SPACES):
        self.presence = float(presence)
        self.frequency = float(frequency)
        self.decay = float(decay)
        self._tokenizer = tokenizer
        self._exempt_text = exempt_text
        self._weight_cache: dict[int, float] = {}
        self.reset()

    @classmethod
    def from_params(cls, params: SamplingParams, tokenizer=None, *,
                    exempt_text: str | None = DIGITS_AND_SPACES) -> "Penalties":
        return cls(params.presence_penalty, params.frequency_penalty, params.penalty_decay,
                   tokenizer=tokenizer, exempt_text=exempt_text)

    def reset(self) -> None:
        """Forget every occurrence."""
        self._slot: dict[int, int] = {}  # token id -> index into ids / counts
        self.ids = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.float64)

    def weight(self, token_id: int) -> float:
        """How much one occurrence of `token_id` adds to its count (0 or 1)."""
        w = self._weight_cache.get(token_id)
        if w is None:
            exempt = (self._exempt_text is not None and self._tokenizer is not None
                      and self._tokenizer.decode([token_id]) in self._exempt_text)
            w = self._weight_cache[token_id] = 0.0 if exempt else 1.0
        return w

    def amount(self, token_id: int) -> float:
        """What apply() currently subtracts from `token_id`'s logit (0 if it has not occurred)."""
        slot = self._slot.get(token_id)
        return 0.0 if slot is None else self.presence + self.frequency * float(self.counts[slot])

    def apply(self, logits: np.ndarray) -> None:
        """Subtract the penalties from `logits` in place."""
        if self.ids.size and (self.presence or self.frequency):
            logits[self.ids] -= (self.presence + self.frequency * self.counts).astype(logits.dtype)

    def update(self, token_id: int) -> None:
        """Record that `token_id` was just generated (decay every count, then count it)."""
        token_id = int(token_id)
        self.counts *= self.decay
        slot = self._slot.get(token_id)
        if slot is None:
            self._slot[token_id] = self.ids.size
            self.ids = np.append(self.ids, token_id)
            self.counts = np.append(self.counts, self.weight(token_id))
        else:
            self.counts[slot] += self.weight(token_id)
