"""The activation-maximization loop (ask -> decode -> respond -> tell, logged) and the `maximize` stage."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import pickle
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spikemax import SpikemaxError

if TYPE_CHECKING:
    from spikemax.params import Params, Paths
    from spikemax.tracking import QueryLogger

Responder = Callable[[torch.Tensor], np.ndarray]


@dataclass
class AMResult:
    """Outcome of one AM run: the best stimulus and every query in order."""

    best_indices: np.ndarray | None
    best_response: float
    best_image: torch.Tensor | None
    indices: np.ndarray  # (n_queries, d) grid indices in query order
    responses: np.ndarray  # (n_queries,), NaN = failed query
    batches: np.ndarray  # (n_queries,) batch number of each query
    stopped_early: bool = False
    stop_reason: str = ""
    wall_s: float = 0.0

    @property
    def n_queries(self) -> int:
        return len(self.responses)

    @property
    def history(self) -> np.ndarray:
        """Every response in query order (the optimizers' `history` convention)."""
        return self.responses

    def queries_to(self, fraction: float = 0.95) -> int:
        """Queries (1-based) until the running best first reaches `fraction` of the final best."""
        return queries_to_fraction(self.responses, fraction)


def queries_to_fraction(responses: np.ndarray, fraction: float = 0.95) -> int:
    """Queries (1-based) until the running best reaches `fraction` of the best; 0 if none succeeded."""
    y = np.asarray(responses, dtype=np.float64)
    ok = ~np.isnan(y)
    if not ok.any():
        return 0
    best = float(y[ok].max())
    # Works for negative bests too: the threshold lies `1 - fraction` of |best| below it.
    threshold = best - (1.0 - fraction) * abs(best)
    return int(np.argmax(np.where(ok, y, -np.inf) >= threshold)) + 1


@dataclass
class _Track:
    """Per-optimizer state inside a lock-step group."""

    optimizer: Any
    logger: QueryLogger | None
    target_value: float | None
    indices: list = field(default_factory=list)
    responses: list = field(default_factory=list)
    batches: list = field(default_factory=list)
    best: float = -math.inf
    best_indices: np.ndarray | None = None
    best_image: torch.Tensor | None = None
    n: int = 0
    stopped: str = ""
    t0: float = field(default_factory=time.perf_counter)
    wall: float = 0.0


def _respond(responder: Responder, images: torch.Tensor, max_images: int) -> np.ndarray:
    """Responses to many images in chunks (bounded memory); (K,) or (K, m)."""
    outs = [
        np.asarray(responder(images[i : i + max_images]), dtype=np.float64) for i in range(0, len(images), max_images)
    ]
    return np.concatenate(outs, axis=0)


def _decode(grid: Any, indices: np.ndarray, max_images: int) -> torch.Tensor:
    with torch.no_grad():
        parts = [
            grid.decode(torch.as_tensor(indices[i : i + max_images], dtype=torch.long))
            for i in range(0, len(indices), max_images)
        ]
    return torch.cat(parts, dim=0)


def run_am_group(
    optimizers: Sequence[Any],
    grid: Any,
    responder: Responder,
    budget: int,
    batch: int,
    loggers: Sequence[QueryLogger | None] | None = None,
    target_value: float | None = None,
    on_batch: Callable[[int], None] | None = None,
    max_images: int = 512,
) -> list[AMResult]:
    """Run several AM loops in lock step, sharing one decode and one responder call per step.

    `responder(images)` returns (K, m) with one column per optimizer (m = len(optimizers)); optimizer
    j is told column j of its own rows only. Each loop spends exactly `budget` queries unless its
    best reaches `target_value` (then it stops, and its logger records why). Every batch is logged
    before the next one is asked, so an exception or kill loses nothing already measured.
    """
    from spikemax.tracking import log_batches

    if budget <= 0 or batch <= 0:
        raise ValueError(f"budget and batch must be positive (got {budget}, {batch})")
    loggers = list(loggers) if loggers is not None else [None] * len(optimizers)
    tracks = [_Track(opt, lg, target_value) for opt, lg in zip(optimizers, loggers)]
    m = len(tracks)
    step = 0
    while True:
        active = [j for j, t in enumerate(tracks) if t.n < budget and not t.stopped]
        if not active:
            break
        asked = []
        for j in active:
            k = min(batch, budget - tracks[j].n)
            asked.append(np.asarray(tracks[j].optimizer.ask(k), dtype=np.int64).reshape(k, -1))
        all_idx = np.concatenate(asked, axis=0)
        images = _decode(grid, all_idx, max_images)
        y_all = _respond(responder, images, max_images)
        if y_all.ndim == 1:
            y_all = y_all[:, None]
        row = 0
        ys, rows = [], []
        for j, idx in zip(active, asked):
            col = j if y_all.shape[1] == m else 0
            ys.append(y_all[row : row + len(idx), col].copy())
            rows.append(row)
            row += len(idx)
        # Every run's batch is in the store and its table before any optimizer sees it.
        logged = [i for i, j in enumerate(active) if tracks[j].logger is not None]
        if logged:
            log_batches([tracks[active[i]].logger for i in logged], [asked[i] for i in logged], [ys[i] for i in logged])
        for j, idx, y, row in zip(active, asked, ys, rows):
            t = tracks[j]
            k = len(idx)
            imgs = images[row : row + k]
            t.optimizer.tell(idx, y)
            if not np.all(np.isnan(y)):
                b = int(np.nanargmax(y))
                if y[b] > t.best:
                    t.best, t.best_indices, t.best_image = float(y[b]), idx[b].copy(), imgs[b].clone()
            t.indices.append(idx.astype(np.int32))
            t.responses.append(y)
            t.batches.append(np.full(k, step, dtype=np.int32))
            t.n += k
            t.wall = time.perf_counter() - t.t0
            if t.target_value is not None and t.best >= t.target_value and t.n < budget:
                # Early stop is a choice the params made: record it, keep everything measured.
                t.stopped = f"target_value {t.target_value:g} reached after {t.n} queries"
                if t.logger is not None:
                    t.logger.log_stop(t.stopped)
            if on_batch is not None:
                on_batch(k)
        step += 1
    results = []
    for t in tracks:
        d = t.indices[0].shape[1] if t.indices else 0
        results.append(
            AMResult(
                best_indices=t.best_indices,
                best_response=t.best if t.best_indices is not None else float("nan"),
                best_image=t.best_image,
                indices=np.concatenate(t.indices) if t.indices else np.zeros((0, d), np.int32),
                responses=np.concatenate(t.responses) if t.responses else np.zeros(0),
                batches=np.concatenate(t.batches) if t.batches else np.zeros(0, np.int32),
                stopped_early=bool(t.stopped),
                stop_reason=t.stopped,
                wall_s=t.wall,
            )
        )
    return results


def run_am(
    optimizer: Any,
    grid: Any,
    responder: Responder,
    budget: int,
    batch: int,
    logger: QueryLogger | None = None,
    target_value: float | None = None,
    on_batch: Callable[[int], None] | None = None,
    max_images: int = 512,
) -> AMResult:
    """One AM loop: optimizer.ask -> grid.decode -> responder -> optimizer.tell, to `budget` queries."""

    def single(images: torch.Tensor) -> np.ndarray:
        y = np.asarray(responder(images), dtype=np.float64)
        return y.reshape(len(images), -1)[:, :1]

    return run_am_group([optimizer], grid, single, budget, batch, [logger], target_value, on_batch, max_images)[0]


# ---- the `maximize` stage -------------------------------------------------------------------

SUMMARY_COLUMNS = [
    "run_key",
    "run_id",
    "epoch",
    "generator",
    "target",
    "layer",
    "unit",
    "method",
    "seed",
    "budget",
    "n_queries",
    "best_activation",
    "queries_to_95",
    "dataset_max",
    "am_gain",
    "queries_saved",
    "run_dir",
]
OUTPUT_LAYER = "out"  # the SNN's class layer: its unit K is target `class:K`


@dataclass(frozen=True)
class Target:
    """One neuron: canonical name (`class:K` or `LAYER:UNIT`), its spiking layer and unit index."""

    name: str
    layer: str
    unit: int


@dataclass(frozen=True)
class Combo:
    """One nested AM run: (checkpoint epoch, generator, target, method, seed) under one configuration."""

    epoch: int
    generator: str
    target: Target
    method: str
    seed: int
    key: str

    @property
    def run_dir(self) -> str:
        return f"runs/{self.key}"


@dataclass
class Plan:
    """Everything the stage will run, validated before any run starts."""

    epochs: list[int]
    snn_ckpts: dict[int, Path]
    gen_ckpts: dict[str, Path]
    targets: list[Target]
    combos: list[Combo]


def _stage_error(msg: str) -> SpikemaxError:
    from spikemax.params import ParamsError

    return ParamsError(f"maximize: {msg}")


def _digest(path: Path, _cache: dict[Path, str] = {}) -> str:  # noqa: B006 - per-process memo
    """Content hash of a checkpoint: a retrained model must not reuse old results."""
    if path not in _cache:
        _cache[path] = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    return _cache[path]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-")


def _to_target(name: str, layers: dict[str, int]) -> Target:
    """Validate a target string with neurons.parse_target and give its canonical form."""
    from spikemax.neurons import parse_target

    try:
        parsed = parse_target(name, layers)
    except SpikemaxError as err:
        raise _stage_error(f"target {name!r}: {err}") from None
    except (ValueError, KeyError, IndexError) as err:
        raise _stage_error(f"target {name!r}: {err}") from None
    layer = getattr(parsed, "layer", None)
    unit = getattr(parsed, "unit", None)
    if layer is None and isinstance(parsed, tuple) and len(parsed) == 2:
        layer, unit = parsed
    if layer is None:
        head, _, tail = name.partition(":")
        layer, unit = (OUTPUT_LAYER if head == "class" else head), int(tail)
    unit = int(unit)
    canon = f"class:{unit}" if layer == OUTPUT_LAYER else f"{layer}:{unit}"
    return Target(canon, str(layer), unit)


def resolve_targets(m: Any, layers: dict[str, int]) -> list[Target]:
    """Explicit targets, `class:*`, then `units_per_layer` units sampled per spiking layer (deduplicated)."""
    names: list[str] = []
    for t in m.targets:
        if t.strip() == "class:*":
            names += [f"class:{k}" for k in range(layers[OUTPUT_LAYER])]
        else:
            names.append(t.strip())
    out = [_to_target(n, layers) for n in names]
    if m.units_per_layer:
        rng = np.random.default_rng(m.target_seed)
        for layer, units in layers.items():
            picked = np.sort(rng.choice(units, size=min(m.units_per_layer, units), replace=False))
            out += [_to_target(f"{layer}:{int(u)}", layers) for u in picked]
    seen: set[tuple[str, int]] = set()
    unique = []
    for t in out:
        if (t.layer, t.unit) not in seen:
            seen.add((t.layer, t.unit))
            unique.append(t)
    if not unique:
        raise _stage_error("no targets: give `targets` or `units_per_layer`")
    return unique


def _optimizer_options(m: Any, method: str, ordered: bool | None = None) -> dict[str, Any]:
    """make_optimizer options of `method` from the maximize params, TT's ordinal "auto" resolved
    for a grid that is `ordered` or not (None keeps "auto": the config hash, whose key names the
    generator, so it still tells apart "auto" from an explicit value)."""
    if method == "tt":
        from spikemax.optim import resolve_ordinal

        opts = m.tt.model_dump()
        if ordered is not None:
            opts["ordinal"] = resolve_ordinal(opts["ordinal"], ordered)
        return opts
    if method == "ngopt":
        return {"budget": m.budget}
    return {}


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """Hash of the code a run's responses and queries depend on (readout, networks, optimizers)."""
    import spikemax

    pkg = Path(spikemax.__file__).parent
    files = [
        pkg / "neurons.py",
        pkg / "snn.py",
        *sorted((pkg / "generators").glob("*.py")),
        *sorted((pkg / "optim").glob("*.py")),
    ]
    h = hashlib.sha1()
    for f in files:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def _config_hash(m: Any, method: str, snn_ckpt: Path, gen_ckpt: Path) -> str:
    """Hash of everything that changes a run's result besides its key fields (so DVC's rerun after
    a code, checkpoint or params change never reuses a stale result, while a resume does)."""
    cfg = {
        "budget": m.budget,
        "batch": m.batch,
        "noise": m.noise,
        "target_value": m.target_value,
        "options": _optimizer_options(m, method),
        "warm": bool(m.warm_start and method == "tt"),
        "snn": _digest(snn_ckpt),
        "gen": _digest(gen_ckpt),
        "code": _code_digest(),
    }
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def plan(params: Params, paths: Paths) -> Plan:
    """Validate the maximize params against what exists on disk; one-line error on anything wrong."""
    from spikemax import snn
    from spikemax.generators import checkpoint_path
    from spikemax.optim import make_optimizer

    m = params.maximize
    if m.budget <= 0 or m.batch <= 0:
        raise _stage_error(f"budget and batch must be >= 1 (got {m.budget}, {m.batch})")
    if not (paths.prepared / "meta.json").is_file():
        raise _stage_error(f"no prepared data under {paths.prepared}: run `spikemax prepare` first")
    available = snn.checkpoints(paths)
    if not available:
        raise _stage_error(f"no SNN checkpoints under {paths.snn_dir}: run `spikemax train-snn` first")
    have = sorted(available)
    if m.epochs == "all":
        epochs = have
    else:
        epochs = []
        for e in m.epochs:
            ee = have[e] if e < 0 and -e <= len(have) else e
            if ee not in available:
                raise _stage_error(f"epochs: no SNN checkpoint for epoch {e} (have {', '.join(map(str, have))})")
            if ee not in epochs:
                epochs.append(ee)
        epochs.sort()
    gen_ckpts = {}
    for g in m.generators:
        path = checkpoint_path(g, paths)
        if not path.is_file():
            raise _stage_error(f"generator {g!r} has no checkpoint at {path}: run `spikemax train-generator {g}`")
        gen_ckpts[g] = path
    for method in m.methods:
        try:
            make_optimizer(method, 2, 4, seed=0, **_optimizer_options(m, method, ordered=False))
        except SpikemaxError as err:
            raise _stage_error(f"method {method!r}: {err}") from None
        except (ValueError, TypeError, ImportError) as err:
            raise _stage_error(f"method {method!r}: {err}") from None
    net = snn.load_snn(available[epochs[0]])
    layers = dict(net.spiking_layers())
    for e in epochs[1:]:
        if dict(snn.load_snn(available[e]).spiking_layers()) != layers:
            raise _stage_error(f"checkpoint of epoch {e} has other layers than epoch {epochs[0]}")
    targets = resolve_targets(m, layers)
    combos = []
    for e in epochs:
        for g in m.generators:
            for method in m.methods:
                h = _config_hash(m, method, available[e], gen_ckpts[g])
                for seed in m.seeds:
                    for t in targets:
                        key = _slug(f"e{e:03d}_{g}_{t.name}_{method}_s{seed}_{h}")
                        combos.append(Combo(e, g, t, method, seed, key))
    return Plan(epochs, {e: available[e] for e in epochs}, gen_ckpts, targets, combos)


def _search_runs(client: Any, eid: str) -> list[Any]:
    """Every run of the AM experiment that carries a run key."""
    from spikemax.tracking import RUN_KEY_TAG

    runs, token = [], None
    while True:
        page = client.search_runs(
            [eid], filter_string=f"tags.`{RUN_KEY_TAG}` LIKE '%'", max_results=5000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _read_summary(am_dir: Path, combo: Combo) -> dict | None:
    path = am_dir / combo.run_dir / "summary.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _finished(client: Any, eid: str, plan_: Plan, am_dir: Path) -> dict[str, dict]:
    """Combinations finished earlier (FINISHED run with the key tag and its local outputs); marks
    runs left RUNNING by a killed invocation as FAILED."""
    from spikemax.tracking import RUN_KEY_TAG

    wanted = {c.key: c for c in plan_.combos}
    done: dict[str, dict] = {}
    stale = []
    for run in _search_runs(client, eid):
        key = run.data.tags.get(RUN_KEY_TAG)
        if key not in wanted:
            continue
        if run.info.status == "FINISHED":
            row = _read_summary(am_dir, wanted[key])
            if row is not None and row.get("run_id") == run.info.run_id:
                done[key] = row
        elif run.info.status == "RUNNING":
            stale.append(run.info.run_id)
    parents = client.search_runs(
        [eid], filter_string="tags.`spikemax.stage` = 'maximize' and status = 'RUNNING'", max_results=1000
    )
    stale += [r.info.run_id for r in parents]
    for run_id in stale:
        # Only this stage writes these runs and it is not running twice: they were interrupted.
        client.set_tag(run_id, "spikemax.failure", "interrupted (process killed before the run ended)")
        client.set_terminated(run_id, "FAILED")
    return done


def _metric_batch(values: dict[str, float]) -> list:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, 0) for k, v in values.items() if v is not None]


