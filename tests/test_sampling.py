"""Sampling: filters, temperature, numerics, penalties, seeds; parity with the reference rwkv PIPELINE."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rwkv_lite.errors import NumericalError, RwkvLiteError
from rwkv_lite.sampling import (DIGITS_AND_SPACES, Penalties, SamplingError, SamplingParams, sample,
                                sampling_distribution)

V = 65536  # the World vocabulary size: the case the sampler is tuned for


def random_logits(seed: int, size: int = V, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=size) * scale).astype(np.float32)


def kept_set(logits, **params) -> set[int]:
    ids, _ = sampling_distribution(logits, SamplingParams(**params))
    return set(ids.tolist())


def softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# ------------------------------------------------------------------------------------------------ filters

def test_top_k_1_is_argmax():
    for seed in range(20):
        logits = random_logits(seed)
        rng = np.random.default_rng(seed)
        for temperature in (0.5, 1.0, 3.0):
            params = SamplingParams(temperature=temperature, top_p=1.0, top_k=1)
            assert sample(logits, params, rng) == int(np.argmax(logits))


def test_top_k_keeps_the_k_largest():
    logits = random_logits(1)
    expected = set(np.argsort(logits)[-50:].tolist())
    assert kept_set(logits, top_p=1.0, top_k=50) == expected
    assert len(kept_set(logits, top_p=1.0, top_k=V + 10)) == V  # k >= vocab: no truncation


def nucleus_size(probs: np.ndarray, top_p: float) -> int:
    """Minimal number of most-probable tokens whose probability reaches top_p (float64, from the definition)."""
    cum = np.cumsum(np.sort(probs)[::-1])
    return int(np.argmax(cum >= top_p)) + 1 if cum[-1] >= top_p else len(probs)


@settings(max_examples=300, deadline=None)
@given(weights=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=2, max_size=40),
       top_p=st.floats(min_value=0.0, max_value=0.999))
def test_top_p_keeps_exactly_the_minimal_nucleus(weights, top_p):
    probs = np.asarray(weights) / np.sum(weights)
    cum = np.cumsum(np.sort(probs)[::-1])
    assume(np.min(np.abs(cum - top_p)) > 1e-5)          # no float-rounding coin flips at the boundary
    logits = np.log(probs).astype(np.float32)
    ids, q = sampling_distribution(logits, SamplingParams(top_p=top_p))
    kept = np.zeros(len(probs), dtype=bool)
    kept[ids] = True
    assert kept.sum() == nucleus_size(probs, top_p)
    assert probs[kept].sum() >= top_p - 1e-6                                   # reaches the mass ...
    assert probs[kept].sum() - probs[kept].min() < top_p + 1e-6                 # ... and is minimal
    if (~kept).any():                                                           # and holds the most probable
        assert probs[kept].min() >= probs[~kept].max() * (1 - 1e-5)
    np.testing.assert_allclose(q, probs[ids] / probs[ids].sum(), rtol=1e-5)   # renormalised at T = 1


def test_top_p_ties_at_the_boundary_keep_the_lowest_ids():
    logits = np.log(np.array([0.3, 0.1, 0.1, 0.1, 0.4], dtype=np.float64)).astype(np.float32)
    assert kept_set(logits, top_p=0.75) == {4, 0, 1}
    assert kept_set(logits, top_p=0.0) == {4}


def test_top_p_1_keeps_everything_even_where_the_float32_cumsum_falls_short():
    # The reference's float32 cumulative sum never reaches 1.0 for such logits, which makes it greedy (section
    # 7 quirk). Our top_p = 1 means "no truncation".
    for seed in range(5):
        logits = random_logits(seed)
        p32 = softmax64(logits).astype(np.float32)
        if np.cumsum(np.sort(p32)[::-1])[-1] >= 1.0:
            continue
        assert len(kept_set(logits, top_p=1.0)) == V
        return
    pytest.fail("expected at least one seed whose float32 cumulative sum stays below 1")


@pytest.mark.parametrize("tail_logit, top_p", [(-8.0, 0.85), (-14.0, 0.99), (0.0, 0.5)])
def test_top_p_with_heavy_tails_takes_the_slower_paths(tail_logit, top_p):
    # The nucleus search first looks among tokens with p >= 1e-3 p_max, then 1e-6 p_max, then sorts everything;
    # a heavy tail of small probabilities forces the later paths.
    logits = np.full(V, tail_logit, dtype=np.float32)
    logits[:10] = np.linspace(0.0, 0.9, 10)
    ids, _ = sampling_distribution(logits, SamplingParams(top_p=top_p))
    assert len(ids) == nucleus_size(softmax64(logits), top_p)
    assert set(range(min(10, len(ids)))) <= set(ids.tolist())


def test_min_p_keeps_tokens_above_the_fraction_of_the_top_probability():
    logits = random_logits(3)
    probs = softmax64(logits)
    for min_p in (0.01, 0.1, 0.5, 1.0):
        expected = set(np.flatnonzero(probs >= min_p * probs.max() * (1 + 1e-6)).tolist())
        borderline = set(np.flatnonzero(probs >= min_p * probs.max() * (1 - 1e-6)).tolist())
        got = kept_set(logits, top_p=1.0, min_p=min_p)
        assert expected <= got <= borderline
    assert kept_set(logits, top_p=1.0, min_p=1.0) == {int(np.argmax(logits))}


def test_filters_combine_as_an_intersection_measured_on_the_full_distribution():
    logits = random_logits(4, size=200, scale=2.0)
    probs = softmax64(logits)
    order = np.argsort(-probs)
    nucleus = set(order[:nucleus_size(probs, 0.6)].tolist())
    top20 = set(order[:20].tolist())
    above = set(np.flatnonzero(probs >= 0.05 * probs.max()).tolist())
    assert kept_set(logits, top_p=0.6, top_k=20, min_p=0.05) == nucleus & top20 & above


# ------------------------------------------------------------------------------------------------ temperature

def test_temperature_0_is_greedy_with_lowest_id_on_ties():
    rng = np.random.default_rng(0)
    for seed in range(10):
        logits = random_logits(seed)
        assert sample(logits, SamplingParams(temperature=0.0), rng) == int(np.argmax(logits))
    tied = np.array([0.0, 2.0, 1.0, 2.0], dtype=np.float32)
    assert all(sample(tied, SamplingParams(temperature=0.0), rng) == 1 for _ in range(20))


def test_temperature_reshapes_the_kept_probabilities_as_a_power():
    logits = random_logits(5, size=100)
    probs = softmax64(logits)
    ids, q = sampling_distribution(logits, SamplingParams(temperature=0.7, top_p=0.9))
    expected = probs[ids] ** (1 / 0.7)
    np.testing.assert_allclose(q, expected / expected.sum(), rtol=1e-5)
    # truncation is measured at temperature 1: the kept set does not depend on the temperature
    for t in (0.01, 0.5, 2.0, 100.0):
        assert kept_set(logits, temperature=t, top_p=0.9) == set(ids.tolist())


@pytest.mark.parametrize("temperature", [1e-30, 1e-6, 1e-3, 1e3, 1e6, 1e30])
def test_extreme_temperatures_stay_finite(temperature):
    logits = random_logits(6)
    logits[::7] = -np.inf
    logits[3] = 1e30
    logits[5] = -3e38
    rng = np.random.default_rng(0)
    for top_p in (0.5, 1.0):
        params = SamplingParams(temperature=temperature, top_p=top_p)
        ids, q = sampling_distribution(logits, params)
        assert np.isfinite(q).all() and abs(q.sum() - 1) < 1e-9 and (q >= 0).all()
        assert np.isfinite(logits[sample(logits, params, rng)])
    if temperature <= 1e-3:
        assert sample(logits, SamplingParams(temperature=temperature, top_p=1.0), rng) == 3
    if temperature >= 1e30:  # effectively uniform over the tokens that are not -inf
        finite = random_logits(6)
        finite[::7] = -np.inf
        _, q = sampling_distribution(finite, SamplingParams(temperature=temperature, top_p=1.0))
        assert (q > 0).sum() == np.isfinite(finite).sum() and q.max() / q[q > 0].min() < 1.0001


def test_positive_infinite_logits_share_the_probability():
    logits = np.zeros(10, dtype=np.float32)
    logits[[2, 7]] = np.inf
    ids, q = sampling_distribution(logits, SamplingParams(top_p=1.0))
    assert dict(zip(ids.tolist(), q.tolist())) == {i: (0.5 if i in (2, 7) else 0.0) for i in range(10)}


# ------------------------------------------------------------------------------------------------ bans, errors

def test_banned_tokens_are_never_sampled():
    logits = random_logits(7, size=50, scale=1.0)
    best = int(np.argmax(logits))
    banned = (best, 3, 4, 5)
    rng = np.random.default_rng(0)
    for params in (SamplingParams(temperature=0.0, banned_tokens=banned),
                   SamplingParams(top_p=1.0, banned_tokens=banned),
                   SamplingParams(temperature=1e6, top_p=1.0, banned_tokens=banned),
                   SamplingParams(top_k=1, banned_tokens=banned)):
        draws = {sample(logits, params, rng) for _ in range(300)}
        assert not draws & set(banned)
    assert np.argmax(logits) == best  # the caller's logits are untouched


def test_nothing_left_to_sample_is_a_clear_error():
    rng = np.random.default_rng(0)
    with pytest.raises(SamplingError, match="every logit is -inf or banned"):
        sample(np.full(8, -np.inf, dtype=np.float32), SamplingParams(), rng)
    with pytest.raises(SamplingError, match="every logit"):
        sample(np.zeros(3, dtype=np.float32), SamplingParams(banned_tokens=(0, 1, 2)), rng)
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        sample(np.zeros(3, dtype=np.float32), SamplingParams(banned_tokens=(3,)), rng)
    nan_logits = np.zeros(4, dtype=np.float32)
    nan_logits[2] = np.nan
    with pytest.raises(NumericalError, match="NaN"):
        sample(nan_logits, SamplingParams(), rng)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("inf")), dict(top_p=1.5),
                                 dict(top_p=float("nan")), dict(min_p=-0.1), dict(top_k=-1), dict(top_k=2.5),
                                 dict(penalty_decay=1.5), dict(seed=-3), dict(banned_tokens=(1, -2)),
                                 dict(presence_penalty="lots")])
def test_bad_parameters_raise_one_line_errors(bad):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**bad)
    assert isinstance(info.value, RwkvLiteError) and "\n" not in str(info.value)


def test_presets():
    assert SamplingParams() == SamplingParams(1.0, 0.85, 0, 0.0, 0.2, 0.2, 0.996, (), None)
    chat = SamplingParams.chat(seed=3)
    assert (chat.top_p, chat.presence_penalty, chat.frequency_penalty, chat.seed) == (0.3, 0.5, 0.5, 3)
    greedy = SamplingParams.greedy()
    assert greedy.temperature == 0 and greedy.presence_penalty == 0 and greedy.frequency_penalty == 0


# ------------------------------------------------------------------------------------------------ randomness

def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(8, scale=1.0)  # a wide distribution: many plausible tokens
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def draws(seed):
        rng = SamplingParams(seed=seed).make_rng()
        return [sample(logits, params, rng) for _ in range(30)]

    assert draws(123) == draws(123)
    assert draws(123) != draws(124)


def chi_square(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature, top_k, expected", [
    (1.0, 0, [0.4, 0.2, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01]),
    (0.5, 0, np.array([0.4, 0.2, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01]) ** 2),
    (1.0, 3, [0.4, 0.2, 0.15, 0, 0, 0, 0, 0]),
])
def test_sampling_frequencies_match_the_distribution(temperature, top_k, expected):
    probs = np.array([0.4, 0.2, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01])
    logits = np.log(probs).astype(np.float32)
    expected = np.asarray(expected, dtype=np.float64)
    expected /= expected.sum()
    params = SamplingParams(temperature=temperature, top_p=1.0, top_k=top_k, seed=2024)
    rng = params.make_rng()
    counts = np.bincount([sample(logits, params, rng) for _ in range(20000)], minlength=8).astype(np.float64)
    support = expected > 0
    assert counts[~support].sum() == 0
    # chi-square critical value at p = 0.001 for 7 degrees of freedom is 24.3 (fewer dof -> smaller); a wrong
    # distribution (e.g. temperature ignored) gives values in the thousands.
    assert chi_square(counts[support], expected[support]) < 24.3
    assert chi_square(counts[support], (probs[support] / probs[support].sum())) > 100 or temperature == 1.0


# ------------------------------------------------------------------------------------------------ penalties

class PieceVocab:
    """Minimal tokenizer stand-in: id -> text (only decode is needed by Penalties)."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)


