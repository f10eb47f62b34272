"""The file protocol end to end: a simulated rig process answers blocks of PNGs through a folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from spikemax.rig.files import read_responses, run_files
from spikemax.rig.models import SessionCreate
from spikemax.rig.sessions import SessionManager
from tests.support.rig import make_project

# The rig: answers each block with the mean brightness of its PNGs (2 channels); its first answer is
# malformed (one value per stimulus), and once that is refused it writes a correct CSV file.
RIG = textwrap.dedent(
    """
    import csv, json, os, sys, time
    from pathlib import Path
    import numpy as np
    from PIL import Image
    folder = Path(sys.argv[1]); done = set(); malformed = True
    while not (folder / "finished.json").exists():
        nxt = folder / "next.json"
        if not nxt.exists():
            time.sleep(0.02); continue
        block = folder / json.loads(nxt.read_text())["block"]
        if block.name in done or (block / "told.json").exists():
            time.sleep(0.02); continue
        man = json.loads((block / "manifest.json").read_text())
        y = [float(np.asarray(Image.open(block / s["file"]), dtype=float).mean() / 255) for s in man["stimuli"]]
        if malformed:
            body = {"results": [{"id": s["id"], "responses": [v]} for s, v in zip(man["stimuli"], y)]}
            (block / ".r.tmp").write_text(json.dumps(body)); os.replace(block / ".r.tmp", block / "responses.json")
            while not (block / "responses.rejected-1.error.txt").exists():
                time.sleep(0.02)
            malformed = False
        with open(block / ".r.tmp", "w", newline="") as f:
            w = csv.writer(f); w.writerow(["id", "r0", "r1"])
            for s, v in zip(man["stimuli"], y):
                w.writerow([s["id"], v, "" if v > 0.5 else 1 - v])
        os.replace(block / ".r.tmp", block / "responses.csv")
        done.add(block.name)
    """
)


def test_file_protocol_with_a_simulated_rig(generator_checkpoints, tmp_path):
    params, paths = make_project(tmp_path / "proj", generator_checkpoints)
    folder = tmp_path / "rigdir"
    folder.mkdir()
    rig = subprocess.Popen([sys.executable, "-c", RIG, str(folder)])
    manager = SessionManager(params, paths, folder / "state")
    try:
        create = SessionCreate(generator="vqvae", method="tt", budget=24, seed=0, batch=8, channels=2)
        status = run_files(manager, folder, create, max_wait=60)
    finally:
        rig.wait(30)
        manager.close()
    assert (status["asked"], status["answered"], status["queries"], status["pending"]) == (24, 24, 24, 0)
    blocks = sorted(p for p in folder.iterdir() if p.name.startswith("block-"))
    assert len(blocks) == 3 and all((b / "told.json").is_file() for b in blocks)
    err = (blocks[0] / "responses.rejected-1.error.txt").read_text().strip()
    assert err == "results[0].responses: expected 2 values (one per channel), got 1"
    assert (blocks[0] / "responses.rejected-1.json").is_file() and not (blocks[0] / "responses.json").exists()
    manifest = json.loads((blocks[0] / "manifest.json").read_text())
    assert len(manifest["stimuli"]) == 8 and all((blocks[0] / s["file"]).is_file() for s in manifest["stimuli"])
    # every told response is what the rig wrote (nothing half-applied from the refused file)
    told = {}
    for b in blocks:
        for r in read_responses(b / "responses.csv", 2).results:
            told[r.id] = r.responses
    restored = SessionManager(params, paths, folder / "state", mlflow=False)
    s = restored.all()[0]
    assert [told[x] for x in s.q_sid] == [[None if np.isnan(v) else v for v in y.tolist()] for y in s.q_y]
    assert json.loads((folder / "finished.json").read_text())["best"] == status["best"]
    restored.close()
