"""The `spikemax` command line: one thin command per DVC stage."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from spikemax import SpikemaxError

app = typer.Typer(
    help="Query-efficient activation maximization for spiking neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read")


def one_line_errors(fn: Callable) -> Callable:
    """Report SpikemaxError as `error: ...` on stderr with exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpikemaxError as err:
            msg = " ".join(str(err).split())
            print(f"error: {msg}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def _load(params: Path):
    from spikemax.devices import keep_freed_memory
    from spikemax.logs import quiet_third_party
    from spikemax.params import load

    quiet_third_party()  # every stage's log: the known third-party noise, filtered once
    keep_freed_memory()  # every stage allocates and frees the same large tensors batch after batch
    return load(params)


@app.command()
@one_line_errors
def prepare(params: Path = ParamsOpt) -> None:
    """Subset and split the dataset into data/prepared/ with its normalization statistics."""
    p, paths = _load(params)
    from rich import print as rprint

    from spikemax.stages.prepare import run

    meta = run(p, paths)
    rprint(f"[green]prepared[/] {meta['dataset']}: {meta['sizes']} -> {paths.prepared}")


@app.command("train-snn")
@one_line_errors
def train_snn(params: Path = ParamsOpt) -> None:
    """Train the ConvSNN, saving checkpoints on the snn.checkpoints schedule (untrained, early steps, epoch ends)."""
    p, paths = _load(params)
    from spikemax.stages.train_snn import run

    run(p, paths)


@app.command()
@one_line_errors
def neurons(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="SNN checkpoint (.ckpt)"),
) -> None:
    """List the spiking layers of a checkpoint and their unit counts (valid targets)."""
    from spikemax.neurons import describe

    print(describe(checkpoint))


@app.command("train-generator")
@one_line_errors
def train_generator(
    name: str = typer.Argument(..., help="generator: sngan or vqvae"),
    params: Path = ParamsOpt,
) -> None:
    """Train one generator (SN-GAN or VQ-VAE) on the prepared data."""
    p, paths = _load(params)
    from spikemax.stages.train_generator import run

    run(name, p, paths)


@app.command("check-generators")
@one_line_errors
def check_generators(params: Path = ParamsOpt) -> None:
    """Score the trained generators with the final SNN: diversity, recognizability, reconstruction."""
    p, paths = _load(params)
    from spikemax.stages.check_generators import run

    run(p, paths)


@app.command()
@one_line_errors
def maximize(
    params: Path = ParamsOpt,
    engine: str | None = typer.Option(
        None, "--engine", envvar="SPIKEMAX_ENGINE", help="where the groups run: local or ray (not a param)"
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", envvar="SPIKEMAX_RAY_ADDRESS", help='Ray cluster: "" starts one, "auto", HOST:6379'
    ),
    ray_workers: int | None = typer.Option(
        None, "--ray-workers", envvar="SPIKEMAX_RAY_WORKERS", help="CPUs of a started Ray cluster (0 = all)"
    ),
    processes: int | None = typer.Option(
        None,
        "--processes",
        envvar="SPIKEMAX_PROCESSES",
        help="local engine: worker processes (1 = this one, 0 = one per core; same results either way)",
    ),
) -> None:
    """Run activation maximization over checkpoints x generators x targets x methods x seeds."""
    p, paths = _load(params)
    from spikemax.am.engine import EngineSettings
    from spikemax.stages.maximize import run

    run(p, paths, EngineSettings.resolve(p.maximize, engine, ray_address, ray_workers, processes))


@app.command()
@one_line_errors
def analyze(params: Path = ParamsOpt) -> None:
    """Selectivity and training-dynamics analysis of the maximize results."""
    p, paths = _load(params)
    from spikemax.stages.analyze import run

    run(p, paths)


@app.command()
@one_line_errors
def summarize(params: Path = ParamsOpt) -> None:
    """Write metrics/summary.json: the headline numbers `dvc metrics show` and `dvc exp show` compare."""
    p, paths = _load(params)
    from spikemax.stages.summarize import run

    for key, value in run(p, paths).items():
        print(f"{key}: {value}")


