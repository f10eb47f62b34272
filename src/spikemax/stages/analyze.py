"""Stage `analyze`: selectivity across checkpoints, concept changes of optimal stimuli, the paper's claims."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from spikemax import SpikemaxError
from spikemax.analysis import (
    claims,
    convergence_curves,
    dataset_selectivity,
    epoch_table,
    first_selective_table,
    headline,
    layer_table,
    load_best,
    load_summary,
    log_mlflow,
    method_table,
    neuron_changes,
    optimal_stimuli,
    read_accuracy,
    restart_stimuli,
    stimulus_stats,
    trajectories,
    wide_by_layer,
)
from spikemax.data import Prepared
from spikemax.figures import write_figures
from spikemax.outputs import write_json
from spikemax.params import Params, Paths
from spikemax.snn import checkpoints, load_snn


def run(params: Params, paths: Paths) -> dict:
    """Selectivity of every checkpoint, the optimal stimuli's concepts, the claims; returns analysis.json."""
    a = params.analyze
    prepared = Prepared.load(paths.prepared)
    x_test, y_test = prepared.tensors("test")
    if a.max_images:  # the prepared test split is shuffled and class-balanced: a prefix stays balanced
        x_test, y_test = x_test[: a.max_images], y_test[: a.max_images]
    ckpts = checkpoints(paths)
    if not ckpts:
        raise SpikemaxError(f"no SNN checkpoints under {paths.snn_dir}: run `spikemax train-snn` first")
    summary_df = load_summary(paths)
    am_dir = paths.results / "am"

    units, layers = dataset_selectivity(ckpts, x_test, y_test.numpy(), len(prepared.classes), a.batch_size, a.min_rate)
    final_net = load_snn(ckpts[max(ckpts)])
    final_net.eval()
    best = [load_best(am_dir, d) for d in summary_df["run_dir"]]
    images = np.stack([b[0] for b in best])
    with torch.no_grad():
        runs = stimulus_stats(summary_df, images, final_net, prepared, units)
        pixels = prepared.denormalize(torch.from_numpy(images)).clamp(0, 1).numpy()
    by_key = dict(zip(runs["run_key"], range(len(runs))))
    pix_of = {k: pixels[i] for k, i in by_key.items()}
    lat_of = {k: best[i][1] for k, i in by_key.items()}
    return write_outputs(
        params, paths, units, layers, runs, pix_of, lat_of, prepared.classes, epochs=sorted(int(e) for e in ckpts)
    )


def write_outputs(
    params: Params,
    paths: Paths,
    units: pd.DataFrame,
    layers: list[str],
    runs: pd.DataFrame,
    pixels: dict[str, np.ndarray],
    latents: dict[str, np.ndarray],
    classes: list[str],
    epochs: list[int],
) -> dict:
    """Everything after the SNN readout: tables, claims, figures, metrics JSON and MLflow."""
    a = params.analyze
    am_dir = paths.results / "am"
    out_dir = paths.results / "analysis"
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    optimal = optimal_stimuli(runs)
    traj = trajectories(optimal, latents, params, pixels)
    changes = neuron_changes(traj, a.concept_from_epoch, restart_stimuli(runs))
    first = first_selective_table(units, a.csi_threshold)
    epochs_t = epoch_table(units, runs, read_accuracy(paths), a.csi_threshold)
    result = claims(units, first, runs, traj, changes, epochs_t, layers, params)
    curves = convergence_curves(runs, am_dir)

    units.to_csv(out_dir / "units.csv", index=False)
    runs.to_csv(out_dir / "runs.csv", index=False)
    traj.to_csv(out_dir / "stimuli.csv", index=False)
    changes.to_csv(out_dir / "concept_changes.csv", index=False)
    first.to_csv(out_dir / "first_selective.csv", index=False)
    method_table(runs, curves).to_csv(out_dir / "methods.csv", index=False)
    epochs_t.to_csv(out_dir / "accuracy_by_epoch.csv", index=False)
    wide_by_layer(units, "csi", layers).to_csv(out_dir / "csi_by_epoch.csv", index=False)
    wide_by_layer(runs, "am_gain_dataset", layers).to_csv(out_dir / "am_gain_by_epoch.csv", index=False)
    layer_table(result, layers).to_csv(out_dir / "layers.csv", index=False)
    write_figures(
        fig_dir,
        units=units,
        runs=runs,
        traj=traj,
        first=first,
        epochs_t=epochs_t,
        curves=curves,
        layers=layers,
        classes=classes,
        pixels=pixels,
        threshold=a.csi_threshold,
        grid_rows=a.grid_rows,
    )

    result["meta"] = {
        "epochs": epochs,
        "progress": [float(p) for p in units.groupby("epoch")["progress"].first()],
        "am_epochs": sorted(int(e) for e in runs["epoch"].unique()),
        "restarts": int(runs["seed"].nunique()),
        "layers": layers,
        "am_runs": len(runs),
        "classes": list(classes),
    }
    result["headline"] = headline(result)  # the claims as a handful of numbers (MLflow, metrics/summary.json)
    write_json(paths.metrics / "analysis.json", result)
    ids = log_mlflow(paths, params, result, out_dir, runs) if a.mlflow else {}
    write_json(out_dir / "mlflow.json", ids)
    return result
