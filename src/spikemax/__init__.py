"""spikemax: query-efficient activation maximization for spiking neural networks."""

__version__ = "0.1.0"


class SpikemaxError(Exception):
    """An input error the CLI reports as one line (no traceback) and a non-zero exit."""
