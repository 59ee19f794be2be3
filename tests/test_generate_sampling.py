"""igpt_cli.generate.sampling: the sampling rules, and sampling correct in distribution (chi-square)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from igpt_cli.errors import ParameterError
from igpt_cli.generate import Sampling, complete_images, sample_images
from igpt_cli.generate.sampling import pick_tokens, probabilities, row_uniforms
from igpt_cli.model import IGPT, IGPTConfig, sos_shift


def reference_probs(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float) -> np.ndarray:
    """The documented rule, independently in float64 NumPy: temperature, then top-k, then top-p."""
    x = logits.astype(np.float64) / temperature
    if top_k is not None:
        x = np.where(x < np.sort(x)[::-1][top_k - 1], -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, dtype=bool)
    keep[order[before < top_p]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


@pytest.fixture(scope="module")
def tiny():
    """A tiny model (16 colours, 2x2 images) with peaked, varied next-token distributions."""
    torch.manual_seed(3)
    m = IGPT(IGPTConfig(vocab_size=17, n_positions=4, n_embd=32, n_layer=2, n_head=4)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of counts against probs; bins with an expected count below 5 are pooled."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


SETTINGS = [(1.0, None, 1.0), (0.6, None, 1.0), (1.5, 6, 1.0), (1.0, None, 0.8), (0.8, 8, 0.9)]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sampled_frequencies_match_the_softmax(tiny, temperature, top_k, top_p):
    """Thousands of draws at a fixed prefix (SOS alone, and SOS + a kept row) follow the model's
    truncated, tempered softmax; truncated colours never appear."""
    n = 6000
    prefix = np.array([[5, 11, 0, 0]])
    samples = complete_images(prefix, tiny, keep_rows=1, n=n, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=7, batch_size=2000)[0]  # [n, 4]
    uncond = sample_images(tiny, n, temperature=temperature, top_k=top_k, top_p=top_p, seed=8, batch_size=3000)
    with torch.inference_mode():
        logits = tiny(sos_shift(torch.tensor([[5, 11, 0, 0]]), 16))[0].numpy()  # [4, 16]
    assert (samples[:, :2] == [5, 11]).all()  # the kept row stays
    for drawn, row in ((samples[:, 2], logits[2]), (uncond[:, 0], logits[0])):
        want = reference_probs(row, temperature, top_k, top_p)
        counts = np.bincount(drawn, minlength=16)
        assert counts[want == 0].sum() == 0  # never a truncated colour
        assert chi_square(counts, want) > 1e-3
        # the same test has the power to see a wrong rule (plain softmax, no temperature or truncation)
        assert chi_square(counts, reference_probs(row, 1.0, None, 1.0)) < 1e-6 or \
            (temperature, top_k, top_p) == (1.0, None, 1.0)


def test_settings_are_checked_with_parameter_names():
    for kw, needle in ((dict(temperature=-0.5), "temperature=-0.5"), (dict(temperature=float("nan")), "temperature"),
                       (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"), (dict(top_k=0), "top_k=0")):
        with pytest.raises(ParameterError, match=needle):
            Sampling(**kw)
    assert Sampling(0).greedy and not Sampling(0.1).greedy
    assert Sampling(0.5, None, 0.9).attrs() == dict(temperature=0.5, top_k=0, top_p=0.9)


def test_truncation_rules_and_inverse_cdf_edges():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = probabilities(logits, Sampling(1.0, None, 0.8))[0]  # 0.5 + 0.3 reaches 0.8: the third is cut
    np.testing.assert_allclose(p.numpy(), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-6)
    p = probabilities(logits, Sampling(1.0, None, 0.81))[0]  # 0.8 < 0.81: the third is needed
    assert (p > 0).tolist() == [True, True, True, False]
    p = probabilities(logits, Sampling(1.0, 2, 1.0))[0]
    np.testing.assert_allclose(p.numpy(), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-6)
    p = probabilities(logits, Sampling(1.0), n_colours=2)[0]  # a palette smaller than the vocabulary
    np.testing.assert_allclose(p.numpy(), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=1e-6)
    # u = 0 and u just below 1 draw the first and the last token allowed, never a cut one
    s = Sampling(1.0, None, 0.8)
    u = torch.tensor([0.0, 1.0 - 1e-12], dtype=torch.float64)
    assert pick_tokens(logits.repeat(2, 1), s, u).tolist() == [0, 1]
    flipped = logits.flip(-1).repeat(2, 1)  # zero-probability tokens first
    assert pick_tokens(flipped, s, u).tolist() == [2, 3]
    assert pick_tokens(logits, Sampling(0), None).tolist() == [0]  # greedy
    assert pick_tokens(logits.flip(-1), Sampling(0), None, n_colours=2).tolist() == [1]


def test_random_numbers_depend_on_seed_and_row_only():
    a = row_uniforms(3, [0, 1, 2, 3], 10)
    np.testing.assert_array_equal(a[2:], row_uniforms(3, [2, 3], 10))
    assert not np.array_equal(a, row_uniforms(4, [0, 1, 2, 3], 10))
    assert a.shape == (4, 10) and (a >= 0).all() and (a < 1).all()
