"""The activation-maximization loop and the maximize stage's planning, execution and bookkeeping."""

# Columns of results/am/summary.csv: one row per finished AM run (the analysis stage reads it).
SUMMARY_COLUMNS = [
    "run_key",
    "run_id",
    "epoch",
    "step",
    "progress",
    "generator",
    "target",
    "layer",
    "unit",
    "method",
    "seed",
    "budget",
    "n_queries",
    "best_activation",
    "queries_to_95",
    "dataset_max",
    "am_gain",
    "queries_saved",
    "scan_best_activation",  # best within the first maximize.budget queries (= best_activation unless budget_last)
    "scan_am_gain",
    "run_dir",
    # Noise-aware runs (empty otherwise): estimate, 95 % interval and draws of the reported best's true response.
    "best_estimate",
    "best_low",
    "best_high",
    "best_count",
]
