"""ConvSNN: a convolutional spiking network (snntorch Leaky) with an exact, fast multi-step readout.

Architecture: ``[conv -> maxpool -> Leaky] * len(channels)`` (layers ``lif1``, ``lif2``, ...),
``[linear -> Leaky] * len(hidden)`` (``fc_lif1``, ...), ``linear -> Leaky`` (``out``, one unit per
class). The static normalized image is the input current at each of ``num_steps`` (T) steps.

Two forward paths give the same spikes bit for bit:

* ``forward_spikes_steps``: the snntorch reference, every block called once per time step;
* ``forward_spikes``: each block's synaptic part runs over all T steps in one batched call (the
  first block, driven by a static image, runs once) and only the element-wise membrane recurrence
  loops over time, with exactly snntorch's arithmetic (``beta * mem + I - reset * thr``).

Training uses the fast path too, with a hand-written BPTT through the membrane recurrence (the
fast-sigmoid surrogate, reset detached: the gradient snntorch's autograd gives, tested).

Paper-scale setting (MANGO, CIFAR-10): ``prepare: {dataset: cifar10, train_size: 50000,
test_size: 10000}`` and ``snn: {channels: [32, 64], hidden: [256], num_steps: 64, loss: mse_count,
lr: 0.0005, epochs: 40}`` (hours on CPU; the defaults are sized for a few minutes on 2 cores).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import snntorch as snn
import torch
import torch.nn.functional as F
from snntorch import surrogate
from snntorch._neurons.neurons import SpikingNeuron
from torch import Tensor, nn

from spikemax import SpikemaxError
from spikemax.params import Params, Paths

CKPT_PATTERN = "step=*-epoch=*.ckpt"
LEGACY_PATTERN = "epoch=*.ckpt"  # before checkpoint schedules: one per epoch, named by epoch only
_NAME = re.compile(r"step=(\d+)-epoch=(\d+(?:\.\d+)?)")
_LEGACY = re.compile(r"epoch=(\d+)")
# `epoch` = checkpoint index (0 = untrained; the epoch number under a once-per-epoch schedule),
# `step` = optimizer steps done, `progress` = epochs of training done (fractional).
CSV_COLUMNS = ["epoch", "step", "progress", "train_loss", "val_loss", "val_acc", "test_acc"]


def _leaky(beta: float, threshold: float, slope: float) -> snn.Leaky:
    """A composable Leaky neuron (hidden state inside, spikes out) with a fast-sigmoid surrogate."""
    lif = snn.Leaky(beta=beta, threshold=threshold, spike_grad=surrogate.fast_sigmoid(slope=slope), init_hidden=True)
    # snntorch keeps every neuron ever built in a class-level list; dropping it lets loaded
    # checkpoints be garbage-collected when the AM stage walks through many epochs.
    if SpikingNeuron.instances and SpikingNeuron.instances[-1] is lif:
        SpikingNeuron.instances.pop()
    lif.slope = float(slope)  # the fused sequence below needs the surrogate's slope
    return lif


class ConvSNN(L.LightningModule):
    """Convolutional SNN classifier whose spiking layers are the neurons activation maximization probes."""

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
        self.save_hyperparameters()
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
            self.blocks[f"lif{i}"] = nn.Sequential(conv, pool, _leaky(beta, threshold, slope))
            units[f"lif{i}"] = ch
        features = probe[0].numel()
        for j, units_j in enumerate(hidden, start=1):
            first = j == 1
            linear = nn.Linear(features, units_j)
            parts = [nn.Flatten(), linear] if first else [linear]
            self.blocks[f"fc_lif{j}"] = nn.Sequential(*parts, _leaky(beta, threshold, slope))
            features = units_j
            units[f"fc_lif{j}"] = units_j
        out_parts = [nn.Linear(features, num_classes)]
        if not hidden:
            out_parts.insert(0, nn.Flatten())
        self.blocks["out"] = nn.Sequential(*out_parts, _leaky(beta, threshold, slope))
        units["out"] = num_classes
        self._units = units

    # ---- spiking forward paths ------------------------------------------------------------

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
            synapse, lif = block[:-1], block[-1]
            if h is None:
                # A static image drives the first block with the same current at every step.
                spk = _lif_run(lif, _synapse(synapse, x, infer), T, static=True)
            else:
                current = _synapse(synapse, h.flatten(0, 1), infer)  # all T steps in one call
                spk = _lif_run(lif, current.unflatten(0, (T, -1)), T, static=False)
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
            if isinstance(module, snn.Leaky):
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

    # ---- Lightning ------------------------------------------------------------------------

    def _loss(self, out_spikes: Tensor, y: Tensor) -> Tensor:
        counts = out_spikes.sum(0)
        if self.hparams.loss == "mse_count":
            # snntorch's mse_count_loss: correct class fires on 80 %, others on 20 % of the steps.
            target = torch.full_like(counts, 0.2 * self.num_steps)
            target[torch.arange(len(y)), y] = 0.8 * self.num_steps
            return F.mse_loss(counts, target)
        return F.cross_entropy(counts, y)

    def _step(self, batch: tuple[Tensor, Tensor], prefix: str) -> Tensor:
        x, y = batch
        out = self(x)
        loss = self._loss(out, y)
        acc = (out.sum(0).argmax(1) == y).float().mean()
        self.log(
            f"{prefix}_loss",
            loss,
            on_epoch=True,
            on_step=False,
            prog_bar=True,
            batch_size=len(y),
            logger=False,
            add_dataloader_idx=False,
        )
        self.log(
            f"{prefix}_acc",
            acc,
            on_epoch=True,
            on_step=False,
            prog_bar=prefix != "train",
            batch_size=len(y),
            logger=False,
            add_dataloader_idx=False,
        )
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        # Loader 0 is the validation split, loader 1 the test split: test accuracy per epoch is
        # what the analysis correlates with selectivity.
        self._step(batch, "val" if dataloader_idx == 0 else "test")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        name, lr = self.hparams.optimizer, self.hparams.lr
        if name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=lr)
        elif name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=lr)
        if self.hparams.get("schedule", "constant") != "cosine" or self._trainer is None:
            return opt
        # Cosine decay over the run steadies the last epochs (accuracy keeps rising to the end).
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


SYNAPSE_CHUNK = 512  # images per conv call at inference: keeps each call's data in cache


def _synapse(seq: nn.Sequential, x: Tensor, infer: bool) -> Tensor:
    """The non-spiking part of a block on channels-last tensors (same numbers, faster CPU kernels).

    oneDNN's channels-last convolution sums in the same order as the NCHW one and per image
    independently of the batch (the exactness tests compare against the NCHW step loop), and
    a max pool involves no rounding; so the (T*B)-image batch may run in cache-sized chunks.
    """
    if infer and len(x) > SYNAPSE_CHUNK:
        parts = x.split(SYNAPSE_CHUNK)
        first = _synapse(seq, parts[0], infer)
        fmt = torch.channels_last if first.dim() == 4 else torch.contiguous_format
        out = torch.empty((len(x), *first.shape[1:]), dtype=first.dtype, device=first.device, memory_format=fmt)
        out[: len(first)] = first
        start = len(first)
        for part in parts[1:]:
            out[start : start + len(part)] = _synapse(seq, part, infer)
            start += len(part)
        return out
    for module in seq:
        if isinstance(module, nn.Conv2d):
            # A 1-channel input counts as NCHW and so would its output: force channels-last, whose
            # max-pool kernel is several times faster than the NCHW one.
            x = module(x.contiguous(memory_format=torch.channels_last)).contiguous(memory_format=torch.channels_last)
        else:
            x = module(x)
    return x


def _steps_like(like: Tensor, num_steps: int) -> Tensor:
    """An empty (T, *like.shape) buffer whose steps share like's memory format (mixed layouts are slow)."""
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        buf = torch.empty(
            (num_steps * like.shape[0], *like.shape[1:]),
            dtype=like.dtype,
            device=like.device,
            memory_format=torch.channels_last,
        )
        return buf.unflatten(0, (num_steps, like.shape[0]))
    return torch.empty((num_steps, *like.shape), dtype=like.dtype, device=like.device)


