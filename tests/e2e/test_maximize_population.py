"""Population mode of the `maximize` stage: tell routing, shared query table, budget, resume."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from spikemax import SpikemaxError, querylog, tracking
from spikemax.am import group as am_group
from spikemax.am.group import Context
from spikemax.am.plan import plan
from spikemax.stages.maximize import run as run_stage
from tests.support.maximize import am_runs, project_copy

pytestmark = pytest.mark.usefixtures("own_store")


@pytest.fixture(scope="module")
def models(project, snn_checkpoints, generator_checkpoints):
    """The tiny SNN checkpoints and both tiny generators in `project`."""
    return project


POP = {
    "checkpoints": [-1],
    "generators": ["vqvae"],
    "targets": ["class:0", "class:1", "lif1:0"],
    "units_per_layer": 0,
    "methods": ["tt"],
    "seeds": [0],
    "budget": 40,
    "batch": 16,
    "population": True,
    "noise": {"model": "poisson"},
}


def _record_tells(monkeypatch) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Patch the stage's optimizers to record every tell, by run key."""
    told: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    real = Context.optimizer

    def make(self, spec, grid, warm_from):
        opt = real(self, spec, grid, warm_from)
        key = spec.key
        inner = opt.tell
        told[key] = []

        def tell(I, y):
            told[key].append((np.array(I, dtype=np.int64), np.array(y, dtype=np.float64)))
            inner(I, y)

        opt.tell = tell  # type: ignore[method-assign]
        return opt

    monkeypatch.setattr(Context, "optimizer", make)
    return told


def _pop_dir(paths, pl) -> Path:
    return paths.results / "am" / "populations" / pl.runs[0].population


def test_population_routes_each_column_to_its_optimizer_and_logs_one_shared_table(tmp_path, models, monkeypatch):
    params, paths = project_copy(tmp_path / "p", models, POP)
    pl = plan(params, paths)
    told = _record_tells(monkeypatch)
    metrics = run_stage(params, paths)
    m, budget = len(pl.runs), POP["budget"]
    assert metrics["n_runs"] == m == 3 and metrics["n_failed"] == 0
    # Budget counts presentations of the shared set: B in all, not m * B.
    assert metrics["queries_run"] == budget

    pop_dir = _pop_dir(paths, pl)
    table = querylog.read_queries(pop_dir)
    meta = json.loads((pop_dir / "population.json").read_text())
    assert list(table.columns) == list(querylog.POPULATION_COLUMNS)
    assert table["query"].tolist() == list(range(budget)) and table["batch"].max() == 2
    assert meta["targets"] == [c.target.name for c in pl.runs] and meta["run_keys"] == [c.key for c in pl.runs]
    I = np.stack(table["indices"].to_numpy())
    Y = np.stack(table["responses"].to_numpy())
    assert Y.shape == (budget, m)
    # Round robin: equal shares of the first batch (16 = 6 + 5 + 5); after it a neuron that has
    # answered nothing yet proposes less than any responsive one, never nothing at all.
    batch = table["batch"].to_numpy()
    first = np.bincount(table["owner"][batch == 0], minlength=m)
    assert first.sum() == 16 and first.max() - first.min() <= 1
    for b in range(1, int(batch.max()) + 1):
        q = np.bincount(table["owner"][batch == b], minlength=m)
        fired = (Y[batch < b] > 0).any(axis=0)
        assert q.sum() == (batch == b).sum()
        if fired.any() and not fired.all():
            assert q[~fired].max() <= q[fired].min() and q[~fired].min() >= 1
        else:
            assert q.max() - q.min() <= 1

    client = mlflow.MlflowClient(tracking.tracking_uri(paths.root))
    df = pd.read_csv(paths.results / "am" / "summary.csv").set_index("run_key")
    for j, c in enumerate(pl.runs):
        # Optimizer j was told exactly column j of every presentation, in presentation order.
        tI = np.concatenate([t[0] for t in told[c.key]])
        ty = np.concatenate([t[1] for t in told[c.key]])
        np.testing.assert_array_equal(tI, I)
        np.testing.assert_array_equal(ty, Y[:, j])
        # The neuron's own run: B queries, its table and MLflow history equal the shared table's column.
        row = df.loc[c.key]
        assert row["n_queries"] == budget
        own = querylog.read_queries(paths.results / "am" / row["run_dir"])
        pd.testing.assert_frame_equal(
            own.drop(columns="elapsed_s"), querylog.neuron_queries(table, j).drop(columns="elapsed_s")
        )
        hist = sorted(client.get_metric_history(row["run_id"], "activation"), key=lambda x: x.step)
        assert [h.step for h in hist] == list(range(budget))
        np.testing.assert_allclose([h.value for h in hist], Y[:, j])
        r = client.get_run(row["run_id"])
        assert r.data.params["population"] == pop_dir.name and r.info.status == "FINISHED"
        assert meta["run_ids"][j] == row["run_id"]


