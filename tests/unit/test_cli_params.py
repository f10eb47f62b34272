"""params.yaml validation and the CLI's one-line errors, run as a user would (subprocess)."""

from __future__ import annotations

import pytest

from spikemax import params as P
from tests.support.project import run_cli, write_params

COMMANDS = {
    "prepare",
    "train-snn",
    "train-generator",
    "check-generators",
    "maximize",
    "analyze",
    "summarize",
    "report",
    "tune",
    "serve",
    "rig-files",
    "neurons",
}


def test_help_lists_every_command_by_name():
    from typer.main import get_command

    from spikemax.cli import app

    # The registered command names themselves, not substrings of the help text.
    assert set(get_command(app).commands) == COMMANDS  # type: ignore[attr-defined]
    res = run_cli("--help")
    assert res.returncode == 0
    listed = {line.split()[1] for line in res.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert listed >= COMMANDS, listed


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        ({"dataset": "mnist"}, "prepare.dataset: Input should be 'fashion-mnist' or 'cifar10'"),
        ({"train_size": -5}, "prepare.train_size: Input should be greater than or equal to 1 (got -5)"),
        ({"val_fraction": 1.5}, "prepare.val_fraction"),
        ({"train_size": 70000}, "train_size=70000 is larger than the 60000 training images"),
        ({"colour": True}, "unknown key 'prepare.colour'"),
    ],
)
def test_bad_prepare_params_give_one_line(tmp_path, prepare, expected):
    path = write_params(tmp_path, {"prepare": prepare})
    res = run_cli("prepare", "--params", str(path), cwd=tmp_path)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in res.stderr


