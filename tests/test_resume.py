"""Crash and resume: a run killed after round 2 and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsq_app.runtime.checkpoint import CHECKPOINT_FILE, load_run_state
from fedsq_app.config import ConfigError
from local_grid import LocalGrid, ServerKilled, run_server

ROUNDS = 4
# Compared between the two runs: everything a round records except timings.
ROUND_KEYS = ("round", "val_accuracy", "val_loss", "train_loss", "expected", "received", "missing", "accepted",
              "rejected", "aggregated", "best_val_accuracy_so_far")


@pytest.fixture(scope="module")
def runs(fedsq_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    base = {"num-server-rounds": ROUNDS, "max-train-samples": 300, "batch-size": 32, "lr": 0.05,
            "out-dir": str(out), "device": "cpu"}
    full = {**base, "run-name": "full"}
    run_server(full, LocalGrid(full))

    crashed = {**base, "run-name": "crashed"}
    with pytest.raises(ServerKilled):
        run_server(crashed, LocalGrid(crashed, kill_before_round=3))  # dies while round 3 starts
    after_crash = load_run_state(out / "crashed")

    resumed = {**crashed, "resume-from": str(out / "crashed")}
    run_server(resumed, LocalGrid(resumed))
    return out, after_crash


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def test_checkpoint_after_the_crash_holds_round_2(runs):
    out, after_crash = runs
    assert after_crash.round == 2
    assert [r["round"] for r in after_crash.results["rounds"]] == [1, 2]
    assert "torch" in after_crash.rng["arrays"] and after_crash.rng["info"]["python"]
    assert not list(out.glob("crashed/.*.tmp")), "a temp file survived the atomic rename"


def test_resumed_run_matches_the_uninterrupted_run(runs):
    out, _ = runs
    full, resumed = load_run_state(out / "full"), load_run_state(out / "crashed")
    assert full.round == resumed.round == ROUNDS
    assert full.arrays.keys() == resumed.arrays.keys()
    worst = max(float(np.max(np.abs(full.arrays[k].astype(np.float64) - resumed.arrays[k].astype(np.float64))))
                for k in full.arrays if full.arrays[k].size)
    print(f"\nresume: max |w_full - w_resumed| over {len(full.arrays)} arrays = {worst:.3g}")
    assert worst <= 1e-6
    assert full.best_round == resumed.best_round

    a, b = _results(out / "full"), _results(out / "crashed")
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert {k: ra[k] for k in ROUND_KEYS} == {k: rb[k] for k in ROUND_KEYS}
    for key in ("best_val_accuracy", "best_round", "test_accuracy", "test_loss", "initial"):
        assert a[key] == b[key], key
    print(f"resume: val_accuracy per round {[r['val_accuracy'] for r in a['rounds']]} (both runs); "
          f"test_accuracy {a['test_accuracy']} vs {b['test_accuracy']}")
    assert b["resumed"] == [{"from": str((out / "crashed").resolve()), "after_round": 2}]


def test_resume_from_a_folder_without_checkpoint_is_a_config_error(fedsq_cache, tmp_path):
    config = {"num-server-rounds": 1, "out-dir": str(tmp_path), "resume-from": str(tmp_path / "nothing")}
    grid = LocalGrid(config)
    with pytest.raises(ConfigError, match="resume-from"):
        run_server(config, grid)
    assert grid.rounds_served == 0
    assert not (tmp_path / "nothing" / CHECKPOINT_FILE).exists()


def test_server_optimiser_state_survives_a_checkpoint(tmp_path):
    """FedAdam's moments go through checkpoint.safetensors: a strategy restored after round 2 continues
    exactly like the one that never stopped (the server-side half of resume, without any training)."""
    import time

    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    from fedsq_app.runtime.checkpoint import RunState, save_run_state
    from fedsq_app.core.strategy import ValidatedFedAdam

    rng = np.random.default_rng(0)
    template = {"w": rng.normal(size=(3, 4)).astype(np.float32), "bn.running_mean": np.zeros(4, np.float32),
                "bn.num_batches_tracked": np.array(0, np.int64)}

    def replies(server_round):
        out = []
        for node in (1, 2, 3):
            arrays = {k: (v + rng.normal(scale=0.1, size=v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
                      for k, v in template.items()}
            meta = Metadata(run_id=1, message_id=f"{server_round}-{node}", src_node_id=node, dst_node_id=0,
                            reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                            message_type="train")
            out.append(Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                                   "metrics": MetricRecord({"num-examples": 10 * node})}),
                               metadata=meta))
        return out

    def step(strategy, server_round, arrays, batch):
        strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        new, _ = strategy.aggregate_train(server_round, batch)
        return {k: a.numpy() for k, a in new.items()}

    batches = [replies(r) for r in range(1, 5)]
    full, arrays_full = ValidatedFedAdam(server_lr=0.1), dict(template)
    for r in range(1, 5):
        arrays_full = step(full, r, arrays_full, batches[r - 1])

    first, arrays = ValidatedFedAdam(server_lr=0.1), dict(template)
    for r in (1, 2):
        arrays = step(first, r, arrays, batches[r - 1])
    strategy_arrays, strategy_info = first.state_dict()
    assert strategy_arrays, "FedAdam has moments to save"
    save_run_state(tmp_path, RunState(round=2, arrays=arrays, best_round=2, best_val_accuracy=0.0, best_arrays=arrays,
                                      results={}, structural_sha256="", strategy_arrays=strategy_arrays,
                                      strategy_info=strategy_info))
    state = load_run_state(tmp_path)
    second = ValidatedFedAdam(server_lr=0.1)
    second.load_state_dict(state.strategy_arrays, state.strategy_info)
    arrays = state.arrays
    for r in (3, 4):
        arrays = step(second, r, arrays, batches[r - 1])
    for key in template:
        assert np.array_equal(arrays[key], arrays_full[key]) and arrays[key].shape == template[key].shape, key
