"""Targets, firing-rate readout and responders of spikemax.neurons."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from spikemax import SpikemaxError
from spikemax.neurons import (
    Target,
    describe,
    firing_rates,
    layer_rates,
    make_responder,
    parse_target,
)
from spikemax.snn import ConvSNN, load_snn

LAYERS = {"lif1": 4, "lif2": 8, "fc_lif1": 32, "out": 10}


@pytest.fixture(scope="module")
def net() -> ConvSNN:
    """A random net scaled so that every layer spikes on random images."""
    torch.manual_seed(3)
    model = ConvSNN(channels=[4, 8], hidden=[32], num_steps=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.5)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2


def reference_rates(net: ConvSNN, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Rates from the snntorch step loop, averaged over time and space independently of neurons.py."""
    with torch.no_grad():
        spikes = net.forward_spikes_steps(images)
    out = {}
    for name, s in spikes.items():
        dims = (0, 3, 4) if s.dim() == 5 else (0,)
        out[name] = s.mean(dim=dims).numpy()
    return out


@pytest.mark.parametrize(
    "text, expected",
    [
        ("class:3", Target("out", 3)),
        ("lif2:7", Target("lif2", 7)),
        (" fc_lif1 : 0 ", Target("fc_lif1", 0)),
        ("out:9", Target("out", 9)),
    ],
)
def test_parse_valid_targets(text, expected):
    assert parse_target(text, LAYERS) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("lif9:1", "unknown layer 'lif9'"),
        ("lif1:4", "out of range 0..3"),
        ("class:10", "out of range 0..9"),
        ("class:-1", "out of range"),
        ("lif1", "expected class:K or LAYER:UNIT"),
        ("lif1:x", "expected"),
        ("", "expected"),
    ],
)
def test_bad_targets_name_the_valid_layers_and_ranges(text, fragment):
    with pytest.raises(SpikemaxError, match=re.escape(fragment)) as err:
        parse_target(text, LAYERS)
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg
    assert "lif1:0..3, lif2:0..7, fc_lif1:0..31, class:0..9" in msg


def test_target_round_trips_through_str():
    for text in ["class:2", "lif1:3", "fc_lif1:31"]:
        assert str(parse_target(text, LAYERS)) == text


def test_layer_rates_match_step_loop_reference(net, images):
    rates = layer_rates(net, images)
    ref = reference_rates(net, images)
    assert list(rates) == list(net.spiking_layers())
    for name, units in net.spiking_layers().items():
        assert rates[name].shape == (12, units)
        np.testing.assert_array_equal(rates[name], ref[name])
    assert all(0 < rates[n].mean() < 1 for n in rates)


def test_layer_rates_do_not_depend_on_internal_batch_size(net, images):
    a = layer_rates(net, images, batch_size=5)
    b = layer_rates(net, images)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_firing_rates_one_and_many_targets(net, images):
    ref = reference_rates(net, images)
    single = firing_rates(net, images, "lif2:3")
    assert single.shape == (12,)
    np.testing.assert_array_equal(single, ref["lif2"][:, 3])
    many = firing_rates(net, images, ["class:1", "lif1:0", "fc_lif1:5"])
    assert many.shape == (12, 3)
    np.testing.assert_array_equal(many[:, 0], ref["out"][:, 1])
    np.testing.assert_array_equal(many[:, 1], ref["lif1"][:, 0])
    np.testing.assert_array_equal(many[:, 2], ref["fc_lif1"][:, 5])


def test_state_is_reset_and_batch_order_is_irrelevant(net, images):
    targets = ["lif1:1", "lif2:2", "fc_lif1:3", "class:4"]
    first = firing_rates(net, images, targets)
    firing_rates(net, images * -3, targets)  # a different batch in between must leave no trace
    again = firing_rates(net, images, targets)
    np.testing.assert_array_equal(first, again)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    permuted = firing_rates(net, images[perm], targets)
    np.testing.assert_array_equal(permuted, first[perm.numpy()])


def test_responder_without_noise_is_the_readout(net, images):
    respond = make_responder(net, "lif2:3")
    np.testing.assert_array_equal(respond(images), firing_rates(net, images, "lif2:3"))
    assert make_responder(net, ["class:0", "lif1:2"])(images).shape == (12, 2)


