"""ConvSNN: exact fast path, training stage outputs, checkpoints, CLI."""

from __future__ import annotations

import csv
import json

import mlflow
import pytest
import torch

from spikemax import SpikemaxError
from spikemax.snn import MAX_CHECKPOINTS, ConvSNN, checkpoints, load_snn, progress, schedule_steps, spike_count_loss
from spikemax.tracking import tracking_uri
from tests.support.project import TINY_SNN, run_cli, write_params


def active_net(seed: int = 0, gain: float = 2.5, **kw) -> ConvSNN:
    """A random ConvSNN with weights scaled up so every layer spikes on random input."""
    torch.manual_seed(seed)
    net = ConvSNN(**kw).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(gain)
    return net


CONFIGS = [
    dict(num_steps=16),
    dict(in_shape=(3, 17, 15), num_classes=4, channels=[5, 6, 7], kernel=3, hidden=[], num_steps=9, beta=0.7),
    dict(in_shape=(1, 12, 12), channels=[3], hidden=[20, 11], num_steps=5, threshold=0.6),
    dict(in_shape=(2, 13, 13), channels=[4, 5], kernel=4, hidden=[9], num_steps=7),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_fast_path_spikes_equal_step_loop_in_every_layer(cfg):
    net = active_net(**cfg)
    c, h, w = cfg.get("in_shape", (1, 28, 28))
    x = torch.randn(13, c, h, w) * 2
    with torch.no_grad():
        fast, ref = net.forward_spikes(x), net.forward_spikes_steps(x)
    assert list(fast) == list(ref) == list(net.spiking_layers())
    for name in ref:
        assert fast[name].shape == ref[name].shape and fast[name].shape[:2] == (net.num_steps, 13)
        assert torch.equal(fast[name], ref[name]), name
        assert 0 < ref[name].mean() < 1, f"{name} silent or saturated: the comparison would be vacuous"
    # The training path (autograd, surrogate) computes the same spikes too.
    grad_fast = net.forward_spikes(x.requires_grad_())
    for name in ref:
        assert torch.equal(grad_fast[name].detach(), ref[name]), name


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_fused_bptt_gradient_matches_snntorch_autograd(cfg):
    net = active_net(gain=1.5, **{**cfg, "num_steps": 8})
    net.train()
    c, h, w = cfg.get("in_shape", (1, 28, 28))
    x = torch.randn(6, c, h, w, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % net.num_classes
    grads = []
    for forward in (net.forward_spikes, net.forward_spikes_steps):
        net.zero_grad()
        spike_count_loss(forward(x)["out"], y, net.hparams.loss, net.num_steps).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    fast, ref = grads
    for name in ref:
        assert ref[name].abs().sum() > 0, name
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_spiking_layers_units_match_spike_shapes():
    net = active_net(in_shape=(1, 28, 28), channels=[4, 6], hidden=[16])
    assert net.spiking_layers() == {"lif1": 4, "lif2": 6, "fc_lif1": 16, "out": 10}
    with torch.no_grad():
        spikes = net.forward_spikes(torch.randn(2, 1, 28, 28))
    assert {k: v.shape[2] for k, v in spikes.items()} == net.spiking_layers()


def test_step_loop_state_is_reset_between_calls():
    net = active_net()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        a = net.forward_spikes_steps(x)
        net.forward_spikes_steps(torch.randn(4, 1, 28, 28) * 3)
        b = net.forward_spikes_steps(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_class_probs_are_softmax_of_spike_counts():
    net = active_net()
    x = torch.randn(5, 1, 28, 28)
    probs = net.class_probs(x)
    assert probs.shape == (5, 10)
    assert torch.allclose(probs.sum(1), torch.ones(5))
    with torch.no_grad():
        counts = net.forward_spikes_steps(x)["out"].sum(0)
    assert torch.equal(probs.argmax(1), torch.softmax(counts, 1).argmax(1))


@pytest.mark.parametrize("loss", ["ce_count", "mse_count"])
def test_surrogate_gradient_reaches_first_layer(loss):
    net = active_net(loss=loss, gain=1.5)
    net.train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    out = net(x)
    value = spike_count_loss(out, y, loss, net.num_steps)
    value.backward()
    assert torch.isfinite(value)
    assert net.blocks["lif1"][0].weight.grad.abs().sum() > 0


def test_bad_architecture_is_a_one_line_error():
    with pytest.raises(SpikemaxError, match="snn.channels"):
        ConvSNN(in_shape=(1, 8, 8), channels=[2, 2, 2, 2])
    with pytest.raises(SpikemaxError, match=r"snn.hidden=\[0\]"):
        ConvSNN(hidden=[0])


def test_training_writes_epoch_checkpoints_metrics_and_mlflow_run(project, snn_checkpoints):
    _, paths = project
    assert list(snn_checkpoints) == [0, 1, 2]
    assert checkpoints(paths) == snn_checkpoints
    rows = list(csv.DictReader(open(paths.metrics / "snn_epochs.csv")))
    assert list(rows[0]) == ["epoch", "step", "progress", "train_loss", "val_loss", "val_acc", "test_acc"]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [float(r["progress"]) for r in rows] == [0.0, 1.0, 2.0]
    assert [progress(p).epoch for p in snn_checkpoints.values()] == [0.0, 1.0, 2.0]
    assert rows[0]["train_loss"] == "" and all(float(r["train_loss"]) > 0 for r in rows[1:])
    summary = json.loads((paths.metrics / "snn.json").read_text())
    assert summary["epochs"] == 2
    assert summary["test_acc"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert float(rows[-1]["test_acc"]) > float(rows[0]["test_acc"])
    # A checkpoint holds the bare network (no Lightning prefix) and its constructor arguments.
    ckpt = torch.load(snn_checkpoints[2], map_location="cpu", weights_only=True)
    assert all(key.startswith("blocks.") for key in ckpt["state_dict"])
    assert ConvSNN(**ckpt["hyper_parameters"]).state_dict().keys() == ckpt["state_dict"].keys()

    client = mlflow.MlflowClient(tracking_uri(paths.root))
    exp = client.get_experiment_by_name("snn")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "test_acc")
    assert [m.step for m in history] == [int(r["step"]) for r in rows]
    assert [m.value for m in history] == pytest.approx([float(r["test_acc"]) for r in rows])


def test_checkpoint_reproduces_recorded_test_accuracy(project, prepared, snn_checkpoints):
    rows = list(csv.DictReader(open(project[1].metrics / "snn_epochs.csv")))
    x, y = prepared.tensors("test")
    for epoch, path in snn_checkpoints.items():
        net = load_snn(path)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        with torch.no_grad():
            acc = (net.spike_counts(x).argmax(1) == y).float().mean().item()
        assert acc == pytest.approx(float(rows[epoch]["test_acc"]), abs=1e-6)


@pytest.mark.slow
def test_cli_training_is_deterministic(project, snn_checkpoints, tmp_path):
    params, paths = project
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(paths.prepared)
    write_params(tmp_path, {"prepare": params.prepare.model_dump(), "snn": {**TINY_SNN, "epochs": 1}})
    res = run_cli("train-snn", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "models" / "snn").iterdir())
    assert names == [snn_checkpoints[0].name, snn_checkpoints[1].name]
    a = torch.load(snn_checkpoints[1], weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "models" / "snn" / names[1], weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_and_corrupt_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(SpikemaxError, match="not found"):
        load_snn(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SpikemaxError, match="not a readable ConvSNN checkpoint") as err:
        load_snn(bad)
    assert "\n" not in str(err.value)


def test_cli_neurons_lists_layers_and_rejects_corrupt_file(snn_checkpoints, tmp_path):
    res = run_cli("neurons", "--checkpoint", str(snn_checkpoints[2]))
    assert res.returncode == 0, res.stderr
    for token in ["lif1", "lif2", "fc_lif1", "class:0..9", "lif2:0..7", "fc_lif1:0..31"]:
        assert token in res.stdout
    bad = tmp_path / "epoch=001.ckpt"
    bad.write_bytes(b"\x00garbage")
    res = run_cli("neurons", "--checkpoint", str(bad))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1


def test_built_networks_are_freed():
    """snntorch registers every neuron class-wide; spikemax empties that registry (snn/lif.py), so a
    dropped network (e.g. a checkpoint the AM stage is done with) is garbage-collected."""
    import gc
    import weakref

    import snntorch

    refs = [weakref.ref(ConvSNN(channels=[2], hidden=[3])) for _ in range(3)]
    gc.collect()
    assert all(r() is None for r in refs)
    assert snntorch.SpikingNeuron.instances == []
    net = active_net()  # a kept network still runs its snntorch reference loop after the registry is emptied
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net.forward_spikes(x)["out"], net.forward_spikes_steps(x)["out"])


def test_checkpoint_schedule_is_bounded_before_it_is_built():
    assert schedule_steps(0, 1, [3, 5], 10, 2) == [0, 3, 5, 10, 20]
    # Overlapping parts count once: 1000 epoch ends that the early steps repeat are fine.
    assert len(schedule_steps(10, 999, [], 10, MAX_CHECKPOINTS - 1)) == MAX_CHECKPOINTS
    with pytest.raises(SpikemaxError, match=rf"schedule takes {MAX_CHECKPOINTS + 1} checkpoints \(at most"):
        schedule_steps(0, 1, [], 10, MAX_CHECKPOINTS)
    with pytest.raises(SpikemaxError, match=f"more than {MAX_CHECKPOINTS} checkpoints"):
        schedule_steps(0, 1, [], 85, 10**12)  # refused by counting: the set would exhaust memory
    with pytest.raises(SpikemaxError, match="more than"):
        schedule_steps(1, 10**9, [], 85, 10**9)


@pytest.mark.parametrize(
    ("snn", "device", "expected"),
    [
        ({"epochs": 10**12}, "cpu", "snn.checkpoints: the schedule takes more than 1000 checkpoints"),
        ({"epochs": 1500}, "cpu", "snn.checkpoints: the schedule takes 1501 checkpoints"),
        ({"epochs": 1}, "cuda:9", "device 'cuda:9'"),
    ],
)
def test_a_refused_training_run_leaves_the_checkpoints_as_they_were(project, tmp_path, snn, device, expected):
    """Everything that can refuse train-snn runs before it deletes the previous checkpoints."""
    from spikemax import params as P
    from spikemax.stages.train_snn import run as train

    if device.startswith("cuda") and torch.cuda.device_count() > 9:
        pytest.skip("a tenth GPU exists here")
    params, paths = project
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    (root / "data" / "prepared").symlink_to(paths.prepared)
    models = root / "models" / "snn"
    models.mkdir(parents=True)
    before = {"step=000000-epoch=0.000.ckpt": b"a", "step=000010-epoch=1.000.ckpt": b"b", "epoch=003.ckpt": b"c"}
    for name, data in before.items():
        (models / name).write_bytes(data)
    tiny = params.model_copy(update={"snn": P.SNNParams(**{**TINY_SNN, "batch_size": 512, **snn}), "device": device})
    with pytest.raises(SpikemaxError, match=expected):
        train(tiny, P.Paths(root))
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    assert not (root / "mlruns").exists() or device.startswith("cuda")
