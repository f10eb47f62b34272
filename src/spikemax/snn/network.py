"""ConvSNN: a convolutional spiking network (snntorch Leaky) with an exact, fast multi-step readout.

Architecture: ``[conv -> maxpool -> Leaky] * len(channels)`` (layers ``lif1``, ``lif2``, ...),
``[linear -> Leaky] * len(hidden)`` (``fc_lif1``, ...), ``linear -> Leaky`` (``out``, one unit per
class). The static normalized image is the input current at each of ``num_steps`` (T) steps.

Two forward paths give the same spikes bit for bit:

* ``forward_spikes_steps``: the snntorch reference, every block called once per time step;
* ``forward_spikes``: each block's synaptic part runs over all T steps in one batched call (the
  first block, driven by a static image, runs once) and only the element-wise membrane recurrence
  loops over time (``spikemax.snn.lif``).

Training (``spikemax.snn.training``) uses the fast path too, through the kernel's hand-written BPTT.

Paper-scale setting (MANGO, CIFAR-10): ``prepare: {dataset: cifar10, train_size: 50000,
test_size: 10000}`` and ``snn: {channels: [32, 64], hidden: [256], num_steps: 64, loss: mse_count,
lr: 0.0005, epochs: 40}`` (hours on CPU; the defaults are sized for a few minutes on 2 cores).
"""

from __future__ import annotations

from typing import Any

import snntorch
import torch
from torch import Tensor, nn

from spikemax import SpikemaxError
from spikemax.snn.lif import leaky, lif_run, synapse


class HParams(dict[str, Any]):
    """A network's constructor arguments (as saved in its checkpoints), by key or attribute."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ConvSNN(nn.Module):
    """Convolutional SNN classifier whose spiking layers are the neurons activation maximization probes.

    `loss`, `optimizer`, `lr` and `schedule` are training settings kept with the architecture in
    `hparams` (and so in every checkpoint); the network itself does not use them.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] | list[int] = (1, 28, 28),
        num_classes: int = 10,
        channels: list[int] | tuple[int, ...] = (8, 16),
        kernel: int = 5,
        hidden: list[int] | tuple[int, ...] = (128,),
        beta: float = 0.9,
        threshold: float = 1.0,
        slope: float = 25.0,
        num_steps: int = 16,
        loss: str = "ce_count",
        optimizer: str = "adam",
        lr: float = 3e-3,
        schedule: str = "cosine",
        classes: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.hparams = HParams(
            in_shape=in_shape,
            num_classes=num_classes,
            channels=channels,
            kernel=kernel,
            hidden=hidden,
            beta=beta,
            threshold=threshold,
            slope=slope,
            num_steps=num_steps,
            loss=loss,
            optimizer=optimizer,
            lr=lr,
            schedule=schedule,
            classes=classes,
        )
        for key, sizes in (("channels", channels), ("hidden", hidden)):
            if any(int(v) < 1 for v in sizes):
                raise SpikemaxError(f"snn.{key}={list(sizes)}: every size must be >= 1")
        c, h, w = (int(v) for v in in_shape)
        self.num_steps = int(num_steps)
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes else [str(i) for i in range(num_classes)]
        self.blocks = nn.ModuleDict()
        units: dict[str, int] = {}
        probe = torch.zeros(1, c, h, w)
        for i, ch in enumerate(channels, start=1):
            conv = nn.Conv2d(probe.shape[1], ch, kernel, padding=kernel // 2)
            pool = nn.MaxPool2d(2)
            with torch.no_grad():
                size = conv(probe).shape[-2:]
            if min(size) < 2:
                raise SpikemaxError(
                    f"snn.channels: {len(channels)} conv blocks (kernel {kernel}) shrink a "
                    f"{in_shape[1]}x{in_shape[2]} image to nothing; use fewer blocks or a smaller kernel"
                )
            with torch.no_grad():
                probe = pool(conv(probe))
            self.blocks[f"lif{i}"] = nn.Sequential(conv, pool, leaky(beta, threshold, slope))
            units[f"lif{i}"] = ch
        features = probe[0].numel()
        for j, units_j in enumerate(hidden, start=1):
            first = j == 1
            linear = nn.Linear(features, units_j)
            parts = [nn.Flatten(), linear] if first else [linear]
            self.blocks[f"fc_lif{j}"] = nn.Sequential(*parts, leaky(beta, threshold, slope))
            features = units_j
            units[f"fc_lif{j}"] = units_j
        out_parts: list[nn.Module] = [nn.Linear(features, num_classes)]
        if not hidden:
            out_parts.insert(0, nn.Flatten())
        self.blocks["out"] = nn.Sequential(*out_parts, leaky(beta, threshold, slope))
        units["out"] = num_classes
        self._units = units

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(self.parameters()).device

    def spiking_layers(self) -> dict[str, int]:
        """Spiking layer name -> unit count (conv: channels, dense: units, ``out``: classes), in order."""
        return dict(self._units)

    def forward_spikes(self, x: Tensor, upto: str | None = None) -> dict[str, Tensor]:
        """Fast multi-step path: spikes (T, B, ...) of every spiking layer (up to ``upto``), from zero state."""
        T = self.num_steps
        infer = not torch.is_grad_enabled()
        out: dict[str, Tensor] = {}
        h: Tensor | None = None
        for name, block in self.blocks.items():
            syn, lif = block[:-1], block[-1]  # type: ignore[index]  # every block is an nn.Sequential
            if h is None:
                # A static image drives the first block with the same current at every step.
                spk = lif_run(lif, synapse(syn, x, infer), T, static=True)
            else:
                current = synapse(syn, h.flatten(0, 1), infer)  # all T steps in one call
                spk = lif_run(lif, current.unflatten(0, (T, -1)), T, static=False)
            out[name] = spk
            h = spk
            if name == upto:
                break
        return out

    def forward_spikes_steps(self, x: Tensor) -> dict[str, Tensor]:
        """Reference path: the snntorch step loop (state reset first); same result as forward_spikes."""
        self.reset_state()
        rec: dict[str, list[Tensor]] = {name: [] for name in self.blocks}
        for _ in range(self.num_steps):
            h = x
            for name, block in self.blocks.items():
                h = block(h)
                rec[name].append(h)
        self.reset_state()
        return {name: torch.stack(v) for name, v in rec.items()}

    def reset_state(self) -> None:
        """Zero every Leaky membrane (the step loop would otherwise carry state between calls)."""
        for module in self.modules():
            if isinstance(module, snntorch.Leaky):
                module.mem = torch.zeros(0, device=module.mem.device)

    def forward(self, x: Tensor) -> Tensor:
        """Output spikes (T, B, num_classes) of the fast path."""
        return self.forward_spikes(x)["out"]

    def spike_counts(self, x: Tensor) -> Tensor:
        """Output spike counts over T steps, (B, num_classes): the logits of ``ce_count``."""
        return self.forward(x).sum(0)

    @torch.no_grad()
    def class_probs(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """Class probabilities (B, num_classes): softmax over output spike counts, as trained by ce_count."""
        parts = [
            torch.softmax(self.spike_counts(x[i : i + batch_size].to(self.device)), dim=1)
            for i in range(0, len(x), batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, self.num_classes)
