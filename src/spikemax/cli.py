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
    from spikemax import params as P

    return P.load(params)


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
    """Train the ConvSNN, saving a checkpoint for epoch 0 and after every epoch."""
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
def maximize(params: Path = ParamsOpt) -> None:
    """Run activation maximization over checkpoints x generators x targets x methods x seeds."""
    p, paths = _load(params)
    from spikemax.stages.maximize import run

    run(p, paths)


@app.command()
@one_line_errors
def analyze(params: Path = ParamsOpt) -> None:
    """Selectivity and training-dynamics analysis of the maximize results."""
    p, paths = _load(params)
    from spikemax.stages.analyze import run

    run(p, paths)


@app.command()
@one_line_errors
def report(params: Path = ParamsOpt) -> None:
    """Write the static HTML report under reports/."""
    p, paths = _load(params)
    from spikemax.stages.report import run

    run(p, paths)


@app.command()
@one_line_errors
def tune(params: Path = ParamsOpt) -> None:
    """Tune TT rank and grid resolution with Optuna."""
    p, paths = _load(params)
    from spikemax.stages.tune import run

    run(p, paths)


@app.command()
@one_line_errors
def serve(
    params: Path = ParamsOpt,
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8765, help="port to bind"),
    generator: str = typer.Option(None, help="generator (default: maximize.generators[0])"),
    method: str = typer.Option(None, help="optimizer (default: maximize.methods[0])"),
) -> None:
    """Serve the ask/tell loop over HTTP for an external responder (a living neuron's rig)."""
    p, paths = _load(params)
    from spikemax.server import serve as run

    run(p, paths, host=host, port=port, generator=generator, method=method)


if __name__ == "__main__":
    app()
