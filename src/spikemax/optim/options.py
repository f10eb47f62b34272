"""The options the maximize stage passes to `make_optimizer`, one function for every caller."""

from __future__ import annotations

from typing import Any, Protocol

from .noisy import CLEAN_SWITCHABLE, UNDER_NOISE
from .tt import METHOD_AUTO, resolve_cma, resolve_ordinal


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


def options_for(method: str, params: Any, grid: _HasOrdered | bool | None = None) -> dict[str, Any]:
    """make_optimizer options of `method` under the maximize params, for `grid`.

    `params` is the whole `Params` or its `maximize` section; `grid` is a `LatentGrid` (or a bool,
    whether the grid is ordered). TT's `ordinal: auto` and `cma: auto` are resolved from the grid's
    order (so the run's logged options say what ran); with `grid=None` they stay "auto" (used where
    only the configuration is hashed).
    """
    m = getattr(params, "maximize", params)
    opts: dict[str, Any] = {}
    if method == "auto":  # the per-grid default method, recorded as `resolved` in the run's options
        ordered_auto = None if grid is None else (grid if isinstance(grid, bool) else bool(grid.ordered))
        resolved = "auto" if ordered_auto is None else METHOD_AUTO[ordered_auto]
        opts = options_for("tt", params, grid) if resolved in ("tt", "auto") else {}
        opts["resolved"] = resolved
    elif method == "tt":
        opts = m.tt.model_dump()
        if grid is not None:
            ordered = grid if isinstance(grid, bool) else bool(grid.ordered)
            opts["ordinal"] = resolve_ordinal(opts["ordinal"], ordered)
            opts["cma"] = resolve_cma(opts["cma"], ordered)
    elif method == "ngopt":
        opts = {"budget": int(m.budget)}  # NGOpt chooses its algorithm from the budget
    noise: Any = getattr(m, "noise", None)
    if noise_aware_on(noise):  # the noise-aware layer (spikemax.optim.noisy) around any method
        opts.update(noise_aware=True, retest=noise.retest, estimator=noise.estimator)
        if getattr(noise, "final", 0.0):  # the budget-aware schedule needs the run's budget
            opts.update(final=noise.final, budget=int(m.budget))
        if getattr(noise, "search", "auto") == "auto" and "clean_base" not in opts:  # settings that won under noise
            base = "tt" if "rank" in opts else ("cma" if "cma" in (method, opts.get("resolved")) else "")
            under = UNDER_NOISE.get(base, {})
            # TT's own settings come back if the responses turn out noise-free (the layer's probe).
            clean_base = {k: opts.get(k, _tt_default(k)) for k in under if base == "tt" and k in CLEAN_SWITCHABLE}
            opts.update(under)
            if clean_base:
                opts["clean_base"] = clean_base
    return opts
