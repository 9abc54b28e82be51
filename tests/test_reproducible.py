"""Same seed, same machine, two runs: the same results.json, apart from wall times.

A short run through Flower's simulation (the code `flwr run .` runs). Wall times are the only fields
allowed to differ; node ids are assigned by the simulation engine, so they are compared by count only.
"""

import hashlib
import json

from conftest import TINY_RUN, simulate

VOLATILE = ("wall_time", "time_s", "reply_time", "node_id", "nodes")  # timings; engine-drawn ids


def _figures(value):
    """The results with every timing dropped (keys naming a time), recursively."""
    if isinstance(value, dict):
        return {k: _figures(v) for k, v in value.items() if not any(t in k for t in VOLATILE)}
    if isinstance(value, list):
        return [_figures(v) for v in value]
    return value


def digest(results: dict) -> str:
    return hashlib.sha256(json.dumps(_figures(results), sort_keys=True).encode()).hexdigest()


def test_same_seed_same_results(fedsq_cache, tmp_path):
    run = {**TINY_RUN, "strategy": "fedsq", "num-server-rounds": 3, "seed": 7}
    run.update({"out-dir": str(tmp_path), "run-name": "r"})  # the same paths, so results.json can be equal
    first = simulate(run, num_supernodes=3)
    second = simulate(run, num_supernodes=3)
    print(f"results.json digests (timings dropped): {digest(first)} {digest(second)}")
    assert _figures(first) == _figures(second)
    assert first["rounds"][-1]["val_accuracy"] > first["initial"]["val_accuracy"]  # it trained


def test_digest_sees_a_changed_figure():
    base = {"rounds": [{"val_accuracy": 0.5, "wall_time_s": 1.0}], "total_wall_time_s": 3.0}
    same_but_slower = {"rounds": [{"val_accuracy": 0.5, "wall_time_s": 9.0}], "total_wall_time_s": 7.0}
    changed = {"rounds": [{"val_accuracy": 0.5000001, "wall_time_s": 1.0}], "total_wall_time_s": 3.0}
    assert digest(base) == digest(same_but_slower)
    assert digest(base) != digest(changed)
