"""Across-epoch analysis: change detection, first selective epoch, similarities, claims on synthetic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spikemax import analysis as A
from spikemax import stats
from spikemax.params import Params


def test_concept_changes_on_synthetic_sequence():
    # epochs given out of order: sorted first, then 3 -> 3 -> 5 -> 5 -> 2
    events = A.concept_changes([4, 1, 2, 3, 5], [5, 3, 3, 5, 2])
    assert events == [(2, 3, 3, 5), (4, 5, 5, 2)]


def test_concept_changes_none_when_constant_or_single():
    assert A.concept_changes([0, 1, 2], [7, 7, 7]) == []
    assert A.concept_changes([3], [1]) == []


def test_first_selective_epoch_detects_first_crossing():
    assert A.first_selective_epoch([0, 1, 2, 3], [0.1, 0.4, 0.6, 0.3], 0.5) == 2
    # strictly above: equal to the threshold is not selective
    assert A.first_selective_epoch([0, 1], [0.5, 0.5], 0.5) is None
    assert A.first_selective_epoch([3, 0, 1], [0.9, 0.2, 0.7], 0.5) == 1


def test_selective_fraction_is_cumulative():
    frac = A.selective_fraction_by_epoch([0, 2, None, 2], [0, 1, 2, 3])
    np.testing.assert_allclose(frac, [0.25, 0.25, 0.75, 0.75])


def test_pixel_correlation_and_latent_distance():
    a = np.arange(12, dtype=float).reshape(1, 3, 4)
    assert A.pixel_correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert A.pixel_correlation(a, -a) == pytest.approx(-1.0)
    assert A.pixel_correlation(a, np.ones_like(a)) == 0.0
    # ordinal grid of n = 5: |0-4| + |2-2| over 2 positions / (n - 1)
    assert A.latent_distance(np.array([0, 2]), np.array([4, 2]), n=5) == pytest.approx(0.5)
    # categorical codes: fraction of positions that differ
    assert A.latent_distance(np.array([1, 2, 3, 4]), np.array([1, 9, 3, 0])) == pytest.approx(0.5)


def test_spearman_small_n_p_value_is_exact():
    # 3 epochs, perfectly monotone: 2 of the 6 pairings reach |rho| = 1.
    res = stats.spearman([0.1, 0.5, 0.9], [1, 2, 3])
    assert res["rho"] == pytest.approx(1.0) and res["p"] == pytest.approx(1 / 3)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1])["p"] == pytest.approx(2 / 24)
    big = stats.spearman(np.arange(12.0), np.arange(12.0) ** 2)
    # beyond 8 pairs: seeded random pairings, none reaches rho = 1, so p = 1 / (1 + pairings)
    assert big["n"] == 12 and big["p"] == pytest.approx(1 / (1 + stats.N_PERMUTATIONS))


def test_spearman_monotone_and_degenerate():
    res = stats.spearman([0.1, 0.2, 0.3, 0.5], [0.5, 0.6, 0.7, 0.9])
    assert res["rho"] == pytest.approx(1.0) and res["n"] == 4
    assert stats.spearman([1, 2], [3, 4])["rho"] is None
    assert stats.spearman([1, 1, 1], [1, 2, 3])["rho"] is None
    assert stats.spearman([1, 2, np.nan, 3], [3, 2, 5, 1])["rho"] == pytest.approx(-1.0)


def test_unit_stats_match_selectivity_functions():
    rates = {"lif1": np.array([[4.0, 1.0], [0.0, 1.0], [0.0, 1.0]])}
    df = A.unit_stats(rates, np.array([0, 1, 2]), 3)
    assert df["csi"].tolist() == pytest.approx([1.0, 0.0])
    assert df["preferred_class"].tolist()[0] == 0
    assert df["dataset_max"].tolist() == [4.0, 1.0]
    assert df["sparseness"].tolist() == pytest.approx([1.0, 0.0])


def test_nearly_silent_units_are_not_selective():
    # Unit 0: one spike on one image of class 0 (mean rate 0.02); unit 1 fires for class 0 only.
    rates = {"out": np.array([[0.1, 0.8], [0.0, 0.9]] + [[0.0, 0.0]] * 3)}
    labels = np.array([0, 0, 1, 2, 2])
    df = A.unit_stats(rates, labels, 3, min_rate=0.05)
    assert df["csi_raw"].tolist() == pytest.approx([1.0, 1.0])
    assert df["csi"].tolist() == pytest.approx([0.0, 1.0])
    assert A.unit_stats(rates, labels, 3)["csi"].tolist() == pytest.approx([1.0, 1.0])


def _synthetic_tables(threshold: float = 0.5):
    """Units of 2 layers over epochs 0..3 and tracked optimal stimuli of 2 neurons."""
    units = pd.DataFrame(
        [
            # lif1 unit 0 selective from epoch 1; out unit 0 from epoch 3; out unit 1 never
            {
                "epoch": e,
                "progress": float(e),
                "layer": lay,
                "unit": u,
                "csi": c,
                "preferred_class": 0,
                "sparseness": 0.2,
                "dataset_max": 1.0,
            }
            for e in range(4)
            for lay, u, c in [
                ("lif1", 0, [0.1, 0.6, 0.7, 0.8][e]),
                ("out", 0, [0.0, 0.2, 0.3, 0.9][e]),
                ("out", 1, [0.0, 0.1, 0.1, 0.1][e]),
            ]
        ]
    )
    traj = pd.DataFrame(
        [
            {
                "generator": "sngan",
                "target": tg,
                "layer": lay,
                "unit": 0,
                "epoch": e,
                "progress": float(e),
                "concept": c,
                "preferred_class": 0,
                "pixel_corr_prev": np.nan if e == 0 else 0.5,
                "latent_dist_prev": 0.1,
                "pixel_corr_final": 1.0 if e == 3 else 0.2,
                "concept_prob": 0.5 + 0.1 * e,
                "am_gain_dataset": 1.0 + e,
                "perplexity": 0.3,
                "complexity": 100,
            }
            for tg, lay, seq in [("lif1:0", "lif1", [4, 0, 0, 0]), ("class:0", "out", [1, 2, 3, 0])]
            for e, c in enumerate(seq)
        ]
    )
    return units, traj


def test_claims_on_synthetic_tables():
    params = Params.model_validate({"analyze": {"csi_threshold": 0.5, "early_epoch": 1, "concept_from_epoch": 1}})
    units, traj = _synthetic_tables()
    first = A.first_selective_table(units, 0.5)
    assert first.set_index(["layer", "unit"])["first_selective_epoch"].to_dict() == pytest.approx(
        {("lif1", 0): 1, ("out", 0): 3, ("out", 1): np.nan}, nan_ok=True
    )
    changes = A.neuron_changes(traj, from_epoch=1)
    by_target = changes.set_index("target")
    # epoch 0 excluded: lif1 keeps concept 0 (no change); class:0 goes 2 -> 3 -> 0 (two changes)
    assert by_target.loc["lif1:0", "changes"] == 0 and by_target.loc["class:0", "changes"] == 2
    runs = traj.assign(best_activation=1.0)
    acc = pd.DataFrame({"epoch": range(4), "test_acc": [0.1, 0.5, 0.6, 0.8]})
    epochs_t = A.epoch_table(units, runs, acc, 0.5)
    result = A.claims(units, first, runs, traj, changes, epochs_t, ["lif1", "out"], params)
    c1, c2, c3 = result.values()
    assert c1["per_layer"]["lif1"]["frac_selective_by_early_epoch"]["value"] == 1.0
    assert c1["per_layer"]["out"]["frac_selective_by_early_epoch"]["value"] == 0.0
    assert c1["per_layer"]["out"]["frac_selective_final"]["value"] == 0.5
    assert c1["frac_selective_by_early_epoch"]["value"] == pytest.approx(1 / 3)
    # every number carries an interval that holds its point estimate (or none, with < 2 neurons)
    for block in (c1, c1["per_layer"]["out"], c3, c3["per_layer"]["out"]):
        for v in block.values():
            if isinstance(v, dict) and "value" in v and v["lo"] is not None:
                assert v["lo"] <= v["value"] <= v["hi"]
    # mean CSI rises with accuracy every epoch: rho = 1 (exact p over 4 checkpoints: 2/24)
    assert c2["spearman_mean_csi_vs_test_acc"]["rho"] == pytest.approx(1.0)
    assert c2["spearman_mean_csi_vs_test_acc"]["p"] == pytest.approx(2 / 24)
    assert c2["spearman_am_gain_vs_test_acc"]["rho"] == pytest.approx(1.0)
    assert c3["per_layer"]["lif1"]["frac_neurons_changing_concept"]["value"] == 0.0
    assert c3["per_layer"]["out"]["frac_neurons_changing_concept"]["value"] == 1.0
    assert c3["per_layer"]["out"]["frac_concept_is_preferred_class_final"]["value"] == 1.0
    assert c3["spearman_layer_depth_vs_changes"]["rho"] is None  # two neurons only
    assert c3["restarts"] == 0 and c3["mean_concept_changes_robust"]["value"] is None  # no restarts given
    # The headline numbers (MLflow metrics, metrics/summary.json) are the claims' own numbers; with no
    # restarts claim 3 counts the raw concept changes.
    head = A.headline(result)
    assert list(head) == list(A.HEADLINE)
    assert head["c1_early_selective"] == c1["frac_selective_by_early_epoch"]["value"]
    assert head["c2_rho_csi_acc"] == c2["spearman_mean_csi_vs_test_acc"]["rho"]
    assert head["c3_concept_change"] == c3["frac_neurons_changing_concept"]["value"]
    assert head["c3_concept_changes_mean"] == c3["mean_concept_changes"]["value"]
    assert all(v is None or np.isfinite(v) for v in head.values())


def test_robust_change_not_counted_when_restarts_of_a_checkpoint_disagree():
    # checkpoint 2's two restarts disagree (3 vs 5): the raw sequence of best stimuli 3 -> 5 -> 5 changes,
    # but only checkpoints 1 (concept 3) and 3 (concept 5) are settled: one robust change, from 1 to 3.
    assert A.robust_concept_changes([1, 2, 3], [[3, 3], [3, 5], [5, 5]]) == [(1, 3, 3, 5)]
    # two checkpoints, the second unresolved: a raw change, no robust one
    assert A.robust_concept_changes([1, 2], [[3, 3], [3, 5]]) == []
    assert A.robust_concept_changes([1, 2], [[3, 3], [5, 5]]) == [(1, 2, 3, 5)]
    # end to end through neuron_changes: restarts (seeds) of checkpoint 2 disagree
    base = {"generator": "sngan", "target": "lif1:0", "layer": "lif1", "unit": 0}
    traj = pd.DataFrame([{**base, "epoch": e, "progress": float(e), "concept": c} for e, c in [(1, 3), (2, 5)]])
    restarts = pd.DataFrame(
        [{**base, "epoch": e, "seed": s, "concept": c} for e, s, c in [(1, 0, 3), (1, 1, 3), (2, 0, 5), (2, 1, 3)]]
    )
    row = A.neuron_changes(traj, 1.0, restarts).iloc[0]
    assert row["changes"] == 1 and row["robust_changes"] == 0 and row["restarts"] == 2
    assert row["frac_restarts_agree"] == 0.5
    agree = restarts.assign(concept=[3, 3, 5, 5])
    assert A.neuron_changes(traj, 1.0, agree).iloc[0]["robust_changes"] == 1
    assert A.neuron_changes(traj, 1.0).iloc[0]["robust_changes"] is None  # one restart: undefined


def test_latent_distance_uses_each_runs_own_grid():
    """A tuned SN-GAN re-grid (summary.csv's grid_n) sets the distance's scale; grids differing between
    checkpoints are not compared by index; VQ-VAE codes are categorical."""
    params = Params()
    assert A.grid_size(params, "sngan") == params.generators.sngan.grid_n
    assert A.grid_size(params, "sngan", {"grid_n": 8}) == 8
    assert A.grid_size(params, "sngan", {"grid_n": float("nan")}) == params.generators.sngan.grid_n
    assert A.grid_size(params, "vqvae", {"grid_n": 8}) is None
    rows = pd.DataFrame(
        {
            "generator": "sngan",
            "target": "out:0",
            "epoch": [0, 1, 2],
            "progress": [0.0, 0.5, 1.0],
            "run_key": ["a", "b", "c"],
            "concept": [1, 1, 1],
            "grid_n": [8, 8, 32],
        }
    )
    latents = {"a": np.array([0, 0]), "b": np.array([7, 7]), "c": np.array([7, 7])}
    pixels = {k: np.random.default_rng(i).random(16) for i, k in enumerate("abc")}
    traj = A.trajectories(rows, latents, params, pixels)
    assert traj["latent_dist_prev"].iloc[1] == pytest.approx(1.0)  # 7 steps of an 8-value grid: the whole range
    assert np.isnan(traj["latent_dist_prev"].iloc[2])  # 8 -> 32 values: indices are not comparable
