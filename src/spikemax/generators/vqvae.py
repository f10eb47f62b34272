"""VQ-VAE: conv encoder, EMA vector quantizer (K codes), conv decoder; grid = positions x codes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spikemax import SpikemaxError
from spikemax.generators.common import pixels
from spikemax.generators.grid import LatentGrid


def latent_side(shape: Sequence[int], downsample: int) -> tuple[int, int]:
    """Latent positions (h, w) after `downsample` stride-2 stages; sides must divide evenly."""
    _, h, w = (int(s) for s in shape)
    f = 2**downsample
    if h % f or w % f:
        raise SpikemaxError(f"vqvae.downsample={downsample} needs image sides divisible by {f} (got {h}x{w})")
    return h // f, w // f


class ResBlock(nn.Module):
    """3x3 -> 1x1 residual block."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch // 2, 3, 1, 1), nn.ReLU(), nn.Conv2d(ch // 2, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _widths(width: int, downsample: int) -> list[int]:
    return [max(8, width // 2 ** (downsample - 1 - i)) for i in range(downsample)]


class Encoder(nn.Module):
    """Pixels (B, C, H, W) in [0, 1] -> latents (B, D, H / 2^s, W / 2^s)."""

    def __init__(self, channels: int, width: int, code_dim: int, downsample: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = channels
        for ch in _widths(width, downsample):
            layers += [nn.Conv2d(prev, ch, 4, 2, 1), nn.ReLU()]
            prev = ch
        layers += [nn.Conv2d(prev, width, 3, 1, 1), ResBlock(width), nn.ReLU(), nn.Conv2d(width, code_dim, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x * 2 - 1)


class Decoder(nn.Module):
    """Quantized latents (B, D, h, w) -> pixels (B, C, h 2^s, w 2^s) in [0, 1]."""

    def __init__(self, channels: int, width: int, code_dim: int, downsample: int) -> None:
        super().__init__()
        widths = _widths(width, downsample)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(code_dim, width, 3, 1, 1), ResBlock(width), nn.ReLU()]
        prev = width
        for i in range(downsample):
            last = i == downsample - 1
            out = channels if last else widths[i + 1]
            layers.append(nn.ConvTranspose2d(prev, out, 4, 2, 1))
            if not last:
                layers.append(nn.ReLU())
            prev = out
        layers.append(nn.Sigmoid())
        self.body = nn.Sequential(*layers)

    def forward(self, zq: Tensor) -> Tensor:
        return self.body(zq)


class VectorQuantizerEMA(nn.Module):
    """Nearest-code quantizer whose codebook follows EMA cluster means; dead codes restart."""

    # Buffers (saved with the checkpoint, never trained).
    embed: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    initialized: Tensor

    def __init__(self, codes: int, dim: int, decay: float = 0.99, eps: float = 1e-5) -> None:
        super().__init__()
        self.codes, self.dim, self.decay, self.eps = codes, dim, decay, eps
        self.register_buffer("embed", torch.randn(codes, dim))
        self.register_buffer("cluster_size", torch.ones(codes))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("initialized", torch.tensor(False))

    @staticmethod
    def flatten(z: Tensor) -> Tensor:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])

    def indices(self, z: Tensor) -> Tensor:
        """Nearest code per position: (B, D, h, w) -> (B, h, w)."""
        flat = self.flatten(z)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.T + self.embed.pow(2).sum(1)
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, idx: Tensor) -> Tensor:
        """Code vectors of indices: (B, h, w) -> (B, D, h, w)."""
        return F.embedding(idx, self.embed).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _update(self, flat: Tensor, idx: Tensor) -> None:
        if not bool(self.initialized):
            # Codes start on real encoder outputs, so none begins far from the data.
            pick = torch.randint(0, len(flat), (self.codes,), device=flat.device)
            self.embed.copy_(flat[pick])
            self.embed_sum.copy_(flat[pick])
            self.cluster_size.fill_(1.0)
            self.initialized.fill_(True)
            return
        onehot = F.one_hot(idx, self.codes).type(flat.dtype)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.T @ flat, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.codes * self.eps) * n
        self.embed.copy_(self.embed_sum / size.unsqueeze(1))
        # A code nobody picks is wasted grid resolution: move it onto a random current latent.
        floor = 0.03 * len(flat) / self.codes
        dead = self.cluster_size < floor
        if dead.any():
            rows = flat[torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)]
            self.embed[dead] = rows
            self.embed_sum[dead] = rows * (2 * floor)
            self.cluster_size[dead] = 2 * floor

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Quantize z: straight-through latents, indices, commitment loss, batch perplexity."""
        flat = self.flatten(z)
        idx = self.indices(z)
        if self.training:
            self._update(flat.detach(), idx.view(-1))
            idx = self.indices(z)
        zq = self.lookup(idx)
        commit = F.mse_loss(z, zq.detach())
        p = torch.bincount(idx.view(-1), minlength=self.codes).float() / idx.numel()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        return z + (zq - z).detach(), idx, commit, perplexity


class VQVAE(L.LightningModule):
    """Encoder, EMA quantizer, decoder; loss = pixel MSE + commitment x ||z - sg(zq)||^2."""

    def __init__(
        self,
        codes: int = 32,
        code_dim: int = 16,
        width: int = 64,
        downsample: int = 2,
        commitment: float = 0.25,
        decay: float = 0.99,
        lr: float = 1e-3,
        shape: Sequence[int] = (1, 28, 28),
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        name: str = "vqvae",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.positions = latent_side(shape, downsample)
        c = int(shape[0])
        self.encoder = Encoder(c, width, code_dim, downsample)
        self.quantizer = VectorQuantizerEMA(codes, code_dim, decay)
        self.decoder = Decoder(c, width, code_dim, downsample)

    def configure_optimizers(self):
        return torch.optim.Adam(
            list(self.encoder.parameters()) + list(self.decoder.parameters()), lr=self.hparams["lr"]
        )

    def forward(self, x01: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        zq, idx, commit, perplexity = self.quantizer(self.encoder(x01))
        return self.decoder(zq), idx, commit, perplexity

    @torch.no_grad()
    def reconstruct(self, x01: Tensor) -> Tensor:
        """Decoded nearest-code reconstruction of [0, 1] pixels."""
        return self.decoder(self.quantizer.lookup(self.quantizer.indices(self.encoder(x01))))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x = pixels(batch)
        recon, _, commit, perplexity = self(x)
        mse = F.mse_loss(recon, x)
        loss = mse + self.hparams["commitment"] * commit
        self.log_dict(
            {"loss": loss, "recon_mse": mse, "commitment": commit, "perplexity": perplexity},
            on_step=False,
            on_epoch=True,
            prog_bar=True,
        )
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        x = pixels(batch)
        recon, _, _, perplexity = self(x)
        self.log_dict(
            {"val_recon_mse": F.mse_loss(recon, x), "val_perplexity": perplexity},
            on_step=False,
            on_epoch=True,
            prog_bar=True,
        )

    def grid(self) -> VQVAEGrid:
        """The searchable grid of this model's current weights."""
        return VQVAEGrid(self)


