"""Planning the maximize stage: targets, run keys and config hashes, and what earlier runs finished."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spikemax import SpikemaxError
from spikemax.neurons import OUTPUT_LAYER, Target, parse_target
from spikemax.optim import options_for
from spikemax.tracking import RUN_KEY_TAG

if TYPE_CHECKING:
    from spikemax.params import MaximizeParams, Params, Paths


@dataclass(frozen=True)
class Combo:
    """One nested AM run: (checkpoint, generator, target, method, seed) under one configuration.

    `epoch` is the checkpoint's index (0 = untrained); `step` and `progress` say how far training was
    (optimizer steps, fractional epochs; step None for legacy `epoch=NNN.ckpt` names)."""

    epoch: int
    generator: str
    target: Target
    method: str
    seed: int
    key: str
    step: int | None = None
    progress: float = 0.0
    budget: int = 0  # queries of this run (maximize.budget, or budget_last at the scan's last checkpoint)

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
    """Validate a target string against the network's layers (one-line stage error if it names no unit)."""
    try:
        return parse_target(name, layers)
    except SpikemaxError as err:
        raise _stage_error(f"target {name!r}: {err}") from None


def resolve_targets(
    m: MaximizeParams, layers: dict[str, int], live: dict[str, np.ndarray] | None = None
) -> list[Target]:
    """Explicit targets, `class:*`, then `units_per_layer` units sampled per spiking layer (deduplicated);
    with `live` (layer -> bool per unit) the sample is drawn from the live units only."""
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
            pool = np.arange(units) if live is None else np.flatnonzero(live[layer])
            picked = np.sort(rng.choice(pool, size=min(m.units_per_layer, len(pool)), replace=False))
            out += [_to_target(f"{layer}:{int(u)}", layers) for u in picked]
    seen: set[tuple[str, int]] = set()
    unique: list[Target] = []
    for target in out:
        if (target.layer, target.unit) not in seen:
            seen.add((target.layer, target.unit))
            unique.append(target)
    if not unique:
        raise _stage_error("no targets: give `targets` or `units_per_layer`")
    return unique


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


def runs_tt(method: str, generator: str, m: MaximizeParams | None = None) -> bool:
    """Whether `method` on `generator`'s grid runs TT (`auto`: the tune stage's adopted method where
    `m` carries one, else the per-grid table, as options_for resolves it)."""
    from spikemax.generators import grid_ordered
    from spikemax.optim.tt import METHOD_AUTO

    if method != "auto":
        return method == "tt"
    return ((m.auto_choice(generator) if m is not None else None) or METHOD_AUTO[grid_ordered(generator)]) == "tt"


def run_settings(m: MaximizeParams, method: str, generator: str) -> MaximizeParams:
    """The maximize params a run of `method` on `generator` runs with: with `maximize.tuned`, the tune
    stage's adopted method and settings where they apply (`MaximizeParams.for_generator`)."""
    return m.for_generator(generator, method)


PRIOR_METHODS = ("tt", "random", "auto")  # methods that take a data prior (`prior=`)
PRIOR_GENERATORS = ("vqvae",)  # codebook grids (unordered, with an encoder): where the prior is fitted


def budget_for(m: MaximizeParams, epoch: int, epochs: list[int]) -> int:
    """Queries per run at this checkpoint: `budget_last` at the scan's last one, else `budget`."""
    return m.budget_last if m.budget_last is not None and epoch == max(epochs) else m.budget


def with_budget(m: MaximizeParams, budget: int) -> MaximizeParams:
    """The maximize params as one run sees them: its own budget (NGOpt and the noisy layer are told it)."""
    return m if budget in (0, m.budget) else m.model_copy(update={"budget": budget})


