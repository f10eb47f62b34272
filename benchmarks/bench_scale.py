"""Scaling the maximize stage: Ray engine vs in-process, and per-query logging against `mlflow server`.

Run from anywhere with a trained project (its layout: data/prepared, models/):
  python benchmarks/bench_scale.py --project /path/to/project --out benchmarks/results/scale.json
  python benchmarks/bench_scale.py --project P --quick     # smaller budget (smoke run)

1. Engines: the same maximize plan (last checkpoint, both generators, tt + random, class:* targets)
   run in-process and on a fresh local Ray cluster with `--workers` worker CPUs, each in its own
   temp project (fresh sqlite store, fresh results). Reports the stage's wall time (cluster start
   excluded, reported apart), the ratio ray/in-process, and whether both produced the same run keys
   and the same query tables.
2. Logging: the in-process plan again with MLFLOW_TRACKING_URI pointing at a real `mlflow server`
   subprocess on a loopback port (sqlite backend, or `--backend-store-uri`, e.g. a PostgreSQL URL):
   the stage's logging_share_pct (time inside the query loggers, including the wait for the
   server's acknowledgements at each run's close / stage wall time), the time inside the loggers
   per query (less noisy on a shared machine), and the stage's wall time against the local sqlite
   store's. `--repeats N` runs the server part N times (a fresh server and database each);
   `--design sync` sends every batch synchronously instead of mirroring it in the background (the
   previous design); `--design mirrored --design sync` alternates both in each repeat. A PostgreSQL
   `--backend-store-uri` gets a fresh database per server run on that server.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def _project(root: Path, source: Path, maximize: dict) -> tuple:
    """A temp project sharing `source`'s prepared data and models, with its own outputs and store."""
    from spikemax import params as P

    (root / "data").mkdir(parents=True)
    (root / "data" / "prepared").symlink_to(source / "data" / "prepared")
    (root / "models").symlink_to(source / "models")
    base = yaml.safe_load((source / "params.yaml").read_text())
    base["maximize"] = {**base.get("maximize", {}), **maximize}
    (root / "params.yaml").write_text(yaml.safe_dump(base))
    return P.load(root / "params.yaml", root=root)


def _tables(paths) -> dict:
    import pandas as pd

    from spikemax.querylog import read_queries

    df = pd.read_csv(paths.results / "am" / "summary.csv")
    return {
        r.run_key: read_queries(paths.results / "am" / r.run_dir).drop(columns="elapsed_s") for r in df.itertuples()
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)


def _stage(params, paths, engine: str = "local") -> tuple[float, dict]:
    from spikemax.am.engine import EngineSettings
    from spikemax.stages.maximize import run

    t0 = time.perf_counter()
    metrics = run(params, paths, EngineSettings(engine))  # joins the cluster started here (ray)
    return time.perf_counter() - t0, metrics


def _per_query(metrics: dict) -> float:
    """Milliseconds inside the query loggers per logged query."""
    return round(1000 * metrics["logging_s"] / max(metrics["queries_run"], 1), 4)


