"""``fedsq-perf``: micro-benchmarks of the training step (``micro.py``), the cold-start and deployment
probes (``cold.py``, ``tracing/``), the simulation-overhead probe (``sim.py``) and Flower's floor (``floor.py``)."""
