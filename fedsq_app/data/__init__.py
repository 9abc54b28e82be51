"""Data: sources (embedded, Hub, local files), splits, flwr-datasets partitions, the per-node partition cache
and the pretraining-leakage check. Imports neither the method (``core``) nor the app runtime."""
