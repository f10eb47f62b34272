"""The closed loop over HTTP: a rig that sees only PNG images drives the optimizer to a budget."""

from __future__ import annotations

import base64
import io
import threading

import mlflow
import numpy as np
import pytest
from PIL import Image

from spikemax import SpikemaxError, querylog, tracking
from spikemax.generators import load_generator
from spikemax.optim import make_optimizer
from spikemax.server import Client, ClosedLoop, make_server


def brightness(png_b64: str) -> float:
    """The rig's 'neuron': mean pixel value of the image it was shown."""
    img = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    return float(np.asarray(img, dtype=np.float64).mean() / 255)


@pytest.fixture
def served(generator_checkpoints, tmp_path):
    grid = load_generator("vqvae", generator_checkpoints["vqvae"])
    uri = tracking.configure(tmp_path)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(tracking.experiment_id("activation-maximization", tmp_path))
    logger = querylog.QueryLogger(client, run.info.run_id, tmp_path / "run")
    loop = ClosedLoop(make_optimizer("tt", grid.d, grid.n, seed=0, batch=16), grid, budget=96, logger=logger)
    server = make_server(loop, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Client(f"http://127.0.0.1:{server.server_address[1]}"), loop, logger, client, run.info.run_id
    server.shutdown()
    server.server_close()


def test_rig_loop_over_http_logs_every_query(served):
    rig, loop, logger, client, run_id = served
    first_batch_mean = None
    while rig.status()["asked"] < 96:
        batch = rig.ask(16)
        responses = [brightness(p) for p in batch["images_png"]]
        if first_batch_mean is None:
            first_batch_mean = float(np.mean(responses))
        responses[0] = None  # a failed presentation is told as null and counted
        rig.tell(batch["indices"], responses)
    status = rig.status()
    assert status["told"] == 96 and status["asked"] == 96
    best = rig.best()
    assert best["response"] > first_batch_mean
    assert abs(brightness(best["image_png"]) - best["response"]) < 1e-9
    with pytest.raises(SpikemaxError, match="budget of 96 queries is spent"):
        rig.ask(1)
    table = logger.close()
    assert len(table) == 96 and int(table["response"].isna().sum()) == 6
    history = client.get_metric_history(run_id, "activation")
    assert len(history) == 96


def test_bad_requests_get_clear_errors(served):
    rig, loop, *_ = served
    with pytest.raises(SpikemaxError, match="k must be a positive integer"):
        rig.ask(0)
    with pytest.raises(SpikemaxError, match=r"shape \(k, 49\)"):
        rig.tell([[0, 1, 2]], [1.0])
    with pytest.raises(SpikemaxError, match="no response has been told"):
        rig.best()
    bad = [[loop.grid.n] * loop.grid.d]
    with pytest.raises(SpikemaxError):
        rig.tell(bad, [1.0])


def test_off_policy_tell_is_accepted(served):
    rig, loop, *_ = served
    chosen = np.zeros((2, loop.grid.d), dtype=int).tolist()
    status = rig.tell(chosen, [0.3, 0.7])
    assert status["told"] == 2 and status["best_response"] == 0.7 and status["asked"] == 0


def test_budget_must_be_positive(generator_checkpoints):
    grid = load_generator("vqvae", generator_checkpoints["vqvae"])
    with pytest.raises(SpikemaxError, match="budget must be >= 1"):
        ClosedLoop(make_optimizer("random", grid.d, grid.n), grid, budget=0)
