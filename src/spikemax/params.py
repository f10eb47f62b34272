"""Load and validate params.yaml: one section per stage, one-line errors on bad values."""

from __future__ import annotations

import types
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from spikemax import SpikemaxError

DATASETS = ("fashion-mnist", "cifar10")
MAX_BUDGET = 10**7  # queries per run: beyond this a run would take days and its query table gigabytes


GeneratorName = Literal["sngan", "vqvae"]
GENERATOR_NAMES: tuple[GeneratorName, ...] = ("sngan", "vqvae")
MethodName = Literal["auto", "tt", "random", "cma", "ngopt", "protes"]
DEFAULT_METHODS: tuple[MethodName, ...] = ("tt", "cma")
TunedMethod = Literal["tt", "cma"]  # the method family the tune stage searches
TUNED_METHODS: tuple[TunedMethod, ...] = ("tt", "cma")
Estimator = Literal["mean", "shrink", "lcb"]
ESTIMATORS: tuple[Estimator, ...] = ("mean", "shrink", "lcb")


class ParamsError(SpikemaxError):
    """A params.yaml value is missing, malformed or out of range."""


def _fit(annotation: Any, value: Any) -> bool | str | None:
    """How `value` fits the number parts of `annotation`: True (natively), the kind wanted (a
    boolean, float or string given where an int or float is meant), or None (not a number question)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _fit(get_args(annotation)[0], value)
    if origin in (Union, types.UnionType):
        fits = [_fit(member, value) for member in get_args(annotation)]
        if True in fits:
            return True
        return next((f for f in fits if isinstance(f, str)), None)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        items = (
            [_fit(args[0], v) for v in value]
            if origin is list or len(args) == 1
            else [_fit(a, v) for a, v in zip(args, value)]
        )
        return next((f for f in items if isinstance(f, str)), True)
    if annotation is int:
        if type(value) is int:
            return True
        return "an integer" if isinstance(value, (bool, float, str)) else None
    if annotation is float:
        if isinstance(value, bool):
            return "a number"
        return True if isinstance(value, (int, float)) else None
    if origin is Literal:
        return True if value in get_args(annotation) and not isinstance(value, bool) else None
    if annotation is type(None):
        return True if value is None else None
    if annotation is Any or not isinstance(annotation, type):
        return None
    return True if isinstance(value, annotation) else None


def _mistyped(annotation: Any, value: Any) -> str | None:
    """The kind of value wanted where `value` gives a bool/float/string for a count (None: fine)."""
    fit = _fit(annotation, value)
    return fit if isinstance(fit, str) else None


def _repeated(values: list[Any]) -> Any:
    """The first value listed twice (None when all are distinct)."""
    seen: set[Any] = set()
    for v in values:
        key = v if isinstance(v, Hashable) else repr(v)
        if key in seen:
            return v
        seen.add(key)
    return None


def _check_distinct(value: list[Any]) -> list[Any]:
    """A list field whose entries must be distinct (a repeated run key would run twice)."""
    if isinstance(value, list) and (dup := _repeated(value)) is not None:
        raise PydanticCustomError(
            "distinct", "Input should list each value once ({dup} is repeated)", {"dup": repr(dup)}
        )
    return value


class Section(BaseModel):
    """Base of every section: unknown keys are errors, not silently ignored; floats must be finite;
    counts are strict ints (a boolean, float or string is not a count)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: Any) -> Any:
        """Refuse what pydantic's lax mode would coerce: `true` as 1, 3.0 or "3" as an int, `true` as 1.0."""
        want = _mistyped(cls.model_fields[info.field_name].annotation, value)
        if want is not None:
            raise PydanticCustomError("strict_number", "Input should be {want}", {"want": want})
        return value


class PrepareParams(Section):
    """`prepare` stage: which dataset, where its raw files live, and the subset kept."""

    dataset: Literal["fashion-mnist", "cifar10"] = "fashion-mnist"
    root: str = "data/raw"
    train_size: int = Field(12000, ge=1)
    test_size: int = Field(2000, ge=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    download: bool = True


class CheckpointSchedule(Section):
    """When `train_snn` saves a checkpoint: before training, at every epoch end, and early steps."""

    every_steps: int = Field(0, ge=0)  # a checkpoint every N optimizer steps during the first epochs (0 = off)
    early_epochs: int = Field(1, ge=1)  # ... during this many epochs
    steps: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)  # and after these optimizer steps
    every_epochs: int = Field(1, ge=1)  # and at the end of every N-th epoch (and of the last)


