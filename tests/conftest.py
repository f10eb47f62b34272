"""Shared fixtures: tiny real data and models built once per session in temp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spikemax import params as P
from spikemax.data import Prepared
from spikemax.stages.prepare import run as prepare
from tests.support.project import TINY_GENERATORS, TINY_PREPARE, TINY_SNN, write_params
from tests.support.servers import mlflow_server, postgres, ray_local  # noqa: F401 - fixtures for the scaling tests


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """Tests share 2 cores; one intra-op thread keeps them predictable."""
    torch.set_num_threads(1)


@pytest.fixture
def own_store(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: keep one stage run's store out of the next
    (modules that run stages use it with `pytestmark = pytest.mark.usefixtures("own_store")`)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> tuple[P.Params, P.Paths]:
    """A project dir with tiny params and real prepared Fashion-MNIST (1000 train+val, 300 test)."""
    root = tmp_path_factory.mktemp("project")
    path = write_params(root, {"prepare": TINY_PREPARE})
    params, paths = P.load(path, root=root)
    prepare(params, paths)
    return params, paths


@pytest.fixture(scope="session")
def prepared(project) -> Prepared:
    """The tiny prepared dataset of `project`."""
    return Prepared.load(project[1].prepared)


@pytest.fixture(scope="session")
def generator_checkpoints(project) -> dict[str, Path]:
    """Both generators trained tiny (one epoch on the tiny project) into its models/generators."""
    from spikemax.generators import NAMES, checkpoint_path
    from spikemax.stages.train_generator import run as train

    params, paths = project
    tiny = P.validate({**params.model_dump(), "generators": TINY_GENERATORS})
    out = {}
    for name in NAMES:
        train(name, tiny, paths)
        out[name] = checkpoint_path(name, paths)
    return out


@pytest.fixture(scope="session")
def snn_checkpoints(project) -> dict[int, Path]:
    """A tiny ConvSNN trained 2 epochs on `project` (models/snn/epoch=000..002.ckpt): epoch -> path."""
    from spikemax.snn import checkpoints
    from spikemax.stages.train_snn import run as train

    params, paths = project
    if not checkpoints(paths):
        tiny = params.model_copy(update={"snn": P.SNNParams(**TINY_SNN)})
        train(tiny, paths)
    return checkpoints(paths)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
