"""The maximize stage's MLflow run lifecycle: the parent run, one nested run per AM run (open,
finish, fail), finished runs found for a resume, runs left RUNNING by a dead process failed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spikemax import tracking
from spikemax.am.spec import RunSpec
from spikemax.querylog import QueryLogger

if TYPE_CHECKING:
    from spikemax.params import MaximizeParams

STAGE_TAG = "spikemax.stage"
FAILURE_TAG = "spikemax.failure"
INTERRUPTED = "interrupted (process killed before the run ended)"


def run_tags(
    spec: RunSpec | None = None, parent_id: str | None = None, warm_from: str = "", failure: str | None = None
) -> dict[str, str]:
    """Every MLflow tag the stage sets, in one place: a parent run's (no spec), a nested run's, or a
    failure reason (only `failure`)."""
    if failure is not None:
        return {FAILURE_TAG: failure[:4000]}
    if spec is None:
        return {STAGE_TAG: "maximize"}
    # Nesting (under the scan's generator/checkpoint group), the scan id, commit and params hash
    # come from tracking.am_run_tags when the run is opened.
    return {
        tracking.RUN_KEY_TAG: spec.key,
        "spikemax.layer": spec.target.layer,
        "spikemax.warm_start_from": warm_from or "none",
    }


def metric_batch(values: dict[str, Any]) -> list:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, 0) for k, v in values.items() if v is not None]


def param_batch(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in values.items()]


@dataclass
class OpenRun:
    """A nested run in flight."""

    spec: RunSpec
    run_id: str
    logger: QueryLogger
    warm_from: str


class RunTracker:
    """The AM experiment of one project's store, as the maximize stage writes it."""

    def __init__(self, root: Path) -> None:
        import mlflow

        tracking.enable_fast_sqlite()
        self.uri = tracking.configure(root)
        self.client = mlflow.MlflowClient(self.uri)
        self.eid = tracking.experiment_id(tracking.AM_EXPERIMENT, root)

    def _fail(self, run_id: str, reason: str) -> None:
        for k, v in run_tags(failure=reason).items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, "FAILED")

    # -- resume -------------------------------------------------------------------------------
    def keyed_runs(self) -> list[Any]:
        """Every run of the AM experiment that carries a run key."""
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.eid], filter_string=f"tags.`{tracking.RUN_KEY_TAG}` LIKE '%'", max_results=5000, page_token=token
            )
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def fail_stale(self) -> int:
        """Mark FAILED every maximize run still RUNNING, whatever its key or plan: under the project
        lock no other invocation is alive, so its process died. Returns how many."""
        stale = [r.info.run_id for r in self.keyed_runs() if r.info.status == "RUNNING"]
        parents = self.client.search_runs(
            [self.eid], filter_string=f"tags.`{STAGE_TAG}` = 'maximize' and status = 'RUNNING'", max_results=1000
        )
        stale += [r.info.run_id for r in parents]
        for run_id in stale:
            self._fail(run_id, INTERRUPTED)
        return len(stale)

    def finished(self, wanted: dict[str, RunSpec], read_row: Any) -> dict[str, dict]:
        """Runs finished earlier: a FINISHED run with the key tag whose local summary (`read_row(spec)`)
        names it."""
        done: dict[str, dict] = {}
        for run in self.keyed_runs():
            key = run.data.tags.get(tracking.RUN_KEY_TAG)
            if key in wanted and run.info.status == "FINISHED":
                row = read_row(wanted[key])
                if row is not None and row.get("run_id") == run.info.run_id:
                    done[key] = row
        return done

    def fail_leftover(self, key: str) -> None:
        """Fail the runs of `key` an earlier attempt left RUNNING (a Ray retry of its group)."""
        for run in self.client.search_runs(
            [self.eid], filter_string=f"tags.`{tracking.RUN_KEY_TAG}` = '{key}' and status = 'RUNNING'", max_results=100
        ):
            self._fail(run.info.run_id, "interrupted (worker lost; group retried)")

    # -- parent -------------------------------------------------------------------------------
    def open_parent(self, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        """Open the scan's parent run (`tags`: tracking.run_tags, the commit and params hash) with its params."""
        run = self.client.create_run(
            self.eid, run_name=f"maximize-{time.strftime('%Y%m%d-%H%M%S')}", tags={**run_tags(), **(tags or {})}
        )
        self.client.log_batch(run.info.run_id, params=param_batch(params))
        return str(run.info.run_id)

    def close_parent(self, parent_id: str, status: str, metrics: dict[str, Any]) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        self.client.log_batch(parent_id, metrics=metric_batch(numbers))
        self.client.set_terminated(parent_id, status)

    def fail_open_children(self, parent_id: str, reason: str) -> list[str]:
        """Mark FAILED every run of this parent still RUNNING (its process is gone); their failures."""
        out = []
        for run in self.client.search_runs(
            [self.eid],
            filter_string=f"{tracking.scan_filter(parent_id)} and status = 'RUNNING'",
            max_results=10000,
        ):
            self._fail(run.info.run_id, reason)
            out.append(f"{run.data.tags.get(tracking.RUN_KEY_TAG, run.info.run_id)}: {reason}")
        return out

    # -- nested runs --------------------------------------------------------------------------
    def open_run(
        self, spec: RunSpec, parent_id: str, warm_from: str, m: MaximizeParams, grid: Any, snn_ckpt: Path, run_dir: Path
    ) -> OpenRun:
        """Open the nested run of `spec` (its params logged) with its query logger in `run_dir`."""
        tags = {
            **run_tags(spec, parent_id, warm_from),
            **tracking.am_run_tags(self.client, self.eid, str(parent_id), spec.generator, spec.epoch),
        }
        run = self.client.create_run(self.eid, run_name=spec.key, tags=tags)
        run_id = run.info.run_id
        self.client.log_batch(
            run_id,
            params=param_batch(
                {
                    "method": spec.method,
                    "rank": spec.rank if spec.rank is not None else "none",
                    "grid_n": grid.n,
                    "grid_d": grid.d,
                    "budget": spec.budget,
                    "batch": m.batch,
                    "epoch": spec.epoch,
                    "step": spec.step,
                    "progress": spec.progress,
                    "target": spec.target.name,
                    "generator": spec.generator,
                    "seed": spec.seed,
                    "layer": spec.target.layer,
                    "unit": spec.target.unit,
                    "noise": json.dumps(m.noise.model_dump(), sort_keys=True),
                    "target_value": m.target_value,
                    "warm_start": bool(warm_from),
                    "checkpoint": snn_ckpt.name,
                    "options": spec.options_json,
                    "resolved_method": spec.resolved,
                    "prior": spec.prior_rank is not None,
                    "tuned": spec.tuned_study,  # the tune study whose adopted settings ran
                    "method_source": spec.method_source,  # study | default | fallback | configured
                    **(
                        {"population": spec.population, "population_rule": m.population_rule} if spec.population else {}
                    ),
                }
            ),
        )
        logger = QueryLogger(self.client, run_id, run_dir, artifact_uri=run.info.artifact_uri)
        return OpenRun(spec, run_id, logger, warm_from)

    def log_results(
        self, op: OpenRun, metrics: dict[str, Any], artifacts: list[Path], classes: list[str] | None = None
    ) -> None:
        """Log a run's summary metrics and artifacts (it stays RUNNING until `mark_finished`)."""
        metrics = dict(metrics)
        concept = metrics.pop("concept", None)  # a class: a tag with its name, not a float metric
        self.client.log_batch(
            op.run_id,
            metrics=metric_batch(metrics),
            tags=tracking.concept_tags("spikemax.concept", concept, classes or []),
        )
        for path in artifacts:
            if path.is_file():
                op.logger.log_artifact(path)

    def mark_finished(self, op: OpenRun) -> None:
        """FINISHED: the run counts as done (a kill before this leaves it to be redone)."""
        self.client.set_terminated(op.run_id, "FINISHED")

    def fail_run(self, op: OpenRun, err: BaseException) -> str:
        """End a nested run FAILED with its error as the failure tag; returns the failure line."""
        msg = f"{type(err).__name__}: {err}"[:4000]
        if op.logger.writer is not None:
            op.logger.writer.abandon(msg)  # the queued metrics of a failed run need not reach the server
        try:
            self._fail(op.run_id, msg)
        except Exception:
            pass
        return f"{op.spec.key}: {msg}"