def _backend(uri: str | None, name: str) -> str | None:
    """A fresh database `bench_NAME` on the PostgreSQL server of `uri` (other URIs as given)."""
    if not uri or not uri.startswith("postgresql"):
        return uri
    import sqlalchemy

    db = f"bench_{name}".replace("-", "_")
    engine = sqlalchemy.create_engine(uri, isolation_level="AUTOCOMMIT")
    with engine.connect() as con:
        con.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{db}"'))
        con.execute(sqlalchemy.text(f'CREATE DATABASE "{db}"'))
    engine.dispose()
    return str(sqlalchemy.engine.make_url(uri).set(database=db).render_as_string(hide_password=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(home: Path, backend: str | None, workers: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--backend-store-uri", backend or f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(home / "artifacts"), "--serve-artifacts",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("mlflow server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=Path("."), help="trained project root (data/, models/)")
    ap.add_argument("--workers", type=int, default=2, help="Ray worker CPUs")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="budget 128")
    ap.add_argument("--skip", choices=["engines", "logging"], action="append", default=[])
    ap.add_argument("--repeats", type=int, default=1, help="runs of the mlflow-server part")
    ap.add_argument(
        "--design",
        choices=["mirrored", "sync"],
        action="append",
        help="mirrored (default): metrics go to the server from a background thread; sync: every batch is "
        "acknowledged before the optimizer is told (the previous design); several: alternated per repeat",
    )
    ap.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers")
    ap.add_argument("--backend-store-uri", help="mlflow server's backend store (default: a fresh sqlite file)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    designs = args.design or ["mirrored"]
    from spikemax.querylog import QueryLogger

    source = args.project.resolve()
    plan = {
        "epochs": [-1],
        "generators": ["sngan", "vqvae"],
        "methods": ["tt", "random"],
        "targets": ["class:*"],
        "units_per_layer": 0,
        "seeds": [0],
        "budget": 128 if args.quick else args.budget,
        "batch": 64,
    }
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # an HTTP store prints a URL per run
    import torch

    out: dict = {
        "plan": plan,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp_path = Path(tmp)
        local = _project(tmp_path / "local", source, plan)
        wall_local, m_local = _stage(*local)
        out["in_process"] = {
            "wall_s": round(wall_local, 2),
            "logging_share_pct": m_local["logging_share_pct"],
            "logging_ms_per_query": _per_query(m_local),
        }
        rows.append(("in-process (sqlite)", wall_local, m_local["logging_share_pct"], _per_query(m_local)))
        if "engines" not in args.skip:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=args.workers, include_dashboard=False, configure_logging=False, log_to_driver=False)
            start_s = time.perf_counter() - t0
            try:
                remote = _project(tmp_path / "ray", source, plan)
                wall_ray, m_ray = _stage(*remote, engine="ray")
            finally:
                ray.shutdown()
            same = _same(_tables(local[1]), _tables(remote[1]))
            out["ray"] = {
                "wall_s": round(wall_ray, 2),
                "cluster_start_s": round(start_s, 2),
                "ratio_vs_in_process": round(wall_ray / wall_local, 3),
                "same_results": same,
                "n_runs": m_ray["n_runs"],
            }
            rows.append((f"ray, {args.workers} workers", wall_ray, m_ray["logging_share_pct"], _per_query(m_ray)))
        if "logging" not in args.skip:
            out["mlflow_server"] = []
            for rep, design in itertools.product(range(args.repeats), designs):
                QueryLogger.mirror_remote = design == "mirrored"
                name = f"{rep}-{design}"
                proc, uri = _mlflow_server(
                    tmp_path / f"server{name}", _backend(args.backend_store_uri, name), args.server_workers
                )
                try:
                    os.environ["MLFLOW_TRACKING_URI"] = uri
                    served = _project(tmp_path / f"served{name}", source, plan)
                    wall_srv, m_srv = _stage(*served)
                finally:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                    proc.terminate()
                    proc.wait(30)
                out["mlflow_server"].append(
                    {
                        "design": design,
                        "wall_s": round(wall_srv, 2),
                        "wall_vs_sqlite": round(wall_srv / wall_local, 3),
                        "logging_share_pct": m_srv["logging_share_pct"],
                        "logging_ms_per_query": _per_query(m_srv),
                        "same_results": _same(_tables(local[1]), _tables(served[1])),
                    }
                )
                rows.append(
                    (f"mlflow server ({design}) #{rep + 1}", wall_srv, m_srv["logging_share_pct"], _per_query(m_srv))
                )
    print(f"{'engine':32s} {'wall s':>8s} {'logging %':>10s} {'ms/query':>9s}")
    for name, wall, share, per_query in rows:
        print(f"{name:32s} {wall:8.2f} {share:10.2f} {per_query:9.4f}")
    if "ray" in out:
        print(f"ray / in-process: {out['ray']['ratio_vs_in_process']:.3f}  same results: {out['ray']['same_results']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
