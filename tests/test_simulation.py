"""End to end in Flower's simulation: 2 rounds × 3 clients write a valid results.json, both strategies."""

import math

import pytest

from conftest import TINY_RUN, simulate


@pytest.mark.parametrize("strategy", ["fedsq", "fedavg"])
def test_simulation_writes_results(fedsq_cache, tmp_path, strategy):
    # FedAvg also asks every node for its own validation accuracy (Flower's federated evaluation in Ray).
    extra = {"fraction-evaluate": 1.0} if strategy == "fedavg" else {}
    results = simulate({**TINY_RUN, "strategy": strategy, "out-dir": str(tmp_path), "run-name": strategy, **extra},
                       num_supernodes=3)
    assert results["config"]["strategy"] == strategy
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert 0.0 <= record["val_accuracy"] <= 1.0
        assert math.isfinite(record["val_loss"]) and math.isfinite(record["train_loss"])
        assert record["accepted"] == 3 and record["rejected"] == 0
    assert results["best_val_accuracy"] == max(r["val_accuracy"] for r in rounds)
    assert 1 <= results["rounds_to_best"] <= 2
    assert 0.0 <= results["test_accuracy"] <= 1.0
    # Training from a random head must beat chance (10 classes) after two rounds.
    assert results["best_val_accuracy"] > results["initial"]["val_accuracy"]
    assert (tmp_path / strategy / "best_model.safetensors").is_file()
    assert results["validation_source"].startswith("server:")
    for record in rounds:
        if extra:  # each of the 3 nodes validated on its held-out 10 %, none rejected
            validation = record["node_validation"]
            assert len(validation["nodes"]) == 3 and validation["rejected"] == [], validation
            assert all(e["num_examples"] > 0 and 0 <= e["accuracy"] <= 1 for e in validation["nodes"].values())
        else:
            assert "node_validation" not in record
