"""The file protocol for rigs without HTTP (MATLAB, LabVIEW, Bonsai): one session driven through a folder.

Layout of DIR (every file spikemax writes appears whole: written aside, then renamed):

    state/rig.db                 the session's durable log (same store and rules as the HTTP service)
    next.json                    {"block": "block-000002", "manifest": "block-000002/manifest.json"}
    block-000002/manifest.json   {"session", "block", "channels", "responses_file", "stimuli": [{"id", "file", "indices"}]}
                                 (a reference stimulus, noise.references, has "reference": true)
    block-000002/manifest.csv    id,file,i0,i1,... (the same, for readtable / CSV readers)
    block-000002/<id>.png        the stimuli, [0, 1] pixels at the generator's resolution
    block-000002/responses.json  written by the rig (atomic rename): the tell body {"results": [...]}
      or responses.csv           id,r0,...,r{m-1} (an empty cell or NaN = failed channel)
    block-000002/told.json       spikemax's reply: the session status after the block was told
    block-.../responses.rejected-1.json + responses.rejected-1.error.txt   a refused file, moved aside
    finished.json                the final status once the budget is spent and answered

A responses file must answer every stimulus of its block; it is applied whole or not at all.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from spikemax import SpikemaxError
from spikemax.rig.errors import RigError, Unavailable
from spikemax.rig.models import SessionCreate, TellRequest
from spikemax.rig.session import Session
from spikemax.rig.sessions import SessionManager

RESPONSE_FILES = ("responses.json", "responses.csv")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see it whole or not at all (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def block_name(event: int) -> str:
    """The folder of the block made by ask event `event`."""
    return f"block-{event:06d}"


def write_block(folder: Path, s: Session, event: int) -> Path:
    """Write the pending stimuli of ask `event` as a block folder (PNGs, manifests), atomically."""
    from spikemax.images import png_bytes

    block = folder / block_name(event)
    if (block / "manifest.json").is_file():
        return block
    stims = [(sid, st) for sid, st in s.stimuli.items() if st.event == event]
    repeats = {"repeats": s.cfg.repeats} if s.cfg.repeats > 1 else {}
    tmp = folder / f".{block.name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    pixels = s.grid.decode_pixels(np.stack([st.indices for _, st in stims]))
    for (sid, _), im in zip(stims, pixels):
        (tmp / f"{sid}.png").write_bytes(png_bytes(im))
    manifest = {
        "session": s.id,
        "block": block.name,
        "channels": s.cfg.channels,
        "responses_file": "responses.json",
        **repeats,
        "stimuli": [
            # a reference stimulus (noise.references) is shown and answered like any other
            {
                "id": sid,
                "file": f"{sid}.png",
                "indices": st.indices.tolist(),
                **({"reference": True} if st.reference is not None else {}),
            }
            for sid, st in stims
        ],
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with open(tmp / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "file", *[f"i{j}" for j in range(s.grid.d)]])
        for sid, st in stims:
            w.writerow([sid, f"{sid}.png", *st.indices.tolist()])
    for p in tmp.iterdir():  # the whole block on disk before it appears under its name
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, block)
    write_atomic(folder / "next.json", json.dumps({"block": block.name, "manifest": f"{block.name}/manifest.json"}))
    return block


def read_responses(path: Path, channels: int) -> TellRequest:
    """A responses file as a tell body; raises ValueError / ValidationError naming what is wrong."""
    if path.suffix == ".json":
        return TellRequest.model_validate_json(path.read_bytes())
    results = []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0].strip() != "id":
        raise ValueError("responses.csv: the first row must be the header id,r0,...")
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        values: list[float | None] = []
        for col, cell in enumerate(row[1:], start=1):
            cell = cell.strip()
            if cell == "" or cell.lower() in ("nan", "null"):
                values.append(None)
                continue
            try:
                v = float(cell)
            except ValueError:
                raise ValueError(f"responses.csv line {line} column {col}: {cell!r} is not a number") from None
            if not math.isfinite(v):
                raise ValueError(f"responses.csv line {line} column {col}: {cell!r} is not finite")
            values.append(v)
        results.append({"id": row[0].strip(), "responses": values})
    return TellRequest.model_validate({"results": results})


def _problem(err: Exception) -> str:
    """One line naming the field of a refused responses file."""
    if isinstance(err, ValidationError):
        from spikemax.rig.app import error_text

        e = err.errors()[0]
        return error_text(e["loc"], e["msg"])
    return " ".join(str(err).split())


def reject(path: Path, message: str) -> Path:
    """Move a refused responses file aside with an error file next to it; returns the error file."""
    n = 1
    while (path.parent / f"responses.rejected-{n}{path.suffix}").exists():
        n += 1
    moved = path.parent / f"responses.rejected-{n}{path.suffix}"
    os.replace(path, moved)
    err = path.parent / f"responses.rejected-{n}.error.txt"
    write_atomic(err, message + "\n")
    return err


def apply_block(manager: SessionManager, s: Session, block: Path, event: int) -> bool:
    """Tell the block's responses file if one is there: True when applied, False when absent or refused."""
    for name in RESPONSE_FILES:
        path = block / name
        if not path.is_file():
            continue
        try:
            req = read_responses(path, s.cfg.channels)
            want = {sid for sid, st in s.stimuli.items() if st.event == event and not st.answered}
            got = [r.id for r in req.results if r.id is not None]
            missing = sorted(want - set(got))
            if missing:
                raise ValueError(
                    f"results: {len(missing)} stimuli of {block.name} are not answered (first {missing[0]})"
                )
            status = manager.tell(s.id, req)
        except Unavailable:
            raise  # the journal's fault, not the file's: leave the file for the restarted session
        except (ValueError, ValidationError, RigError) as err:
            msg = _problem(err)
            reject(path, msg)
            print(f"{block.name}: {name} refused: {msg}", flush=True)
            return False
        write_atomic(block / "told.json", status.model_dump_json(indent=1))
        return True
    return False


def run_files(
    manager: SessionManager,
    folder: Path,
    create: SessionCreate,
    k: int | None = None,
    poll: float = 0.05,
    max_wait: float | None = None,
    on_block: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Drive the folder's session (created from `create` on first use, else resumed) to its budget."""
    sessions = manager.all()
    if len(sessions) > 1:
        raise SpikemaxError(f"{manager.store.path} holds {len(sessions)} sessions; a rig-files folder holds one")
    s = sessions[0] if sessions else manager.create(create)
    write_atomic(folder / "session.json", json.dumps({"id": s.id, "run_id": s.run_id, "channels": s.cfg.channels}))
    waited = time.monotonic()
    while True:
        if s.problem:
            raise SpikemaxError(f"session {s.id} cannot continue: {s.problem}")
        pending = s.pending
        if not pending and s.state.left <= 0:
            status = s.status().model_dump()
            write_atomic(folder / "finished.json", json.dumps(status, indent=1))
            return status
        if not pending:
            manager.ask(s.id, k)
            pending = s.pending
        event = s.stimuli[pending[0]].event
        block = write_block(folder, s, event)  # again after a crash between the ask and the block
        if apply_block(manager, s, block, event):
            waited = time.monotonic()
            if on_block is not None:
                on_block(s.status().model_dump())
            continue
        if max_wait is not None and time.monotonic() - waited > max_wait:
            raise SpikemaxError(f"no responses for {block.name} within {max_wait:g} s")
        time.sleep(poll)
