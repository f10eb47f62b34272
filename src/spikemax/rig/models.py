"""Request and response bodies of the rig service (pydantic), shared by HTTP and the file protocol."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from spikemax.generators import NAMES
from spikemax.optim import METHODS

MAX_K = 4096  # stimuli in one ask (a block of PNGs a rig shows in one go)
MAX_CHANNELS = 4096  # electrodes of one rig
MAX_REPEATS = 1024  # presentations of one stimulus in one result
MAX_REFERENCE_SET = 4096  # reference stimuli in a session's fixed set


def _number(value: Any) -> Any:
    """A JSON number: no booleans or strings (pydantic's lax float takes True as 1.0 and "2" as 2.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("number", "Input should be a number or null")
    if isinstance(value, int) and abs(value) > 2**63:
        raise PydanticCustomError("number", "Input should be a number that fits a 64-bit float")
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "Input should be a finite number (null marks a failed channel)")
    return float(value)


Number = Annotated[float, BeforeValidator(_number)]
Index = StrictInt  # rejects floats, booleans and strings; the range is checked against the session's grid
Count = Annotated[StrictInt, Field(ge=0, le=2**53)]


class Body(BaseModel):
    """Base of every request body: unknown keys are errors, floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class NoiseOptions(Body):
    """Per-session noise options (`noise` of `POST /sessions`); left out: the `maximize.noise` params."""

    repeats: Annotated[StrictInt, Field(ge=1, le=MAX_REPEATS)] | None = Field(
        None, description="presentations of each stimulus the session asks the rig for"
    )
    retest: Annotated[Number, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="share of each ask re-presenting the best estimated stimuli"
    )
    final: Annotated[Number, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="last share of the budget spent racing the best estimated stimuli"
    )
    estimator: Literal["mean", "shrink", "lcb"] | None = Field(None, description="how a stimulus's mean is estimated")
    references: Annotated[StrictInt, Field(ge=0, le=MAX_K)] | None = Field(
        None, description="reference stimuli in every ask (counted in the budget) to correct the search for drift"
    )
    reference_set: Annotated[StrictInt, Field(ge=1, le=MAX_REFERENCE_SET)] | None = Field(
        None, description="size of the fixed set the references are drawn from in turn"
    )


class SessionCreate(Body):
    """`POST /sessions`: every field left out takes the maximize stage's default (params.yaml)."""

    generator: Literal["sngan", "vqvae"] | None = Field(None, description=f"one of {', '.join(NAMES)}")
    method: Literal["auto", "tt", "random", "cma", "ngopt", "protes"] | None = Field(
        None, description=f"one of {', '.join(METHODS)} (auto: the stage's per-grid default)"
    )
    budget: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = Field(None, description="stimuli to ask in all")
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    batch: Annotated[StrictInt, Field(ge=1, le=MAX_K)] | None = Field(None, description="default k of an ask")
    channels: Annotated[StrictInt, Field(ge=1, le=MAX_CHANNELS)] = Field(1, description="responses per presentation")
    target_channel: Annotated[StrictInt, Field(ge=0)] | Literal["all"] = Field(
        0, description="channel to maximize (the others are recorded), or 'all' (population mode)"
    )
    name: Annotated[str, Field(max_length=200)] = ""
    noise_aware: StrictBool = Field(
        True, description="re-present the elite and report the best estimated mean (false: the best single draw)"
    )
    noise: NoiseOptions | None = Field(None, description="noise options; fields left out take maximize.noise's")
    retry_failed: StrictBool = Field(False, description="show a failed presentation (responses null) once more")
    prior: bool | None = Field(
        None, description="VQ-VAE: start from the stage's TT data prior (default: maximize.prior)"
    )

    @model_validator(mode="after")
    def _channel_in_range(self) -> SessionCreate:
        """target_channel must name one of the session's channels."""
        if isinstance(self.target_channel, int) and self.target_channel >= self.channels:
            raise PydanticCustomError(
                "channel",
                "target_channel {target} is not one of the {channels} channels (0..{last})",
                {"target": self.target_channel, "channels": self.channels, "last": self.channels - 1},
            )
        return self


class AskRequest(Body):
    """`POST /sessions/{id}/ask`: k stimuli (the session's batch when left out)."""

    k: Annotated[StrictInt, Field(ge=1, le=MAX_K)] | None = None
    png: bool = Field(True, description="include base64 PNGs (false: fetch /stimuli/{sid}.png instead)")