class VQVAEGrid(LatentGrid):
    """VQ-VAE grid: d = latent positions (row-major h x w), n = codebook size."""

    name = "vqvae"
    ordered = False  # codebook entries i and i + 1 are unrelated vectors

    net: VQVAE

    def __init__(self, model: VQVAE) -> None:
        hp: Any = model.hparams
        h, w = model.positions
        super().__init__(model, h * w, hp.codes, hp.shape, hp.mean, hp.std)
        self.positions = (h, w)

    def _decode(self, idx: Tensor) -> Tensor:
        h, w = self.positions
        return self.net.decoder(self.net.quantizer.lookup(idx.view(len(idx), h, w)))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Grid indices (k, d) of images (k, C, H, W) given in the normalized input space."""
        x = torch.as_tensor(images)
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape or not x.is_floating_point():
            raise SpikemaxError(
                f"vqvae: encode expects float images of shape (k, {', '.join(map(str, self.shape))}), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        if len(x) == 0:
            return torch.empty((0, self.d), dtype=torch.long)
        x01 = self.denormalize(x.float())
        idx = torch.cat([self.net.quantizer.indices(self.net.encoder(part)) for part in x01.split(self.chunk)])
        return idx.view(len(x), -1)


def perplexity_of(idx: Tensor, codes: int) -> float:
    """exp(entropy) of code usage: codes effectively used (1..codes)."""
    p = torch.bincount(idx.reshape(-1), minlength=codes).double() / idx.numel()
    return float(math.exp(-(p * torch.log(p + 1e-12)).sum()))
