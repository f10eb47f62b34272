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