def test_population_changes_the_config_hash():
    from spikemax import params as P
    from spikemax.am.plan import _config_hash
    from spikemax.neurons import Target

    ckpt = Path(__file__)
    base = P.MaximizeParams(budget=8, batch=4)
    pop = base.model_copy(update={"population": True})
    ts = [Target("out", 0), Target("out", 1)]
    assert _config_hash(base, "tt", ckpt, ckpt, ts) == _config_hash(base, "tt", ckpt, ckpt)
    assert _config_hash(pop, "tt", ckpt, ckpt, ts) != _config_hash(base, "tt", ckpt, ckpt, ts)
    # Every neuron learns from the whole set: another target set is another configuration.
    assert _config_hash(pop, "tt", ckpt, ckpt, ts) != _config_hash(pop, "tt", ckpt, ckpt, ts[:1])
    rule = pop.model_copy(update={"population_rule": "progress"})
    assert _config_hash(rule, "tt", ckpt, ckpt, ts) != _config_hash(pop, "tt", ckpt, ckpt, ts)


def test_population_resume_redoes_the_group_and_skips_finished_neurons(tmp_path, models, monkeypatch):
    params, paths = project_copy(tmp_path / "p", models, POP)
    pl = plan(params, paths)
    real_finish = am_group.finish_run
    calls = []

    def flaky_finish(ctx, op, *args, **kwargs):
        calls.append(op.spec.key)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_finish(ctx, op, *args, **kwargs)

    monkeypatch.setattr(am_group, "finish_run", flaky_finish)
    with pytest.raises(SpikemaxError, match="disk full"):
        run_stage(params, paths)
    monkeypatch.setattr(am_group, "finish_run", real_finish)
    first = [r for r in am_runs(paths.root) if r.info.status == "FINISHED" and tracking.RUN_KEY_TAG in r.data.tags]
    assert [r.data.tags[tracking.RUN_KEY_TAG] for r in first] == [pl.runs[0].key]
    done_id = first[0].info.run_id
    before = querylog.read_queries(paths.results / "am" / pl.runs[0].run_dir)

    told = _record_tells(monkeypatch)
    metrics = run_stage(params, paths)
    assert metrics["n_runs"] == 3 and metrics["n_failed"] == 0 and metrics["queries_run"] == POP["budget"]
    nested = [r for r in am_runs(paths.root) if tracking.RUN_KEY_TAG in r.data.tags]
    finished = {r.data.tags[tracking.RUN_KEY_TAG]: r.info.run_id for r in nested if r.info.status == "FINISHED"}
    assert set(finished) == {c.key for c in pl.runs} and finished[pl.runs[0].key] == done_id
    assert sorted(r.info.status for r in nested) == ["FAILED", "FAILED", "FINISHED", "FINISHED", "FINISHED"]
    # The finished neuron re-proposed but was not logged again; the set presented is the planned one.
    assert set(told) == {c.key for c in pl.runs}
    table = querylog.read_queries(_pop_dir(paths, pl))
    assert len(table) == POP["budget"]
    pd.testing.assert_frame_equal(
        before.drop(columns="elapsed_s"), querylog.neuron_queries(table, 0).drop(columns="elapsed_s")
    )
    meta = json.loads((_pop_dir(paths, pl) / "population.json").read_text())
    assert meta["run_ids"] == [finished[c.key] for c in pl.runs]
