"""The planner's per-grid policy: which method `auto` runs, where the data prior applies, each
checkpoint's budget, and the settings a tuned run takes (a run spec is resolved from these)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spikemax.params import MaximizeParams

# `method: auto`, by whether the grid is ordered: on SN-GAN's quantile grid CMA-ES matched or beat
# every TT variant tried at 256-1,024 queries (bench_am, seeds 0 and 1), while on codebooks TT (with
# the data prior) beats CMA-ES by far.
METHOD_AUTO = {True: "cma", False: "tt"}

PRIOR_METHODS = ("tt", "random", "auto")  # methods that take a data prior (`prior=`)
PRIOR_GENERATORS = ("vqvae",)  # codebook grids (unordered, with an encoder): where the prior is fitted

Tuned = dict[str, dict[str, Any]]  # generator -> the tune study's best settings {"study", "rank", "lr"[, "grid_n"]}


def resolve_method(method: str, ordered: bool) -> str:
    """The method that runs: `auto` resolved for an ordered (quantile) or codebook grid."""
    return METHOD_AUTO[bool(ordered)] if method == "auto" else method


def runs_tt(method: str, generator: str) -> bool:
    """Whether `method` on `generator`'s grid runs TT (`auto` resolves per grid)."""
    from spikemax.generators import grid_ordered

    return method == "tt" or (method == "auto" and resolve_method(method, grid_ordered(generator)) == "tt")


def prior_applies(method: str, generator: str) -> bool:
    """Whether a run of `method` on `generator` can use a data prior (codebook grids, tt / random)."""
    return method in PRIOR_METHODS and generator in PRIOR_GENERATORS


def takes_prior(m: MaximizeParams, method: str, generator: str) -> bool:
    """Whether a run starts from (or samples) the grid's data prior (`maximize.prior` on)."""
    return bool(m.prior) and prior_applies(method, generator)


def budget_for(m: MaximizeParams, epoch: int, epochs: list[int]) -> int:
    """Queries per run at this checkpoint: `budget_last` at the scan's last one, else `budget`."""
    return m.budget_last if m.budget_last is not None and epoch == max(epochs) else m.budget


def with_budget(m: MaximizeParams, budget: int) -> MaximizeParams:
    """The maximize params as one run sees them: its own budget (NGOpt and the noisy layer are told it)."""
    return m if budget in (0, m.budget) else m.model_copy(update={"budget": budget})


def tuned_for(tuned: Tuned, method: str, generator: str) -> dict[str, Any]:
    """The tune study's settings a run takes ({} = none): only runs whose method runs TT take them."""
    return dict(tuned[generator]) if generator in tuned and runs_tt(method, generator) else {}


def run_settings(m: MaximizeParams, tuned: Tuned, method: str, generator: str) -> MaximizeParams:
    """The maximize params a run of `method` on `generator` runs with: with `maximize.tuned`, a run
    whose method runs TT takes that generator's tune study's rank and lr (others run as configured)."""
    s = tuned_for(tuned, method, generator)
    if not s:
        return m
    return m.model_copy(update={"tt": m.tt.model_copy(update={"rank": int(s["rank"]), "lr": float(s["lr"])})})
