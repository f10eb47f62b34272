"""The `report` stage: one static, self-contained HTML page (images embedded as base64 PNG).

Reads what `analyze` wrote (metrics/analysis.json, results/analysis/*.csv, figures, mlflow.json)
and the maximize summary; computes nothing new, so the page always shows the measured numbers.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from spikemax import SpikemaxError
from spikemax.params import Paths

MLFLOW_UI = "http://127.0.0.1:5000"
SECTIONS = {
    "overview": "Overview",
    "claim-early": "Claim 1: selective neurons form early (epochs and layers)",
    "claim-accuracy": "Claim 2: refined optimal stimuli go with rising accuracy",
    "claim-concepts": "Claim 3: some neurons change their concept during training",
    "methods": "Method comparison",
    "layers": "Per-layer table",
    "mlflow": "MLflow runs",
}
CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222;background:#fff}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em;display:block;overflow-x:auto}td,th{border:1px solid #ccd;padding:.2em .5em;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}figure{margin:.8em 0}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.claim{background:#f5f7ff;border-left:4px solid #55a;padding:.5em 1em;margin:.8em 0}
code{background:#f3f3f3;padding:0 .2em}nav a{margin-right:1em}
"""


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, missing as an em dash, an estimate dict as `value [lo, hi]`."""
    if isinstance(v, dict):
        return est(v, digits)
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return "—"
        if float(v).is_integer() and abs(v) < 1e9:
            return str(int(v))
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _interval(d: dict, scale: float = 1.0, spec: str = ".3g") -> str:
    """' [lo, hi]' of an estimate dict (the 95 % bootstrap interval), or '' when it has none."""
    if d.get("lo") is None or d.get("hi") is None:
        return ""
    return f" [{scale * d['lo']:{spec}}, {scale * d['hi']:{spec}}]"


def est(d: dict | None, digits: int = 3) -> str:
    """'value [lo, hi]' of an estimate dict ({"value", "lo", "hi", "n"}) or a correlation dict."""
    if not d:
        return "—"
    if "rho" in d:
        return rho(d)
    if d.get("value") is None:
        return "—"
    return f"{d['value']:.{digits}g}{_interval(d, spec=f'.{digits}g')}"


def rho(d: dict | None, unit: str = "checkpoints") -> str:
    """'rho [lo, hi] (p = ..., n = ...)' of a correlation dict (bootstrap interval over neurons)."""
    if not d or d.get("rho") is None:
        n = (d or {}).get("n", 0)
        return f"undefined (n = {n} {unit}, or a constant series)"
    return f"{d['rho']:+.2f}{_interval(d, spec='+.2f')} (p = {d['p']:.2g}, n = {d['n']} {unit})"


def table(df: pd.DataFrame, links: dict[str, str] | None = None) -> str:
    """An HTML table of a frame; `links` maps a column to the column holding its href."""
    links = links or {}
    shown = [c for c in df.columns if c not in links.values()]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in shown:
            text = fmt(r[c])
            if c in links and isinstance(r[links[c]], str) and r[links[c]]:
                text = f'<a href="{html.escape(r[links[c]])}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def image(path: Path, caption: str) -> str:
    """A figure with the PNG embedded as a data URI (the page travels as one file)."""
    if not path.is_file():
        return f"<p><em>figure {html.escape(path.name)} was not produced.</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def run_url(exp_id: str, run_id: str) -> str:
    """Link to one run in a local `mlflow ui`."""
    return f"{MLFLOW_UI}/#/experiments/{exp_id}/runs/{run_id}"


def per_layer_frame(block: dict, keys: dict[str, str]) -> pd.DataFrame:
    """Rows = layers, columns = the chosen per-layer numbers of one claim (spearman dicts -> rho)."""
    rows = []
    for layer, vals in block.get("per_layer", {}).items():
        row: dict[str, Any] = {"layer": layer}
        for key, label in keys.items():
            v = vals.get(key)
            row[label] = est(v) if isinstance(v, dict) else v
        rows.append(row)
    return pd.DataFrame(rows)


def pct(v: float | dict | None) -> str:
    """A fraction as a percentage; an estimate dict with its 95 % interval."""
    if isinstance(v, dict):
        if v.get("value") is None:
            return "—"
        return f"{100 * v['value']:.0f} %{_interval(v, 100, '.0f')}"
    return "—" if v is None else f"{100 * v:.0f} %"


def section_overview(a: dict, meta: dict, paths: Paths, ids: dict) -> str:
    """Setting of the run: data, epochs, layers, AM runs."""
    c2 = a["claim2_selectivity_and_accuracy"]
    min_rate = a["claim1_early_selectivity"].get("min_rate")
    silent = f"silent unit, or mean rate below {min_rate:g} spikes/step: 0" if min_rate else "silent unit: 0"
    return (
        f"<p>Checkpoints analysed (epochs of training): {', '.join(f'{p:g}' for p in meta.get('progress', []))} "
        f"(selectivity from the prepared test set at every checkpoint); AM'd checkpoints (indices): "
        f"{', '.join(map(str, meta.get('am_epochs', [])))}; {meta.get('am_runs', 0)} AM runs "
        f"({meta.get('restarts', 1)} restarts per checkpoint and neuron); spiking layers "
        f"{', '.join(meta.get('layers', []))}. Test accuracy {fmt(c2.get('test_acc_first'))} (first epoch) → "
        f"{fmt(c2.get('test_acc_final'))} (final). Project: <code>{html.escape(str(paths.root.resolve()))}</code>.</p>"
        "<p>CSI = (μ<sub>max</sub> − μ<sub>rest</sub>)/(μ<sub>max</sub> + μ<sub>rest</sub>) over class-mean firing "
        f"rates ({silent}); AM gain = best AM activation / highest activation over the test set; concept = class "
        "the final-epoch SNN assigns to the optimal stimulus (the best stimulus over methods and seeds).</p>"
        "<p>Brackets are 95 % percentile-bootstrap intervals over neurons (1,000 seeded resamples); "
        "p-values of correlations over checkpoints come from permuting the checkpoints (exact up to 8).</p>"
    )


def section_claim1(a: dict, fig: Path) -> str:
    """Claim 1 numbers and figures."""
    c1 = a["claim1_early_selectivity"]
    early, final = c1.get("early_progress", c1["early_epoch"]), c1.get("final_progress", c1["final_epoch"])
    df = per_layer_frame(
        c1,
        {
            "units": "units",
            "frac_selective_by_early_epoch": f"selective by epoch {c1.get('early_progress', c1['early_epoch']):.2f}",
            "frac_selective_final": "selective at final epoch",
            "mean_csi_early": "mean CSI early",
            "mean_csi_final": "mean CSI final",
            "max_csi_early": "max CSI early",
            "median_first_selective_progress": "median first selective (epochs)",
            "mean_sparseness_final": "sparseness final",
        },
    )
    return (
        f'<div class="claim">Measured: {pct(c1.get("frac_selective_by_early_epoch"))} of all units had CSI > '
        f"{c1['csi_threshold']} by epoch {early:.2f} ({pct(c1.get('frac_selective_final'))} at the final "
        f"checkpoint, epoch {final:g}); the highest CSI at epoch {early:.2f} was {fmt(c1.get('max_csi_early'))}. "
        f"Per layer (input side first), selective by epoch {early:.2f}: "
        + ", ".join(
            f"{html.escape(lay)} {pct(v.get('frac_selective_by_early_epoch'))}"
            for lay, v in c1.get("per_layer", {}).items()
        )
        + ".</div>"
        + table(df)
        + image(
            fig / "first_selective.png",
            "Cumulative fraction of units per layer whose CSI exceeded the threshold by each epoch.",
        )
    )


def section_claim2(a: dict, fig: Path, analysis_dir: Path) -> str:
    """Claim 2 numbers, per-epoch table and figures."""
    c2 = a["claim2_selectivity_and_accuracy"]
    df = per_layer_frame(
        c2,
        {
            "spearman_mean_csi_vs_test_acc": "ρ(mean CSI, test acc)",
            "spearman_am_gain_vs_test_acc": "ρ(AM gain, test acc)",
            "mean_am_gain": "mean AM gain",
            "mean_pixel_corr_consecutive": "pixel corr. consecutive stimuli",
            "mean_latent_dist_consecutive": "latent dist. consecutive stimuli",
        },
    )
    epochs = analysis_dir / "accuracy_by_epoch.csv"
    ep_table = table(pd.read_csv(epochs)) if epochs.is_file() else ""
    return (
        '<div class="claim">Measured Spearman correlations across checkpoints with test accuracy: '
        f"mean CSI {rho(c2.get('spearman_mean_csi_vs_test_acc'))}; mean AM gain {rho(c2.get('spearman_am_gain_vs_test_acc'))}; "
        f"concept probability of the optimal stimuli {rho(c2.get('spearman_concept_prob_vs_test_acc'))}; similarity of the "
        f"optimal stimulus to its final-epoch version {rho(c2.get('spearman_similarity_to_final_vs_test_acc'))}.</div>"
        + table(df)
        + "<h3>Per epoch</h3>"
        + ep_table
        + image(
            fig / "accuracy_selectivity.png",
            "Test accuracy, mean CSI and AM gain vs epoch; mean CSI and selective fraction per layer.",
        )
        + image(fig / "am_gain.png", "AM gain (AM best / dataset max) vs epoch, per layer and per generator/method.")
    )


def section_claim3(a: dict, fig: Path) -> str:
    """Claim 3 numbers and figures (concept map and stimulus evolution grids)."""
    c3 = a["claim3_concept_change"]
    df = per_layer_frame(
        c3,
        {
            "tracked_neurons": "tracked (generator, neuron)",
            "frac_neurons_changing_concept": "changing concept",
            "mean_concept_changes": "mean changes",
            "frac_neurons_changing_concept_robust": "changing concept (restart-robust)",
            "mean_concept_changes_robust": "mean changes (restart-robust)",
            "frac_checkpoints_restarts_agree": "restarts agree",
            "frac_concept_is_preferred_class_final": "final concept = preferred class",
        },
    )
    grids = "".join(
        image(
            p,
            f"Stimulus evolution ({p.stem.removeprefix('evolution_')}): rows = neurons, columns = "
            "epochs; title = concept under the final SNN, its probability (* = changed), activation.",
        )
        for p in sorted(fig.glob("evolution_*.png"))
    )
    return (
        f'<div class="claim">Measured: {pct(c3.get("frac_neurons_changing_concept"))} of {c3.get("tracked_neurons", 0)} '
        f"tracked (generator, neuron) pairs changed the concept of their optimal stimulus at least once from epoch "
        f"{c3.get('from_progress')} epochs of training on (mean {fmt(c3.get('mean_concept_changes'))} changes); "
        f"restart-robust (both checkpoints' {c3.get('restarts', 0)} restarts agree, and the concepts differ): "
        f"{pct(c3.get('frac_neurons_changing_concept_robust'))} (mean {fmt(c3.get('mean_concept_changes_robust'))} "
        f"changes; restarts agreed at {pct(c3.get('frac_checkpoints_restarts_agree'))} of the tracked checkpoints). "
        f"Spearman ρ between layer depth and number of changes "
        f"{rho(c3.get('spearman_layer_depth_vs_changes'), 'neurons')}, restart-robust "
        f"{rho(c3.get('spearman_layer_depth_vs_changes_robust'), 'neurons')}.</div>"
        + table(df)
        + image(fig / "concepts.png", "Concept of each tracked neuron's optimal stimulus per epoch.")
        + grids
    )


def section_methods(fig: Path, analysis_dir: Path) -> str:
    """Method comparison: table, convergence curves, best stimuli side by side."""
    path = analysis_dir / "methods.csv"
    return (
        (table(pd.read_csv(path)) if path.is_file() else "")
        + "<p>win rate = fraction of (epoch, generator, neuron, seed) tasks where the method found the highest activation.</p>"
        + image(
            fig / "convergence.png", "Best-so-far activation / dataset max vs queries: median over runs, band = IQR."
        )
        + image(
            fig / "methods_best.png", "Best stimulus per generator/method at the last AM'd epoch, with its activation."
        )
    )


def section_mlflow(ids: dict, summary: pd.DataFrame) -> str:
    """How to open the store, the analysis run link, and a link per AM run."""
    if not ids.get("run_id"):
        return "<p>The analysis ran with <code>analyze.mlflow: false</code>: no MLflow run to link.</p>"
    uri = ids.get("tracking_uri", "")
    start = f"mlflow ui --backend-store-uri {uri} --port 5000" if uri else "mlflow ui"
    exp = ids["experiment_id"]
    runs = summary.copy()
    runs["href"] = [run_url(exp, r) for r in runs["run_id"]]
    cols = [
        c
        for c in (
            "run_id",
            "epoch",
            "generator",
            "target",
            "method",
            "seed",
            "best_activation",
            "am_gain_dataset",
            "concept_name",
            "href",
        )
        if c in runs.columns
    ]
    return (
        f"<p>Start the UI with <code>{html.escape(start)}</code> and open "
        f'<a href="{MLFLOW_UI}/#/experiments/{exp}/runs">experiment {html.escape(ids.get("experiment", ""))} '
        f"(runs view; switch to “Model training” if MLflow opens the GenAI overview)</a>. "
        f'Analysis run: <a href="{run_url(exp, ids["run_id"])}">{html.escape(ids["run_id"])}</a> '
        f"({ids.get('am_runs_tagged', 0)} AM runs tagged with selectivity.*"
        f"{', ' + str(ids['am_runs_missing']) + ' not found in the store' if ids.get('am_runs_missing') else ''}).</p>"
        f"<details><summary>All {len(runs)} AM runs</summary>{table(runs[cols], links={'run_id': 'href'})}</details>"
    )


def build(paths: Paths) -> str:
    """The report page as a string."""
    metrics = paths.metrics / "analysis.json"
    analysis_dir = paths.results / "analysis"
    if not metrics.is_file() or not analysis_dir.is_dir():
        raise SpikemaxError(f"{metrics} missing: run `spikemax analyze` (or `dvc repro analyze`) first")
    a = json.loads(metrics.read_text())
    meta = a.get("meta", {})
    ids_path = analysis_dir / "mlflow.json"
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    runs_path = analysis_dir / "runs.csv"
    runs = pd.read_csv(runs_path) if runs_path.is_file() else pd.DataFrame(columns=["run_id"])
    fig = analysis_dir / "figures"
    layers_csv = analysis_dir / "layers.csv"
    body = {
        "overview": section_overview(a, meta, paths, ids),
        "claim-early": section_claim1(a, fig),
        "claim-accuracy": section_claim2(a, fig, analysis_dir),
        "claim-concepts": section_claim3(a, fig),
        "methods": section_methods(fig, analysis_dir),
        "layers": table(pd.read_csv(layers_csv)) if layers_csv.is_file() else "<p>no layer table</p>",
        "mlflow": section_mlflow(ids, runs),
    }
    nav = "".join(f'<a href="#{k}">{html.escape(v.split(":")[0])}</a>' for k, v in SECTIONS.items())
    parts = [f'<section id="{k}"><h2>{html.escape(SECTIONS[k])}</h2>{v}</section>' for k, v in body.items()]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>spikemax report</title>'
        f"<style>{CSS}</style></head><body><h1>spikemax: activation maximization across SNN training</h1>"
        f"<nav>{nav}</nav>{''.join(parts)}</body></html>\n"
    )
