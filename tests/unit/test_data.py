"""The prepare stage on real Fashion-MNIST and the CIFAR-10 reader on a fixture in the real format."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from spikemax import SpikemaxError
from spikemax import data as D
from spikemax import params as P
from spikemax.stages.prepare import run as prepare
from tests.support.project import write_params


def test_prepare_shapes_dtypes_and_sizes(prepared):
    sizes = {s: len(prepared.raw(s)[1]) for s in D.SPLITS}
    assert sizes == {"train": 800, "val": 200, "test": 300}
    x, y = prepared.raw("train")
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (1, 28, 28)
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= 9
    assert prepared.meta["classes"][0] == "T-shirt/top" and prepared.shape == (1, 28, 28)


@pytest.mark.parametrize("split", D.SPLITS)
def test_prepare_keeps_classes_balanced(prepared, split):
    _, y = prepared.raw(split)
    counts = np.bincount(y.numpy(), minlength=10)
    assert counts.max() - counts.min() <= 1


def test_splits_are_disjoint(prepared):
    flat = {s: {bytes(img.numpy().tobytes()) for img in prepared.raw(s)[0]} for s in ("train", "val")}
    assert not flat["train"] & flat["val"]


def test_normalization_recorded_and_applied(prepared):
    x, _ = prepared.tensors("train")
    assert x.dtype == torch.float32
    # The train split is normalized with its own statistics: mean ~0, std ~1.
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    raw, _ = prepared.raw("test")
    back = prepared.denormalize(prepared.tensors("test")[0])
    assert torch.allclose(back, raw.float() / 255, atol=1e-5)
    # Fashion-MNIST's known pixel mean is about 0.286.
    assert 0.25 < prepared.meta["mean"][0] < 0.32


def test_prepare_is_deterministic(tmp_path, project):
    params, _ = project
    paths = P.Paths(tmp_path)
    prepare(params, paths)
    again = D.Prepared.load(paths.prepared)
    first = D.Prepared.load(project[1].prepared)
    for split in D.SPLITS:
        assert torch.equal(again.raw(split)[0], first.raw(split)[0])


def test_subset_larger_than_data_is_an_error(tmp_path):
    path = write_params(tmp_path, {"prepare": {"test_size": 10001}})
    params, paths = P.load(path, root=tmp_path)
    with pytest.raises(SpikemaxError, match=r"test_size=10001 .*allowed: 1\.\.10000"):
        prepare(params, paths)


def test_missing_dataset_names_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(D.DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        D.load_fashion_mnist(tmp_path / "raw", download=False)


def test_read_idx_rejects_truncated_file(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") * 3 + b"\x00" * 5)
    with pytest.raises(SpikemaxError, match="truncated"):
        D.read_idx(bad)


def write_cifar_fixture(root, per_batch: int = 20) -> np.ndarray:
    """Write a tiny CIFAR-10 in the real python-pickle layout; return the first batch's images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(per_batch)]
        with open(folder / name, "wb") as fh:
            pickle.dump(
                {
                    b"batch_label": name.encode(),
                    b"labels": labels,
                    b"data": data,
                    b"filenames": [b"f%d.png" % i for i in range(per_batch)],
                },
                fh,
            )
        first = data if first is None else first
    names = [c.encode() for c in D.CIFAR10_CLASSES]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, fh)
    return first


def test_cifar10_reader_on_real_format_fixture(tmp_path):
    first = write_cifar_fixture(tmp_path)
    raw = D.load_cifar10(tmp_path, download=False)
    assert raw.train_x.shape == (100, 3, 32, 32) and raw.test_x.shape == (20, 3, 32, 32)
    assert raw.classes[0] == "airplane"
    # Channel planes: the first 1024 bytes are the red plane of image 0, row-major.
    assert np.array_equal(raw.train_x[0, 0].ravel(), first[0, :1024])
    assert np.array_equal(raw.train_x[0, 2].ravel(), first[0, 2048:])


def test_prepare_cifar10(tmp_path):
    write_cifar_fixture(tmp_path / "raw")
    path = write_params(
        tmp_path,
        {"prepare": {"dataset": "cifar10", "root": "raw", "train_size": 50, "test_size": 20, "download": False}},
    )
    params, paths = P.load(path, root=tmp_path)
    meta = prepare(params, paths)
    assert meta["shape"] == [3, 32, 32] and len(meta["mean"]) == 3
    x, _ = D.Prepared.load(paths.prepared).tensors("train")
    assert x.shape == (45, 3, 32, 32)


def test_missing_cifar10_lists_missing_files(tmp_path):
    with pytest.raises(D.DatasetNotFound, match="data_batch_1"):
        D.load_cifar10(tmp_path, download=False)


def test_datamodule_serves_normalized_batches(prepared):
    dm = D.PreparedDataModule(prepared, batch_size=64)
    dm.setup()
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (64, 1, 28, 28) and yb.shape == (64,)
    assert len(dm.test_dataloader().dataset) == 300


def test_prepared_missing_is_a_clear_error(tmp_path):
    with pytest.raises(SpikemaxError, match="spikemax prepare"):
        D.Prepared.load(tmp_path)


def test_datamodule_pixel_mode_and_drop_last(prepared):
    dm = D.PreparedDataModule(prepared, batch_size=300, pixels=True, drop_last=True)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(len(b[0]) == 300 for b in batches)  # 800 -> 2 full, ragged dropped
    assert batches[0][0].dtype == torch.uint8
    assert len(list(dm.val_dataloader())) == 1  # only the shuffled train split drops
