"""Planning the maximize stage: targets, run keys and config hashes, and what earlier runs finished."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import zlib
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spikemax import SpikemaxError
from spikemax.am.policy import (
    Tuned,
    budget_for,
    method_source,
    prior_applies,
    resolve_method,
    run_method,
    run_options,
    run_settings,
    runs_tt,
    settings_options,
    takes_prior,
    tuned_for,
    tuned_study,
    with_budget,
)
from spikemax.am.spec import GroupSpec, RunSpec
from spikemax.digest import digest_bytes, digest_files, file_digest
from spikemax.neurons import OUTPUT_LAYER, Target, parse_target

if TYPE_CHECKING:
    from spikemax.params import MaximizeParams, Params, Paths


@dataclass(frozen=True)
class Plan:
    """Everything the stage will run, validated before any run starts."""

    epochs: list[int]
    snn_ckpts: dict[int, Path]
    gen_ckpts: dict[str, Path]
    targets: list[Target]
    runs: list[RunSpec]
    groups: list[GroupSpec]
    tuned_from: str = ""  # the tune studies whose settings apply ("" = none)
    # per generator, what `auto` runs: the study's adopted winner, the default kept, or the fallback table
    method_sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def group_runs(self, group: GroupSpec, done: Container[str]) -> list[RunSpec]:
        """The runs of `group` to run now: those not `done`, or in population mode every one when
        any is left (the whole presentation set; finished neurons only re-propose)."""
        todo = [r for r in group.runs if r.key not in done]
        return list(group.runs) if todo and group.runs[0].population else todo

    def previous(self, spec: RunSpec) -> RunSpec | None:
        """The run of the previous checkpoint `spec` may warm-start from."""
        return self._by_key.get(spec.warm_from) if spec.warm_from else None

    @functools.cached_property
    def _by_key(self) -> dict[str, RunSpec]:
        return {r.key: r for r in self.runs}


def _stage_error(msg: str) -> SpikemaxError:
    from spikemax.params import ParamsError

    return ParamsError(f"maximize: {msg}")


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
        *sorted((pkg / "snn").glob("*.py")),
        *sorted((pkg / "generators").glob("*.py")),
        *sorted((pkg / "optim").glob("*.py")),
    ]
    missing = [str(f) for f in files if not f.is_file()]
    assert not missing, f"code digest lists missing files {missing}"  # a moved module must not drop out silently
    return digest_files(files)


def _config_hash(
    m: MaximizeParams,
    method: str,
    snn_ckpt: Path,
    gen_ckpt: Path,
    targets: list[Target] | None = None,
    generator: str = "",
    tuned: Tuned | None = None,
) -> str:
    """Hash of everything that changes a run's result besides its key fields (so DVC's rerun after
    a code, checkpoint or params change never reuses a stale result, while a resume does); in
    population mode also the rule and the whole target set (every neuron learns from all)."""
    tuned = tuned or {}
    options = run_options(m, tuned, method, generator, None)  # after tuning; `auto`: the adopted method
    grid_n = tuned_for(tuned, method, generator).get("grid_n")
    m = run_settings(m, tuned, method, generator)
    cfg: dict[str, Any] = {
        "budget": m.budget,
        "batch": m.batch,
        "noise": m.noise.model_dump(),
        "target_value": m.target_value,
        "options": options,
        "warm": bool(m.warm_start and runs_tt(method, generator, tuned)),
        # Only runs that can use the prior (codebook grids, tt / random) depend on its settings.
        "prior": [m.prior, m.prior_images] if _uses_prior(tuned, method, generator) else None,
        "snn": file_digest(snn_ckpt),
        "gen": file_digest(gen_ckpt),
        "code": _code_digest(),
    }
    if grid_n is not None:
        cfg["grid_n"] = grid_n  # a tuned SN-GAN grid resolution
    if m.population:
        cfg["population"] = {"rule": m.population_rule, "targets": [t.name for t in targets or []]}
    if m.measure_warm_start and cfg["warm"]:
        cfg["measure_warm_start"] = True  # queries_saved is measured (0 otherwise)
    return digest_bytes(json.dumps(cfg, sort_keys=True))[:8]


def plan(params: Params, paths: Paths, tuned: Tuned | None = None, tuned_from: str = "") -> Plan:
    """Validate the maximize params against what exists on disk and resolve every run's spec
    (`tuned`: each generator's tune study's best settings); one-line error on anything wrong."""
    from spikemax import snn
    from spikemax.generators import checkpoint_path
    from spikemax.optim import make_optimizer

    m = params.maximize
    tuned = tuned or {}
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
    if m.checkpoints == "all":
        epochs = have
    else:
        epochs = []
        for e in m.checkpoints:
            ee = have[e] if e < 0 and -e <= len(have) else e
            if ee not in available:
                raise _stage_error(
                    f"checkpoints: no SNN checkpoint {e} (checkpoint indices are 0..{have[-1]}: "
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
            make_optimizer(method, 2, 4, seed=0, **optimizer_options(method, m, False))
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
    runs: list[RunSpec] = []
    groups: list[GroupSpec] = []
    keys: dict[tuple[int, str, str, str, int], str] = {}  # (epoch, generator, target, method, seed) -> key
    for i, e in enumerate(epochs):
        prog = snn.progress(available[e])
        budget = budget_for(m, e, epochs)
        for g in m.generators:
            for method in m.methods:
                run_m = with_budget(m, budget)
                h = _config_hash(with_budget(m, budget), method, available[e], gen_ckpts[g], targets, g, tuned)
                # A TT run may warm-start from the previous checkpoint's run (decided when it opens).
                prev = epochs[i - 1] if i > 0 and m.warm_start and runs_tt(method, g, tuned) else None
                for seed in m.seeds:
                    group = []
                    for t in targets:
                        key = _slug(f"e{e:03d}-{prog.epoch:.3f}_{g}_{t.name}_{method}_s{seed}_{h}")
                        keys[e, g, t.name, method, seed] = key
                        warm_from = keys[prev, g, t.name, method, seed] if prev is not None else ""
                        group.append(_run_spec(run_m, tuned, e, g, t, method, seed, key, prog, budget, warm_from))
                    runs += group
                    groups.append(
                        GroupSpec(
                            epoch=e,
                            generator=g,
                            method=method,
                            seed=seed,
                            runs=tuple(group),
                            snn_ckpt=available[e],
                            gen_ckpt=gen_ckpts[g],
                            noise_seed=zlib.crc32(f"{e}/{g}/{method}/{seed}".encode()),
                            grid_n=group[0].grid_n,
                            after=(prev, g, method, seed) if prev is not None else None,
                        )
                    )
    sources = {str(g): method_source(tuned, "auto", g) for g in m.generators}
    return Plan(epochs, {e: available[e] for e in epochs}, gen_ckpts, targets, runs, groups, tuned_from, sources)


def optimizer_options(method: str, m: MaximizeParams, ordered: bool | None = None) -> dict[str, Any]:
    """make_optimizer options of `method` under the run's params `m` on an ordered (quantile) or
    codebook grid, `auto` resolved by the planner's policy; with `ordered` None the grid-dependent
    choices stay "auto" (what the configuration hash records)."""
    resolved = None if ordered is None else resolve_method(method, ordered)
    return settings_options(m, method, {}, ordered, resolved=resolved)  # no tuned settings: the params' own


def _run_spec(
    m: MaximizeParams,
    tuned: Tuned,
    epoch: int,
    generator: str,
    target: Target,
    method: str,
    seed: int,
    key: str,
    prog: Any,
    budget: int,
    warm_from: str,
) -> RunSpec:
    """One run's spec under the params `m` with its budget (its tuned settings are applied here)."""
    from spikemax.generators import grid_ordered

    ordered = grid_ordered(generator)
    opts = run_options(m, tuned, method, generator, ordered)
    resolved = opts.get("resolved", method)
    settings = tuned_for(tuned, method, generator)
    m = run_settings(m, tuned, method, generator)
    return RunSpec(
        epoch=epoch,
        generator=generator,
        target=target,
        method=method,
        seed=seed,
        key=key,
        step=prog.step,
        progress=prog.epoch,
        budget=budget,
        resolved=resolved,
        options_json=json.dumps(opts),
        rank=m.tt.rank if resolved == "tt" else None,
        prior_rank=m.tt.rank if takes_prior(m, method, generator) and _uses_prior(tuned, method, generator) else None,
        tuned_study=tuned_study(tuned, method, generator),
        method_source=method_source(tuned, method, generator),
        grid_n=settings.get("grid_n"),
        warm_from=warm_from,
        population=_population_key(epoch, generator, method, seed, key) if m.population else "",
    )


def _uses_prior(tuned: Tuned | None, method: str, generator: str) -> bool:
    """Whether a run can use the grid's data prior: a prior method on a codebook, unless `auto` runs
    an adopted CMA-ES (which takes none)."""
    return prior_applies(method, generator) and run_method(tuned, method, generator) != "cma"


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


def _population_key(epoch: int, generator: str, method: str, seed: int, key: str) -> str:
    """Name of the presentation set a population-mode run belongs to (its dir under
    results/am/populations/): the run's key without the target."""
    return _slug(f"e{epoch:03d}_{generator}_pop_{method}_s{seed}_{key.rsplit('_', 1)[-1]}")