def _lif_forward(
    current: Tensor, beta: Tensor, thr: Tensor, num_steps: int, static: bool, mems: Tensor | None = None
) -> Tensor:
    """Spikes (T, B, ...) of snntorch's Leaky recurrence, in place; optionally keeps every membrane.

    Same float operations in the same order as ``snn.Leaky`` with subtractive reset and reset
    delay: ``mem = beta * mem + I - reset * thr`` where the reset of step t is the spike of step
    t-1, and ``spike = (mem - thr > 0)``, which is exactly ``mem > thr`` (gradual underflow).
    """
    like = current if static else current[0]
    mem = torch.zeros_like(like)
    res = _steps_like(like, num_steps)
    thr_f = float(thr)
    for t in range(num_steps):
        mem.mul_(beta).add_(current if static else current[t])
        if t > 0:
            mem.sub_(res[t - 1], alpha=thr_f)  # spike is 0/1, so thr*spike is exact
        torch.gt(mem, thr, out=res[t])
        if mems is not None:
            mems[t].copy_(mem)
    return res


class _LIFSequence(torch.autograd.Function):
    """Leaky over T steps with a hand-written BPTT: the fast-sigmoid surrogate, reset detached."""

    @staticmethod
    def forward(ctx, current: Tensor, beta: Tensor, thr: Tensor, slope: float, num_steps: int, static: bool):
        like = current if static else current[0]
        mems = _steps_like(like, num_steps)
        spikes = _lif_forward(current, beta, thr, num_steps, static, mems)
        ctx.save_for_backward(mems, beta, thr)
        ctx.slope, ctx.static = slope, static
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: Tensor):
        mems, beta, thr = ctx.saved_tensors
        # d spike_t / d mem_t = 1 / (slope * |mem_t - thr| + 1)^2  (snntorch FastSigmoid)
        surr = mems.sub_(thr).abs_().mul_(ctx.slope).add_(1.0).pow_(-2)
        grad_mem = grad_spikes * surr
        b = beta.clamp(0, 1)
        for t in range(len(grad_mem) - 2, -1, -1):
            grad_mem[t].add_(grad_mem[t + 1], alpha=float(b))  # mem_{t+1} = beta * mem_t + ...
        grad_current = grad_mem.sum(0) if ctx.static else grad_mem
        return grad_current, None, None, None, None, None


