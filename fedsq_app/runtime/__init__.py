"""The app runtime, what runs in a round: models (registry), the local train/evaluate loop, the strategy
registry, S's mask cache, checkpoints, metrics and the fedsq-warmup switch."""