@app.command()
@one_line_errors
def report(params: Path = ParamsOpt) -> None:
    """Write the static HTML report under reports/."""
    p, paths = _load(params)
    from spikemax.stages.report import run

    run(p, paths)


@app.command()
@one_line_errors
def tune(
    params: Path = ParamsOpt,
    workers: int = typer.Option(None, min=1, help="worker processes sharing the study (default: tune.workers)"),
) -> None:
    """Tune the TT maximizer (rank, lr; grid resolution on SN-GAN) with Optuna, one study per generator."""
    p, paths = _load(params)
    from spikemax.stages.tune import run

    run(p, paths, workers=workers)


@app.command()
@one_line_errors
def serve(
    params: Path = ParamsOpt,
    host: str = typer.Option("127.0.0.1", help="address to bind (a non-loopback one needs a token)"),
    port: int = typer.Option(8765, help="port to bind (0: any free port, printed)"),
    token: str = typer.Option(
        None, envvar="SPIKEMAX_TOKEN", help="bearer token every route but /health requires", show_default=False
    ),
    state: Path = typer.Option(None, help="session store folder (default: results/rig)"),
    forget_lost: bool = typer.Option(
        False, help="start although MLflow has open sessions the journal lacks (their runs are marked FAILED)"
    ),
) -> None:
    """Serve closed-loop sessions over HTTP for rigs (living neurons); sessions survive restarts."""
    p, paths = _load(params)
    from spikemax.rig.app import serve as run

    run(p, paths, host=host, port=port, token=token, state_dir=state, forget_lost=forget_lost)


@app.command("rig-files")
@one_line_errors
def rig_files(
    folder: Path = typer.Argument(..., help="folder shared with the rig (blocks of PNGs in, responses files back)"),
    params: Path = ParamsOpt,
    generator: str = typer.Option(None, help="generator (default: maximize.generators[0])"),
    method: str = typer.Option(
        None, help="optimizer: auto | tt | random | cma | ngopt | protes (default: maximize.methods[0])"
    ),
    budget: int = typer.Option(None, help="stimuli in all (default: maximize.budget)"),
    seed: int = typer.Option(None, help="optimizer seed (default: maximize.seeds[0])"),
    batch: int = typer.Option(None, help="stimuli per block (default: maximize.batch)"),
    channels: int = typer.Option(1, help="responses per presentation (electrodes)"),
    target_channel: int = typer.Option(0, help="channel to maximize (all are recorded)"),
    noise_aware: bool = typer.Option(True, help="re-present the elite, report the best estimated mean"),
    retry_failed: bool = typer.Option(False, help="show a failed presentation (empty response cells) once more"),
    poll: float = typer.Option(0.05, help="seconds between looks for a responses file"),
) -> None:
    """Drive one closed-loop session through a folder (rigs without HTTP); resumes after a crash."""
    p, paths = _load(params)
    from pydantic import ValidationError

    from spikemax.rig.errors import RigError
    from spikemax.rig.files import run_files
    from spikemax.rig.models import SessionCreate
    from spikemax.rig.sessions import SessionManager

    fields = {"generator": generator, "method": method, "budget": budget, "seed": seed, "batch": batch}
    try:
        create = SessionCreate.model_validate(
            {
                **{k: v for k, v in fields.items() if v is not None},
                "channels": channels,
                "target_channel": target_channel,
                "noise_aware": noise_aware,
                "retry_failed": retry_failed,
            }
        )
    except ValidationError as err:
        from spikemax.rig.app import error_text

        e = err.errors()[0]
        raise SpikemaxError(error_text(e["loc"], e["msg"])) from None
    folder.mkdir(parents=True, exist_ok=True)
    manager = SessionManager(p, paths, folder / "state")
    try:
        status = run_files(
            manager,
            folder,
            create,
            poll=poll,
            on_block=lambda st: print(
                f"told {st['answered']}/{st['budget']} stimuli; best {st['best']['response'] if st['best'] else None}",
                flush=True,
            ),
        )
    except RigError as err:
        raise SpikemaxError(str(err)) from None
    except KeyboardInterrupt:
        return
    finally:
        manager.close()
    best = status["best"]
    print(f"session {status['id']} finished: best {best['response'] if best else None} at {folder / 'finished.json'}")


if __name__ == "__main__":
    app()
