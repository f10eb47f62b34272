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

# generator -> its tune result as `spikemax.tuning.tuned_results` reads it from metrics/tune.json:
# {"study", "method", "settings", "source"}, source "study" (the adopted winner), "default" (the study
# kept the default) or "fallback" (no study result).
Tuned = dict[str, dict[str, Any]]

# Tune search-point keys that are TT options under another name (the rest keep theirs).
_TT_KEYS = {"rank": "rank", "lr": "lr", "elite": "elite", "cma_share": "cma"}
_NOISE_KEYS = ("aware", "retest", "estimator")  # the noise-aware layer's options
_CMA_KEYS = ("sigma0", "popsize")


def resolve_method(method: str, ordered: bool, adopted: str | None = None) -> str:
    """The method that runs: `auto` resolved to the tune stage's `adopted` method, else for an
    ordered (quantile) or codebook grid by the table."""
    if method != "auto":
        return method
    return adopted or METHOD_AUTO[bool(ordered)]


def auto_choice(tuned: Tuned | None, generator: str) -> str | None:
    """The method the tune stage adopted for `generator` (None: no adopted result)."""
    s = (tuned or {}).get(generator, {})
    return s.get("method") if s.get("source") == "study" else None


def _adopted(tuned: Tuned | None, method: str, generator: str) -> dict[str, Any] | None:
    """`generator`'s adopted tune result where it applies to a run of `method` (`auto` always, an
    explicit method when it is the adopted one), else None."""
    choice = auto_choice(tuned, generator)
    return (tuned or {})[generator] if choice is not None and method in ("auto", choice) else None


def run_method(tuned: Tuned | None, method: str, generator: str) -> str:
    """The method a run of `method` on `generator` runs (`auto`: the adopted one, else the table's)."""
    if method != "auto":
        return method
    from spikemax.generators import grid_ordered

    return resolve_method(method, grid_ordered(generator), auto_choice(tuned, generator))


def runs_tt(method: str, generator: str, tuned: Tuned | None = None) -> bool:
    """Whether `method` on `generator`'s grid runs TT (`auto`: the adopted method, else per grid)."""
    return run_method(tuned, method, generator) == "tt"


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


def tuned_for(tuned: Tuned | None, method: str, generator: str) -> dict[str, Any]:
    """The adopted tune settings a run of `method` on `generator` takes ({} = runs as configured)."""
    entry = _adopted(tuned, method, generator)
    return dict(entry.get("settings", {})) if entry is not None else {}


def tuned_study(tuned: Tuned | None, method: str, generator: str) -> str:
    """The tune study whose adopted settings a run takes ("none")."""
    entry = _adopted(tuned, method, generator)
    return str(entry.get("study", "none")) if entry is not None else "none"


def method_source(tuned: Tuned | None, method: str, generator: str) -> str:
    """What decided a run's method and settings: "study" (the tune stage's adopted winner),
    "default" (a study kept the default), "fallback" (no study result) or "configured"."""
    if _adopted(tuned, method, generator) is not None:
        return "study"
    if method != "auto":
        return "configured"
    return str((tuned or {}).get(generator, {}).get("source", "fallback"))


def with_settings(m: MaximizeParams, method: str, settings: dict[str, Any]) -> MaximizeParams:
    """The maximize params with a tune search point applied: TT's rank, lr, elite and CMA share (when
    `method` is TT) and the noise-aware options; CMA-ES's are `cma_options`, grid_n a re-grid
    (`spikemax.tuning.tuned_grid`)."""
    update: dict[str, Any] = {}
    tt = {_TT_KEYS[k]: v for k, v in settings.items() if k in _TT_KEYS} if method == "tt" else {}
    if tt:
        update["tt"] = m.tt.model_copy(update=tt)
    noise = {k: settings[k] for k in _NOISE_KEYS if k in settings}
    if noise:
        update["noise"] = m.noise.model_copy(update=noise)
    return m.model_copy(update=update) if update else m


def cma_options(settings: dict[str, Any]) -> dict[str, Any]:
    """CMA-ES options (sigma0, popsize) of a tune search point ({} = CMA-ES's defaults; popsize 0: pycma's)."""
    return {k: settings[k] for k in _CMA_KEYS if settings.get(k)}


def settings_options(
    m: MaximizeParams, method: str, settings: dict[str, Any], ordered: bool | None, resolved: str | None = None
) -> dict[str, Any]:
    """make_optimizer options of `method` (`auto` running `resolved`) under `m` with the tune search
    point `settings` applied; with `ordered` None the grid-dependent choices stay "auto" (hashed)."""
    from spikemax.optim import options_for

    runs = resolved if method == "auto" and resolved else method
    opts = options_for(method, with_settings(m, runs, settings), ordered, resolved=resolved)
    # The study's values win over the noise-aware default's base settings (optim.noisy.UNDER_NOISE):
    # it measured them under that noise; `auto` resolved to CMA-ES passes its options on (make_optimizer).
    if runs == "tt":
        opts.update({_TT_KEYS[k]: v for k, v in settings.items() if k in _TT_KEYS})
    elif runs == "cma":
        opts.update(cma_options(settings))
    return opts


def run_options(
    m: MaximizeParams, tuned: Tuned | None, method: str, generator: str, ordered: bool | None
) -> dict[str, Any]:
    """make_optimizer options of a run of `method` on `generator`: the adopted tune settings where
    they apply, `auto` resolved to the adopted method, else by the grid (`ordered` None: the
    configuration hash, which keeps "auto" and the grid-dependent choices unresolved)."""
    resolved = None
    if method == "auto":
        resolved = auto_choice(tuned, generator) or (None if ordered is None else resolve_method(method, ordered))
    return settings_options(m, method, tuned_for(tuned, method, generator), ordered, resolved)


def run_settings(m: MaximizeParams, tuned: Tuned | None, method: str, generator: str) -> MaximizeParams:
    """The maximize params a run of `method` on `generator` runs with: with `maximize.tuned`, the
    adopted tune settings where they apply (`tuned_for`; others run as configured)."""
    return with_settings(m, run_method(tuned, method, generator), tuned_for(tuned, method, generator))
