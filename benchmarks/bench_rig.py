"""Rig service latency over loopback (ask 40 + tell 40, durable writes and MLflow) and SIGKILL durability.

    python benchmarks/bench_rig.py --generators models/generators --rounds 30 --kills 20 --out rig.json

HTTP: a real uvicorn server on 127.0.0.1, one session per generator, `rounds` ask(k)+tell(k) round
trips (p50/p95 of ask, tell and the round trip; the first round is a warm-up and not counted).
Files: `run_files` on a temp folder with an in-process rig that answers each block at once; the
round trip is from the rig's rename of responses.json to the next block's appearance.
Kills: a `spikemax serve` subprocess is SIGKILLed `kills` times at random moments of a session
(mid-tell included) and restarted; the final query table must equal a never-killed session's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def project(root: Path, generators: Path, prepared: Path | None = None) -> tuple:
    """A temp project with the repo's params, the trained generators and (linked) prepared data (the VQ-VAE prior's)."""
    from spikemax import params as P

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "models" / "generators").mkdir(parents=True, exist_ok=True)
    for name in ("sngan", "vqvae"):
        shutil.copy(generators / f"{name}.ckpt", root / "models" / "generators" / f"{name}.ckpt")
    if prepared is not None and prepared.is_dir():
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / "prepared").symlink_to(prepared.resolve())
    return P.load(root / "params.yaml", root=root)


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "n": len(a)}


def neuron(indices: np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.float64)
    return -((idx - (np.arange(idx.shape[1]) % 7)) ** 2).mean(axis=1)


def bench_http(params, paths, k: int, rounds: int) -> dict:
    import uvicorn

    from spikemax.rig.app import bind, create_app
    from spikemax.rig.sessions import SessionManager

    manager = SessionManager(params, paths, paths.results / "rig")
    sock = bind("127.0.0.1", 0)  # the socket `spikemax serve` listens on (TCP_NODELAY)
    server = uvicorn.Server(uvicorn.Config(create_app(manager, "tok"), log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    out = {}
    with httpx.Client(base_url=url, headers={"Authorization": "Bearer tok"}, timeout=60) as c:
        for gen in ("sngan", "vqvae"):
            made = c.post("/sessions", json={"generator": gen, "method": "tt", "budget": k * (rounds + 1), "seed": 0})
            assert made.status_code == 201, made.text
            sid = made.json()["id"]
            ask, tell, trip = [], [], []
            for r in range(rounds + 1):
                t0 = time.perf_counter()
                stim = c.post(f"/sessions/{sid}/ask", json={"k": k}).json()["stimuli"]
                t1 = time.perf_counter()
                y = neuron(np.asarray([s["indices"] for s in stim]))
                t2 = time.perf_counter()
                resp = c.post(
                    f"/sessions/{sid}/tell",
                    json={"results": [{"id": s["id"], "responses": [float(v)]} for s, v in zip(stim, y)]},
                )
                t3 = time.perf_counter()
                assert resp.status_code == 200, resp.text
                if r:
                    ask.append(t1 - t0)
                    tell.append(t3 - t2)
                    trip.append((t1 - t0) + (t3 - t2))
            out[gen] = {"ask": pct(ask), "tell": pct(tell), "round_trip": pct(trip)}
    server.should_exit = True
    th.join(10)
    manager.close()
    return out


def bench_files(params, paths, k: int, rounds: int, gen: str = "sngan") -> dict:
    from spikemax.rig.files import run_files
    from spikemax.rig.models import SessionCreate
    from spikemax.rig.sessions import SessionManager

    folder = paths.root / f"files-{gen}"
    folder.mkdir()
    manager = SessionManager(params, paths, folder / "state")
    trips: list[float] = []
    stop = threading.Event()

    def rig() -> None:
        answered: set[str] = set()
        t_written = None
        while not stop.is_set():
            nxt = folder / "next.json"
            if not nxt.exists():
                time.sleep(0.001)
                continue
            block = folder / json.loads(nxt.read_text())["block"]
            if block.name in answered:
                time.sleep(0.001)
                continue
            if t_written is not None:
                trips.append(time.perf_counter() - t_written)
            man = json.loads((block / "manifest.json").read_text())
            y = neuron(np.asarray([s["indices"] for s in man["stimuli"]]))
            body = {"results": [{"id": s["id"], "responses": [float(v)]} for s, v in zip(man["stimuli"], y)]}
            (block / ".tmp").write_text(json.dumps(body))
            t_written = time.perf_counter()
            os.replace(block / ".tmp", block / "responses.json")
            answered.add(block.name)

    th = threading.Thread(target=rig, daemon=True)
    th.start()
    run_files(
        manager, folder, SessionCreate(generator=gen, method="tt", budget=k * (rounds + 1), seed=0, batch=k), poll=0.002
    )
    stop.set()
    th.join(5)
    manager.close()
    return {gen: {"block_round_trip": pct(trips[1:])}}


def bench_kills(params, paths, kills: int, k: int = 8, budget: int = 400) -> dict:
    from spikemax.rig.models import SessionCreate, TellRequest
    from spikemax.rig.sessions import SessionManager

    root = paths.root
    env = {**{a: b for a, b in os.environ.items() if a != "MLFLOW_TRACKING_URI"}, "SPIKEMAX_TOKEN": "tok"}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")

    def start():
        p = subprocess.Popen(
            [sys.executable, "-m", "spikemax.cli", "serve", "--port", "0", "--state", "killrig"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        url = p.stdout.readline().split()[3]
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
                return p, httpx.Client(base_url=url, headers={"Authorization": "Bearer tok"}, timeout=30)
            except httpx.TransportError:
                time.sleep(0.05)

    rng = random.Random(1)
    proc, c = start()
    sid = c.post("/sessions", json={"generator": "sngan", "method": "tt", "budget": budget, "seed": 4}).json()["id"]
    restarts, refused = 0, 0
    while True:
        try:
            if restarts < kills and rng.random() < 0.4:
                threading.Timer(rng.random() * 0.03, proc.send_signal, (signal.SIGKILL,)).start()
            pending = c.get(f"/sessions/{sid}/stimuli").json()
            if not pending:
                if c.get(f"/sessions/{sid}").json()["asked"] >= budget:
                    break
                pending = c.post(f"/sessions/{sid}/ask", json={"k": k, "png": False}).json()["stimuli"]
            y = neuron(np.asarray([s["indices"] for s in pending]))
            r = c.post(
                f"/sessions/{sid}/tell",
                json={"results": [{"id": s["id"], "responses": [float(v)]} for s, v in zip(pending, y)]},
            )
            refused += r.status_code == 409
        except httpx.TransportError:
            proc.wait(10)
            restarts += 1
            proc, c = start()
    final = c.get(f"/sessions/{sid}").json()
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    ref = SessionManager(params, paths, root / "ref", mlflow=False)
    rid = ref.create(SessionCreate(generator="sngan", method="tt", budget=budget, seed=4)).id
    while ref.get(rid).n_asked < budget:
        asked = ref.ask(rid, k)
        y = neuron(np.stack([i for _, i in asked]))
        ref.tell(
            rid,
            TellRequest.model_validate(
                {"results": [{"id": x, "responses": [float(v)]} for (x, _), v in zip(asked, y)]}
            ),
        )
    got = SessionManager(params, paths, root / "killrig", mlflow=False)
    a, b = got.get(sid), ref.get(rid)
    same = bool(
        np.array_equal(np.stack(a.q_idx), np.stack(b.q_idx))
        and np.array_equal(np.asarray(a.q_y), np.asarray(b.q_y), equal_nan=True)
    )
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    run_id = final["run_id"]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "activation"))
    return {
        "kills": restarts,
        "budget": budget,
        "queries": final["queries"],
        "lost": budget - len(set(steps)),
        "double_counted_mlflow": len(steps) - len(set(steps)),
        "table_equals_unkilled": same,
        "mlflow_steps_exact": steps == list(range(budget)),
        "tells_refused_409": refused,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generators", type=Path, default=Path("models/generators"), help="trained generator checkpoints")
    ap.add_argument(
        "--prepared", type=Path, default=Path("data/prepared"), help="prepared data (the VQ-VAE sessions' prior)"
    )
    ap.add_argument("--k", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    res: dict = {"k": args.k, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        params, paths = project(Path(tmp) / "proj", args.generators, args.prepared)
        res["http"] = bench_http(params, paths, args.k, args.rounds)
        res["files"] = {
            **bench_files(params, paths, args.k, args.rounds, "sngan"),
            **bench_files(params, paths, args.k, args.rounds, "vqvae"),
        }
        if args.kills:
            res["sigkill"] = bench_kills(params, paths, args.kills)
    print(f"{'path':28s} {'p50 ms':>8s} {'p95 ms':>8s}")
    for gen, r in res["http"].items():
        for key in ("ask", "tell", "round_trip"):
            print(f"{'http ' + gen + ' ' + key:28s} {r[key]['p50_ms']:8.1f} {r[key]['p95_ms']:8.1f}")
    for gen, r in res["files"].items():
        print(
            f"{'files ' + gen + ' block':28s} {r['block_round_trip']['p50_ms']:8.1f} {r['block_round_trip']['p95_ms']:8.1f}"
        )
    if "sigkill" in res:
        print("sigkill:", res["sigkill"])
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
