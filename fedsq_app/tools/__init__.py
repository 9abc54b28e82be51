"""Command-line tools above the apps: the benchmark grid, performance probes (with the compatibility table),
the defenses bench and the pretraining CLIs."""
