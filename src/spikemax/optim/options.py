"""The options the maximize stage passes to `make_optimizer`, one function for every caller."""

from __future__ import annotations

from typing import Any, Protocol

from .tt import METHOD_AUTO, resolve_cma, resolve_ordinal


class _HasOrdered(Protocol):
    ordered: bool


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
        # The tune stage's adopted method where the params carry one (MaximizeParams.for_generator), else the table.
        tuned = getattr(m, "auto_method", None)
        resolved = tuned or ("auto" if ordered_auto is None else METHOD_AUTO[ordered_auto])
        opts = options_for("tt" if resolved == "auto" else resolved, params, grid)
        opts["resolved"] = resolved
    elif method == "tt":
        opts = m.tt.model_dump()
        if grid is not None:
            ordered = grid if isinstance(grid, bool) else bool(grid.ordered)
            opts["ordinal"] = resolve_ordinal(opts["ordinal"], ordered)
            opts["cma"] = resolve_cma(opts["cma"], ordered)
    elif method == "cma":
        opts = dict(getattr(m, "cma_options", {}))  # tuned sigma0 / popsize ({} = CMA-ES's defaults)
    elif method == "ngopt":
        opts = {"budget": int(m.budget)}  # NGOpt chooses its algorithm from the budget
    noise: Any = getattr(m, "noise", None)
    if getattr(noise, "aware", False):  # the noise-aware layer (spikemax.optim.noisy) around any method
        opts.update(noise_aware=True, retest=noise.retest, estimator=noise.estimator)
        if getattr(noise, "final", 0.0):  # the budget-aware schedule needs the run's budget
            opts.update(final=noise.final, budget=int(m.budget))
    return opts