def _lif_run(lif: snn.Leaky, current: Tensor, num_steps: int, static: bool) -> Tensor:
    """Spikes (T, B, ...) of a Leaky neuron driven by ``current`` ((B, ...) if static, else (T, B, ...))."""
    beta = lif.beta.clamp(0, 1)
    thr = lif.threshold
    if lif.graded_spikes_factor != 1.0 or lif.reset_mechanism != "subtract":
        raise NotImplementedError("the fast path covers Leaky with subtractive reset and unit spikes")
    if torch.is_grad_enabled() and current.requires_grad:
        return _LIFSequence.apply(current, beta, thr, lif.slope, num_steps, static)
    return _lif_forward(current, beta, thr, num_steps, static)


# ---- training stage ---------------------------------------------------------------------------


def checkpoint_name(step: int, progress: float) -> str:
    """File name of the checkpoint taken after `step` optimizer steps (`progress` epochs of training)."""
    return f"step={step:06d}-epoch={progress:.3f}.ckpt"


def schedule_steps(
    every_steps: int, early_epochs: int, steps: list[int], steps_per_epoch: int, epochs: int, every_epochs: int = 1
) -> list[int]:
    """Optimizer steps after which a checkpoint is taken: 0, every `every_steps` steps during the first
    `early_epochs` epochs, the explicit `steps`, and the end of every `every_epochs`-th epoch and of the
    last one (sorted, unique, within training)."""
    total = steps_per_epoch * epochs
    ends = {steps_per_epoch * e for e in range(every_epochs, epochs + 1, every_epochs)} | {total}
    out = {0, *ends, *(s for s in steps if 0 < s <= total)}
    if every_steps > 0:
        out.update(range(every_steps, min(early_epochs * steps_per_epoch, total) + 1, every_steps))
    return sorted(out)