PIECES = ["", "cat", " ", "\t", "7", "12", "13", " dog", "\n", "0"]
CAT, SPACE, TAB, SEVEN, TWELVE, THIRTEEN, DOG, NEWLINE, ZERO = range(1, 10)


def test_penalties_lower_repeated_tokens_by_the_documented_amounts():
    presence, frequency, decay = 0.3, 0.7, 0.9
    pen = Penalties(presence, frequency, decay, tokenizer=PieceVocab(PIECES))
    logits = np.zeros(len(PIECES), dtype=np.float32)
    pen.apply(logits)
    assert not logits.any()  # nothing generated yet: nothing penalised

    for t in (CAT, CAT, SPACE, TWELVE, THIRTEEN, CAT, DOG):
        pen.update(t)
    # every update first decays all counts, then adds the token's weight:
    #   cat: 1 -> 1*.9+1 = 1.9 -> (space, 12, 13) *.9^3 = 1.3851 -> (cat) *.9+1 = 2.24659 -> (dog) *.9 = 2.021931
    #   space, "12": weight 0 (substrings of " \t0123456789"); "13" is not a substring: weight 1
    expected_counts = {CAT: ((1 * 0.9 + 1) * 0.9 ** 4 + 1) * 0.9, SPACE: 0.0, TWELVE: 0.0,
                       THIRTEEN: 1 * 0.9 ** 2, DOG: 1.0}
    logits = np.full(len(PIECES), 5.0, dtype=np.float32)
    pen.apply(logits)
    for token in range(len(PIECES)):
        if token in expected_counts:
            amount = presence + frequency * expected_counts[token]   # presence applies even with count 0
        else:
            amount = 0.0
        assert pen.amount(token) == pytest.approx(amount, rel=1e-12)
        assert logits[token] == pytest.approx(5.0 - amount, abs=1e-6)