def _param_batch(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in values.items()]


@dataclass
class _Open:
    """A nested run in flight."""

    combo: Combo
    run_id: str
    logger: Any
    warm_from: str


class _Stage:
    """State of one `maximize` invocation."""

    def __init__(self, params: Params, paths: Paths, plan_: Plan) -> None:
        import mlflow

        from spikemax import tracking
        from spikemax.data import Prepared

        self.m = params.maximize
        self.paths = paths
        self.plan = plan_
        self.am_dir = paths.results / "am"
        self.am_dir.mkdir(parents=True, exist_ok=True)
        self.prepared = Prepared.load(paths.prepared)
        tracking.enable_fast_sqlite()
        self.uri = tracking.configure(paths.root)
        self.client = mlflow.MlflowClient(self.uri)
        self.eid = tracking.experiment_id(tracking.AM_EXPERIMENT, paths.root)
        self.done = _finished(self.client, self.eid, plan_, self.am_dir)
        self.failed: list[str] = []
        self.parent_id: str | None = None
        self.logging_s = 0.0  # time inside the query loggers (the cost of logging every query)

    # -- runs ---------------------------------------------------------------------------------
    def open_run(self, combo: Combo, grid: Any, snn_ckpt: Path) -> _Open:
        from spikemax import tracking

        m = self.m
        warm_from = ""
        if combo.method == "tt" and m.warm_start:
            prev = self._prev_combo(combo)
            if prev is not None and (self.am_dir / prev.run_dir / "tt_state.pkl").is_file():
                warm_from = prev.key
        tags = {
            "mlflow.parentRunId": self.parent_id,
            tracking.RUN_KEY_TAG: combo.key,
            "spikemax.layer": combo.target.layer,
            "spikemax.warm_start_from": warm_from or "none",
        }
        run = self.client.create_run(self.eid, run_name=combo.key, tags=tags)
        run_id = run.info.run_id
        self.client.log_batch(
            run_id,
            params=_param_batch(
                {
                    "method": combo.method,
                    "rank": m.tt.rank if combo.method == "tt" else "none",
                    "grid_n": grid.n,
                    "grid_d": grid.d,
                    "budget": m.budget,
                    "batch": m.batch,
                    "epoch": combo.epoch,
                    "target": combo.target.name,
                    "generator": combo.generator,
                    "seed": combo.seed,
                    "layer": combo.target.layer,
                    "unit": combo.target.unit,
                    "noise": m.noise,
                    "target_value": m.target_value,
                    "warm_start": bool(warm_from),
                    "checkpoint": snn_ckpt.name,
                    "options": json.dumps(_optimizer_options(m, combo.method, grid.ordered)),
                }
            ),
        )
        run_dir = self.am_dir / combo.run_dir
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # leftovers of an unfinished attempt
        logger = tracking.QueryLogger(self.client, run_id, run_dir, artifact_uri=run.info.artifact_uri)
        return _Open(combo, run_id, logger, warm_from)

    def _prev_combo(self, combo: Combo) -> Combo | None:
        epochs = self.plan.epochs
        i = epochs.index(combo.epoch)
        if i == 0:
            return None
        want = (epochs[i - 1], combo.generator, combo.target, combo.method, combo.seed)
        for c in self.plan.combos:
            if (c.epoch, c.generator, c.target, c.method, c.seed) == want:
                return c
        return None

    def _chain_first(self, combo: Combo) -> Combo | None:
        for c in self.plan.combos:
            if (c.epoch, c.generator, c.target, c.method, c.seed) == (
                self.plan.epochs[0],
                combo.generator,
                combo.target,
                combo.method,
                combo.seed,
            ):
                return c
        return None

    def make_optimizer(self, op: _Open, grid: Any) -> Any:
        from spikemax.optim import make_optimizer

        opts = _optimizer_options(self.m, op.combo.method, grid.ordered)
        if op.warm_from:
            with open(self.am_dir / "runs" / op.warm_from / "tt_state.pkl", "rb") as f:
                opts["init"] = pickle.load(f)
        return make_optimizer(op.combo.method, grid.d, grid.n, seed=op.combo.seed, **opts)

    def finish_run(
        self, op: _Open, res: AMResult, optimizer: Any, dataset_max: float, extras: dict[str, float]
    ) -> dict:
        from spikemax import selectivity as S
        from spikemax import tracking

        c = op.combo
        run_dir = self.am_dir / c.run_dir
        op.logger.close()
        self.logging_s += op.logger.seconds
        q95 = res.queries_to(0.95)
        saved = 0
        if op.warm_from:
            first = self._chain_first(c)
            first_row = _read_summary(self.am_dir, first) if first is not None else None
            if first_row is not None:
                # Estimate: the cold start's queries to 95 % at the chain's first epoch minus this run's.
                saved = int(first_row["queries_to_95"]) - q95
        image = res.best_image if res.best_image is not None else None
        np.savez(
            run_dir / "best.npz",
            image=(image.numpy() if image is not None else np.full(self.prepared.shape, np.nan)).astype(np.float32),
            indices=(res.best_indices if res.best_indices is not None else np.full(1, -1)).astype(np.int64),
        )
        if image is not None:
            pixels = self.prepared.denormalize(image[None])[0].clamp(0, 1)
            tracking.save_image_png(pixels, run_dir / "best_stimulus.png")
        tracking.save_convergence_png(
            res.responses, run_dir / "convergence.png", title=f"{c.target.name} e{c.epoch} {c.generator} {c.method}"
        )
        if hasattr(optimizer, "state_dict") and c.method == "tt":
            with open(run_dir / "tt_state.pkl", "wb") as f:
                pickle.dump(optimizer.state_dict(), f)
        gain = S.am_gain(res.best_response, dataset_max)
        summary = {
            "best_activation": res.best_response,
            "queries_to_95": q95,
            "dataset_max": dataset_max,
            "am_gain": gain,
            "queries_saved": saved,
            "n_queries": res.n_queries,
            "wall_s": res.wall_s,
            **extras,
        }
        # best_activation is already the last point of its per-query curve (MLflow shows the latest).
        self.client.log_batch(
            op.run_id, metrics=_metric_batch({k: v for k, v in summary.items() if k != "best_activation"})
        )
        for name in ("best_stimulus.png", "convergence.png"):
            if (run_dir / name).is_file():
                op.logger.log_artifact(run_dir / name)
        row = {
            "run_key": c.key,
            "run_id": op.run_id,
            "epoch": c.epoch,
            "generator": c.generator,
            "target": c.target.name,
            "layer": c.target.layer,
            "unit": c.target.unit,
            "method": c.method,
            "seed": c.seed,
            "budget": self.m.budget,
            "n_queries": res.n_queries,
            "best_activation": res.best_response,
            "queries_to_95": q95,
            "dataset_max": dataset_max,
            "am_gain": gain,
            "queries_saved": saved,
            "run_dir": c.run_dir,
            "stopped_early": res.stop_reason,
            "warm_start_from": op.warm_from,
            **extras,
        }
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(row, default=float))
        tmp.replace(run_dir / "summary.json")
        # FINISHED last: a kill before this line leaves the run to be redone, never half-counted.
        self.client.set_terminated(op.run_id, "FINISHED")
        self.done[c.key] = row
        return row

    def fail_run(self, op: _Open, err: BaseException) -> None:
        msg = f"{type(err).__name__}: {err}"[:4000]
        try:
            self.client.set_tag(op.run_id, "spikemax.failure", msg)
            self.client.set_terminated(op.run_id, "FAILED")
        except Exception:
            pass
        self.failed.append(f"{op.combo.key}: {msg}")

    # -- outputs ------------------------------------------------------------------------------
    def write_summary(self) -> Any:
        import pandas as pd

        rows = [self.done[c.key] for c in self.plan.combos if c.key in self.done]
        df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
        tmp = self.am_dir / "summary.csv.tmp"
        df.to_csv(tmp, index=False)
        tmp.replace(self.am_dir / "summary.csv")
        return df

    def write_grids(self) -> list[Path]:
        from spikemax import tracking

        out = []
        seed = self.m.seeds[0]
        targets = self.plan.targets[:40]  # a readable page; every stimulus is in its run dir
        for g in self.m.generators:
            for method in self.m.methods:
                images = []
                for t in targets:
                    for e in self.plan.epochs:
                        c = next(
                            (
                                c
                                for c in self.plan.combos
                                if (c.epoch, c.generator, c.target, c.method, c.seed) == (e, g, t, method, seed)
                            ),
                            None,
                        )
                        img = None
                        path = self.am_dir / c.run_dir / "best.npz" if c is not None else None
                        if c is not None and c.key in self.done and path.is_file():
                            with np.load(path) as z:
                                x = torch.from_numpy(z["image"])
                            if torch.isfinite(x).all():
                                img = self.prepared.denormalize(x[None])[0].clamp(0, 1).numpy()
                        images.append(img)
                path = self.am_dir / f"stimuli_{g}_{method}.png"
                tracking.save_image_grid_png(
                    images,
                    len(targets),
                    len(self.plan.epochs),
                    path,
                    row_labels=[t.name for t in targets],
                    col_labels=[f"epoch {e}" for e in self.plan.epochs],
                    title=f"best stimuli: {g}, {method}, seed {seed}",
                )
                out.append(path)
        return out

    def prune(self) -> None:
        """Drop run dirs of other params (results/am mirrors the current plan; MLflow keeps them all)."""
        import shutil

        keys = {c.key for c in self.plan.combos}
        for d in (self.am_dir / "runs").glob("*"):
            if d.is_dir() and d.name not in keys:
                shutil.rmtree(d, ignore_errors=True)

    def write_metrics(self, df: Any, wall_s: float, n_queries_run: int) -> dict:
        out: dict[str, Any] = {
            "n_runs": len(df),
            "n_planned": len(self.plan.combos),
            "n_failed": len(self.failed),
            "wall_s": round(wall_s, 2),
            "queries_run": n_queries_run,
            "queries_per_s": round(n_queries_run / wall_s, 1) if wall_s > 0 else None,
            "logging_s": round(self.logging_s, 2),
            "logging_share_pct": round(100 * self.logging_s / wall_s, 2) if wall_s > 0 else None,
        }
        if len(df):
            out["queries_saved_warm_start"] = int(df["queries_saved"].sum())
            out["methods"] = {}
            for (g, method), sub in df.groupby(["generator", "method"]):
                gain = sub["am_gain"].astype(float)
                out["methods"][f"{g}/{method}"] = {
                    "median_best_activation": float(sub["best_activation"].median()),
                    "median_am_gain": float(gain[np.isfinite(gain)].median()) if np.isfinite(gain).any() else None,
                    "frac_above_dataset": float((sub["best_activation"] > sub["dataset_max"]).mean()),
                    "median_queries_to_95": float(sub["queries_to_95"].median()),
                }
        self.paths.metrics.mkdir(parents=True, exist_ok=True)
        (self.paths.metrics / "am.json").write_text(json.dumps(out, indent=2) + "\n")
        return out