def test_noisy_responder_is_seeded_multiplicative_and_non_negative(net, images):
    clean = firing_rates(net, images, "lif1:1")
    a = make_responder(net, "lif1:1", noise=0.3, seed=7)
    b = make_responder(net, "lif1:1", noise=0.3, seed=7)
    ra, rb = a(images), b(images)
    np.testing.assert_array_equal(ra, rb)
    assert not np.array_equal(ra, clean) and (ra >= 0).all()
    assert np.all(ra[clean == 0] == 0)  # multiplicative: a silent unit stays silent
    assert not np.array_equal(a(images), ra)  # fresh noise on every call
    c = make_responder(net, "lif1:1", noise=0.3, seed=8)
    assert not np.array_equal(c(images), ra)


def test_poisson_responder_gives_counts_over_t(net, images):
    respond = make_responder(net, "lif1:1", poisson=True, seed=0)
    r = respond(images)
    counts = r * net.num_steps
    np.testing.assert_allclose(counts, np.round(counts))
    assert not np.array_equal(r, firing_rates(net, images, "lif1:1"))


def test_bad_inputs_to_readout(net, images):
    with pytest.raises(SpikemaxError, match="unknown layer"):
        firing_rates(net, images, "conv9:0")
    with pytest.raises(SpikemaxError, match="noise"):
        make_responder(net, "class:0", noise=-0.1)
    with pytest.raises(SpikemaxError, match="no targets"):
        firing_rates(net, images, [])


def test_describe_lists_layers_units_and_classes(snn_checkpoints):
    text = describe(snn_checkpoints[0])
    net = load_snn(snn_checkpoints[0])
    for name, units in net.spiking_layers().items():
        assert name in text and str(units) in text
    assert "class:0..9" in text and "Ankle boot" in text


def test_noisy_rates_models_have_the_stated_moments():
    """Poisson counts over a window are rates with variance rate / window; multiplicative noise has
    mean r (for small sigma) and sd r * sigma; repeats average the draws; none returns the rates."""
    from spikemax.neurons import noisy_rates

    rng = np.random.default_rng(0)
    r = np.full(200_000, 0.25)
    p = noisy_rates(r, "poisson", window=16, rng=rng)
    assert np.allclose(p * 16, np.round(p * 16))  # whole spike counts
    assert p.mean() == pytest.approx(0.25, rel=0.01) and p.var() == pytest.approx(0.25 / 16, rel=0.03)
    mult = noisy_rates(r, "multiplicative", sigma=0.2, rng=rng)
    assert mult.mean() == pytest.approx(0.25, rel=0.01) and mult.std() == pytest.approx(0.05, rel=0.03)
    four = noisy_rates(r, "multiplicative", sigma=0.2, repeats=4, rng=rng)
    assert four.std() == pytest.approx(0.025, rel=0.03)
    assert np.array_equal(noisy_rates(r, "none"), r)
    assert noisy_rates(r[:10], "poisson", steps=8, rng=rng).var() >= 0  # window defaults to steps


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "poisson", "window": -1.0}, "window must be > 0"),
        ({"model": "multiplicative", "sigma": -0.1}, "sigma must be >= 0"),
        ({"model": "poisson", "repeats": 0}, "repeats must be an integer >= 1"),
        ({"model": "gamma"}, "noise model must be one of"),
    ],
)
def test_bad_noise_models_are_one_line_errors(net, kwargs, match):
    with pytest.raises(SpikemaxError, match=match):
        make_responder(net, "class:0", **kwargs)


def test_poisson_responder_reports_rates_of_whole_counts(net, images):
    """A Poisson responder over the SNN's T steps returns count / T, seeded."""
    a = make_responder(net, ["lif1:1", "class:2"], seed=3, model="poisson")
    b = make_responder(net, ["lif1:1", "class:2"], seed=3, model="poisson")
    ya = a(images)
    assert ya.shape == (len(images), 2) and np.array_equal(ya, b(images))
    assert np.allclose(ya * net.num_steps, np.round(ya * net.num_steps))
