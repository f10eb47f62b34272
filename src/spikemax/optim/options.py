"""The options the maximize stage passes to `make_optimizer` (the public `options_for`)."""

from __future__ import annotations

from typing import Any, Protocol

from .noisy import CLEAN_SWITCHABLE, UNDER_NOISE
from .tt import resolve_cma, resolve_ordinal

POPULATION_CMA_POPSIZE = 6
"""CMA-ES generation size in population mode: bench_population on SN-GAN (16 neurons, seeds 0-3),
population / independent at 256 and 1,024: pycma's default (12) 0.898 and 0.900; popsize 4 0.958
and 0.929; 6 0.970 and 0.929; 8 0.943 and 0.909."""


class _HasOrdered(Protocol):
    ordered: bool


def _tt_default(name: str) -> Any:
    """TTOptimizer's default of an option the params do not set (e.g. `archive`)."""
    import inspect

    from .tt import TTOptimizer

    return inspect.signature(TTOptimizer).parameters[name].default


def noise_aware_on(noise: Any) -> bool:
    """Whether the noise section turns the noise-aware layer on: `aware: true`, or "auto" (the
    default) with a noise model set."""
    aware = getattr(noise, "aware", False)
    if aware == "auto":
        return getattr(noise, "model", "none") != "none"
    return bool(aware)


def options_for(
    method: str, params: Any, grid: _HasOrdered | bool | None = None, resolved: str | None = None
) -> dict[str, Any]:
    """make_optimizer options of `method` under the maximize params, for `grid`.

    `params` is the whole `Params` or its `maximize` section; `grid` is a `LatentGrid` (or a bool,
    whether the grid is ordered). TT's `ordinal: auto` and `cma: auto` are resolved from the grid's
    order (so the run's logged options say what ran); with `grid=None` they stay "auto" (used where
    only the configuration is hashed). `auto` runs `resolved` (the planner's choice); without it,
    the planner's per-grid table (`spikemax.am.policy.METHOD_AUTO`) decides.
    """
    m = getattr(params, "maximize", params)
    ordered = None if grid is None else (grid if isinstance(grid, bool) else bool(grid.ordered))
    opts: dict[str, Any] = {}
    if method == "auto":  # the per-grid default method, recorded as `resolved` in the run's options
        if resolved is None and ordered is not None:
            from spikemax.am.policy import resolve_method  # the policy is the planner's (lazy: optim stays pure)

            resolved = resolve_method("auto", ordered)
        resolved = resolved or "auto"
        opts = _method_options("tt", m, ordered) if resolved in ("tt", "auto") else {}
        opts["resolved"] = resolved
    else:
        opts = _method_options(method, m, ordered)
    if getattr(m, "population", False) and "cma" in (method, opts.get("resolved")):
        # Population mode: each CMA-ES proposes a share of every batch; a better point another
        # neuron's optimizer proposed joins its next generation (bench_population: +0.03 at 1,024).
        # A share is a few points, so a generation of pycma's default size (12 at d = 16) spans
        # several batches: generations of POPULATION_CMA_POPSIZE update it more often.
        opts.update(adopt=True, popsize=POPULATION_CMA_POPSIZE)
    elif getattr(m, "population", False) and "rank" in opts:
        # Population mode: each TT proposes a few points of a batch, so it climbs from its single best
        # point (its own or another neuron's): bench_population on VQ-VAE, seeds 0-3, elite 4 -> 1:
        # 0.868 -> 0.902 of independent runs at 1,024, 0.985 -> 1.007 at 256.
        opts["elite"] = 1
    noise: Any = getattr(m, "noise", None)
    if noise_aware_on(noise):  # the noise-aware layer (spikemax.optim.noisy) around any method
        opts.update(noise_aware=True, retest=noise.retest, estimator=noise.estimator)
        if getattr(noise, "final", 0.0):  # the budget-aware schedule needs the run's budget
            opts.update(final=noise.final, budget=int(m.budget))
        if getattr(noise, "search", "auto") == "auto" and "clean_base" not in opts:  # settings that won under noise
            base = "tt" if "rank" in opts else ("cma" if "cma" in (method, opts.get("resolved")) else "")
            under = UNDER_NOISE.get(base, {})
            # The base's own settings come back if the responses turn out noise-free (the layer's
            # probe): TT's archive and elite, CMA-ES's generation size (None: pycma's default).
            own = _tt_default if base == "tt" else (lambda k: None)
            clean_base = {k: opts.get(k, own(k)) for k in under if k in CLEAN_SWITCHABLE}
            opts.update(under)
            if clean_base:
                opts["clean_base"] = clean_base
    return opts


def _method_options(method: str, m: Any, ordered: bool | None) -> dict[str, Any]:
    """A concrete method's own options (TT's grid-dependent shares resolved when `ordered` is known)."""
    if method == "tt":
        opts = m.tt.model_dump()
        if ordered is not None:
            opts["ordinal"] = resolve_ordinal(opts["ordinal"], ordered)
            opts["cma"] = resolve_cma(opts["cma"], ordered)
        return opts
    if method == "ngopt":
        return {"budget": int(m.budget)}  # NGOpt chooses its algorithm from the budget
    return {}