def _dataset_stats(net: Any, prepared: Any, targets: list[Target], max_images: int) -> dict[str, np.ndarray]:
    """Per target over the prepared test images: max response, CSI and lifetime sparseness."""
    from spikemax import selectivity as S
    from spikemax.neurons import firing_rates

    x, labels = prepared.tensors("test")
    names = [t.name for t in targets]
    with torch.no_grad():
        rates = np.concatenate(
            [
                np.asarray(firing_rates(net, x[i : i + max_images], names), dtype=np.float64).reshape(-1, len(names))
                for i in range(0, len(x), max_images)
            ]
        )
    means = S.class_means(rates, labels.numpy(), len(prepared.classes))
    return {"dataset_max": rates.max(axis=0), "csi": S.csi(means), "sparseness": S.lifetime_sparseness(rates)}


def _stimulus_stats(net: Any, prepared: Any, results: list[AMResult]) -> list[dict[str, float]]:
    """Concept of each best stimulus under this checkpoint (class, probability, perplexity), complexity."""
    from spikemax import selectivity as S

    have = [i for i, r in enumerate(results) if r.best_image is not None]
    out: list[dict[str, float]] = [{} for _ in results]
    if not have:
        return out
    x = torch.stack([results[i].best_image for i in have])
    probs = net.class_probs(x).detach().cpu().numpy()
    cls, prob, ppl = S.concept(probs)
    pixels = prepared.denormalize(x).clamp(0, 1).numpy()
    for j, i in enumerate(have):
        out[i] = {
            "concept": int(cls[j]),
            "concept_prob": float(prob[j]),
            "perplexity": float(ppl[j]),
            "complexity": S.png_complexity(pixels[j]),
        }
    return out


