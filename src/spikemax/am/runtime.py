"""What one `maximize` process holds while it runs: the project lock, SIGTERM handled as an
interrupt (open runs end FAILED), and the progress bars."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from spikemax import SpikemaxError

if TYPE_CHECKING:
    from spikemax.am.spec import GroupSpec
    from spikemax.params import Paths


@contextmanager
def project_lock(paths: Paths, stage: str) -> Iterator[None]:
    """Hold the project's `stage` lock (.spikemax/STAGE.lock: beside, not inside, the DVC outputs and
    the MLflow store, which may be a server); a second process exits with one line naming the holder
    (pid and host)."""
    from filelock import FileLock, Timeout

    where = paths.root / ".spikemax"
    where.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(where / f"{stage}.lock"))
    holder = where / f"{stage}.lock.holder"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            who = json.loads(holder.read_text())
            name = f"pid {who['pid']} on {who['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            name = "another process"
        raise SpikemaxError(f"{stage} is already running on this project ({name}); wait for it or stop it") from None
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`) raises KeyboardInterrupt in the main thread, as Ctrl-C does, so
    the stage's open runs end FAILED instead of staying RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


class StageProgress:
    """The stage's two bars (AM runs, queries) as the groups' `Progress`."""

    def __init__(self, n_runs: int, n_queries: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self.runs_task = self.bars.add_task("AM runs", total=n_runs)
        self.q_task = self.bars.add_task("queries", total=n_queries)

    def __enter__(self) -> StageProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def queries(self, k: int) -> None:
        self.bars.advance(self.q_task, k)

    def runs(self, k: int) -> None:
        self.bars.advance(self.runs_task, k)

    def more_queries(self, k: int) -> None:
        """Grow the queries bar (cold twins' queries count too)."""
        task = next(t for t in self.bars.tasks if t.id == self.q_task)
        self.bars.update(self.q_task, total=(task.total or 0) + k)

    def group(self, group: GroupSpec, n_runs: int) -> None:
        self.bars.update(
            self.q_task, description=f"e{group.epoch} {group.generator} {group.method} s{group.seed} ({n_runs} targets)"
        )
