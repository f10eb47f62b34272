"""SN-GAN: a small DCGAN-style generator and a spectral-normalized discriminator, hinge loss."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from spikemax import SpikemaxError
from spikemax.generators.common import pixels
from spikemax.generators.grid import LatentGrid, normal_quantiles


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    c, h, w = (int(s) for s in shape)
    if h % 4 or w % 4:
        raise SpikemaxError(f"sngan needs image sides divisible by 4 (got {h}x{w})")
    return c, h, w


class Upsample2x(nn.Upsample):
    """Nearest 2x upsampling; without autograd, the same values by a broadcast copy.

    Why: on CPU the broadcast copy is 2-3x faster than torch's upsample_nearest2d, which took over
    half of SN-GAN decoding in the AM stage. Training keeps the kernel whose backward made the weights.
    """

    def __init__(self) -> None:
        super().__init__(scale_factor=2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        b, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class Generator(nn.Module):
    """Latent z (B, d) -> pixels (B, C, H, W) in [0, 1]: linear to H/4 x W/4, two 2x upsamplings."""

    def __init__(self, latent_dim: int, width: int, shape: Sequence[int]) -> None:
        super().__init__()
        c, h, w = _check_shape(shape)
        self.start = (2 * width, h // 4, w // 4)
        self.fc = nn.Linear(latent_dim, 2 * width * (h // 4) * (w // 4))
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            # Nearest upsampling + 3x3 conv: no checkerboard artifacts of strided transposed convs.
            Upsample2x(),
            nn.Conv2d(2 * width, width, 3, 1, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            Upsample2x(),
            nn.Conv2d(width, width // 2, 3, 1, 1),
            nn.BatchNorm2d(width // 2),
            nn.ReLU(),
            nn.Conv2d(width // 2, c, 3, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.fc(z).view(len(z), *self.start))


class Discriminator(nn.Module):
    """Pixels in [0, 1] -> one unbounded score; every layer spectral-normalized (Lipschitz 1)."""

    def __init__(self, width: int, shape: Sequence[int]) -> None:
        super().__init__()
        c, h, w = _check_shape(shape)
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        # Strided from the first layer: the critic dominates CPU time, so it stays shallow.
        self.body = nn.Sequential(
            spectral_norm(nn.Conv2d(c, width // 2, 4, 2, 1)),
            act(),
            spectral_norm(nn.Conv2d(width // 2, width, 4, 2, 1)),
            act(),
            spectral_norm(nn.Conv2d(width, width, 3, 1, 1)),
            act(),
            nn.Flatten(),
            spectral_norm(nn.Linear(width * (h // 4) * (w // 4), 1)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x * 2 - 1).squeeze(1)


class SNGAN(L.LightningModule):
    """Hinge-loss GAN with one D step per G step (manual optimization)."""

    def __init__(
        self,
        latent_dim: int = 16,
        grid_n: int = 16,
        width: int = 32,
        lr: float = 5e-4,
        ema: float = 0.995,
        shape: Sequence[int] = (1, 28, 28),
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        name: str = "sngan",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim, width, shape)
        self.discriminator = Discriminator(2 * width, shape)
        # Decoding uses an exponential moving average of the generator's weights: on a short CPU
        # budget it is far smoother than the last iterate (ema = 0 decodes the raw generator).
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    @property
    def decoder(self) -> Generator:
        """The network the grid decodes with: the EMA generator unless ema = 0."""
        return self.generator_ema if self.hparams["ema"] > 0 else self.generator

    def configure_optimizers(self):
        lr = self.hparams["lr"]
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999))
        # The critic learns twice as fast (TTUR): one D step per G step then suffices.
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=2 * lr, betas=(0.5, 0.999))
        return [opt_g, opt_d]

    def _z(self, k: int) -> Tensor:
        return torch.randn(k, self.hparams["latent_dim"], device=self.device)

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        opt_g, opt_d = cast(list, self.optimizers())
        real = pixels(batch)
        fake = self.generator(self._z(len(real)))
        loss_d = F.relu(1 - self.discriminator(real)).mean() + F.relu(1 + self.discriminator(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()

        loss_g = -self.discriminator(self.generator(self._z(len(real)))).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self._update_ema()
        self.log_dict({"loss_d": loss_d, "loss_g": loss_g}, on_step=False, on_epoch=True, prog_bar=True)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.hparams["ema"]
        # Early on a 0.999 average would mostly remember the random init: warm it up.
        decay = min(decay, (1 + self.global_step) / (10 + self.global_step))
        for pe, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            pe.lerp_(p, 1 - decay)
        for be, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            be.copy_(b)  # BatchNorm stats for per-epoch samples; recalibrate() sets exact ones

    @torch.no_grad()
    def recalibrate(self, batches: int = 20, batch_size: int = 256) -> None:
        """Recompute BatchNorm running stats as exact means over fresh latents (eval-mode decode)."""
        net = self.decoder
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        old = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        net.train()
        gen = torch.Generator().manual_seed(12345)
        for _ in range(batches):
            net(torch.randn(batch_size, self.hparams["latent_dim"], generator=gen))
        for m, mom in zip(bns, old):
            m.momentum = mom
        net.eval()

    def grid(self) -> SNGANGrid:
        """The searchable grid of this model's current weights."""
        return SNGANGrid(self)


class SNGANGrid(LatentGrid):
    """SN-GAN latent gridded per dimension at the N(0, 1) quantiles (i + 0.5) / n."""

    name = "sngan"
    ordered = True  # quantiles increase with the index

    def __init__(self, model: SNGAN) -> None:
        hp: Any = model.hparams
        super().__init__(model.decoder, hp.latent_dim, hp.grid_n, hp.shape, hp.mean, hp.std)
        self.values = normal_quantiles(hp.grid_n)

    def to(self, device: str | torch.device) -> SNGANGrid:
        """Decode on `device`, the quantile table included."""
        super().to(device)
        self.values = self.values.to(device)
        return self

    def latents(self, indices: Tensor) -> Tensor:
        """Continuous latents (k, d) of grid indices (k, d)."""
        return self.values[self.check_indices(indices).to(self.device)]

    def _decode(self, idx: Tensor) -> Tensor:
        return self.net(self.values[idx])
