"""Liveness: no single node stops the run. A node's wrong partition count, a partition it names that is
another node's, a reply that fails every round, or replies of length 0 cost that node alone
(``core/weights.py``, ``core/liveness.py``, ``core/defenses.py``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array

from fedsq_app.core import wire
from fedsq_app.core.defenses import clip_bound, norm_floor
from fedsq_app.core.liveness import MAX_QUARANTINE, Quarantine
from fedsq_app.harness.inprocess import FIRST_NODE_ID, InProcessGrid
from tests.test_refusals import _embedded, make_silo


# ---------------------------------------------------------------------------------------------- pure parts
def test_a_node_rejected_round_after_round_is_quarantined_for_longer_each_time():
    quarantine = Quarantine()
    assert quarantine.update(1, [1, 2], [(3, "NaN")]) == []  # one bad round: no quarantine yet
    (first,) = quarantine.update(2, [1, 2], [(3, "NaN")])
    assert first["rounds"] == 1 and quarantine.held(3) == {3} and quarantine.held(4) == set()
    (second,) = quarantine.update(4, [1, 2], [(3, "NaN")])  # back in round 4, still failing
    assert second["rounds"] == 2 and quarantine.held(6) == {3} and quarantine.held(7) == set()
    for r in range(7, 20):
        quarantine.update(r, [], [(3, "NaN")])
    assert quarantine.records[-1]["rounds"] == MAX_QUARANTINE
    quarantine.update(30, [3], [])  # an accepted reply clears the record
    assert 3 not in quarantine.strikes


def test_a_failing_node_lowers_the_replies_a_round_needs_by_itself_only():
    quarantine = Quarantine()
    assert quarantine.needed(3, [1, 2, 3]) == 3  # no history: fail closed
    quarantine.update(1, [1, 2], [(3, "NaN")])
    assert quarantine.needed(3, [1, 2, 3]) == 2  # node 3 failed before: two honest replies suffice
    assert quarantine.needed(3, [1, 2]) == 2 and quarantine.needed(1, [1, 2, 3]) == 1
    assert quarantine.needed(3, list(range(1, 21))) == 3  # many nodes: the usual requirement


def test_replies_of_length_zero_cannot_shrink_the_bound_below_the_floor():
    honest, zeros = [1.0, 1.1, 0.9], [0.0, 0.0, 0.0]
    assert clip_bound(zeros + honest, 2.0) == 0.0  # half the replies of length 0: the round's median is 0
    floor = norm_floor([1.0, 0.95, 1.05])
    assert floor == pytest.approx(0.5) and clip_bound(zeros + honest, 2.0, floor) == pytest.approx(1.0)
    assert clip_bound(honest, 2.0, floor) == pytest.approx(2.0)  # no effect on an honest round
    assert norm_floor([]) == 0.0


# ---------------------------------------------------------------------------------------------- whole runs
class RewritingGrid(InProcessGrid):
    """In-process grid whose node ``FIRST_NODE_ID + culprit`` has its train replies rewritten by ``rewrite``."""

    def __init__(self, run_config, num_nodes, rewrite, culprit, node_configs=None) -> None:
        super().__init__(run_config, num_nodes, node_configs)
        self.rewrite, self.culprit = rewrite, FIRST_NODE_ID + culprit

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.metadata.src_node_id == self.culprit and reply.metadata.message_type.startswith("train") \
                    and not reply.has_error():
                self.rewrite(reply)
        return replies


def run_with(grid: RewritingGrid, run: dict) -> dict:
    import json
    from pathlib import Path

    from flwr.app import Context, RecordDict

    from fedsq_app import server_app
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run)))
    return json.loads((Path(run["out-dir"]) / run["run-name"] / "results.json").read_text())


def nan_arrays(reply) -> None:
    record = reply.content[wire.ARRAYS]
    key = next(k for k, a in record.items() if np.dtype(a.dtype).kind == "f")
    values = record[key].numpy().copy()
    values.flat[0] = np.nan
    record[key] = Array(values)


def test_one_node_failing_every_round_does_not_keep_the_start_model(fedsq_cache, tmp_path, caplog):
    """Three silos, one replying NaN every round (a diverged local run): round 1 fails closed; from round 2 the
    two honest replies aggregate, and the failing node is quarantined (results.json names it)."""
    images, labels = _embedded("train")
    paths = [make_silo(tmp_path / f"silo-{i}", images[i * 150:(i + 1) * 150], labels[i * 150:(i + 1) * 150])
             for i in range(3)]
    run = {"num-server-rounds": 5, "out-dir": str(tmp_path / "out"), "run-name": "nan", "probe-size": 0,
           "min-available-nodes": 2, "min-train-nodes": 2}
    grid = RewritingGrid(run, 3, nan_arrays, culprit=2, node_configs=[{"data-path": p} for p in paths])
    with caplog.at_level(logging.INFO, logger="flwr"):
        results = run_with(grid, run)
    culprit = FIRST_NODE_ID + 2
    rounds = results["rounds"]
    assert not rounds[0]["aggregated"]  # fail closed: nothing known of anyone yet
    assert all(r["aggregated"] for r in rounds[1:]), [r["aggregated"] for r in rounds]
    for record in rounds:
        assert all(reply["accepted"] for reply in record["replies"] if reply["node_id"] != culprit), record
    quarantined = results["quarantined_nodes"]
    assert quarantined and {q["node_id"] for q in quarantined} == {culprit} and "NaN" in quarantined[0]["reason"]
    asked = [[reply["node_id"] for reply in r["replies"]] for r in rounds]
    assert culprit not in asked[2]  # set aside the round after its second failure
    assert "not sampled for" in caplog.text
    assert results["best_val_accuracy"] > results["initial"]["val_accuracy"]


PARTITION_RUN = {"num-server-rounds": 3, "max-train-samples": 600, "probe-size": 0, "min-available-nodes": 6,
                 "min-train-nodes": 6}


def forged_metric(key: str, value: int):
    def rewrite(reply) -> None:
        reply.content[wire.METRICS][key] = value
    return rewrite


@pytest.mark.parametrize("case, rewrite", [
    ("wrong partition count", forged_metric(wire.NUM_PARTITIONS, 7)),
    ("stolen partition", forged_metric(wire.PARTITION_ID, 2)),  # trains on partition 0, names node 1003's 2
])
def test_a_misconfigured_or_thieving_node_costs_only_itself(fedsq_cache, tmp_path, caplog, case, rewrite):
    """The culprit is the first node in node order, so neither "the first reply fixes the count" nor "first
    come, first served" would save the others."""
    run = {**PARTITION_RUN, "out-dir": str(tmp_path / "out"), "run-name": "six"}
    grid = RewritingGrid(run, 6, rewrite, culprit=0)
    with caplog.at_level(logging.INFO, logger="flwr"):
        results = run_with(grid, run)
    culprit = FIRST_NODE_ID
    for record in results["rounds"]:
        assert record["aggregated"], record
        honest = [reply for reply in record["replies"] if reply["node_id"] != culprit]
        assert len(honest) == 5 and all(reply["accepted"] for reply in honest), record  # 0 honest rejected
        assert all(not reply["accepted"] for reply in record["replies"] if reply["node_id"] == culprit)
    first = next(r for r in results["rounds"][0]["replies"] if r["node_id"] == culprit)
    if case == "stolen partition":
        assert "is node 1003's" in first["reason"]
        assert "partition 2 was named by nodes [1001, 1003]: it is node 1003's" in caplog.text
    else:
        assert "split the pool into 6" in first["reason"]
