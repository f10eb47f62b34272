"""Generators: quantile grid, decode contract, VQ-VAE round trip, checkpoints, one-line errors."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from spikemax import SpikemaxError, tracking
from spikemax.generators import NAMES, LatentGrid, load_generator, normal_quantiles
from tests.support.project import run_cli


@pytest.fixture(scope="module")
def grids(generator_checkpoints) -> dict[str, LatentGrid]:
    return {name: load_generator(name, path) for name, path in generator_checkpoints.items()}


@pytest.mark.parametrize("n", [2, 7, 16, 64])
def test_quantile_grid_is_symmetric_increasing_and_centred(n):
    v = normal_quantiles(n)
    assert v.shape == (n,) and v.dtype == torch.float32
    assert torch.allclose(v, -v.flip(0), atol=1e-6)
    assert bool((v[1:] > v[:-1]).all())
    mid = v[(n - 1) // 2 : n // 2 + 1]
    assert abs(float(mid.mean())) < 1e-6 and float(mid.abs().max()) < 1.4 / n
    # Quantile grid, not a [-4, 4] box: extremes stay inside the N(0, 1) bulk.
    assert float(v.max()) < 3.0


def test_random_grid_latents_have_typical_norm(grids):
    g = grids["sngan"]
    z = g.latents(g.random_indices(2000, seed=1))
    # ||z|| of a N(0, I_d) sample is about sqrt(d); MANGO's uniform box gave ~2.3 x that.
    ratio = float(z.norm(dim=1).mean()) / g.d**0.5
    assert 0.8 < ratio < 1.1


@pytest.mark.parametrize("name", NAMES)
def test_decode_shape_dtype_range_and_determinism(grids, prepared, name):
    g = grids[name]
    assert g.name == name and isinstance(g.d, int) and isinstance(g.n, int)
    idx = g.random_indices(16, seed=3)
    x = g.decode(idx)
    assert x.shape == (16, *prepared.shape) and x.dtype == torch.float32
    assert not x.requires_grad
    px = prepared.denormalize(x)
    assert float(px.min()) >= -1e-5 and float(px.max()) <= 1 + 1e-5
    assert torch.equal(x, g.decode(idx))
    assert torch.equal(x, g.decode(idx.numpy()))
    # Same point in a bigger batch decodes the same (eval-mode BatchNorm, no batch coupling).
    assert torch.allclose(x[:4], g.decode(idx[:4]), atol=1e-5)
    assert not torch.allclose(x[0], x[1])  # different grid points, different images


@pytest.mark.parametrize("name", NAMES)
def test_ordered_flag_matches_whether_a_one_index_step_is_a_small_change(grids, name):
    # What optimizers rely on (TT's ordinal "auto"): on an ordered grid, moving one coordinate by
    # one index changes the image much less than moving it to a random other index.
    g = grids[name]
    rng = np.random.default_rng(0)
    base = g.random_indices(256, seed=5)
    rows, cols = torch.arange(len(base)), torch.as_tensor(rng.integers(0, g.d, len(base)))
    near, far = base.clone(), base.clone()
    near[rows, cols] = torch.where(base[rows, cols] > 0, base[rows, cols] - 1, 1)
    far[rows, cols] = (base[rows, cols] + torch.as_tensor(rng.integers(1, g.n, len(base)))) % g.n
    x = g.decode(base)
    ratio = float((g.decode(near) - x).norm() / (g.decode(far) - x).norm())
    assert g.ordered == (name == "sngan")
    assert ratio < 0.5 if g.ordered else ratio > 0.7


@pytest.mark.parametrize("name", NAMES)
def test_decode_uses_prepared_normalization(grids, prepared, name):
    g = grids[name]
    idx = g.random_indices(4)
    assert torch.allclose(g.decode(idx), prepared.normalize(g.decode_pixels(idx)), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bad_indices_give_one_line_errors_naming_the_valid_range(grids, name):
    g = grids[name]
    good = g.random_indices(3)
    bad_cases = {
        "too large": good.clone().index_fill_(1, torch.tensor([0]), g.n),
        "negative": good.clone().index_fill_(1, torch.tensor([0]), -1),
        "wrong d": torch.zeros(3, g.d + 1, dtype=torch.long),
        "1-D": torch.zeros(g.d, dtype=torch.long),
        "float": good.float(),
    }
    for case, idx in bad_cases.items():
        with pytest.raises(SpikemaxError, match=rf"\(k, {g.d}\)") as err:
            g.decode(idx)
        msg = str(err.value)
        assert "\n" not in msg, case
        assert f"(k, {g.d})" in msg and f"0..{g.n - 1}" in msg, case


def test_sngan_has_no_encoder(grids, prepared):
    with pytest.raises(SpikemaxError, match="no encoder"):
        grids["sngan"].encode(prepared.tensors("test")[0][:2])


def test_vqvae_round_trip_beats_noise(grids, prepared):
    g = grids["vqvae"]
    x = prepared.tensors("test")[0][:128]
    idx = g.encode(x)
    assert idx.shape == (128, g.d) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < g.n
    recon = g.decode(idx)
    err = float(((recon - x) ** 2).mean())
    noise = prepared.normalize(torch.rand_like(x))
    random_codes = g.decode(g.random_indices(128, seed=5))
    assert err < 0.5 * float(((noise - x) ** 2).mean())
    assert err < float(((random_codes - x) ** 2).mean())
    with pytest.raises(SpikemaxError, match=r"\(k, 1, 28, 28\)"):
        g.encode(x[:, :, :14])


def test_training_wrote_checkpoint_metrics_and_mlflow_run(generator_checkpoints, project, prepared):
    _, paths = project
    for name, ckpt in generator_checkpoints.items():
        assert ckpt == paths.generators_dir / f"{name}.ckpt" and ckpt.is_file()
        hp = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
        assert list(hp["mean"]) == prepared.meta["mean"] and list(hp["std"]) == prepared.meta["std"]
        metrics = json.loads((paths.metrics / f"generator_{name}.json").read_text())
        assert metrics["steps"] > 0 and metrics["d"] == load_generator(name, ckpt).d
    vq = json.loads((paths.metrics / "generator_vqvae.json").read_text())
    assert 1.0 <= vq["val_perplexity"] <= 32 and 0 < vq["val_recon_mse"] < 0.2
    client = mlflow.MlflowClient(tracking.configure(paths.root))
    runs = client.search_runs(
        [tracking.experiment_id("generators", paths.root)], filter_string="tags.`spikemax.stage` = 'train_generator'"
    )
    by_gen = {r.data.tags["spikemax.generator"]: r for r in runs}
    assert set(NAMES) <= set(by_gen)
    vq_run = by_gen["vqvae"]
    assert {"loss", "recon_mse", "perplexity", "val_recon_mse"} <= set(vq_run.data.metrics)
    assert {"loss_d", "loss_g"} <= set(by_gen["sngan"].data.metrics)
    pngs = [a.path for a in client.list_artifacts(vq_run.info.run_id, "samples")]
    assert pngs and all(p.endswith(".png") for p in pngs)
    assert client.list_artifacts(vq_run.info.run_id, "reconstructions")


def test_load_generator_errors(tmp_path, generator_checkpoints):
    with pytest.raises(SpikemaxError, match=r"unknown generator 'gan'; allowed: sngan, vqvae"):
        load_generator("gan", generator_checkpoints["sngan"])
    with pytest.raises(SpikemaxError, match="not found.*allowed names: sngan, vqvae"):
        load_generator("sngan", tmp_path / "missing.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(SpikemaxError, match="corrupt"):
        load_generator("vqvae", corrupt)
    with pytest.raises(SpikemaxError, match="holds a 'sngan' generator"):
        load_generator("vqvae", generator_checkpoints["sngan"])


def test_cli_unknown_generator_is_one_line(project):
    _, paths = project
    res = run_cli("train-generator", "gan", cwd=paths.root)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: unknown generator 'gan'; allowed: sngan, vqvae"


def test_check_scores_generators_with_final_snn(project, generator_checkpoints, snn_checkpoints):
    from spikemax import params as P
    from spikemax.stages.check_generators import run as check

    params, paths = project
    small = P.validate({**params.model_dump(), "generators": {"check_samples": 64}})
    out = check(small, paths)
    saved = json.loads((paths.metrics / "generators.json").read_text())
    assert saved["samples"] == 64
    for name in NAMES:
        res = saved[name]
        assert sum(res["histogram"].values()) == 64
        assert 0.0 <= res["class_entropy"] <= res["max_entropy"] + 1e-9
        assert 0.0 < res["mean_top_prob"] <= 1.0
    assert 0 < saved["vqvae"]["test_recon_mse"] < 0.2
    assert out["snn_epoch"] == saved["snn_epoch"]


PAPER_SCALE = {
    "sngan": {"latent_dim": 128, "grid_n": 64, "width": 128},
    "vqvae": {"codes": 512, "code_dim": 64, "width": 128, "downsample": 2},
}


@pytest.mark.parametrize("name, d, n", [("sngan", 128, 64), ("vqvae", 64, 512)])
def test_paper_scale_cifar10_settings_build_the_paper_grids(name, d, n):
    from spikemax import params as P
    from spikemax.generators import build

    params = P.validate({"prepare": {"dataset": "cifar10"}, "generators": PAPER_SCALE})
    meta = {"shape": [3, 32, 32], "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
    g = build(name, params, meta).eval().grid()
    assert (g.d, g.n) == (d, n)
    x = g.decode(g.random_indices(2))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    if name == "vqvae":
        assert g.encode(x).shape == (2, 64)


def test_image_sides_must_fit_the_architecture():
    from spikemax import params as P
    from spikemax.generators import build

    meta = {"shape": [1, 30, 30], "mean": [0.5], "std": [0.5]}
    for name in NAMES:
        with pytest.raises(SpikemaxError, match="divisible by 4"):
            build(name, P.validate({}), meta)


@pytest.mark.slow
def test_cli_train_generator_end_to_end(tmp_path, project):
    """`spikemax train-generator vqvae` as DVC runs it: checkpoint, metrics JSON, sample PNG."""
    import shutil

    from tests.support.project import TINY_GENERATORS, TINY_PREPARE, write_params

    _, paths = project
    shutil.copytree(paths.prepared, tmp_path / "data" / "prepared")
    write_params(tmp_path, {"prepare": TINY_PREPARE, "generators": TINY_GENERATORS})
    res = run_cli("train-generator", "vqvae", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    g = load_generator("vqvae", tmp_path / "models" / "generators" / "vqvae.ckpt")
    assert g.d == 49 and g.n == 32
    assert json.loads((tmp_path / "metrics" / "generator_vqvae.json").read_text())["val_recon_mse"] > 0
    assert (tmp_path / "metrics" / "generator_vqvae_samples.png").stat().st_size > 0


def test_sngan_upsampling_copies_exactly_what_torch_upsamples():
    from spikemax.generators.sngan import Upsample2x

    up, x = Upsample2x(), torch.randn(3, 5, 7, 6)
    expected = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    with torch.no_grad():
        assert torch.equal(up(x), expected)  # the broadcast copy at inference
    x.requires_grad_(True)
    y = up(x)  # training: torch's kernel and its backward
    assert torch.equal(y.detach(), expected) and y.grad_fn is not None and "Upsample" in type(y.grad_fn).__name__