class SNNParams(Section):
    """`train_snn` stage: architecture, neuron model and optimisation of the ConvSNN."""

    channels: list[int] = Field(default_factory=lambda: [8, 16], min_length=1)
    kernel: int = Field(5, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [128])
    beta: float = Field(0.9, gt=0.0, le=1.0)
    threshold: float = Field(1.0, gt=0.0)
    slope: float = Field(25.0, gt=0.0)
    num_steps: int = Field(16, ge=1)
    loss: Literal["ce_count", "mse_count"] = "ce_count"
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(3e-3, gt=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    seed: int = Field(0, ge=0)
    threads: int = Field(1, ge=1)
    checkpoints: CheckpointSchedule = Field(default_factory=CheckpointSchedule)


class SNGANParams(Section):
    """SN-GAN: latent size, grid resolution per latent dimension, training."""

    latent_dim: int = Field(16, ge=1)
    grid_n: int = Field(16, ge=2)
    width: int = Field(32, ge=4)
    ema: float = Field(0.995, ge=0.0, lt=1.0)  # decode with an EMA of generator weights (0: off)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0.0)  # generator; the critic uses 2x
    seed: int = Field(0, ge=0)


class VQVAEParams(Section):
    """VQ-VAE: latent positions, codebook and training."""

    codes: int = Field(32, ge=2)
    code_dim: int = Field(16, ge=1)
    width: int = Field(32, ge=4)
    downsample: int = Field(2, ge=1, le=4)  # stride-2 stages: 28x28 -> 7x7, 32x32 -> 8x8 positions
    commitment: float = Field(0.25, ge=0.0)
    decay: float = Field(0.99, gt=0.0, lt=1.0)
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    seed: int = Field(0, ge=0)


class GeneratorsParams(Section):
    """`train_generator` and `check_generators` stages."""

    names: list[GeneratorName] = Field(default_factory=lambda: list(GENERATOR_NAMES))
    sngan: SNGANParams = Field(default_factory=SNGANParams)
    vqvae: VQVAEParams = Field(default_factory=VQVAEParams)
    check_samples: int = Field(1000, ge=1)


class TTOptions(Section):
    """Options of the Tensor-Train maximizer used by the AM stage."""

    # Defaults = the TT optimizer's own (tuned on benchmarks/bench_optimizers.py), but for ordinal.
    rank: int = Field(5, ge=1)
    elite: int = Field(4, ge=1)
    lr: float = Field(0.2, gt=0.0)
    steps: int = Field(1, ge=1)
    local: float = Field(0.8, ge=0.0, le=1.0)
    # "auto": chosen per generator from whether its grid's index order is meaningful
    # (spikemax.optim.tt.resolve_ordinal), since ordinal steps only help on ordered grids.
    ordinal: float | Literal["auto"] = "auto"
    qtt: bool = False
    # Share of each ask proposed by an internal CMA-ES; "auto": on for ordered grids (SN-GAN), off on
    # codebooks (spikemax.optim.tt.resolve_cma).
    cma: float | Literal["auto"] = "auto"

    @field_validator("ordinal", "cma", mode="before")
    @classmethod
    def _check_auto_share(cls, value: Any, info: Any) -> Any:
        """Accept "auto" or a probability in [0, 1] (one message for both forms)."""
        if value == "auto":
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
            return float(value)
        raise PydanticCustomError(info.field_name, "Input should be 'auto' or a number in [0, 1]")


class NoiseParams(Section):
    """`maximize.noise`: the responders' noise model and the noise-aware optimization options."""

    model: Literal["none", "poisson", "multiplicative"] = "none"
    sigma: float = Field(0.0, ge=0.0)  # multiplicative: r * max(0, 1 + sigma N(0, 1))
    window: float | None = Field(None, gt=0.0)  # poisson: time steps counted (null = the SNN's T)
    repeats: int = Field(1, ge=1)  # noisy draws averaged per presentation
    # Noise-aware optimizers (spikemax.optim.noisy): re-present the elite, best by estimated mean with an
    # interval; "auto" = on whenever `model` is not none (the deterministic net needs no layer).
    aware: bool | Literal["auto"] = "auto"
    retest: float = Field(0.05, ge=0.0, lt=1.0)  # at most this fraction of each batch re-presented
    final: float = Field(0.15, ge=0.0, lt=1.0)  # last share of the budget spent racing the elite
    estimator: Literal["mean", "shrink", "lcb"] = "shrink"
    # "auto": the noise-aware default also switches the base search to the settings that won under noise
    # (spikemax.optim.noisy.UNDER_NOISE: TT selects its elite per batch, CMA-ES recombines more points);
    # "base": the method's own settings as given.
    search: Literal["auto", "base"] = "auto"
    # Drift of the responder's gain (spikemax.optim.drift.DriftingGain): linear change over the run's
    # budget (-0.3 = falls by 30 %) times a random walk with this standard deviation per 100 presentations.
    drift_trend: float = Field(0.0, ge=-1.0)
    drift_walk: float = Field(0.0, ge=0.0)
    # Reference stimuli presented in every batch (counted in the budget) to correct the search for drift
    # (spikemax.optim.drift.DriftCorrected), drawn in turn from a fixed set of `reference_set` stimuli.
    references: int = Field(0, ge=0)
    reference_set: int = Field(16, ge=1)

    @classmethod
    def from_sigma(cls, value: Any) -> Any:
        """The older `noise: SIGMA` float: 0 = none, else multiplicative with that sigma."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"model": "none"} if value == 0 else {"model": "multiplicative", "sigma": value}
        return value


class MaximizeParams(Section):
    """`maximize` stage: which checkpoints, generators, targets, methods and budget."""

    # A list of checkpoint indices (0 = untrained; a negative entry counts from the last one: -1 =
    # last) or "all". Formerly `epochs` (still read, with a one-line deprecation message).
    checkpoints: Literal["all"] | list[int] = Field("all", min_length=1)
    generators: list[GeneratorName] = Field(default_factory=lambda: list(GENERATOR_NAMES), min_length=1)
    targets: list[str] = Field(default_factory=lambda: ["class:*"])
    units_per_layer: int = Field(0, ge=0)
    # Where those units are drawn from: "live" = units of the trained network (last checkpoint) that
    # fire on some prepared test image (a unit silent on all of them has no AM gain), or "all".
    units_from: Literal["live", "all"] = "live"
    target_seed: int = Field(0, ge=0)
    max_images: int = Field(512, ge=1)
    methods: list[MethodName] = Field(default_factory=lambda: list(DEFAULT_METHODS), min_length=1)
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    budget: int = Field(1024, ge=1, le=MAX_BUDGET)
    # Queries per run at the last checkpoint of the scan (null = `budget`): the trained network gets a
    # deeper search; comparisons across checkpoints use each run's best within its first `budget` queries.
    budget_last: int | None = Field(None, ge=1, le=MAX_BUDGET)
    batch: int = Field(64, ge=1)
    target_value: float | None = None
    warm_start: bool = True
    noise: NoiseParams = Field(default_factory=NoiseParams)
    # Codebook grids (vqvae): TT starts from, and random samples, a TT prior fitted to the encoder's
    # indices of `prior_images` prepared train images (spikemax.optim.prior); false = uniform codes.
    prior: bool = True
    prior_images: int = Field(4000, ge=1)
    # true: `auto` runs the method and settings the tune stage adopted for the generator (metrics/tune.json,
    # spikemax.tuning.resolve_auto), and a `tt` / `cma` run takes them when that is the adopted method;
    # without an adopted result (no tune.json, or the default kept) `auto` falls back to the per-grid table.
    tuned: bool = True
    # Population mode: the targets of one (epoch, generator, method, seed) share one stimulus set of
    # `budget` presentations, each told to every target's optimizer (spikemax.optim.Population).
    population: bool = False
    population_rule: Literal["round_robin", "progress"] = "round_robin"
    tt: TTOptions = Field(default_factory=TTOptions)
    # Deprecated (engine settings are not params: changing them must not rerun the stage): use
    # `spikemax maximize --engine/--ray-address/--ray-workers` or SPIKEMAX_ENGINE / SPIKEMAX_RAY_ADDRESS
    # / SPIKEMAX_RAY_WORKERS. Still read when set here (spikemax.am.engine.EngineSettings).
    engine: Literal["local", "ray"] | None = None
    ray_address: str | None = None
    ray_workers: int | None = Field(None, ge=0)
    # true: warm-started runs also run a cold twin (same seed, no warm start, not logged) so that
    # `queries_saved` is measured; off by default (the twins cost about a fifth of the stage's queries).
    measure_warm_start: bool = False

    @field_validator("noise", mode="before")
    @classmethod
    def _noise_sigma(cls, value: Any) -> Any:
        return NoiseParams.from_sigma(value)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Read `epochs` (a checkpoint index, not a training epoch) as `checkpoints`, with a warning."""
        if isinstance(data, dict) and "epochs" in data:
            import logging

            data = dict(data)
            if "checkpoints" in data:
                raise PydanticCustomError("renamed", "give `checkpoints` only (`epochs` is its old name)")
            logging.getLogger(__name__).warning(
                "maximize.epochs is deprecated: it is a checkpoint index, now `maximize.checkpoints`"
            )
            data["checkpoints"] = data.pop("epochs")
        return data

    @field_validator("checkpoints", "generators", "targets", "methods", "seeds")
    @classmethod
    def _no_repeats(cls, value: Any) -> Any:
        """Each checkpoint, generator, target, method and seed once: a repeat would run its keys twice."""
        return _check_distinct(value)

    @model_validator(mode="after")
    def _population_references(self) -> MaximizeParams:
        """Reference stimuli correct one neuron's own session; a population's shared presentations
        would tell every neuron the others' references as searched points (the rig refuses it too)."""
        if self.population and self.noise.references > 0:
            raise PydanticCustomError(
                "population_references", "noise.references needs population: false (not available in population mode)"
            )
        return self


class AnalyzeParams(Section):
    """`analyze` stage: thresholds of the selectivity analysis."""

    csi_threshold: float = Field(0.5, ge=0.0, le=1.0)
    min_rate: float = Field(0.001, ge=0.0, le=1.0)  # mean test-set rate (spikes/step) below which CSI counts as 0
    # Both in epochs of training done (fractional: 0.25 = a quarter of the first epoch; 0 = untrained).
    early_epoch: float = Field(
        1.0, ge=0.0
    )  # claim 1: units selective by the first checkpoint at or after this count as "early"
    concept_from_epoch: float = Field(1.0, ge=0.0)  # concept changes counted between checkpoints from here on
    batch_size: int = Field(500, ge=1)  # images per forward pass when reading dataset responses
    max_images: int = Field(0, ge=0)  # test images for dataset selectivity (0 = the whole prepared test set)
    grid_rows: int = Field(16, ge=1)  # neurons shown in the stimulus-evolution grids
    mlflow: bool = True  # log the analysis run and tag the AM runs


class TuneParams(Section):
    """`tune` stage: one Optuna study per generator over the search method (TT or CMA-ES) and its settings."""

    # One study per generator; a trial runs the maximize stage's search on that grid with the trial's
    # method and settings (VQ-VAE's TT with the data prior when `maximize.prior` is true).
    generators: list[GeneratorName] = Field(default_factory=lambda: list(GENERATOR_NAMES), min_length=1)
    methods: list[TunedMethod] = Field(default_factory=lambda: list(TUNED_METHODS), min_length=1)
    epoch: Literal["last"] | int = "last"
    # Panels of live units of that checkpoint (none a maximize target): trials are scored on the
    # training panel, the winner is confirmed against the untuned default on the validation panel.
    neurons: int = Field(8, ge=1)
    validation: int = Field(8, ge=1)
    # Trials per study at most; the study stops earlier, after `min_trials`, once the winner's
    # advantage over the runner-up has a bootstrap interval (over the panel's neurons) above 0.
    n_trials: int = Field(12, ge=1)
    min_trials: int = Field(4, ge=1)
    level: float = Field(0.9, gt=0.0, lt=1.0)  # of every bootstrap interval (stopping, pruning, validation)
    # Queries per neuron per trial and per ask; None = the maximize stage's `budget` / `batch`.
    budget: int | None = Field(None, ge=1, le=MAX_BUDGET)
    batch: int | None = Field(None, ge=1)
    # TT: rank, learning-rate range (log-uniform), elite size, share of an internal CMA-ES (ordered grids).
    ranks: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [2, 3, 5, 8], min_length=1)
    lr: tuple[Annotated[float, Field(gt=0.0)], Annotated[float, Field(gt=0.0)]] = (0.01, 0.3)
    elite: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [2, 4, 8], min_length=1)
    cma_share: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75], min_length=1
    )
    # CMA-ES: initial step size range on [0, 1] (log-uniform) and population (0 = pycma's 4 + 3 ln d).
    sigma0: tuple[Annotated[float, Field(gt=0.0)], Annotated[float, Field(gt=0.0)]] = (0.1, 0.6)
    popsize: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 8, 16, 32], min_length=1)
    grid_n: list[Annotated[int, Field(ge=2)]] = Field(default_factory=lambda: [8, 16, 32], min_length=1)
    # Noise-aware options, searched only when `maximize.noise.model` is not none.
    retest: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.05, 0.1, 0.2], min_length=1
    )
    estimators: list[Estimator] = Field(default_factory=lambda: list(ESTIMATORS), min_length=1)
    seed: int = Field(0, ge=0)
    # Where the study lives: "" = the journal file optuna/journal.log (one machine), or an RDB URL
    # (postgresql://user@host:port/db) that workers on several machines share.
    storage: str = ""
    workers: int = Field(1, ge=1)  # worker processes of one `spikemax tune` (`--workers` overrides)
    heartbeat: int = Field(10, ge=1)  # seconds between an RDB worker's heartbeats (stale after 2x: FAIL)
    rungs: int = Field(4, ge=1)  # intermediate per-neuron scores per trial (pruner input), at equal query budgets

    @model_validator(mode="before")
    @classmethod
    def _one_generator(cls, data: Any) -> Any:
        """The older `generator: NAME` (one study) is `generators: [NAME]`."""
        if isinstance(data, dict) and "generator" in data and "generators" not in data:
            data = {**data, "generators": [data["generator"]]}
            del data["generator"]
        return data

    @field_validator("generators")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        """Each generator's study once."""
        if len(set(value)) != len(value):
            raise PydanticCustomError("distinct", "Input should name each generator once")
        return value

    @field_validator("storage")
    @classmethod
    def _rdb_url(cls, value: str) -> str:
        """An RDB URL (SQLAlchemy form) or "" for the journal file."""
        if value and value.split("://", 1)[0].split("+")[0] not in ("postgresql", "mysql", "sqlite"):
            raise PydanticCustomError("storage", "Input should be '' (journal file) or a postgresql/mysql/sqlite URL")
        return value

    @field_validator("lr", "sigma0")
    @classmethod
    def _ordered_lr(cls, value: tuple[float, float]) -> tuple[float, float]:
        """The log-uniform range must be [low, high] with low < high."""
        if not value[0] < value[1]:
            raise PydanticCustomError("range", "Input should be [low, high] with low < high")
        return value


