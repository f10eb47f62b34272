"""Test-only Ray worker hook that SIGKILLs the worker running a chosen maximize group, mid-group.

`install` is a Ray `worker_process_setup_hook` (it runs in every worker process the cluster starts,
retried ones included). It wraps `spikemax.am.group.finish_run` in that worker only: when `KILL_ENV` names a
plan file that exists and the finishing run belongs to the planned (epoch, generator, method, seed)
group, the worker records what it finished and SIGKILLs itself while finishing the next run once
`after` runs of the group have finished in this attempt (0: at its first). A `once` plan is claimed
by renaming the plan file (one kill over all workers and attempts); other plans kill every attempt.
Nothing in spikemax knows about this.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

KILL_ENV = "SPIKEMAX_TEST_KILL_PLAN"


def plan_kill(path: Path, epoch: int, generator: str, method: str, seed: int, after: int, once: bool) -> None:
    """Arm the hook: kill the worker of group (epoch, generator, method, seed) after `after` finished runs."""
    group = {"epoch": epoch, "generator": generator, "method": method, "seed": seed}
    for old in (path.with_suffix(".deaths"), path.with_suffix(".fired")):
        old.unlink(missing_ok=True)
    path.write_text(json.dumps({"group": group, "after": after, "once": once}))


def deaths(path: Path) -> list[dict]:
    """One record per killed worker: its pid and the runs it finished in its attempt (key -> run id, files)."""
    log = path.with_suffix(".deaths")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every file in a run dir, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir()) if p.is_file()}


def _claim(path: Path) -> bool:
    """Take a `once` plan (atomic rename: exactly one worker over all attempts gets it)."""
    try:
        path.rename(path.with_suffix(".fired"))
    except FileNotFoundError:
        return False
    return True


def install() -> None:
    """Worker setup hook: wrap spikemax.am.group.finish_run with the kill (no-op unless KILL_ENV is set)."""
    plan_path = os.environ.get(KILL_ENV)
    if not plan_path:
        return
    from spikemax.am import group as am_group

    path = Path(plan_path)
    finish = am_group.finish_run

    def finish_then_die(self: Any, op: Any, *args: Any, **kwargs: Any) -> dict:
        c = op.spec
        try:
            plan = json.loads(path.read_text())
        except FileNotFoundError:  # not armed, or a `once` plan already fired
            plan = None
        if (
            plan is None
            or {"epoch": c.epoch, "generator": c.generator, "method": c.method, "seed": c.seed} != plan["group"]
        ):
            return finish(self, op, *args, **kwargs)
        mine = self.__dict__.setdefault("_killed_finished", {})  # this attempt's finished runs of the group
        if len(mine) < plan["after"] or (plan["once"] and not _claim(path)):
            row = finish(self, op, *args, **kwargs)
            mine[c.key] = {"run_id": row["run_id"], "files": digests(self.files.am_dir / c.run_dir)}
            return row
        with open(path.with_suffix(".deaths"), "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "dying": c.key, "finished": mine}) + "\n")
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL")

    am_group.finish_run = finish_then_die
