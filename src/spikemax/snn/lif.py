"""The spiking part of a block: snntorch's Leaky neuron and a fused, exact multi-step LIF kernel.

``lif_run`` computes snntorch's Leaky recurrence over all T steps at once (with exactly snntorch's
arithmetic, ``beta * mem + I - reset * thr``), in place at inference and with a hand-written BPTT
for training (the fast-sigmoid surrogate, reset detached: the gradient snntorch's autograd gives).
``synapse`` runs a block's non-spiking layers on channels-last tensors in cache-sized chunks.
"""

from __future__ import annotations

import snntorch
import torch
from snntorch import surrogate
from torch import Tensor, nn

SYNAPSE_CHUNK = 512  # images per conv call at inference: keeps each call's data in cache


def leaky(beta: float, threshold: float, slope: float) -> snntorch.Leaky:
    """A composable Leaky neuron (hidden state inside, spikes out) with a fast-sigmoid surrogate."""
    lif = snntorch.Leaky(
        beta=beta, threshold=threshold, spike_grad=surrogate.fast_sigmoid(slope=slope), init_hidden=True
    )
    forget_registered_neurons()
    lif.slope = float(slope)  # the fused sequence below needs the surrogate's slope
    return lif


def forget_registered_neurons() -> None:
    """Empty snntorch's registry of every neuron ever built (`SpikingNeuron.instances`).

    The one place spikemax touches snntorch's global state, through its public
    `SpikingNeuron.init()`: the registry only serves snntorch's class-level `reset_hidden` /
    `detach_hidden`, which spikemax never calls (`ConvSNN.reset_state` walks its own modules),
    and it would keep every network alive, so the checkpoints the AM and analysis stages load
    one after another could never be freed (tested in tests/test_snn.py).
    """
    snntorch.SpikingNeuron.init()


def synapse(seq: nn.Sequential, x: Tensor, infer: bool) -> Tensor:
    """The non-spiking part of a block on channels-last tensors (same numbers, faster CPU kernels).

    oneDNN's channels-last convolution sums in the same order as the NCHW one and per image
    independently of the batch (the exactness tests compare against the NCHW step loop), and
    a max pool involves no rounding; so the (T*B)-image batch may run in cache-sized chunks.
    """
    if infer and len(x) > SYNAPSE_CHUNK:
        parts = x.split(SYNAPSE_CHUNK)
        first = synapse(seq, parts[0], infer)
        fmt = torch.channels_last if first.dim() == 4 else torch.contiguous_format
        out = torch.empty((len(x), *first.shape[1:]), dtype=first.dtype, device=first.device, memory_format=fmt)
        out[: len(first)] = first
        start = len(first)
        for part in parts[1:]:
            out[start : start + len(part)] = synapse(seq, part, infer)
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

    Same float operations in the same order as ``snntorch.Leaky`` with subtractive reset and reset
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


def lif_run(lif: snntorch.Leaky, current: Tensor, num_steps: int, static: bool) -> Tensor:
    """Spikes (T, B, ...) of a Leaky neuron driven by ``current`` ((B, ...) if static, else (T, B, ...))."""
    beta = lif.beta.clamp(0, 1)
    thr = lif.threshold
    if lif.graded_spikes_factor != 1.0 or lif.reset_mechanism != "subtract":
        raise NotImplementedError("the fast path covers Leaky with subtractive reset and unit spikes")
    if torch.is_grad_enabled() and current.requires_grad:
        return _LIFSequence.apply(current, beta, thr, lif.slope, num_steps, static)
    return _lif_forward(current, beta, thr, num_steps, static)