class Params(Section):
    """The whole params.yaml."""

    prepare: PrepareParams = Field(default_factory=PrepareParams)
    snn: SNNParams = Field(default_factory=SNNParams)
    generators: GeneratorsParams = Field(default_factory=GeneratorsParams)
    maximize: MaximizeParams = Field(default_factory=MaximizeParams)
    analyze: AnalyzeParams = Field(default_factory=AnalyzeParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    # Where training, decoding and the readout run: "auto" (CUDA when available, else CPU), "cpu", "cuda[:N]".
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, relative to the project root (the working directory)."""

    root: Path

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def snn_dir(self) -> Path:
        return self.root / "models" / "snn"

    @property
    def generators_dir(self) -> Path:
        return self.root / "models" / "generators"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"

    def resolve(self, path: str | Path) -> Path:
        """A path from params.yaml: absolute as given, else relative to the project root."""
        p = Path(path)
        return p if p.is_absolute() else self.root / p


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    return f"{key}: {msg} (got {first.get('input')!r})"


def validate(data: dict[str, Any] | None) -> Params:
    """Validate a parsed params mapping; raise ParamsError with a one-line message."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError("params must be a mapping of stage sections")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_error(err)) from None


class _RepeatedKeyError(yaml.YAMLError):
    """A mapping gives one key twice (YAML forbids it; PyYAML would keep the last silently)."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"key {key!r} repeated at line {line}")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe YAML loader, refusing a mapping that repeats a key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise _RepeatedKeyError(key, key_node.start_mark.line + 1)
            seen.add(key if isinstance(key, Hashable) else repr(key))
        return super().construct_mapping(node, deep=deep)


def load(path: str | Path = "params.yaml", root: str | Path | None = None) -> tuple[Params, Paths]:
    """Read a params file; return the validated params and the project paths (root: cwd by default)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path.name}: not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except _RepeatedKeyError as err:
        raise ParamsError(f"{path.name} line {err.line}: key {err.key!r} is given twice") from None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ParamsError(f"{path.name}{where}: not valid YAML") from None
    try:
        params = validate(data)
    except ParamsError as err:
        raise ParamsError(f"{path.name}: {err}") from None
    # Outputs go under the working directory (as DVC runs stages), whichever params file is read.
    return params, Paths(Path(root).resolve() if root is not None else Path.cwd())
