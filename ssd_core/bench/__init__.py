"""The benchmarks behind `ssd bench`, each side by side with its anchor in the same run.

- `speed`: `bench infer` and `bench train` (forward and training step against torchvision's), and the
  timing helpers the others share (alternating repetitions, medians, synthetic inputs);
- `learn`: `bench learn` (from-scratch training against torchvision's recipe on the same data and budget,
  and the recipe ablation);
- `detect`: `bench detect` (bulk detection end to end against the model alone and a naive loop);
- `ledger`: `bench ledger` (driver memory and time of a nothing-new incremental run at N objects);
- `workers`: `bench train --workers` (Ray Train images/s per worker count).

The command line lives in `ssd_core/commands/bench.py`.
"""
