"""What stages write to their logs: whole progress lines (a file or a pipe holds them), and the known
third-party noise filtered once, here."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any


def line(message: str) -> None:
    """One progress line on stderr, flushed (DVC shows a stage's stderr as it comes)."""
    print(message, file=sys.stderr, flush=True)


class _DropTip(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger (printed once per Trainer)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


_QUIET = False


def quiet_third_party() -> None:
    """Filter the known third-party noise of stage logs (once per process)."""
    global _QUIET
    if _QUIET:
        return
    # Lightning 2.6 builds torch's deprecated LeafSpec in its own pytree helper (its code, not ours):
    # a FutureWarning on every fit until Lightning moves to `treespec_leaf()`.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # Every Trainer logs a tip to install `litlogger`; the project logs to MLflow. Lightning sends it
    # through whichever of its rank-zero loggers was set last.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTip())
    _QUIET = True


def trial_progress(n_trials: int, stream: Callable[[str], None] = line) -> Callable[[Any, Any], None]:
    """An Optuna callback (`study.optimize(..., callbacks=[...])`) writing one line per finished trial."""
    start = time.perf_counter()

    def report(study: Any, trial: Any) -> None:
        done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))
        value = f"{trial.value:.4g}" if trial.value is not None else "-"
        stream(
            f"tune {study.study_name}: trial {trial.number} {trial.state.name} value {value} "
            f"({done}/{n_trials} finished, {time.perf_counter() - start:.0f} s)"
        )

    return report