@torch.no_grad()
def evaluate(model: ConvSNN, loader: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """Mean loss and accuracy of `model` over a loader (eval mode for the call, the mode restored after)."""
    was_training = model.training
    model.eval()
    loss = correct = n = 0.0
    for x, y in loader:
        out = model(x)
        loss += float(model._loss(out, y)) * len(y)
        correct += float((out.sum(0).argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return (loss / n, correct / n) if n else (math.nan, math.nan)


class EpochRecorder(L.Callback):
    """Saves `step=SSSSSS-epoch=E.EEE.ckpt` at scheduled optimizer steps and keeps one metrics row per
    checkpoint (MLflow step = optimizer step). Epoch ends use the epoch's validation metrics; a checkpoint
    inside an epoch evaluates the `eval_loaders` (validation, test) itself."""

    def __init__(
        self,
        out_dir: Path,
        steps: Iterable[int] = (),
        steps_per_epoch: int = 1,
        eval_loaders: Sequence[Iterable[tuple[Tensor, Tensor]]] = (),
    ) -> None:
        self.out_dir = out_dir
        self.steps = set(steps)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.eval_loaders = list(eval_loaders)
        self.rows: list[dict[str, float]] = []

    def record(self, trainer: L.Trainer, step: int, metrics: dict[str, float] | None = None) -> None:
        """Checkpoint the current weights as taken after `step` optimizer steps and log its metrics."""
        progress = step / self.steps_per_epoch
        trainer.save_checkpoint(self.out_dir / checkpoint_name(step, progress), weights_only=True)
        got = metrics if metrics is not None else {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {"epoch": len(self.rows), "step": step, "progress": progress}
        row.update({k: got.get(k, math.nan) for k in CSV_COLUMNS[3:]})
        if step == 0:
            row["train_loss"] = math.nan  # no training has happened yet
        self.rows.append(row)
        if trainer.logger is not None:
            logged = {k: v for k, v in row.items() if k not in ("epoch", "step") and not math.isnan(v)}
            logged.update({k: got[k] for k in ("train_acc", "test_loss") if k in got and step > 0})
            trainer.logger.log_metrics(logged, step=step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if step in self.steps and step % self.steps_per_epoch and isinstance(pl_module, ConvSNN):
            # inside an epoch Lightning has no validation metrics yet: evaluate here
            val_loss, val_acc = evaluate(pl_module, self.eval_loaders[0]) if self.eval_loaders else (math.nan,) * 2
            test_loss, test_acc = (
                evaluate(pl_module, self.eval_loaders[1]) if len(self.eval_loaders) > 1 else (math.nan,) * 2
            )
            got = {"val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc}
            self.record(trainer, step, got)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2 runs this hook after the epoch's validation, so val/test metrics are current.
        if trainer.global_step in self.steps:
            self.record(trainer, trainer.global_step)


def build(params: Params, meta: dict) -> ConvSNN:
    """A fresh ConvSNN for the prepared dataset, sized by params.snn."""
    s = params.snn
    return ConvSNN(
        in_shape=list(meta["shape"]),
        num_classes=int(meta["num_classes"]),
        channels=list(s.channels),
        kernel=s.kernel,
        hidden=list(s.hidden),
        beta=s.beta,
        threshold=s.threshold,
        slope=s.slope,
        num_steps=s.num_steps,
        loss=s.loss,
        optimizer=s.optimizer,
        lr=s.lr,
        schedule=s.schedule,
        classes=list(meta["classes"]),
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


def checkpoints(paths: Paths) -> dict[int, Path]:
    """Checkpoint index -> path of every checkpoint under `models/snn/`, ordered by training progress.

    Index 0 is the untrained net; `progress(path)` gives each one's step and (fractional) epoch.
    Legacy `epoch=NNN.ckpt` names are read only when no scheduled checkpoint exists.
    """
    found = [p for p in paths.snn_dir.glob(CKPT_PATTERN) if _NAME.fullmatch(p.stem)]
    if not found:
        found = [p for p in paths.snn_dir.glob(LEGACY_PATTERN) if _LEGACY.fullmatch(p.stem)]
    ordered = sorted(found, key=lambda p: (progress(p).epoch, progress(p).step or 0))
    return dict(enumerate(ordered))


def load_snn(path: str | Path) -> ConvSNN:
    """Load a ConvSNN checkpoint on CPU in eval mode with gradients off; SpikemaxError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SpikemaxError(f"SNN checkpoint not found: {path} (run `spikemax train-snn` first)")
    try:
        net = ConvSNN.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise SpikemaxError(f"{path}: not a readable ConvSNN checkpoint ({reason})") from None
    net.eval()
    net.requires_grad_(False)
    return net
