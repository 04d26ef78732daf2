"""Tools for a person, not the training run: benchmarks, the ablation, the judge, data preparation."""
