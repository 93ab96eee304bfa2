"""The sampler: a step's rows in one batch (sample_rows) = each row alone (sample_tensor, the
one-sequence reference's), with every kind of row mixed: greedy, sampled at its own temperature /
top-k / top-p / min-p, seeded or not, penalized, biased, banned tokens, grammar masks."""

from __future__ import annotations

import pytest
import torch

from cometserve.engine.sampler import draw, new_counts, sample_rows, sample_tensor, sampling_probs
from cometserve.sampling_params import SamplingParams

V = 500
PARAMS = [
    SamplingParams(min_tokens=1),  # greedy, a banned token
    SamplingParams(temperature=0.7, top_k=5, seed=1),
    SamplingParams(),  # greedy, masked
    SamplingParams(temperature=1.3, top_p=0.6, seed=2),
    SamplingParams(temperature=1.0, min_p=0.2, top_k=700, seed=3),
    SamplingParams(temperature=0.5),  # unseeded: torch's generator
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4),  # greedy, penalized
    SamplingParams(temperature=0.9, seed=4, repetition_penalty=0.8, presence_penalty=-1.0),
    SamplingParams(logit_bias={7: 100.0}),  # greedy, biased to token 7
    SamplingParams(temperature=1.1, seed=5, logit_bias={3: -100.0, 9: 5.0}, top_p=0.9),
]


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(PARAMS), V, generator=g) * 3
    allowed = torch.rand(len(PARAMS), V, generator=g) < 0.3
    allowed[[0, 6, 7, 8, 9]] = True
    allowed[2, 7] = True
    banned = [(int(logits[0].argmax()),), (), (), (1, 2, int(logits[3].argmax())), (), (), (), (), (), ()]
    counts = [new_counts(p, V, "cpu") for p in PARAMS]
    for c in counts:
        if c is not None:
            c[0, torch.randint(0, V, (40,), generator=g)] += 2.0
            c[1, torch.randint(0, V, (60,), generator=g)] = 1.0
    return logits, allowed, banned, counts


def test_batch_equals_each_row_alone():
    logits, allowed, banned, counts = _inputs()
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in PARAMS]
    alone_counts = [None if c is None else c.clone() for c in counts]
    before = alone_counts[6].clone()
    tokens, lps = sample_rows(logits, PARAMS, gens, counts, banned, allowed)
    full = torch.log_softmax(logits, dim=-1)
    for r, p in enumerate(PARAMS):
        assert allowed[r, int(tokens[r])] and int(tokens[r]) not in banned[r]
        assert float(lps[r]) == pytest.approx(float(full[r, tokens[r]]), abs=1e-6)
        if p.seed is None and not p.greedy:
            continue  # torch's generator: another draw alone
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        t, lp = sample_tensor(logits[r], p, gen, alone_counts[r], banned[r] or None, allowed[r])
        assert int(t) == int(tokens[r]) and float(lp) == float(lps[r]), r
        if counts[r] is not None:  # the picked token counted, in place, the same way
            assert torch.equal(counts[r], alone_counts[r])
    assert int(tokens[8]) == 7 and int(tokens[9]) != 3
    # the penalized greedy row against the formulas written out (vLLM's / HF's): repetition divides
    # positive logits of seen tokens (prompt or output) and multiplies negative ones; frequency and
    # presence subtract count x f and [count > 0] x p over the outputs
    c, x = before, logits[6].clone()
    seen = (c[0] > 0) | (c[1] > 0)
    x[seen] = torch.where(x[seen] > 0, x[seen] / 1.3, x[seen] * 1.3)
    x = x - 0.5 * c[0] - 0.4 * (c[0] > 0).float()
    assert int(tokens[6]) == int(x.argmax())


def test_penalties_change_the_pick():
    logits = torch.zeros(1, V)
    logits[0, 4], logits[0, 5] = 2.0, 1.9
    counts = new_counts(SamplingParams(frequency_penalty=1.0), V, "cpu")
    counts[0, 4] = 1.0
    p = SamplingParams(frequency_penalty=1.0)
    tokens, _ = sample_rows(logits, [p], [None], [counts], [()], None)
    assert int(tokens[0]) == 5 and counts[0, 5] == 1.0


def test_filtered_probabilities_and_the_draw():
    """Each row's probabilities as it alone gets them; the exponential race draws at them."""
    logits, allowed, _, _ = _inputs()
    rows = [1, 3, 4, 5]
    scores = logits[rows].masked_fill(~allowed[rows], float("-inf"))
    batch = sampling_probs(scores, [PARAMS[r] for r in rows])
    for j in range(len(rows)):
        assert torch.equal(batch[j], sampling_probs(scores[j:j + 1], [PARAMS[rows[j]]])[0])
    assert (batch[0] > 0).sum() <= 5 and (batch[3] > 0).sum() == int(allowed[5].sum())
    draws = draw(batch[3:4].expand(20000, -1).contiguous(), [None] * 20000)
    freq = torch.bincount(draws, minlength=V).float() / 20000
    assert (freq - batch[3]).abs().max() < 0.02


def test_zero_noise_never_picks_a_masked_token(monkeypatch):
    """Exponential noise of exactly 0 (possible in float32) must not turn a 0-probability token into
    0 / 0 = NaN, which argmax would pick."""
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: self.fill_(0.0))
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7], [0.0, 0.0, 1.0, 0.0]])
    tokens = draw(probs, [None, torch.Generator().manual_seed(0)])
    assert probs[0, tokens[0]] > 0 and int(tokens[1]) == 2
