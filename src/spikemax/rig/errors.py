"""Domain errors of the rig: what went wrong, in words; `app.py` alone maps them to HTTP statuses."""

from __future__ import annotations

from spikemax import SpikemaxError


class RigError(SpikemaxError):
    """A request the session cannot apply."""


class NotFound(RigError):
    """An unknown session or stimulus id."""


class Conflict(RigError):
    """A stimulus already answered, a spent budget, a finished or broken session."""


class Invalid(RigError):
    """A well-formed request that does not fit the session (channel count, grid range, ...)."""


class Unavailable(RigError):
    """The journal cannot take writes (its state directory was deleted or replaced while serving)."""


class JournalDamaged(SpikemaxError):
    """`rig.db` cannot be read (truncated, garbled) or is missing sessions that other records show."""
