"""The MLflow helper: a real sqlite store in a temp dir, runs readable back."""

from __future__ import annotations

import mlflow

from spikemax import tracking


def test_store_is_sqlite_under_mlruns_and_run_reads_back(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.configure(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    exp = tracking.experiment_id("snn", tmp_path)
    assert tracking.experiment_id("snn", tmp_path) == exp
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment(exp).artifact_location.startswith((tmp_path / "mlruns").resolve().as_uri())
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "acc", 0.5, step=3)
    client.log_text(run.info.run_id, "hello", "note.txt")
    client.set_terminated(run.info.run_id)
    back = client.get_run(run.info.run_id)
    assert back.data.metrics["acc"] == 0.5
    local = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "dl"))
    assert open(local).read() == "hello"
    assert str((tmp_path / "mlruns").resolve()) in back.info.artifact_uri


def test_env_var_overrides_store(tmp_path, monkeypatch):
    other = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert tracking.tracking_uri(tmp_path) == other


def test_two_stores_in_one_process_stay_apart(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = tracking.configure(tmp_path / "a")
    second = tracking.configure(tmp_path / "b")
    assert first != second and "/b/mlruns/" in second
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_parallel_first_writers_share_one_new_store(tmp_path):
    """Several processes opening a fresh store at once all succeed (schema created once)."""
    import subprocess
    import sys

    code = "import sys; from spikemax import tracking; tracking.experiment_id('snn', sys.argv[1]); print('ok')"
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-800:] for o in outs]
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    assert [e.name for e in client.search_experiments() if e.name == "snn"] == ["snn"]


def test_terminated_marks_finished_or_failed(tmp_path, monkeypatch):
    import pytest

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = mlflow.MlflowClient(tracking.configure(tmp_path))
    exp = tracking.experiment_id("snn", tmp_path)
    ok, bad = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    with tracking.terminated(client, ok):
        pass
    with pytest.raises(KeyError), tracking.terminated(client, bad):
        raise KeyError("boom")
    assert client.get_run(ok).info.status == "FINISHED"
    assert client.get_run(bad).info.status == "FAILED"


def test_params_hash_follows_the_params_only():
    from spikemax import params as P

    base = P.validate({})
    assert tracking.params_hash(base) == tracking.params_hash(P.validate({}))
    assert tracking.params_hash(base) != tracking.params_hash(P.validate({"snn": {"lr": 0.004}}))
    assert len(tracking.params_hash(base)) == 12


def test_run_tags_carry_commit_params_hash_and_only_the_vocabulary(tmp_path):
    import subprocess

    import pytest

    from spikemax import params as P

    params = P.validate({})
    outside = tracking.run_tags(tmp_path, params, "analyze")
    assert tracking.GIT_COMMIT_TAG not in outside  # not a git checkout: no commit to name
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    tracking.git_state.cache_clear()
    tags = tracking.run_tags(tmp_path, params, "train_generator", **{"spikemax.generator": "sngan"})
    assert tags[tracking.GIT_COMMIT_TAG] == head and tags["spikemax.git_dirty"] == "false"
    assert tags[tracking.PARAMS_HASH_TAG] == tracking.params_hash(params)
    assert tags[tracking.STAGE_TAG] == "train_generator" and tags["spikemax.generator"] == "sngan"
    assert all(k.startswith("mlflow.") or k in tracking.TAGS for k in tags)
    with pytest.raises(ValueError, match="vocabulary"):
        tracking.run_tags(tmp_path, params, "analyze", **{"selectivity.am_gain": "1.0"})


def test_am_runs_nest_under_one_group_per_generator_and_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = mlflow.MlflowClient(tracking.configure(tmp_path))
    eid = tracking.experiment_id(tracking.AM_EXPERIMENT, tmp_path)
    scan = client.create_run(eid, tags={tracking.STAGE_TAG: "maximize"}).info.run_id
    a = tracking.am_run_tags(client, eid, scan, "sngan", 3)
    tracking._GROUPS.clear()  # another process (a Ray worker) finds the group in the store
    b = tracking.am_run_tags(client, eid, scan, "sngan", 3)
    c = tracking.am_run_tags(client, eid, scan, "vqvae", 3)
    assert a == b and a[tracking.PARENT_TAG] != c[tracking.PARENT_TAG]
    group = client.get_run(a[tracking.PARENT_TAG])
    assert group.data.tags[tracking.PARENT_TAG] == scan and group.data.tags[tracking.GROUP_TAG] == "sngan/e3"
    assert group.info.status == "FINISHED" and group.info.run_name == "sngan/e3"
    run = client.create_run(eid, tags={**a, tracking.RUN_KEY_TAG: "k"}).info.run_id
    found = client.search_runs([eid], tracking.scan_filter(scan))
    assert [r.info.run_id for r in found] == [run]  # the AM run, not its group or the scan


def test_saved_views_are_experiment_tags_the_ui_link_names(tmp_path, monkeypatch):
    import json

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.UI_ENV, raising=False)
    views = tracking.am_views(15, "sngan", "class:3")
    links = tracking.save_views(tmp_path, views)
    client = mlflow.MlflowClient(tracking.configure(tmp_path))
    eid = tracking.experiment_id(tracking.AM_EXPERIMENT, tmp_path)
    tags = client.get_experiment(eid).tags
    for view, link in zip(views, links):
        assert link["url"] == f"{tracking.DEFAULT_UI}/#/experiments/{eid}/runs?viewStateShareKey={view.key}"
        state = json.loads(tags[tracking.SHARED_VIEW_PREFIX + view.key])
        assert state["searchFilter"] == view.filter
        assert "params.`method`" in state["selectedColumns"] and "metrics.`am_gain`" in state["selectedColumns"]
        assert "tags.`spikemax.concept`" in state["selectedColumns"]
    assert json.loads(tags[tracking.SHARED_VIEW_PREFIX + views[0].key])["orderByKey"] == "metrics.am_gain"
    # The UI of a tracking server is the server; of a file store, where `mlflow ui` serves it.
    assert tracking.ui_url("http://10.0.0.5:8080/") == "http://10.0.0.5:8080"
    monkeypatch.setenv(tracking.UI_ENV, "http://127.0.0.1:5055")
    assert (
        tracking.view_url("sqlite:////x/mlflow.db", "7", "k")
        == "http://127.0.0.1:5055/#/experiments/7/runs?viewStateShareKey=k"
    )


def test_every_spikemax_tag_the_code_writes_is_in_the_vocabulary():
    """A tag literal anywhere in src (AM runs, tuning, the rig) is documented in tracking.TAGS."""
    import re

    from tests.support.project import REPO

    loggers = {"spikemax.rig"}  # logging.getLogger names, not tags
    found = set()
    for path in (REPO / "src" / "spikemax").rglob("*.py"):
        found |= set(re.findall(r"[\"'](spikemax\.[a-z_]+)[\"']", path.read_text()))
    assert found - loggers, "the scan found no tag literals"
    assert sorted(found - loggers - set(tracking.TAGS)) == []