def _config_hash(
    m: MaximizeParams,
    method: str,
    snn_ckpt: Path,
    gen_ckpt: Path,
    targets: list[Target] | None = None,
    generator: str = "",
) -> str:
    """Hash of everything that changes a run's result besides its key fields (so DVC's rerun after
    a code, checkpoint or params change never reuses a stale result, while a resume does); in
    population mode also the rule and the whole target set (every neuron learns from all)."""
    m = run_settings(m, method, generator)
    cfg: dict[str, Any] = {
        "budget": m.budget,
        "batch": m.batch,
        "noise": m.noise.model_dump(),
        "target_value": m.target_value,
        "options": options_for(method, m),
        "warm": bool(m.warm_start and runs_tt(method, generator, m)),
        # Only runs that can use the prior (codebook grids, tt / random) depend on its settings.
        "prior": [m.prior, m.prior_images] if method in PRIOR_METHODS and generator in PRIOR_GENERATORS else None,
        "snn": _digest(snn_ckpt),
        "gen": _digest(gen_ckpt),
        "code": _code_digest(),
    }
    if "grid_n" in m.tuned_for(generator, method):
        cfg["grid_n"] = m.tuned_for(generator, method)["grid_n"]  # a tuned SN-GAN grid resolution
    if m.population:
        cfg["population"] = {"rule": m.population_rule, "targets": [t.name for t in targets or []]}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def plan(params: Params, paths: Paths) -> Plan:
    """Validate the maximize params against what exists on disk; one-line error on anything wrong."""
    from spikemax import snn
    from spikemax.generators import checkpoint_path
    from spikemax.optim import make_optimizer

    m = params.maximize
    if m.budget <= 0 or m.batch <= 0 or (m.budget_last is not None and m.budget_last < m.budget):
        raise _stage_error(
            f"budget and batch must be >= 1 and budget_last >= budget (got {m.budget}, {m.batch}, {m.budget_last})"
        )
    if not (paths.prepared / "meta.json").is_file():
        raise _stage_error(f"no prepared data under {paths.prepared}: run `spikemax prepare` first")
    available = snn.checkpoints(paths)  # index (ordered by training progress) -> path
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
                raise _stage_error(
                    f"epochs: no SNN checkpoint for epoch {e} (epochs are checkpoint indices 0..{have[-1]}: "
                    "0 = untrained, -1 = last)"
                )
            if ee not in epochs:
                epochs.append(ee)
        epochs.sort()
    gen_ckpts: dict[str, Path] = {}
    for g in m.generators:
        path = checkpoint_path(g, paths)
        if not path.is_file():
            raise _stage_error(f"generator {g!r} has no checkpoint at {path}: run `spikemax train-generator {g}`")
        gen_ckpts[g] = path
    for method in m.methods:
        try:
            make_optimizer(method, 2, 4, seed=0, **options_for(method, m, grid=False))
        except SpikemaxError as err:
            raise _stage_error(f"method {method!r}: {err}") from None
        except (ValueError, TypeError, ImportError) as err:
            raise _stage_error(f"method {method!r}: {err}") from None
    net = snn.load_snn(available[epochs[0]])
    layers = dict(net.spiking_layers())
    for e in epochs[1:]:
        net = snn.load_snn(available[e])
        if dict(net.spiking_layers()) != layers:
            raise _stage_error(f"checkpoint of epoch {e} has other layers than epoch {epochs[0]}")
    # `net` is now the plan's last checkpoint: usually the trained network the live units come from.
    live = live_units(net if epochs[-1] == have[-1] else snn.load_snn(available[have[-1]]), paths, m)
    targets = resolve_targets(m, layers, live)
    combos = []
    for e in epochs:
        prog = snn.progress(available[e])
        budget = budget_for(m, e, epochs)
        for g in m.generators:
            for method in m.methods:
                h = _config_hash(with_budget(m, budget), method, available[e], gen_ckpts[g], targets, g)
                for seed in m.seeds:
                    for t in targets:
                        key = _slug(f"e{e:03d}-{prog.epoch:.3f}_{g}_{t.name}_{method}_s{seed}_{h}")
                        combos.append(Combo(e, g, t, method, seed, key, prog.step, prog.epoch, budget))
    return Plan(epochs, {e: available[e] for e in epochs}, gen_ckpts, targets, combos)


def live_units(net: Any, paths: Paths, m: MaximizeParams) -> dict[str, np.ndarray] | None:
    """`units_from: live`: per spiking layer, which units of `net` fire on some prepared test image."""
    if not m.units_per_layer or m.units_from != "live":
        return None
    import torch

    from spikemax.data import Prepared
    from spikemax.neurons import layer_rates

    x, _ = Prepared.load(paths.prepared).tensors("test")
    with torch.no_grad():
        rates = layer_rates(net.eval(), x, batch_size=m.max_images)
    return {name: r.max(axis=0) > 0 for name, r in rates.items()}


def population_key(combo: Combo) -> str:
    """Name of the presentation set a population-mode combination belongs to (its dir under
    results/am/populations/): the combination's key without the target."""
    return _slug(
        f"e{combo.epoch:03d}_{combo.generator}_pop_{combo.method}_s{combo.seed}_{combo.key.rsplit('_', 1)[-1]}"
    )


def _search_runs(client: Any, eid: str) -> list[Any]:
    """Every run of the AM experiment that carries a run key."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [eid], filter_string=f"tags.`{RUN_KEY_TAG}` LIKE '%'", max_results=5000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def read_summary(am_dir: Path, combo: Combo) -> dict | None:
    path = am_dir / combo.run_dir / "summary.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def finished_runs(client: Any, eid: str, plan_: Plan, am_dir: Path) -> dict[str, dict]:
    """Combinations finished earlier (FINISHED run with the key tag and its local outputs); marks
    runs left RUNNING by a killed invocation as FAILED."""
    wanted = {c.key: c for c in plan_.combos}
    done: dict[str, dict] = {}
    stale = []
    for run in _search_runs(client, eid):
        key = run.data.tags.get(RUN_KEY_TAG)
        if key not in wanted:
            continue
        if run.info.status == "FINISHED":
            row = read_summary(am_dir, wanted[key])
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
