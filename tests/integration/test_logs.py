"""Stage logs a file can hold: whole progress lines (no carriage returns or cursor codes) when the
output is not a terminal, and the known third-party noise filtered once."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import optuna
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from spikemax import logs
from spikemax.generators.common import LineProgress, make_trainer


class Tiny(L.LightningModule):
    """A linear regression: three batches an epoch, one logged scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def training_step(self, batch, _idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(12, 2, generator=g), torch.randn(12, 1, generator=g)), batch_size=4)


def _fit(trainer: L.Trainer) -> None:
    trainer.fit(Tiny(), train_dataloaders=_loader())


def test_progress_lines_not_bars_when_stderr_is_not_a_terminal(capfd):
    trainer = make_trainer(2, [], validate=False, name="tiny")
    assert isinstance(trainer.progress_bar_callback, LineProgress)  # pytest's capture is no terminal
    trainer.progress_bar_callback.every_s = 0.0  # a line after every step too
    _fit(trainer)
    err = capfd.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("tiny ")]
    assert lines[:3] == [f"tiny epoch 1/2: step {i}/3 ({lines[i - 1].rsplit('(', 1)[1]}" for i in (1, 2, 3)]
    done = [ln for ln in lines if ": done in " in ln]
    assert [d.split(":")[0] for d in done] == ["tiny epoch 1/2", "tiny epoch 2/2"]
    assert all("loss " in d for d in done)


def test_lightning_tip_and_leafspec_warning_filtered_once(monkeypatch, caplog, capfd):
    plain = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("always")
        with caplog.at_level(logging.INFO):
            _fit(L.Trainer(**plain))
    said = caplog.text + capfd.readouterr().err
    leafspec = [w for w in before if "LeafSpec" in str(w.message)]
    if "Tip" not in said and not leafspec:
        pytest.skip("this Lightning/torch pair prints neither the tip nor the LeafSpec warning")
    caplog.clear()
    monkeypatch.setattr(logs, "_QUIET", False)
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        logs.quiet_third_party()
        logs.quiet_third_party()  # idempotent: one filter, not two
        with caplog.at_level(logging.INFO):
            _fit(L.Trainer(**plain))
    assert "Tip" not in caplog.text + capfd.readouterr().err
    assert not [w for w in after if "LeafSpec" in str(w.message)]
    tips = [
        f for f in logging.getLogger("lightning.pytorch.utilities.rank_zero").filters if isinstance(f, logs._DropTip)
    ]
    assert len(tips) >= 1


def test_trial_progress_writes_one_line_per_finished_trial():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="tt-sngan-e1", direction="maximize")
    out: list[str] = []

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 1:
            raise optuna.TrialPruned()
        return x

    study.optimize(objective, n_trials=3, callbacks=[logs.trial_progress(3, out.append)])
    assert len(out) == 3
    assert out[0].startswith("tune tt-sngan-e1: trial 0 COMPLETE value ")
    assert out[1].startswith("tune tt-sngan-e1: trial 1 PRUNED value -")
    assert "(3/3 finished, " in out[2]


@pytest.mark.slow
@pytest.mark.usefixtures("own_store")
def test_check_generators_says_what_it_does(project, snn_checkpoints, generator_checkpoints, capfd):
    from spikemax import params as P
    from spikemax.stages.check_generators import run

    params, paths = project
    run(P.validate({**params.model_dump(), "generators": {"check_samples": 32}}), paths)
    err = capfd.readouterr().err
    for name in ("sngan", "vqvae"):
        assert f"check_generators: {name}: scoring 32 random grid points" in err
        assert f"check_generators: {name}: " in err and " classes, entropy " in err
