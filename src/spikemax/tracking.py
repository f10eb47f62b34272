"""MLflow set-up shared by every stage: a sqlite store under mlruns/, artifacts beside it; the tag
vocabulary every run uses, the AM runs' group parents, and ready comparison views of the UI."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from filelock import FileLock

if TYPE_CHECKING:
    from mlflow import MlflowClient

# The project's MLflow experiments, named once (the public MLflow layout).
SNN_EXPERIMENT = "snn"
GENERATORS_EXPERIMENT = "generators"
AM_EXPERIMENT = "activation-maximization"
TUNING_EXPERIMENT = "tuning"
ANALYSIS_EXPERIMENT = "analysis"
EXPERIMENTS = (SNN_EXPERIMENT, GENERATORS_EXPERIMENT, AM_EXPERIMENT, TUNING_EXPERIMENT, ANALYSIS_EXPERIMENT)

# ---- one tag vocabulary -----------------------------------------------------------------------
# Every tag the project sets is MLflow's own (`mlflow.*`) or one of these. Numbers are metrics and
# settings are params, never tags; a tag holds a category, a name or an id.
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own: the commit the run's code came from
SOURCE_NAME_TAG = "mlflow.source.name"  # MLflow's own: the UI's Source column
SOURCE_TYPE_TAG = "mlflow.source.type"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests a run under another in the UI
STAGE_TAG = "spikemax.stage"
PARAMS_HASH_TAG = "spikemax.params_hash"
RUN_KEY_TAG = "spikemax.run_key"  # an AM run's key: (epoch, generator, target, method, seed, config)
CLOSED_LOOP_TAG = "spikemax.closed_loop"
SCAN_TAG = "spikemax.scan"
GROUP_TAG = "spikemax.group"
TAGS: dict[str, str] = {
    STAGE_TAG: "the DVC stage whose invocation the run is (train_snn, train_generator, check_generators, maximize, ...)",
    PARAMS_HASH_TAG: "sha256 of the validated params the run ran with (12 hex digits; `spikemax.tracking.params_hash`)",
    "spikemax.git_dirty": "true when tracked files differed from that commit",
    "spikemax.generator": "the generator a run trained, checked or searched (sngan, vqvae)",
    RUN_KEY_TAG: "an AM run's key (checkpoint, generator, target, method, seed and a hash of its settings)",
    SCAN_TAG: "AM runs and groups: the run id of the `maximize` invocation they belong to",
    GROUP_TAG: "an AM group run: GENERATOR/eEPOCH (its children are that generator's runs at that checkpoint)",
    "spikemax.layer": "an AM run's layer",
    "spikemax.warm_start_from": "run key an AM run's TT started from (none: cold start)",
    "spikemax.concept": "class name of an AM run's best stimulus under the run's checkpoint",
    "spikemax.final_concept": "class name of an AM run's best stimulus under the trained (last) checkpoint",
    "spikemax.preferred_class": "class name the AM run's unit fires most for on the test set, at its checkpoint",
    "spikemax.analysis_run": "id of the analysis run that tagged an AM run",
    "spikemax.failure": "why a run ended FAILED",
    "spikemax.stopped_early": "why an AM run stopped before its budget",
    "spikemax.study": "a tuning trial's Optuna study",
    "spikemax.trial": "a tuning trial's number in its study",
    "spikemax.trial_state": "a tuning run's state: RUNNING, COMPLETE, PRUNED, FAIL, or VALIDATION (the winner's check)",
    "spikemax.method": "the search method of a tuning trial",
    "spikemax.worker": "host:pid that ran a tuning trial",
    "spikemax.verdict": "a study's validation: whether its winner beat the untuned default on the validation panel",
    "spikemax.adopted": "true when maximize's `auto` runs the study's winner",
    CLOSED_LOOP_TAG: "true on a rig session's run (a closed loop with a living neuron, `spikemax serve`)",
    "spikemax.source": "where an AM run's responses came from: rig (a lab's presentations)",
    "spikemax.rig_session": "a rig session's id",
    "spikemax.rig_state": "the state directory whose journal holds a rig session",
    "spikemax.session_name": "a rig session's name, as the lab gave it",
    "spikemax.session_state": "a rig session's state (open, paused, done, ...)",
}


def tracking_uri(root: str | Path) -> str:
    """The project's store: `MLFLOW_TRACKING_URI` if set, else sqlite:///<root>/mlruns/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(root).resolve() / "mlruns" / "mlflow.db"
    return f"sqlite:///{db}"


