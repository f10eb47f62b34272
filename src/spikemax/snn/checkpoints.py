"""The SNN's checkpoints: file names, the schedule they are taken on, discovery under models/snn/, loading.

`epoch` in a name or a CSV row is the checkpoint index (0 = untrained; the epoch number under a
once-per-epoch schedule), `step` the optimizer steps done, `progress` the epochs of training done
(fractional).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from spikemax import SpikemaxError
from spikemax.params import Paths
from spikemax.snn.network import ConvSNN

CKPT_PATTERN = "step=*-epoch=*.ckpt"
LEGACY_PATTERN = "epoch=*.ckpt"  # before checkpoint schedules: one per epoch, named by epoch only
_NAME = re.compile(r"step=(\d+)-epoch=(\d+(?:\.\d+)?)")
_LEGACY = re.compile(r"epoch=(\d+)")
CSV_COLUMNS = ["epoch", "step", "progress", "train_loss", "val_loss", "val_acc", "test_acc"]
# Checkpoints one training run may take: each is read by every later stage (AM runs per checkpoint).
MAX_CHECKPOINTS = 1000


def checkpoint_name(step: int, progress: float) -> str:
    """File name of the checkpoint taken after `step` optimizer steps (`progress` epochs of training)."""
    return f"step={step:06d}-epoch={progress:.3f}.ckpt"


def schedule_steps(
    every_steps: int, early_epochs: int, steps: list[int], steps_per_epoch: int, epochs: int, every_epochs: int = 1
) -> list[int]:
    """Optimizer steps after which a checkpoint is taken: 0, every `every_steps` steps during the first
    `early_epochs` epochs, the explicit `steps`, and the end of every `every_epochs`-th epoch and of the
    last one (sorted, unique, within training). SpikemaxError when that is over MAX_CHECKPOINTS."""
    total = steps_per_epoch * epochs
    early = min(early_epochs * steps_per_epoch, total) // every_steps if every_steps > 0 else 0
    # Counted before any set is built (`snn.epochs: 10**12` must be refused, not exhaust memory):
    # the parts may overlap, but the largest alone is at least a third of their sum.
    parts = 2 + epochs // every_epochs + len(steps) + early
    if parts > 3 * MAX_CHECKPOINTS + 2:
        _too_many(f"more than {MAX_CHECKPOINTS}")
    ends = {steps_per_epoch * e for e in range(every_epochs, epochs + 1, every_epochs)} | {total}
    out = {0, *ends, *(s for s in steps if 0 < s <= total)}
    if every_steps > 0:
        out.update(range(every_steps, min(early_epochs * steps_per_epoch, total) + 1, every_steps))
    if len(out) > MAX_CHECKPOINTS:
        _too_many(str(len(out)))
    return sorted(out)


def _too_many(count: str) -> None:
    raise SpikemaxError(
        f"snn.checkpoints: the schedule takes {count} checkpoints (at most {MAX_CHECKPOINTS}); "
        "raise snn.checkpoints.every_epochs or every_steps, or lower snn.epochs"
    )


@dataclass(frozen=True)
class Progress:
    """Training progress of a checkpoint: optimizer steps done (None for legacy names) and epochs done."""

    step: int | None
    epoch: float


def progress(path: str | Path) -> Progress:
    """Progress of a checkpoint from its name (`step=S-epoch=E.ckpt`, or legacy `epoch=E.ckpt`)."""
    stem = Path(path).stem
    if m := _NAME.fullmatch(stem):
        return Progress(int(m.group(1)), float(m.group(2)))
    if m := _LEGACY.fullmatch(stem):
        return Progress(None, float(m.group(1)))
    raise SpikemaxError(f"{Path(path).name}: not a checkpoint name (step=S-epoch=E.ckpt)")


def checkpoint_files(snn_dir: Path) -> list[Path]:
    """Every checkpoint file in `snn_dir` (scheduled names, else legacy ones), unordered."""
    found = [p for p in snn_dir.glob(CKPT_PATTERN) if _NAME.fullmatch(p.stem)]
    return found or [p for p in snn_dir.glob(LEGACY_PATTERN) if _LEGACY.fullmatch(p.stem)]


def checkpoints(paths: Paths) -> dict[int, Path]:
    """Checkpoint index -> path of every checkpoint under `models/snn/`, ordered by training progress.

    Index 0 is the untrained net; `progress(path)` gives each one's step and (fractional) epoch.
    Legacy `epoch=NNN.ckpt` names are read only when no scheduled checkpoint exists.
    """
    ordered = sorted(checkpoint_files(paths.snn_dir), key=lambda p: (progress(p).epoch, progress(p).step or 0))
    return dict(enumerate(ordered))


def load_snn(path: str | Path) -> ConvSNN:
    """Load a ConvSNN checkpoint on CPU in eval mode with gradients off; SpikemaxError if unreadable.

    Read with `torch.load(weights_only=True)`: tensors and plain containers only, never code.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise SpikemaxError(f"SNN checkpoint not found: {path} (run `spikemax train-snn` first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net = ConvSNN(**ckpt["hyper_parameters"])
        net.load_state_dict(ckpt["state_dict"])
    except Exception as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise SpikemaxError(f"{path}: not a readable ConvSNN checkpoint ({reason})") from None
    net.eval()
    net.requires_grad_(False)
    return net