def test_missing_params_file(tmp_path):
    res = run_cli("prepare", "--params", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: params file not found: {tmp_path / 'nope.yaml'}"


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("prepare:\n  dataset: [unclosed\n")
    res = run_cli("prepare", "--params", str(bad), cwd=tmp_path)
    assert res.returncode == 2 and "not valid YAML" in res.stderr and len(res.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "sections", "expected"),
    [
        ("tune", {"tune": {"lr": [0.3, 0.01]}}, "tune.lr: Input should be [low, high] with low < high"),
        ("tune", {"tune": {"ranks": [0]}}, "tune.ranks.0: Input should be greater than or equal to 1 (got 0)"),
        ("tune", {"tune": {"grid_n": [1, 8]}}, "tune.grid_n.0: Input should be greater than or equal to 2"),
        ("tune", {"tune": {"lr": [0.0, 0.1]}}, "tune.lr.0: Input should be greater than 0"),
        ("maximize", {"maximize": {"budget": 0}}, "maximize.budget: Input should be greater than or equal to 1"),
        ("maximize", {"maximize": {"target_value": float("inf")}}, "maximize.target_value: Input should be a finite"),
        ("train-snn", {"snn": {"lr": float("nan")}}, "snn.lr: Input should be a finite number"),
        ("analyze", {"analyze": {"csi_threshold": 2}}, "analyze.csi_threshold: Input should be less than or equal"),
    ],
)
def test_bad_stage_params_give_one_line_and_exit_2(tmp_path, command, sections, expected):
    path = write_params(tmp_path, sections)
    res = run_cli(command, "--params", str(path), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert expected in res.stderr


@pytest.mark.parametrize("ordinal", ["high", 1.5, -0.5, None])
def test_bad_tt_ordinal_gives_one_line(tmp_path, ordinal):
    path = write_params(tmp_path, {"maximize": {"tt": {"ordinal": ordinal}}})
    res = run_cli("maximize", "--params", str(path), cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        f"error: params.yaml: maximize.tt.ordinal: Input should be 'auto' or a number in [0, 1] (got {ordinal!r})"
    )


def test_tt_ordinal_is_auto_by_default_and_accepts_a_probability():
    assert P.validate({}).maximize.tt.ordinal == "auto"
    assert P.validate({"maximize": {"tt": {"ordinal": 1}}}).maximize.tt.ordinal == 1.0
    for config in ("params.yaml", "configs/paper-cifar10.yaml"):
        params, _ = P.load(P.Path(__file__).resolve().parents[2] / config)
        assert params.maximize.tt.ordinal == "auto"


def test_defaults_validate_and_repo_params_are_valid():
    P.validate({})
    params, _ = P.load(P.Path(__file__).resolve().parents[2] / "params.yaml")
    assert params.prepare.dataset == "fashion-mnist"


def test_prepare_cli_writes_outputs_under_cwd(tmp_path):
    path = write_params(tmp_path, {"prepare": {"train_size": 100, "test_size": 50}})
    res = run_cli("prepare", "--params", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "data" / "prepared" / "meta.json").is_file()


@pytest.mark.parametrize(
    ("noise", "expected"),
    [
        ({"model": "poisson", "window": -4}, "maximize.noise.window: Input should be greater than 0"),
        (
            {"model": "multiplicative", "sigma": -0.5},
            "maximize.noise.sigma: Input should be greater than or equal to 0",
        ),
        ({"model": "poisson", "repeats": 0}, "maximize.noise.repeats: Input should be greater than or equal to 1"),
        ({"model": "gaussian"}, "maximize.noise.model: Input should be 'none', 'poisson' or 'multiplicative'"),
        ({"aware": True, "retest": 1.0}, "maximize.noise.retest: Input should be less than 1"),
        ({"aware": True, "final": -0.1}, "maximize.noise.final: Input should be greater than or equal to 0"),
    ],
)
def test_bad_noise_params_give_one_line_before_any_run(tmp_path, noise, expected):
    path = write_params(tmp_path, {"maximize": {"noise": noise}})
    res = run_cli("maximize", "--params", str(path), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert expected in res.stderr
    assert not (tmp_path / "mlruns").exists()  # rejected before any run was opened


def test_noise_section_defaults_and_the_older_sigma_float():
    m = P.validate({}).maximize
    assert m.noise.model == "none" and m.noise.repeats == 1 and m.noise.aware == "auto"  # on only with a model
    old = P.validate({"maximize": {"noise": 0.3}}).maximize.noise
    assert (old.model, old.sigma) == ("multiplicative", 0.3)
    assert P.validate({"maximize": {"noise": 0}}).maximize.noise.model == "none"


def test_noise_aware_params_reach_every_method():
    from spikemax.optim import NoisyOptimizer, make_optimizer, options_for

    noise = {"model": "poisson", "aware": True, "retest": 0.1, "final": 0.2}
    params = P.validate({"maximize": {"budget": 300, "noise": noise}})
    for method in ("tt", "cma", "random"):
        opts = options_for(method, params, True)
        assert opts["noise_aware"] is True and opts["retest"] == 0.1
        opt = make_optimizer(method, 4, 8, seed=0, **opts)
        assert isinstance(opt, NoisyOptimizer) and opt.retest == 0.1
        # The budget-aware schedule is told the run's budget.
        assert (opt.final, opt.budget) == (0.2, 300)
    assert "noise_aware" not in options_for("tt", P.validate({}), True)
    no_final = P.validate({"maximize": {"noise": {**noise, "final": 0.0}}})
    assert "budget" not in options_for("tt", no_final, True)


def test_non_utf8_params_file_is_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_bytes(b"prepare:\n  dataset: fashion-mnist\n  root: caf\xe9\n")
    res = run_cli("prepare", "--params", str(bad), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "error: params.yaml: not UTF-8 text (byte 45 is 0xe9)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("maximize:\n  budget: 64\n  seeds: [0]\n  budget: 8\n", "params.yaml line 4: key 'budget' is given twice"),
        ("maximize:\n  budget: 64\nmaximize:\n  batch: 8\n", "params.yaml line 3: key 'maximize' is given twice"),
    ],
)
def test_repeated_yaml_key_is_refused_and_named(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    assert str(err.value) == expected
    res = run_cli("maximize", "--params", str(path), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {expected}"


@pytest.mark.parametrize(
    ("maximize", "expected"),
    [
        ({"budget": True}, "maximize.budget: Input should be an integer (got True)"),
        ({"budget": 64.0}, "maximize.budget: Input should be an integer (got 64.0)"),
        ({"budget": "64"}, "maximize.budget: Input should be an integer (got '64')"),
        ({"batch": False}, "maximize.batch: Input should be an integer (got False)"),
        ({"seeds": [0, True]}, "maximize.seeds: Input should be an integer (got [0, True])"),
        ({"target_value": True}, "maximize.target_value: Input should be a number (got True)"),
        ({"budget": 10**7 + 1}, "maximize.budget: Input should be less than or equal to 10000000"),
        ({"budget_last": 10**9}, "maximize.budget_last: Input should be less than or equal to 10000000"),
        ({"seeds": [-1]}, "maximize.seeds.0: Input should be greater than or equal to 0 (got -1)"),
        ({"seeds": [0, 1, 0]}, "maximize.seeds: Input should list each value once (0 is repeated)"),
        ({"methods": ["tt", "cma", "tt"]}, "maximize.methods: Input should list each value once ('tt' is repeated)"),
        ({"generators": ["vqvae", "vqvae"]}, "maximize.generators: Input should list each value once ('vqvae' is"),
        (
            {"targets": ["class:1", "lif1:0", "class:1"]},
            "maximize.targets: Input should list each value once ('class:1'",
        ),
        ({"checkpoints": [-1, -1]}, "maximize.checkpoints: Input should list each value once (-1 is repeated)"),
    ],
)
def test_counts_are_strict_bounded_and_lists_distinct(maximize, expected):
    with pytest.raises(P.ParamsError) as err:
        P.validate({"maximize": maximize})
    assert str(err.value).startswith(expected), str(err.value)


def test_other_sections_count_strictly_too():
    with pytest.raises(P.ParamsError, match=r"^tune.budget: Input should be less than or equal to 10000000"):
        P.validate({"tune": {"budget": 10**8}})
    with pytest.raises(P.ParamsError, match=r"^snn.epochs: Input should be an integer \(got True\)"):
        P.validate({"snn": {"epochs": True}})
    with pytest.raises(P.ParamsError, match=r"^tune.epoch: Input should be an integer \(got True\)"):
        P.validate({"tune": {"epoch": True}})


def test_well_typed_values_still_validate():
    m = P.validate(
        {"maximize": {"budget": 10**7, "seeds": [0, 3], "target_value": 2, "checkpoints": [0, -1], "budget_last": None}}
    ).maximize
    assert (m.budget, m.seeds, m.target_value, m.checkpoints) == (10**7, [0, 3], 2.0, [0, -1])
    assert P.validate({"tune": {"lr": [0.01, 1], "epoch": "last"}}).tune.lr == (0.01, 1.0)
    assert P.validate({"prepare": {"download": False}}).prepare.download is False


def test_strict_counts_apply_to_any_new_section_field():
    """Sections added later get the same rule (booleans and floats are not counts) and free-form fields pass."""
    from typing import Any

    class Extra(P.Section):
        n: int = 1
        share: float | None = None
        free: Any = None
        table: dict[str, int] = P.Field(default_factory=dict)

    assert Extra.model_validate({"n": 2, "share": 1, "free": True, "table": {"a": 1}}).share == 1.0
    for bad in ({"n": True}, {"n": 2.5}, {"share": False}):
        with pytest.raises(P.ValidationError, match="Input should be an? (integer|number)"):
            Extra.model_validate(bad)


def test_population_mode_refuses_reference_stimuli():
    """References correct one neuron's own session: in a shared population they would reach every
    neuron as searched points, so the combination is refused before anything runs."""
    from spikemax import params as P

    with pytest.raises(P.ParamsError, match="noise.references needs population: false"):
        P.validate({"maximize": {"population": True, "noise": {"model": "poisson", "references": 2}}})
    assert P.validate({"maximize": {"population": True, "noise": {"model": "poisson"}}}).maximize.population
