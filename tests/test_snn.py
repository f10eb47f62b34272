"""ConvSNN: exact fast path, training stage outputs, checkpoint loading."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from spikemax import SpikemaxError
from spikemax.snn import ConvSNN, checkpoints, load_snn


def test_training_writes_epoch_checkpoints_and_metrics(project, snn_checkpoints):
    _, paths = project
    assert list(snn_checkpoints) == [0, 1, 2]
    assert checkpoints(paths) == snn_checkpoints
    rows = list(csv.DictReader(open(paths.metrics / "snn_epochs.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    summary = json.loads((paths.metrics / "snn.json").read_text())
    assert summary["epochs"] == 2
    assert summary["test_acc"] == pytest.approx(float(rows[-1]["test_acc"]))
    net = load_snn(snn_checkpoints[2])
    assert not net.training
    assert list(net.spiking_layers()) == ["lif1", "lif2", "fc_lif1", "out"]