def test_digit_and_space_rule_weights():
    pen = Penalties(tokenizer=PieceVocab(PIECES))
    weights = {PIECES[t]: pen.weight(t) for t in range(1, len(PIECES))}
    assert weights == {"cat": 1, " ": 0, "\t": 0, "7": 0, "12": 0, "13": 1, " dog": 1, "\n": 1, "0": 0}
    assert all(PIECES[t] in DIGITS_AND_SPACES for t in (SPACE, TAB, SEVEN, TWELVE, ZERO))
    chat_style = Penalties(tokenizer=PieceVocab(PIECES), exempt_text=None)
    assert all(chat_style.weight(t) == 1 for t in range(1, len(PIECES)))


def test_zero_penalties_change_nothing_and_reset_forgets():
    pen = Penalties(0.0, 0.0, 0.996)
    pen.update(CAT)
    logits = np.ones(len(PIECES), dtype=np.float32)
    pen.apply(logits)
    assert (logits == 1).all()
    pen = Penalties(0.5, 0.5, 1.0)
    pen.update(CAT)
    pen.reset()
    pen.apply(logits)
    assert (logits == 1).all() and pen.amount(CAT) == 0


# ------------------------------------------------------------------------------------------------ reference parity

@pytest.mark.oracle
def test_penalties_match_the_reference_pipeline(monkeypatch):
    torch = pytest.importorskip("torch")
    utils = pytest.importorskip("rwkv.utils")
    vocab = PieceVocab(PIECES)
    script = [CAT, SPACE, CAT, TWELVE, SEVEN, THIRTEEN, CAT, DOG, SPACE, CAT, NEWLINE, TAB, CAT, ZERO, DOG]
    base = random_logits(9, size=len(PIECES))

    class ConstantModel:
        def forward(self, tokens, state):
            return torch.tensor(base), state

    pipe = utils.PIPELINE.__new__(utils.PIPELINE)
    pipe.model, pipe.tokenizer = ConstantModel(), vocab
    seen = []

    def scripted(logits, temperature, top_p, top_k):
        seen.append(logits.numpy().copy())
        return script[len(seen) - 1]

    monkeypatch.setattr(pipe, "encode", lambda text: [CAT])
    monkeypatch.setattr(pipe, "sample_logits", scripted)
    args = utils.PIPELINE_ARGS(alpha_presence=0.35, alpha_frequency=0.6, alpha_decay=0.97)
    pipe.generate("prompt", token_count=len(script), args=args)

    ours = Penalties(0.35, 0.6, 0.97, tokenizer=vocab)
    for step, reference_logits in enumerate(seen):
        logits = base.copy()
        ours.apply(logits)
        np.testing.assert_allclose(logits, reference_logits, rtol=0, atol=2e-6, err_msg=f"step {step}")
        ours.update(script[step])


