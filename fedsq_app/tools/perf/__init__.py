"""``fedsq-perf`` (``cli.py``): the training step's cost (``micro.py``), which architectures FedSQ takes
(``compat.py``), the cold-start and deployment probes (``cold.py``, ``tracing/``), the simulation-overhead
probe (``sim.py``) and Flower's own floor (``floor.py``)."""