def run_stage(params: Params, paths: Paths) -> dict:
    """The `maximize` stage: every (epoch, generator, target, method, seed) run, resumable; returns metrics."""
    import zlib

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from spikemax import snn
    from spikemax.generators import load_generator
    from spikemax.neurons import make_responder

    plan_ = plan(params, paths)  # every params error surfaces here, before any run starts
    st = _Stage(params, paths, plan_)
    m = st.m
    todo = [c for c in plan_.combos if c.key not in st.done]
    t0 = time.perf_counter()
    parent = st.client.create_run(
        st.eid, run_name=f"maximize-{time.strftime('%Y%m%d-%H%M%S')}", tags={"spikemax.stage": "maximize"}
    )
    st.parent_id = parent.info.run_id
    st.client.log_batch(
        st.parent_id,
        params=_param_batch(
            {
                "epochs": ",".join(map(str, plan_.epochs)),
                "generators": ",".join(m.generators),
                "methods": ",".join(m.methods),
                "seeds": ",".join(map(str, m.seeds)),
                "n_targets": len(plan_.targets),
                "budget": m.budget,
                "batch": m.batch,
                "noise": m.noise,
                "n_planned": len(plan_.combos),
                "n_skipped_finished": len(plan_.combos) - len(todo),
            }
        ),
    )
    grids = {g: load_generator(g, p) for g, p in plan_.gen_ckpts.items()}
    n_run = 0
    status = "FINISHED"
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as progress:
            runs_task = progress.add_task("AM runs", total=len(todo))
            q_task = progress.add_task("queries", total=len(todo) * m.budget)
            for e in plan_.epochs:
                todo_e = [c for c in todo if c.epoch == e]
                if not todo_e:
                    continue
                net = snn.load_snn(plan_.snn_ckpts[e])
                net.eval()
                stats = _dataset_stats(net, st.prepared, plan_.targets, m.max_images)
                col = {t: i for i, t in enumerate(plan_.targets)}
                for g in m.generators:
                    for method in m.methods:
                        for seed in m.seeds:
                            group = [c for c in todo_e if (c.generator, c.method, c.seed) == (g, method, seed)]
                            if not group:
                                continue
                            progress.update(q_task, description=f"e{e} {g} {method} s{seed} ({len(group)} targets)")
                            n_run += _run_group(
                                st,
                                group,
                                grids[g],
                                net,
                                stats,
                                col,
                                plan_.snn_ckpts[e],
                                make_responder,
                                zlib.crc32(f"{e}/{g}/{method}/{seed}".encode()),
                                progress,
                                q_task,
                                runs_task,
                            )
                            st.write_summary()
    except BaseException:
        status = "FAILED"
        raise
    finally:
        df = st.write_summary()
        wall = time.perf_counter() - t0
        if status == "FINISHED":
            st.write_grids()
            st.prune()
        metrics = st.write_metrics(df, wall, n_run)
        st.client.log_batch(
            st.parent_id,
            metrics=_metric_batch({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}),
        )
        if status == "FINISHED" and st.failed:
            status = "FAILED"
        st.client.set_terminated(st.parent_id, status)
    if st.failed:
        raise SpikemaxError(f"{len(st.failed)} AM run(s) failed (marked FAILED in MLflow); first: {st.failed[0]}")
    return metrics