class Presentation(Body):
    """One presentation's m responses: rates (`responses`) or spike counts in a window (`counts` + `window`).

    `responses: null` (or left out with no counts) is a failed presentation: counted, never elite;
    a null inside the list is a failed channel.
    """

    responses: list[Number | None] | None = None
    counts: list[Count | None] | None = None
    window: Annotated[Number, Field(gt=0)] | None = Field(None, description="seconds the counts were taken over")

    @model_validator(mode="after")
    def _one_form(self) -> Presentation:
        """Rates or counts, not both; counts need their window."""
        if self.responses is not None and self.counts is not None:
            raise PydanticCustomError("form", "give either responses (rates) or counts with a window, not both")
        if self.counts is not None and self.window is None:
            raise PydanticCustomError("form", "counts need their window (seconds, > 0)")
        if self.window is not None and self.counts is None:
            raise PydanticCustomError("form", "window is only meaningful with counts")
        return self

    @model_validator(mode="after")
    def _finite_rates(self) -> Presentation:
        """Counts over a window must give finite rates (2^53 spikes in 1e-300 s is no rate)."""
        if self.counts is not None and self.window is not None:
            for j, c in enumerate(self.counts):
                if c is not None and not math.isfinite(c / self.window):
                    raise PydanticCustomError(
                        "finite_rate",
                        "counts[{j}] / window = {c} / {w} is not a finite rate",
                        {"j": j, "c": c, "w": self.window},
                    )
        return self

    def rates(self) -> list[float | None] | None:
        """The m responses as rates (counts / window); None for a failed presentation."""
        if self.counts is not None:
            assert self.window is not None
            return [None if c is None else c / self.window for c in self.counts]
        return self.responses


class Result(Presentation):
    """One stimulus's result: by stimulus id (or off-policy by grid indices), one presentation or `repeats`."""

    id: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    indices: list[Index] | None = Field(None, description="off-policy: a grid point the rig chose itself")
    repeats: Annotated[list[Presentation], Field(min_length=1, max_length=MAX_REPEATS)] | None = None

    @model_validator(mode="after")
    def _one_key(self) -> Result:
        """Exactly one of id / indices; repeats replace the single presentation's fields."""
        if (self.id is None) == (self.indices is None):
            raise PydanticCustomError("key", "give exactly one of id (an asked stimulus) or indices (off-policy)")
        if self.repeats is not None and (self.responses is not None or self.counts is not None):
            raise PydanticCustomError("form", "give either repeats or one presentation's responses/counts, not both")
        return self

    def presentations(self) -> list[Presentation]:
        """Every presentation of this stimulus in order."""
        return list(self.repeats) if self.repeats is not None else [self]


class TellRequest(Body):
    """`POST /sessions/{id}/tell`: results by stimulus id, applied all together or not at all."""

    results: Annotated[list[Result], Field(min_length=1, max_length=MAX_K * 4)]


class RenderRequest(Body):
    """`POST /sessions/{id}/render`: PNGs of grid points the rig chose (nothing is asked or counted)."""

    indices: Annotated[list[list[Index]], Field(min_length=1, max_length=MAX_K)]


class Stimulus(BaseModel):
    """An asked stimulus: its id, grid indices and (optionally) a base64 PNG in [0, 1] pixel space."""

    id: str
    indices: list[int]
    png: str | None = None
    retry_of: str | None = None  # a failed stimulus shown again (retry_failed)
    reference: bool = False  # a reference stimulus (noise.references): shown and told like any other


class AskResponse(BaseModel):
    """The stimuli of one ask, and how many of the budget are left to ask."""

    stimuli: list[Stimulus]
    left: int
    repeats: int = 1  # presentations of each stimulus the session asks for


class Best(BaseModel):
    """The best presentation so far of one channel."""

    indices: list[int]
    response: float
    channel: int
    stimulus_id: str | None
    query: int  # the first query that presented it
    estimate: float | None = None  # noise-aware: the estimated mean response (`response` is the sample mean)
    presentations: int = 1  # finite responses of this stimulus the best rests on
    # noise-aware: a 95 % interval of the best's true mean response (None while it is unbounded)
    low: float | None = None
    high: float | None = None


class SessionStatus(BaseModel):
    """`GET /sessions/{id}`: configuration and counts (stimuli asked/answered/pending, queries told)."""

    id: str
    name: str
    generator: str
    method: str
    resolved_method: str  # what `auto` ran on this grid
    budget: int
    seed: int
    batch: int
    channels: int
    target_channel: int | str
    options: dict[str, Any]
    noise_aware: bool
    noise: NoiseOptions | None
    retry_failed: bool
    prior: bool
    d: int
    n: int
    asked: int
    answered: int
    pending: int
    pending_ids: list[str]
    retries_waiting: int  # failed stimuli the next ask shows again
    retried: int  # failed stimuli shown again so far
    left: int  # stimuli still to ask
    queries: int
    failed: int
    state: str
    best: Best | None  # noise-aware: the best estimated stimulus; else the best draw
    best_draw: Best | None  # the single highest response (the luckiest draw under noise)
    best_per_channel: list[Best | None]
    # noise.references > 0: the neuron's current gain relative to the session's first reference
    # responses (spikemax.optim.drift.GainTracker); None without references or before any was told
    gain: float | None = None
    run_id: str | None
    created: float


class Health(BaseModel):
    """`GET /health`: liveness (no token needed)."""

    status: str  # ok | unavailable
    sessions: int
    detail: str = ""  # why the service is unavailable