def artifact_root(root: str | Path) -> str:
    """Absolute artifact location for new experiments (under mlruns/, beside the database)."""
    return (Path(root).resolve() / "mlruns" / "artifacts").as_uri()


def configure(root: str | Path) -> str:
    """Create the project store once and return its tracking URI (pass it to every client).

    MLflow's global `set_tracking_uri` is left alone: it exports MLFLOW_TRACKING_URI, which would
    pin every later store of the same process (and its subprocesses) to this one.
    """
    import mlflow

    uri = tracking_uri(root)
    if not uri.startswith("sqlite:///"):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
        return uri
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    # Two processes creating the schema at once crash one of them: the first creates, the rest wait.
    with FileLock(str(db) + ".lock"):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    return uri


@contextmanager
def terminated(client: MlflowClient, run_id: str) -> Iterator[str]:
    """Mark an MLflow run FINISHED when the block ends and FAILED when it raises (then re-raise)."""
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def experiment_id(name: str, root: str | Path) -> str:
    """Id of experiment `name` in the project store, created with artifacts under mlruns/."""
    import mlflow

    uri = configure(root)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A tracking server keeps artifacts where it was told to (--artifacts-destination), not here.
    local = not uri.startswith(("http://", "https://"))
    try:
        return client.create_experiment(name, artifact_location=f"{artifact_root(root)}/{name}" if local else None)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our look-up and our create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


_FAST_SQLITE = False


def enable_fast_sqlite() -> None:
    """Open this process's sqlite connections in WAL mode with synchronous=NORMAL.

    Every commit still survives a crash or SIGKILL of the process (only a power loss could drop the
    last ones) but no longer waits for an fsync, which makes per-batch metric writes several times
    cheaper. Call before the first connection to the store (pooled connections keep their mode).
    """
    global _FAST_SQLITE
    if _FAST_SQLITE:
        return
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _pragmas(dbapi_con, _record):
        if isinstance(dbapi_con, sqlite3.Connection):
            dbapi_con.execute("PRAGMA journal_mode=WAL")  # persistent; a no-op once set
            dbapi_con.execute("PRAGMA synchronous=NORMAL")

    _FAST_SQLITE = True


# ---- what every run records ---------------------------------------------------------------------


def params_hash(params: Any) -> str:
    """Short sha256 of the validated params (a pydantic model or a dict) as canonical JSON."""
    data = params.model_dump(mode="json") if hasattr(params, "model_dump") else params
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def git_state(root: str | Path) -> tuple[str, bool] | None:
    """(HEAD commit, dirty) of the git checkout holding `root`; None outside one (or without git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # Untracked files (outputs, mlruns/) do not make the code differ from the commit.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, dirty


def run_tags(root: str | Path, params: Any, stage: str, **extra: str) -> dict[str, str]:
    """The tags every run of the project starts with: stage, params hash, git commit, source."""
    tags = {
        STAGE_TAG: stage,
        PARAMS_HASH_TAG: params_hash(params),
        SOURCE_NAME_TAG: f"spikemax {stage.replace('_', '-')}",
        SOURCE_TYPE_TAG: "LOCAL",
    }
    state = git_state(str(Path(root).resolve()))
    if state is not None:
        tags[GIT_COMMIT_TAG] = state[0]
        tags["spikemax.git_dirty"] = str(state[1]).lower()
    unknown = [k for k in extra if k not in TAGS]
    if unknown:
        raise ValueError(f"tags outside the vocabulary (tracking.TAGS): {unknown}")
    return {**tags, **extra}


# ---- AM group runs ------------------------------------------------------------------------------
# A maximize invocation (the scan) is one parent run; under it one group run per (generator,
# checkpoint) holds that generator's AM runs at that checkpoint. The UI then opens on a handful of
# scans, each expanding to generators x checkpoints rows of a page's size (the default: 2 x 16 groups
# of 44 runs, where one parent held all 1,408), the way the report's stimulus grids are laid out.

_GROUPS: dict[tuple[str, str], str] = {}
_SCANS: dict[str, dict[str, str]] = {}
INHERITED = (GIT_COMMIT_TAG, "spikemax.git_dirty", PARAMS_HASH_TAG, SOURCE_NAME_TAG, SOURCE_TYPE_TAG)


def group_name(generator: str, epoch: int) -> str:
    """The group tag (and run name) of a generator's AM runs at checkpoint `epoch`."""
    return f"{generator}/e{epoch}"