def _run_group(
    st: _Stage,
    group: list[Combo],
    grid: Any,
    net: Any,
    stats: dict[str, np.ndarray],
    col: dict[Target, int],
    snn_ckpt: Path,
    make_responder: Callable,
    noise_seed: int,
    progress: Any,
    q_task: Any,
    runs_task: Any,
) -> int:
    """Run the targets of one (epoch, generator, method, seed) in lock step; returns queries run."""
    m = st.m
    opens: list[_Open] = []
    try:
        opens = [st.open_run(c, grid, snn_ckpt) for c in group]
        optimizers = [st.make_optimizer(op, grid) for op in opens]
        responder = make_responder(net, [c.target.name for c in group], noise=m.noise, seed=noise_seed)
        results = run_am_group(
            optimizers,
            grid,
            responder,
            m.budget,
            m.batch,
            loggers=[op.logger for op in opens],
            target_value=m.target_value,
            on_batch=lambda k: progress.advance(q_task, k),
            max_images=m.max_images,
        )
        extras = _stimulus_stats(net, st.prepared, results)
        for op, opt, res, ex in zip(opens, optimizers, results, extras):
            j = col[op.combo.target]
            ex = {**ex, "dataset_csi": float(stats["csi"][j]), "dataset_sparseness": float(stats["sparseness"][j])}
            st.finish_run(op, res, opt, float(stats["dataset_max"][j]), ex)
            progress.advance(runs_task, 1)
        return sum(r.n_queries for r in results)
    except Exception as err:
        for op in opens:
            if op.combo.key not in st.done:
                st.fail_run(op, err)
        return 0
    except BaseException as err:  # interrupted: mark, then stop
        for op in opens:
            if op.combo.key not in st.done:
                st.fail_run(op, err)
        raise
