"""LatentGrid: a generator seen as a function of integer grid indices (k, d) -> images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from spikemax import SpikemaxError


def normal_quantiles(n: int) -> Tensor:
    """N(0, 1) quantiles at (i + 0.5) / n, i = 0..n-1: symmetric, a random point is a typical latent."""
    if n < 2:
        raise SpikemaxError(f"grid_n must be at least 2 (got {n})")
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (torch.special.ndtri(p)).to(torch.float32)


class LatentGrid:
    """A generator's searchable grid: `d` dimensions with `n` values each, decoded to images.

    `decode` returns float32 images in the dataset's normalized input space (the SNN's input);
    `decode_pixels` returns the same images in [0, 1] pixel space (for PNGs).
    """

    name: str = "grid"
    # Whether neighbouring indices of a dimension decode to similar values, so that a step of a
    # few indices is a small change of the stimulus (optimizers can then take ordinal steps).
    ordered: bool = False

    def __init__(
        self,
        net: nn.Module,
        d: int,
        n: int,
        shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        chunk: int = 1024,
    ) -> None:
        self.net = net.eval()
        self.d = int(d)
        self.n = int(n)
        self.shape = tuple(int(s) for s in shape)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.chunk = chunk

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, d={self.d}, n={self.n}, shape={self.shape})"

    @property
    def device(self) -> torch.device:
        """Where decoding runs (and where decoded images live)."""
        return self.mean.device

    def to(self, device: str | torch.device) -> LatentGrid:
        """Decode on `device` (the generator's weights and every tensor a decode reads); returns self."""
        self.net.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def check_indices(self, indices: Tensor | np.ndarray | Sequence) -> Tensor:
        """Validate grid indices (k, d) with 0 <= i < n and return them as a LongTensor."""
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
        valid = f"expected integer indices of shape (k, {self.d}) with values in 0..{self.n - 1}"
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise SpikemaxError(f"{self.name}: {valid}, got dtype {idx.dtype}")
        if idx.dim() != 2 or idx.shape[1] != self.d:
            raise SpikemaxError(f"{self.name}: {valid}, got shape {tuple(idx.shape)}")
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise SpikemaxError(f"{self.name}: {valid}, got values in {int(idx.min())}..{int(idx.max())}")
        return idx

    def random_indices(self, k: int, seed: int = 0) -> Tensor:
        """`k` uniformly random grid points (k, d), reproducible from `seed`."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.n, (k, self.d), generator=gen)

    @torch.no_grad()
    def decode_pixels(self, indices: Tensor | np.ndarray) -> Tensor:
        """Images (k, C, H, W) in [0, 1] pixel space for grid indices (k, d)."""
        idx = self.check_indices(indices)
        if len(idx) == 0:
            return torch.empty((0, *self.shape), device=self.device)
        return torch.cat([self._decode(part.to(self.device)) for part in idx.split(self.chunk)])

    @torch.no_grad()
    def decode(self, indices: Tensor | np.ndarray) -> Tensor:
        """Images (k, C, H, W) float32 in the normalized input space for grid indices (k, d)."""
        return self.normalize(self.decode_pixels(indices))

    def encode(self, images: Tensor) -> Tensor:
        """Grid indices (k, d) of normalized images; only generators with an encoder have it."""
        raise SpikemaxError(f"{self.name} has no encoder: encode is only available for vqvae")

    def normalize(self, pixels01: Tensor) -> Tensor:
        """[0, 1] pixels -> the normalized input space recorded by `prepare`."""
        return (pixels01 - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalized images -> [0, 1] pixel space (not clipped)."""
        return x * self.std + self.mean

    def _decode(self, idx: Tensor) -> Tensor:
        raise NotImplementedError