def _inherited(client: MlflowClient, scan_id: str) -> dict[str, str]:
    """The scan's commit, params hash and source tags, which its groups and AM runs repeat."""
    if scan_id not in _SCANS:
        tags = client.get_run(scan_id).data.tags
        _SCANS[scan_id] = {k: tags[k] for k in INHERITED if k in tags}
    return _SCANS[scan_id]


def group_parent(client: MlflowClient, experiment_id: str, scan_id: str, generator: str, epoch: int) -> str:
    """Run id of the scan's group run of (generator, checkpoint), created FINISHED on first use.

    Looked up in the store first, so Ray workers of one scan share the driver's groups. Two processes
    creating the same group at once keep the older of the two (at worst a second group row in the
    UI; no AM run is ever lost, its `spikemax.scan` tag still names the scan).
    """
    name = group_name(generator, epoch)
    key = (scan_id, name)
    if key in _GROUPS:
        return _GROUPS[key]
    flt = f"tags.`{SCAN_TAG}` = '{scan_id}' and tags.`{GROUP_TAG}` = '{name}'"
    found = client.search_runs([experiment_id], flt, max_results=10, order_by=["attributes.start_time ASC"])
    if not found:
        tags = {
            **_inherited(client, scan_id),
            PARENT_TAG: scan_id,
            SCAN_TAG: scan_id,
            GROUP_TAG: name,
            "spikemax.generator": generator,
        }
        # FINISHED at once: a group holds runs and has nothing of its own to fail.
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        client.set_terminated(run_id, "FINISHED")
        found = client.search_runs([experiment_id], flt, max_results=10, order_by=["attributes.start_time ASC"])
    _GROUPS[key] = found[0].info.run_id
    return _GROUPS[key]


def am_run_tags(client: MlflowClient, experiment_id: str, scan_id: str, generator: str, epoch: int) -> dict[str, str]:
    """Tags of an AM run of scan `scan_id`: nested under its (generator, checkpoint) group, with the
    scan's commit and params hash. Only the scan (the maximize invocation) carries `spikemax.stage`."""
    return {
        **_inherited(client, scan_id),
        PARENT_TAG: group_parent(client, experiment_id, scan_id, generator, epoch),
        SCAN_TAG: scan_id,
        "spikemax.generator": generator,
    }


def is_scan(run: Any) -> bool:
    """Whether an AM-experiment run is a maximize invocation (not a group, not an AM run)."""
    tags = run.data.tags
    return tags.get(STAGE_TAG) == "maximize" and SCAN_TAG not in tags


def scan_filter(scan_id: str) -> str:
    """MLflow search filter of every AM run of one maximize invocation (at any nesting depth)."""
    return f"tags.`{SCAN_TAG}` = '{scan_id}' and tags.`{RUN_KEY_TAG}` LIKE '%'"


# ---- comparison views ---------------------------------------------------------------------------
# MLflow 3's runs page restores a whole view (filter, sort, columns) from an experiment tag
# `mlflow.sharedViewState.<key>` named by `?viewStateShareKey=<key>` in the URL: the UI's own
# "Share" button writes the same tag. Plain JSON is accepted as its value.

SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
DEFAULT_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s address when the store is a file, not a server
UI_ENV = "SPIKEMAX_MLFLOW_UI"  # where the UI of a sqlite store is served, if not the default


@dataclass(frozen=True)
class View:
    """A saved runs-table view of one experiment: filter, sort and the columns shown."""

    key: str
    title: str
    experiment: str
    filter: str
    order_by: str  # "metrics.am_gain", "params.progress", "attributes.start_time"
    ascending: bool
    columns: tuple[str, ...]  # "params.method", "metrics.am_gain", "tags.spikemax.concept"

    def state(self) -> dict[str, Any]:
        """The UI's view state (search facets + the columns chosen)."""
        return {
            "searchFilter": self.filter,
            "orderByKey": _sort_key(self.order_by),
            "orderByAsc": self.ascending,
            "startTime": "ALL",
            "lifecycleFilter": "Active",
            "modelVersionFilter": "All Runs",
            "datasetsFilter": [],
            "selectedColumns": [_column_key(c) for c in self.columns],
        }