@pytest.mark.oracle
@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 0.85, 0), (0.6, 0.5, 0), (1.7, 0.95, 0),
                                                        (1.0, 0.9, 40), (0.8, 0.3, 5), (1.3, 0.0, 0)])
def test_sampling_distribution_matches_the_reference(monkeypatch, temperature, top_p, top_k):
    torch = pytest.importorskip("torch")
    utils = pytest.importorskip("rwkv.utils")
    captured = {}

    def capture_choice(a, p):
        captured["p"] = np.asarray(p, dtype=np.float64)
        return int(np.argmax(p))

    monkeypatch.setattr(np.random, "choice", capture_choice)
    pipe = utils.PIPELINE.__new__(utils.PIPELINE)
    for seed in range(3):
        logits = random_logits(100 + seed, size=5000, scale=2.5)
        pipe.sample_logits(torch.tensor(logits), temperature=temperature, top_p=top_p, top_k=top_k)
        reference = captured["p"]
        ids, q = sampling_distribution(logits, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k))
        assert set(ids.tolist()) == set(np.flatnonzero(reference > 0).tolist())
        np.testing.assert_allclose(q, reference[ids], rtol=2e-5, atol=1e-12)


@pytest.mark.oracle
def test_top_p_1_differs_from_the_reference_on_purpose(monkeypatch):
    torch = pytest.importorskip("torch")
    utils = pytest.importorskip("rwkv.utils")
    captured = {}
    monkeypatch.setattr(np.random, "choice", lambda a, p: captured.setdefault("p", np.asarray(p)) is None)
    pipe = utils.PIPELINE.__new__(utils.PIPELINE)
    logits = random_logits(0)
    pipe.sample_logits(torch.tensor(logits), temperature=1.0, top_p=1.0, top_k=0)
    assert (captured["p"] > 0).sum() == 1     # the reference degenerates to greedy here ...
    assert len(kept_set(logits, top_p=1.0)) == V   # ... we keep the whole distribution (documented)


def test_inverse_cdf_draws_what_cumsum_and_searchsorted_draw():
    from rwkv_lite.sampling import _inverse_cdf
    rng = np.random.default_rng(11)
    for n in (1, 2, 5, 300, 65536):
        for _ in range(20):
            probs = rng.random(n) ** rng.choice([1, 8])
            probs[rng.random(n) < 0.2] = 0.0                  # zero-probability tokens are never drawn
            if probs.sum() == 0:
                probs[0] = 1.0
            probs /= probs.sum()
            cdf = np.cumsum(probs)
            for u in [0.0, 1e-300, rng.random(), rng.random(), 1 - 1e-16]:
                want = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
                got = _inverse_cdf(probs, u)
                assert got == want
                assert probs[min(got, n - 1)] > 0 or want == n
