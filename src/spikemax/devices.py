"""Where torch work runs: the `device` param ("auto" = CUDA when available, else CPU)."""

from __future__ import annotations

from spikemax import SpikemaxError


def resolve(name: str) -> str:
    """ "auto" -> "cuda" when a CUDA device is visible, else "cpu"; "cpu" / "cuda" / "cuda:N" as given."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpikemaxError(f"device {name!r}: no CUDA device is visible (use device: auto or cpu)")
    return name


def lightning(name: str) -> tuple[str, list[int] | int]:
    """(accelerator, devices) for a Lightning Trainer on `name`."""
    dev = resolve(name)
    if dev == "cpu":
        return "cpu", 1
    index = int(dev.split(":", 1)[1]) if ":" in dev else 0
    return "gpu", [index]


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX = 32 * 1024 * 1024  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
_TRIM = 512 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks of up to 32 MiB instead of handing them back to the kernel.

    Why: the CPU tensors of a spiking forward pass or a decoded batch (a few MiB to 32 MiB) are
    allocated and freed every batch; by default glibc hands many of them back to the kernel and
    takes fresh pages for the next batch, so their use page-faults: the kernel zeroing pages took a
    fifth of the AM stage's time on 2 cores (cProfile of `spikemax maximize` on the default
    project's last checkpoint). Arithmetic is unchanged (torch aligns every allocation itself).
    Returns whether it applied (False off glibc, or with SPIKEMAX_KEEP_FREED=0).
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("SPIKEMAX_KEEP_FREED", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM))
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False


def cpu_threads(threads: int) -> None:
    """A (worker) process's share of the CPU: torch's thread count, and freed memory kept for reuse."""
    import torch

    torch.set_num_threads(threads)
    keep_freed_memory()
