"""Selectivity metrics equal hand-computed values on constructed activations."""

from __future__ import annotations

import numpy as np
import pytest

from spikemax import selectivity as S


@pytest.fixture
def responses() -> tuple[np.ndarray, np.ndarray]:
    """6 stimuli of 3 classes (2 each) x 4 units: selective, flat, silent, one-class-only."""
    labels = np.array([0, 0, 1, 1, 2, 2])
    rates = np.array(
        [
            [3.0, 2.0, 0.0, 0.0],
            [5.0, 2.0, 0.0, 0.0],
            [1.0, 2.0, 0.0, 0.0],
            [1.0, 2.0, 0.0, 0.0],
            [0.5, 2.0, 0.0, 2.0],
            [1.5, 2.0, 0.0, 4.0],
        ]
    )
    return rates, labels


def test_class_means_average_each_class(responses):
    rates, labels = responses
    means = S.class_means(rates, labels, 3)
    np.testing.assert_allclose(means[:, 0], [4.0, 1.0, 1.0])
    np.testing.assert_allclose(means[:, 3], [0.0, 0.0, 3.0])


def test_class_means_absent_class_is_zero():
    means = S.class_means(np.array([[1.0], [3.0]]), np.array([0, 0]), 3)
    np.testing.assert_allclose(means[:, 0], [2.0, 0.0, 0.0])


def test_csi_hand_computed(responses):
    rates, labels = responses
    means = S.class_means(rates, labels, 3)
    # unit 0: (4 - 1) / (4 + 1); flat: 0; silent (0/0): 0 by definition; one class only: 1.
    np.testing.assert_allclose(S.csi(means), [0.6, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(S.preferred_class(means), [0, 0, -1, 2])


def test_csi_mu_rest_is_mean_of_other_classes():
    # mu_max = 6, mu_rest = (2 + 0 + 1) / 3 = 1 -> 5 / 7
    assert S.csi(np.array([2.0, 6.0, 0.0, 1.0]))[0] == pytest.approx(5 / 7)


def test_lifetime_sparseness_hand_computed():
    rates = np.array([[1.0, 1.0, 2.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    # one stimulus only: 1; flat: 0; [2,1,0,1]: a = 1 / 1.5, S = (1 - 2/3) / (1 - 1/4) = 4/9; silent: 0
    np.testing.assert_allclose(S.lifetime_sparseness(rates), [1.0, 0.0, 4 / 9, 0.0])


def test_lifetime_sparseness_single_stimulus_is_zero():
    assert S.lifetime_sparseness(np.array([[3.0, 0.0]])).tolist() == [0.0, 0.0]


def test_am_gain_ratio_and_zero_max():
    assert S.am_gain(3.0, 2.0) == pytest.approx(1.5)
    out = S.am_gain(np.array([1.0, 2.0]), np.array([4.0, 0.0]))
    assert out[0] == pytest.approx(0.25)
    assert np.isnan(out[1])


def test_normalized_perplexity_bounds():
    assert S.normalized_perplexity(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert S.normalized_perplexity(np.full(4, 0.25)) == pytest.approx(1.0)
    # two equal classes out of 4: exp(ln 2) / 4
    assert S.normalized_perplexity(np.array([0.5, 0.5, 0.0, 0.0])) == pytest.approx(0.5)


def test_concept_picks_most_probable_class():
    cls, prob, ppl = S.concept(np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]]))
    assert cls.tolist() == [1, 0]
    np.testing.assert_allclose(prob, [0.7, 0.5])
    assert ppl.shape == (2,) and np.all((ppl > 1 / 3) & (ppl < 1))


def test_png_complexity_orders_flat_below_noise():
    rng = np.random.default_rng(0)
    flat = np.full((1, 28, 28), 0.5)
    noise = rng.random((1, 28, 28))
    rgb_noise = rng.random((3, 32, 32))
    assert 0 < S.png_complexity(flat) < S.png_complexity(noise)
    assert S.png_complexity(rgb_noise) > S.png_complexity(noise)
