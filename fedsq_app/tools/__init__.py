"""Command-line tools above the apps: the benchmark grid, performance probes, the defenses bench, the
architecture-compatibility table and the pretraining CLIs."""
