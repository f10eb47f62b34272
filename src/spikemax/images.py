"""Images in one place: [0, 1] pixels to uint8, PIL, PNG files and base64, plots drawn as PNGs."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

Pixels = Union["torch.Tensor", np.ndarray]


def to_uint8(pixels01: Pixels) -> np.ndarray:
    """(C, H, W) or (H, W) image in [0, 1] -> uint8 (H, W) or (H, W, C), clipped and rounded."""
    if not isinstance(pixels01, np.ndarray):
        pixels01 = pixels01.detach().cpu().numpy()
    x = np.asarray(pixels01, dtype=np.float64)
    if x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_pil(pixels01: Pixels, scale: int = 1) -> Image.Image:
    """A PIL image of a (C, H, W) image in [0, 1], upscaled `scale` times (nearest neighbour)."""
    from PIL import Image

    img = Image.fromarray(to_uint8(pixels01))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def png_bytes(pixels01: Pixels, scale: int = 1, optimize: bool = False) -> bytes:
    """A (C, H, W) image in [0, 1] encoded as PNG bytes."""
    buf = io.BytesIO()
    if optimize:
        to_pil(pixels01, scale).save(buf, format="PNG", optimize=True, compress_level=9)
    else:
        to_pil(pixels01, scale).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(pixels01: Pixels, scale: int = 1) -> str:
    """A (C, H, W) image in [0, 1] as a base64-encoded PNG (JSON-safe)."""
    return base64.b64encode(png_bytes(pixels01, scale)).decode("ascii")


def save_png(image: Pixels, path: str | Path, scale: int = 4) -> Path:
    """Save one (C, H, W) image with values in [0, 1] as a PNG, upscaled for viewing."""
    path = Path(path)
    to_pil(image, scale).save(path)
    return path


def save_convergence_png(responses: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Plot every query's response (dots) and the running best (line) against the query number.

    Drawn with PIL, not matplotlib: one plot per AM run, and matplotlib's ~0.1-0.3 s each would
    cost more than logging every query does.
    """
    from PIL import Image, ImageDraw

    y = np.asarray(responses, dtype=np.float64)
    W, H, left, right, top, bottom = 360, 220, 48, 10, 18 if title else 8, 28
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    x0, x1, y0, y1 = left, W - right, top, H - bottom
    draw.rectangle([x0, y0, x1, y1], outline=(80, 80, 80))
    ok = np.isfinite(y)
    lo, hi = (float(y[ok].min()), float(y[ok].max())) if ok.any() else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(y), 1)

    def px(i: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x0 + (x1 - x0) * (i + 0.5) / n, y1 - (y1 - y0) * (v - lo) / (hi - lo)

    q = np.arange(len(y))
    if ok.any():
        xs, ys = px(q[ok], y[ok])
        for a, b in zip(xs, ys):
            draw.point((float(a), float(b)), fill=(120, 160, 220))
        best = np.fmax.accumulate(np.where(ok, y, -np.inf))
        keep = np.isfinite(best)
        bx, by = px(q[keep], best[keep])
        draw.line(list(zip(bx.tolist(), by.tolist())), fill=(200, 30, 30), width=2)
    draw.text((2, y0), f"{hi:.3g}", fill="black")
    draw.text((2, y1 - 10), f"{lo:.3g}", fill="black")
    draw.text((x0, y1 + 4), "1", fill="black")
    draw.text((x1 - 6 * len(str(len(y))), y1 + 4), str(len(y)), fill="black")
    draw.text(((x0 + x1) // 2 - 60, y1 + 14), "query  (red: best so far)", fill="black")
    if title:
        draw.text((x0, 3), title[:56], fill="black")
    path = Path(path)
    img.save(path)
    return path


def save_image_grid_png(
    images: list[np.ndarray | None],
    nrows: int,
    ncols: int,
    path: str | Path,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    title: str = "",
) -> Path:
    """A grid of (C, H, W) images in [0, 1] (row-major; None leaves a blank cell) with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(1.0 * ncols + 1.2, 1.0 * nrows + 0.6), dpi=80, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        img = images[i] if i < len(images) else None
        if img is not None:
            arr = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
            if arr.shape[0] == 1:
                ax.imshow(arr[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(np.transpose(arr, (1, 2, 0)))
        else:
            ax.axis("off")
    if row_labels:
        for r, lab in enumerate(row_labels[:nrows]):
            axes[r, 0].set_ylabel(lab, fontsize=6, rotation=0, ha="right", va="center")
    if col_labels:
        for c, lab in enumerate(col_labels[:ncols]):
            axes[0, c].set_title(lab, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    # tight_layout ignores the suptitle: keep ~0.35 inch above the column titles for it.
    top = 1 - 0.35 / fig.get_figheight() if title else 1
    fig.tight_layout(rect=(0, 0, 1, top))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
