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

# Where `mlflow ui` serves a local store (the command the report prints); a tracking server serves its own UI.
LOCAL_UI = "http://127.0.0.1:5000"
# The page's column is 1,200 px; a table estimated wider is split into column groups.
TABLE_PX = 1150
CHAR_PX = 7.2  # average width of a table character at the page's .85em
SECTIONS = {
    "overview": "Overview",
    "claim-early": "Claim 1: selective neurons form early (epochs and layers)",
    "claim-accuracy": "Claim 2: refined optimal stimuli go with rising accuracy",
    "claim-concepts": "Claim 3: some neurons change their concept during training",
    "methods": "Search methods",
    "layers": "Per-layer table",
    "mlflow": "MLflow runs",
}
CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222;background:#fff}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccd;padding-bottom:.2em;margin-top:1.6em}
.wide{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ccd;padding:.2em .5em;text-align:right}
td{white-space:nowrap}th{background:#eef;font-weight:600}td:first-child,th:first-child{text-align:left}figure{margin:.8em 0}img{max-width:100%;border:1px solid #eee}
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


def _html_table(df: pd.DataFrame, links: dict[str, str]) -> str:
    """One HTML table of a frame; `links` maps a column to the column holding its href."""
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
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _col_px(df: pd.DataFrame, c: Any) -> float:
    """Estimated width of a column: its widest cell (cells do not wrap) or its longest header word."""
    cells = max((len(fmt(v)) for v in df[c]), default=0)
    words = max((len(w) for w in str(c).split()), default=0)
    return max(cells, words, 3) * CHAR_PX + 14


def table(df: pd.DataFrame, links: dict[str, str] | None = None) -> str:
    """HTML table(s) of a frame: a frame wider than the column is split into groups of columns, each
    repeating the first (key) column, so the page never scrolls sideways."""
    links = links or {}
    shown = [c for c in df.columns if c not in links.values()]
    if not shown:
        return ""
    key, rest = shown[0], shown[1:]
    key_px, widths = _col_px(df, key), [_col_px(df, c) for c in rest]

    def split(limit: float) -> list[list[Any]]:
        groups: list[list[Any]] = [[]]
        used = key_px
        for c, w in zip(rest, widths):
            if groups[-1] and used + w > limit:
                groups.append([])
                used = key_px
            groups[-1].append(c)
            used += w
        return groups

    groups = split(TABLE_PX)
    k = len(groups)
    for slack in (0.0, 0.25, 0.5, 1.0) if k > 1 else ():  # as many tables, of even widths, not a full one and a stub
        even = split(min(TABLE_PX, key_px + sum(widths) / k + slack * max(widths)))
        if len(even) == k:
            groups = even
            break
    hrefs = [h for c, h in links.items()]
    return "".join(_html_table(df[[key, *g, *hrefs]], links) for g in groups)


def with_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """Columns X, X_lo, X_hi (and X_p) merged into one column X of `value [lo, hi] (p = ...)` cells."""
    out = df.copy()
    for c in list(df.columns):
        if f"{c}_lo" in df and f"{c}_hi" in df:
            cells = []
            for _, r in df.iterrows():
                d = {"value": r[c], "lo": r[f"{c}_lo"], "hi": r[f"{c}_hi"]}
                d = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
                text = "—" if d["value"] is None else est(d)
                if f"{c}_p" in df and isinstance(r[f"{c}_p"], float) and math.isfinite(r[f"{c}_p"]):
                    text += f" (p = {r[f'{c}_p']:.2g})"
                cells.append(text)
            out[c] = cells
            out = out.drop(columns=[k for k in (f"{c}_lo", f"{c}_hi", f"{c}_p") if k in out])
    return out


def layer_table(layers: pd.DataFrame) -> str:
    """The per-layer table turned on its side: one row per number, one column per layer (the layers
    are few; the numbers are many, and as columns they made a table ten times the page's width)."""
    merged = with_intervals(layers).set_index("layer")
    side = merged.T.reset_index().rename(columns={"index": "number"})
    return table(side)


def image(path: Path, caption: str) -> str:
    """A figure with the PNG embedded as a data URI (the page travels as one file)."""
    if not path.is_file():
        return f"<p><em>figure {html.escape(path.name)} was not produced.</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def ui_base(uri: str) -> str:
    """The MLflow UI that shows a tracking URI's runs: a tracking server serves its own UI; a local
    store (sqlite, file) is shown by the `mlflow ui` the report tells you to start (`$SPIKEMAX_MLFLOW_UI`
    or its default address; `tracking.ui_url`)."""
    from spikemax.tracking import ui_url

    return ui_url(uri)


def store_arg(uri: str, root: Path) -> str:
    """The tracking URI as `mlflow ui --backend-store-uri` takes it from the project folder
    (a sqlite store under the project relative to it, so no machine's checkout path is printed)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix) :])
        try:
            return prefix + path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return uri
    return uri


def run_url(exp_id: str, run_id: str, base: str = LOCAL_UI) -> str:
    """Link to one run in the MLflow UI at `base`."""
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}"


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
        f"{fmt(c2.get('test_acc_final'))} (final). Paths on this page are relative to the project folder.</p>"
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
    ep_table = table(with_intervals(pd.read_csv(epochs))) if epochs.is_file() else ""
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


def section_methods(fig: Path, analysis_dir: Path, runs: pd.DataFrame) -> str:
    """The search methods: a comparison table when several ran, else a note saying there is none;
    convergence curves and best stimuli either way."""
    path = analysis_dir / "methods.csv"
    methods = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["generator", "method"])
    names = sorted(methods["method"].unique())
    if len(names) > 1:
        head = (
            table(methods)
            + "<p>win rate = fraction of (checkpoint, generator, neuron, seed) tasks where the method found the "
            "highest activation.</p>"
        )
    else:
        resolved = ""
        if "resolved_method" in runs and len(runs):
            per = runs.groupby("generator")["resolved_method"].agg(lambda v: ", ".join(sorted(set(map(str, v)))))
            resolved = " (" + "; ".join(f"{html.escape(str(g))}: {html.escape(m)}" for g, m in per.items()) + ")"
        which = f"<code>{html.escape(str(names[0]))}</code>{resolved}" if names else "no method"
        head = (
            f"<p>Only one method ran, {which}, so there is nothing to compare: list several in "
            "<code>maximize.methods</code> (for example <code>[auto, tt, random]</code>) to compare them here, "
            "or see <code>benchmarks/bench_am.py</code>.</p>"
            + (table(methods.drop(columns=[c for c in ("win_rate",) if c in methods])) if len(methods) else "")
        )
    return (
        head
        + image(
            fig / "convergence.png", "Best-so-far activation / dataset max vs queries: median over runs, band = IQR."
        )
        + image(
            fig / "methods_best.png",
            "Best stimulus per generator/method at the last AM'd checkpoint, with its activation.",
        )
    )


def section_mlflow(ids: dict, summary: pd.DataFrame, root: Path) -> str:
    """How to open the store, the analysis run link, and a link per AM run."""
    if not ids.get("run_id"):
        return "<p>The analysis ran with <code>analyze.mlflow: false</code>: no MLflow run to link.</p>"
    uri = ids.get("tracking_uri", "")
    base = ui_base(uri)
    if not uri.startswith(("http://", "https://")):
        start = f"mlflow ui --backend-store-uri {store_arg(uri, root)} --port 5000" if uri else "mlflow ui --port 5000"
        how = f"Start the UI from the project folder with <code>{html.escape(start)}</code> and open"
    else:
        how = f"The runs are on the tracking server {html.escape(base)}: open"
    exp = ids["experiment_id"]  # the analysis run's experiment
    am_exp = ids.get("am_experiment_id", exp)  # the AM runs'
    runs = summary.copy()
    runs["href"] = [run_url(am_exp, r, base) for r in runs["run_id"]]
    views = "".join(
        f'<li><a href="{html.escape(v["url"])}">{html.escape(v["title"])}</a></li>' for v in ids.get("views", [])
    )
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
        f"<p>{how} "
        f'<a href="{base}/#/experiments/{am_exp}/runs">the AM experiment</a> '
        f"(runs view; switch to “Model training” if MLflow opens the GenAI overview). "
        f'Analysis run: <a href="{run_url(exp, ids["run_id"], base)}">{html.escape(ids["run_id"])}</a> '
        f"({ids.get('am_runs_tagged', 0)} AM runs tagged with their concept"
        f"{', ' + str(ids['am_runs_missing']) + ' not found in the store' if ids.get('am_runs_missing') else ''}).</p>"
        + (f"<p>Ready comparison views:</p><ul>{views}</ul>" if views else "")
        + f"<details><summary>All {len(runs)} AM runs</summary>{table(runs[cols], links={'run_id': 'href'})}</details>"
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
        "methods": section_methods(fig, analysis_dir, runs),
        "layers": layer_table(pd.read_csv(layers_csv)) if layers_csv.is_file() else "<p>no layer table</p>",
        "mlflow": section_mlflow(ids, runs, paths.root),
    }
    nav = "".join(f'<a href="#{k}">{html.escape(v.split(":")[0])}</a>' for k, v in SECTIONS.items())
    parts = [f'<section id="{k}"><h2>{html.escape(SECTIONS[k])}</h2>{v}</section>' for k, v in body.items()]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>spikemax report</title>'
        f"<style>{CSS}</style></head><body><h1>spikemax: activation maximization across SNN training</h1>"
        f"<nav>{nav}</nav>{''.join(parts)}</body></html>\n"
    )
