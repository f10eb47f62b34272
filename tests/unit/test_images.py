"""images: pixels round-trip through PNG exactly; plots draw what they say (not blank canvases)."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from spikemax import images


def test_to_uint8_rounds_clips_and_moves_channels_last():
    x = np.array([[[-0.5, 0.0, 0.5, 1.0, 2.0]]] * 3, dtype=np.float32)  # (3, 1, 5)
    u = images.to_uint8(x)
    assert u.shape == (1, 5, 3) and u.dtype == np.uint8
    assert u[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert images.to_uint8(x[:1]).shape == (1, 5)  # one channel -> (H, W)
    assert np.array_equal(images.to_uint8(torch.from_numpy(x)), u)  # tensors too


def test_png_round_trip_is_exact_and_upscaled(tmp_path):
    img = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    p = images.save_png(img, tmp_path / "a.png", scale=4)
    back = np.asarray(Image.open(p))
    assert back.shape == (32, 32, 3)
    np.testing.assert_array_equal(back[::4, ::4], images.to_uint8(img))
    gray = images.save_png(img[:1], tmp_path / "g.png", scale=1)
    assert Image.open(gray).mode == "L"
    np.testing.assert_array_equal(np.asarray(Image.open(gray)), images.to_uint8(img[:1]))
    decoded = Image.open(io.BytesIO(base64.b64decode(images.png_base64(img))))
    np.testing.assert_array_equal(np.asarray(decoded), images.to_uint8(img))


def test_convergence_plot_draws_the_running_best(tmp_path):
    c = np.asarray(Image.open(images.save_convergence_png(np.array([0.1, np.nan, 0.3, 0.2]), tmp_path / "c.png")))
    red = (c[..., 0] > 150) & (c[..., 1] < 80) & (c[..., 2] < 80)
    assert red.sum() > 20  # the best-so-far line
    blank = np.asarray(Image.open(images.save_convergence_png(np.array([np.nan, np.nan]), tmp_path / "b.png")))
    red_blank = (blank[..., 0] > 150) & (blank[..., 1] < 80) & (blank[..., 2] < 80)
    assert red_blank.sum() == 0  # nothing succeeded: no best line


def test_image_grid_shows_each_image_in_its_cell(tmp_path):
    black = np.zeros((1, 8, 8), dtype=np.float32)  # contrasts with the white page
    g = np.asarray(Image.open(images.save_image_grid_png([black, None], 1, 2, tmp_path / "g.png")).convert("L"))
    left, right = g[:, : g.shape[1] // 2], g[:, g.shape[1] // 2 :]
    assert (left < 10).sum() > 100  # the image's pixels are drawn in the first cell
    assert (right < 10).sum() < (left < 10).sum() / 4  # the empty cell stays (nearly) blank