def _split(column: str) -> tuple[str, str]:
    kind, _, name = column.partition(".")
    if kind not in ("params", "metrics", "tags", "attributes") or not name:
        raise ValueError(f"column {column!r}: want params.NAME, metrics.NAME, tags.NAME or attributes.NAME")
    return kind, name


def _column_key(column: str) -> str:
    """The UI's column id: kind.`name` (the runs table's canonical key)."""
    kind, name = _split(column)
    return f"{kind}.`{name}`"


def _sort_key(column: str) -> str:
    """The UI's sort key: kind.name, the name back-quoted where it has dots, spaces or brackets."""
    kind, name = _split(column)
    return f"{kind}.`{name}`" if any(c in name for c in ' ."()') else f"{kind}.{name}"


# The columns that matter when comparing AM runs.
AM_COLUMNS = (
    "params.generator",
    "params.method",
    "params.target",
    "params.checkpoint",
    "metrics.best_activation",
    "metrics.am_gain",
    "metrics.queries_to_95",
    "tags.spikemax.concept",
)


def am_views(last_epoch: int, generator: str, target: str) -> list[View]:
    """The AM experiment's comparison views: the trained checkpoint by AM gain and by speed, and one
    neuron (`generator`, `target`) across checkpoints."""
    last = f"params.epoch = '{last_epoch}'"
    return [
        View(
            "spikemax-trained-by-gain",
            f"Trained checkpoint (e{last_epoch}): every AM run, highest AM gain first",
            AM_EXPERIMENT,
            last,
            "metrics.am_gain",
            False,
            AM_COLUMNS,
        ),
        View(
            "spikemax-trained-by-speed",
            f"Trained checkpoint (e{last_epoch}): fewest queries to 95 % of the best first",
            AM_EXPERIMENT,
            last,
            "metrics.queries_to_95",
            True,
            AM_COLUMNS,
        ),
        View(
            "spikemax-one-neuron",
            f"One neuron ({generator}, {target}) across checkpoints, in training order",
            AM_EXPERIMENT,
            f"params.generator = '{generator}' and params.target = '{target}'",
            "params.progress",  # fractional epochs: sorts as text, right while training < 10 epochs
            True,
            ("params.progress", *AM_COLUMNS),
        ),
    ]


def analysis_view(metrics: Sequence[str]) -> View:
    """The analysis experiment's view: every analysis run, newest first, its claim numbers."""
    return View(
        "spikemax-claims",
        "The paper's three claims, one row per analysis run (newest first)",
        ANALYSIS_EXPERIMENT,
        "",
        "attributes.start_time",
        False,
        (*(f"metrics.{m}" for m in metrics), f"tags.{PARAMS_HASH_TAG}", f"tags.{GIT_COMMIT_TAG}"),
    )


def ui_url(uri: str) -> str:
    """The MLflow UI's address for tracking URI `uri`: the server itself when it is one, else
    `$SPIKEMAX_MLFLOW_UI` or `mlflow ui`'s default (serve the store there: `mlflow ui --backend-store-uri URI`)."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return os.environ.get(UI_ENV, DEFAULT_UI).rstrip("/")


def view_url(uri: str, experiment_id: str, key: str) -> str:
    """Link that opens saved view `key` of an experiment in the UI serving tracking URI `uri`."""
    return f"{ui_url(uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={quote(key)}"


def save_views(root: str | Path, views: Sequence[View]) -> list[dict[str, str]]:
    """Store each view in its experiment (replacing an older one of that key) and return the links
    the report and the docs show: [{key, title, experiment, url}]."""
    import mlflow

    uri = configure(root)
    client = mlflow.MlflowClient(uri)
    links = []
    for v in views:
        eid = experiment_id(v.experiment, root)
        client.set_experiment_tag(eid, SHARED_VIEW_PREFIX + v.key, json.dumps(v.state()))
        links.append({"key": v.key, "title": v.title, "experiment": v.experiment, "url": view_url(uri, eid, v.key)})
    return links


def concept_tags(tag: str, concept: Any, classes: Sequence[str]) -> list:
    """A class index as a tag holding the class's name (none when the index is missing)."""
    from mlflow.entities import RunTag

    if concept is None or not 0 <= int(concept) < len(classes):
        return []
    return [RunTag(tag, str(classes[int(concept)]))]
