"""run_am: the ask -> decode -> respond -> tell loop, its budget, early stop and logging."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from spikemax import querylog, tracking
from spikemax.am.loop import AMResult, queries_to_fraction, run_am, run_am_group
from spikemax.optim import make_optimizer

D, N = 5, 8
PEAK = np.array([6, 1, 3, 7, 0])


class IndexGrid:
    """A fake LatentGrid whose 'image' of a grid point is the point itself, scaled to [0, 1]."""

    d, n = D, N

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return (indices.float() / (N - 1)).reshape(-1, 1, 1, D)


def peak_responder(images: torch.Tensor) -> np.ndarray:
    """Largest (= 1) exactly at PEAK, falling off with the L1 distance to it."""
    idx = torch.round(images.reshape(-1, D) * (N - 1)).numpy()
    return np.exp(-0.3 * np.abs(idx - PEAK).sum(axis=1))


@pytest.mark.parametrize("method", ["tt", "random"])
def test_run_am_finds_known_peak_with_exact_budget(method):
    opt = make_optimizer(method, D, N, seed=0, **({"lr": 0.1} if method == "tt" else {}))
    budget = 2000 if method == "random" else 1000
    res = run_am(opt, IndexGrid(), peak_responder, budget=budget, batch=50)
    assert isinstance(res, AMResult)
    assert res.n_queries == budget and res.indices.shape == (budget, D)
    if method == "tt":
        np.testing.assert_array_equal(res.best_indices, PEAK)
        assert res.best_response == pytest.approx(1.0)
    # The best image is the decoded best point, and the history is what the responder said.
    assert torch.equal(res.best_image, IndexGrid().decode(torch.as_tensor(res.best_indices)[None])[0])
    np.testing.assert_allclose(res.responses, np.exp(-0.3 * np.abs(res.indices - PEAK).sum(axis=1)))
    assert res.best_response == res.responses.max()


def test_budget_not_a_multiple_of_batch_and_batch_numbers():
    res = run_am(make_optimizer("random", D, N, seed=1), IndexGrid(), peak_responder, budget=23, batch=10)
    assert res.n_queries == 23
    assert res.batches.tolist() == [0] * 10 + [1] * 10 + [2] * 3


def test_failed_queries_count_against_budget_and_never_win():
    def flaky(images):
        y = peak_responder(images)
        y[::2] = np.nan  # every other query fails
        return y

    res = run_am(make_optimizer("random", D, N, seed=2), IndexGrid(), flaky, budget=40, batch=8)
    assert res.n_queries == 40 and np.isnan(res.responses[::2]).all()
    assert res.best_response == np.nanmax(res.responses)


def test_early_stop_only_on_target_value_and_recorded(tmp_path):
    logger = querylog.QueryLogger(run_dir=tmp_path / "run")
    res = run_am(
        make_optimizer("tt", D, N, seed=0),
        IndexGrid(),
        peak_responder,
        budget=5000,
        batch=25,
        logger=logger,
        target_value=0.5,
    )
    logger.close()
    assert res.stopped_early and "target_value" in res.stop_reason
    assert res.best_response >= 0.5 and res.n_queries < 5000 and res.n_queries % 25 == 0
    assert (tmp_path / "run" / "STOPPED_EARLY").is_file()
    assert len(querylog.read_queries(tmp_path / "run")) == res.n_queries
    # A saturated response is no reason to stop without a target_value (MANGO lost runs that way).
    sat = run_am(make_optimizer("random", D, N, seed=0), IndexGrid(), lambda x: np.ones(len(x)), budget=60, batch=20)
    assert sat.n_queries == 60 and not sat.stopped_early


def test_group_tells_each_optimizer_only_its_own_column():
    peaks = [PEAK, np.array([0, 0, 0, 0, 0]), np.array([7, 7, 7, 7, 7])]

    def multi(images):
        idx = torch.round(images.reshape(-1, D) * (N - 1)).numpy()
        return np.stack([np.exp(-0.3 * np.abs(idx - p).sum(axis=1)) for p in peaks], axis=1)

    opts = [make_optimizer("tt", D, N, seed=s, lr=0.1) for s in range(3)]
    calls = []

    def counting(images):
        calls.append(len(images))
        return multi(images)

    results = run_am_group(opts, IndexGrid(), counting, budget=1000, batch=50, max_images=1000)
    # One decode + forward per step for all three loops.
    assert calls == [150] * 20
    for res, peak in zip(results, peaks):
        assert res.n_queries == 1000
        np.testing.assert_array_equal(res.best_indices, peak)


def test_group_budgets_per_optimizer_and_a_shorter_loop_asks_the_same_points():
    two = [make_optimizer("random", D, N, seed=s) for s in (0, 1)]
    res = run_am_group(two, IndexGrid(), peak_responder, budget=[96, 40], batch=32)
    assert [r.n_queries for r in res] == [96, 40]
    assert [len(b) for b in np.split(res[1].batches, np.flatnonzero(np.diff(res[1].batches)) + 1)] == [32, 8]
    alone = run_am(make_optimizer("random", D, N, seed=1), IndexGrid(), peak_responder, budget=40, batch=32)
    np.testing.assert_array_equal(alone.indices, res[1].indices)  # a loop's budget is its own
    with pytest.raises(ValueError, match="one budget per optimizer"):
        run_am_group(two, IndexGrid(), peak_responder, budget=[96], batch=32)


def test_responder_error_propagates_after_logging_what_was_measured(tmp_path):
    n_calls = 0

    def dies(images):
        nonlocal n_calls
        n_calls += 1
        if n_calls == 3:
            raise RuntimeError("rig unplugged")
        return peak_responder(images)

    logger = querylog.QueryLogger(run_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match="unplugged"):
        run_am(make_optimizer("random", D, N), IndexGrid(), dies, budget=100, batch=10, logger=logger)
    assert len(querylog.read_queries(tmp_path / "run")) == 20


def test_queries_to_fraction():
    assert queries_to_fraction(np.array([0.1, 0.5, 0.96, 1.0, 0.2])) == 3
    assert queries_to_fraction(np.array([np.nan, 2.0, np.nan])) == 2
    assert queries_to_fraction(np.array([np.nan, np.nan])) == 0
    assert queries_to_fraction(np.array([-2.0, -1.0, -1.04])) == 2


def test_run_am_logs_every_query_to_sqlite_store(tmp_path):
    uri = tracking.configure(tmp_path)
    client = mlflow.MlflowClient(uri)
    eid = tracking.experiment_id(tracking.AM_EXPERIMENT, tmp_path)
    run = client.create_run(eid)
    logger = querylog.QueryLogger(client, run.info.run_id, tmp_path / "run")
    budget = 130
    res = run_am(
        make_optimizer("tt", D, N, seed=3), IndexGrid(), peak_responder, budget=budget, batch=32, logger=logger
    )
    df = logger.close()
    act = client.get_metric_history(run.info.run_id, "activation")
    best = client.get_metric_history(run.info.run_id, "best_activation")
    assert sorted(m.step for m in act) == list(range(budget))
    assert sorted(m.step for m in best) == list(range(budget))
    by_step = {m.step: m.value for m in act}
    np.testing.assert_allclose([by_step[i] for i in range(budget)], res.responses)
    best_by_step = {m.step: m.value for m in best}
    np.testing.assert_allclose([best_by_step[i] for i in range(budget)], np.maximum.accumulate(res.responses))
    assert len(df) == budget and df["query"].tolist() == list(range(budget))
    np.testing.assert_array_equal(np.stack(df["indices"].to_numpy()), res.indices)
    assert df["batch"].max() == 4 and df["elapsed_s"].is_monotonic_increasing
    arts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "queries.parquet" in arts


def test_options_for_resolves_tt_ordinal_for_the_grid(monkeypatch):
    from spikemax import params as P
    from spikemax.am.plan import _config_hash
    from spikemax.optim import options_for

    m = P.validate({}).maximize
    assert m.tt.ordinal == "auto"
    assert options_for("tt", m, True)["ordinal"] == 1.0
    assert options_for("tt", m, False)["ordinal"] == 0.0
    # The resolved options build the optimizer the stage runs.
    assert make_optimizer("tt", D, N, **options_for("tt", m, True)).ordinal == 1.0
    fixed = P.validate({"maximize": {"tt": {"ordinal": 0.25}}}).maximize
    assert options_for("tt", fixed, True)["ordinal"] == options_for("tt", fixed, False)["ordinal"] == 0.25
    # Without a grid (the config hash) "auto" stays, so an explicit value gets its own run key.
    assert options_for("tt", m)["ordinal"] == "auto"
    explicit = P.validate({"maximize": {"tt": {"ordinal": 1.0}}}).maximize
    monkeypatch.setattr("spikemax.am.plan.file_digest", lambda path: "x")
    assert _config_hash(m, "tt", "a", "b") != _config_hash(explicit, "tt", "a", "b")
    assert options_for("cma", m, True) == {}
    assert options_for("ngopt", m, True) == {"budget": m.budget}
    # The whole Params works as well as its maximize section.
    assert options_for("tt", P.validate({}), True) == options_for("tt", m, True)


def test_group_drift_clock_counts_each_runs_own_presentations():
    """Lock-step runs are separate sessions with the neuron: a clocked responder gets each image's
    presentation count within its own run (not the count over the whole group)."""
    seen: list[np.ndarray] = []

    def clocked(images: torch.Tensor, times: np.ndarray | None = None) -> np.ndarray:
        assert times is not None
        seen.append(np.asarray(times))
        return np.repeat(peak_responder(images)[:, None], 3, axis=1)

    clocked.clocked = True  # type: ignore[attr-defined]
    opts = [make_optimizer("random", D, N, seed=s) for s in range(3)]
    run_am_group(opts, IndexGrid(), clocked, budget=[25, 25, 10], batch=10)
    assert len(seen) == 3
    assert np.array_equal(seen[0], np.tile(np.arange(10), 3))  # three runs, each at its presentations 0..9
    assert np.array_equal(seen[1], np.tile(np.arange(10, 20), 2))  # the third run is done after 10
    assert np.array_equal(seen[2], np.tile(np.arange(20, 25), 2))


def test_drifting_responder_gain_follows_the_given_clock():
    """make_responder's drift applies the gain of each image's own presentation count when told it."""
    from spikemax.neurons import make_responder
    from spikemax.optim.drift import DriftingGain
    from spikemax.snn import ConvSNN

    torch.manual_seed(0)
    net = ConvSNN(in_shape=[1, 8, 8], channels=[4], kernel=3, hidden=[8], num_steps=8).eval()
    images = torch.rand(4, 1, 8, 8) * 3
    clean = make_responder(net, ["fc_lif1:0", "fc_lif1:1"])(images)
    assert (clean > 0).any()  # the gain has something to scale
    gain = DriftingGain(trend=-0.5, horizon=100)
    drifting = make_responder(net, ["fc_lif1:0", "fc_lif1:1"], drift=gain)
    times = np.array([0, 50, 99, 0])
    np.testing.assert_allclose(drifting(images, times=times), clean * gain(times)[:, None])
    np.testing.assert_allclose(drifting(images), clean * gain(np.arange(4, 8))[:, None])  # its own clock went on
