"""Each silo that asks keeps the federation's model (node config ``keep-model``): the best round's arrays, its
sidecar with the silo's own validation accuracy, and results.json's record of who kept it. In process (one
node asks, one does not and is sent nothing) and reply by reply (nothing a node replies raises out of the
server). On a real loopback deployment (SuperLink, two SuperNodes on their own data, TLS, the warm
executor) tests/test_deployment.py's warm-executor run has silo-1 ask and silo-2 not."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from safetensors.numpy import load_file

from fedsq_app import client_app, server_app
from fedsq_app.config import ConfigError, NodeConfig, RunConfig
from fedsq_app.core import wire
from fedsq_app.harness.inprocess import FIRST_NODE_ID, InProcessGrid
from fedsq_app.runtime import delivery

MODEL = "best_model.safetensors"


def _metadata(node_id: int, *, to_node: bool = False) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=0 if to_node else node_id,
                    dst_node_id=node_id if to_node else 0, reply_to_message_id="", group_id="",
                    created_at=time.time(), ttl=3600.0, message_type="evaluate")


def _reply(node_id: int, metrics: dict | None = None, error: str | None = None) -> Message:
    if error is not None:
        return Message(error=Error(code=2, reason=error), metadata=_metadata(node_id))
    content = RecordDict({wire.METRICS: MetricRecord(metrics)} if metrics is not None else {})
    return Message(content=content, metadata=_metadata(node_id))


def _same_tensors(first: Path, second: Path) -> None:
    a, b = load_file(str(first)), load_file(str(second))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------- node config
def test_keep_model_is_checked_once_in_the_node_config(tmp_path):
    assert NodeConfig.from_mapping({"partition-id": 0, "num-partitions": 2}).keep_model == ""
    node = NodeConfig.from_mapping({"data-path": "/x", "keep-model": str(tmp_path / "new" / "folder")})
    assert node.keep_model == str(tmp_path / "new" / "folder")  # created when the model is saved
    with pytest.raises(ConfigError, match="keep-model='models' must be an absolute path"):
        NodeConfig.from_mapping({"data-path": "/x", "keep-model": "models"})
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file: give a folder"):
        NodeConfig.from_mapping({"data-path": "/x", "keep-model": str(tmp_path / "a-file")})
    with pytest.raises(ConfigError, match="keep-model must be a string"):
        NodeConfig.from_mapping({"data-path": "/x", "keep-model": 1})
    with pytest.raises(ConfigError, match="did you mean 'keep-model'"):
        NodeConfig.from_mapping({"data-path": "/x", "keep_model": "/y"})


# ---------------------------------------------------------------------------------------------- replies
@pytest.mark.parametrize("reply, kept, accuracy, reason", [
    (_reply(7, {wire.KEPT: 1, wire.EVAL_ACCURACY: 0.8, wire.EVAL_LOSS: 0.5, wire.NUM_EXAMPLES: 40}), True, 0.8, None),
    (_reply(7, {wire.KEPT: 1}), True, None, None),  # kept; no validation data of its own
    (_reply(7, {wire.KEPT: 1, wire.EVAL_ACCURACY: float("nan"), wire.NUM_EXAMPLES: 2.5}), True, None, None),
    (_reply(7, {wire.KEPT: 1, wire.EVAL_ACCURACY: 1.5}), True, None, None),
    (_reply(7, {wire.KEPT: 1, wire.EVAL_ACCURACY: [0.5, 0.6]}), True, None, None),
    (_reply(7, {wire.KEPT: 0}), False, None, "does not ask"),
    (_reply(7, {wire.KEPT: 2}), False, None, "'kept' must be 0 or 1, got 2"),
    (_reply(7, {wire.KEPT: [1, 1]}), False, None, "'kept' must be 0 or 1"),
    (_reply(7, {wire.EVAL_ACCURACY: 0.9}), False, None, "does not deliver the final model"),
    (_reply(7), False, None, "no 'metrics'"),
    (_reply(7, error="not kept: structural copy mismatch: ..." + "x" * 5000), False, None, "error reply: not kept"),
])
def test_a_final_reply_is_recorded_never_raised(reply, kept, accuracy, reason):
    record = delivery.check_final_reply(reply)
    assert record["node_id"] == 7 and record["kept"] is kept and record["val_accuracy"] == accuracy
    assert (record["reason"] is None) if reason is None else reason in record["reason"]
    assert len(json.dumps(record)) < 500  # an error reason is cut, whatever its length


class _Grid:
    """Just enough of a Grid for ``deliver_final_model``: who is online, and what sending does."""

    def __init__(self, online):
        InProcessGrid({}, 1)  # sets the task identity a Message needs, as a ServerApp process has it
        self.online, self.sent = online, []

    def get_node_ids(self):
        if isinstance(self.online, Exception):
            raise self.online
        return self.online


def test_malformed_or_missing_final_replies_do_not_raise_out_of_the_server():
    broken = SimpleNamespace(metadata=SimpleNamespace(src_node_id="not a node"))  # no Message at all

    def send(grid, messages, timeout):
        grid.sent.extend(messages)
        return [_reply(1, {wire.KEPT: 1, wire.EVAL_ACCURACY: float("inf")}), _reply(1, {wire.KEPT: 0}),  # 2nd: ignored
                _reply(2, error="OSError: disk full"), _reply(9, {wire.KEPT: 1}), broken]

    grid = _Grid([1, 2, 3])
    records = delivery.deliver_final_model(grid, [1, 2, 3, 4], ArrayRecord(), {wire.FINAL_MODEL: True}, send, 5.0)
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2, 3]  # never to an offline node (4)
    assert all(m.metadata.message_type == "evaluate" and m.content[wire.CONFIG][wire.FINAL_MODEL] for m in grid.sent)
    by_node = {r["node_id"]: r for r in records}
    assert sorted(by_node) == [1, 2, 3, 4]  # 9 was never asked: ignored
    assert by_node[1]["kept"] and by_node[1]["val_accuracy"] is None
    assert not by_node[2]["kept"] and "disk full" in by_node[2]["reason"]
    assert "no reply within round-timeout" in by_node[3]["reason"] and "offline" in by_node[4]["reason"]

    def fails(grid, messages, timeout):
        raise RuntimeError("SuperLink gone")

    records = delivery.deliver_final_model(_Grid([1]), [1], ArrayRecord(), {}, fails, 5.0)
    assert records[0]["reason"] == "not sent: RuntimeError: SuperLink gone"
    records = delivery.deliver_final_model(_Grid(ConnectionError("down")), [1], ArrayRecord(), {}, fails, 5.0)
    assert "node list failed" in records[0]["reason"]
    assert delivery.deliver_final_model(_Grid(ConnectionError("never asked")), [], ArrayRecord(), {}, fails, 5.0) == []


def test_a_node_with_another_s_saves_nothing_and_says_why(fedsq_cache, tmp_path):
    run = {"max-train-samples": 300}
    config = RunConfig.from_mapping(run)
    model, _, _ = client_app.local_model(config)
    content = RecordDict({wire.ARRAYS: ArrayRecord(model.quantitative.state_dict()),
                          wire.CONFIG: ConfigRecord({wire.FINAL_MODEL: True, wire.STRUCTURAL_SHA256: "f" * 64})})
    message = Message(content=content, metadata=_metadata(1002, to_node=True))
    node = {"partition-id": 0, "num-partitions": 2, "keep-model": str(tmp_path / "kept")}
    reply = client_app.evaluate_local(message, Context(run_id=1, node_id=1002, node_config=node, state=RecordDict(),
                                                      run_config=run))
    assert reply.has_error() and reply.error.reason.startswith("not kept: structural copy mismatch")
    assert not (tmp_path / "kept").exists()
    record = delivery.check_final_reply(Message(error=reply.error, metadata=_metadata(1002)))
    assert not record["kept"] and "structural copy mismatch" in record["reason"]


# ---------------------------------------------------------------------------------------------- in process
def test_the_node_that_asks_keeps_the_best_model_in_process(fedsq_cache, tmp_path):
    """Two partitions, one asks: only it is sent the model, and its copy is the server's best model, tensor
    for tensor; fraction-evaluate=0, so it trained on all of its data and reports no accuracy (None), and
    its sidecar says why."""
    run = {"num-server-rounds": 1, "max-train-samples": 300, "out-dir": str(tmp_path / "out"), "run-name": "keep",
           "probe-size": 0, "min-valid-replies": 2}
    kept = tmp_path / "silo-a" / "models"
    nodes = [{"partition-id": 0, "num-partitions": 2, "keep-model": str(kept)},
             {"partition-id": 1, "num-partitions": 2}]
    sent = []

    class Counting(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            sent.append([(m.metadata.message_type, m.metadata.dst_node_id) for m in messages])
            return super().send_and_receive(messages, timeout=timeout)

    server_app.main(Counting(run, 2, nodes), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                     run_config=run))
    results = json.loads((tmp_path / "out" / "keep" / "results.json").read_text())
    # The node that did not ask is sent nothing; so in a run where nobody asks, nothing is sent.
    assert sent == [[("train", FIRST_NODE_ID), ("train", FIRST_NODE_ID + 1)], [("evaluate", FIRST_NODE_ID)]]
    assert results["model_delivered_to"] == [{"node_id": FIRST_NODE_ID, "kept": True, "val_accuracy": None,
                                              "num_examples": None, "reason": None}]
    _same_tensors(kept / "keep" / MODEL, tmp_path / "out" / "keep" / MODEL)
    sidecar = json.loads((kept / "keep" / f"{MODEL}.json").read_text())
    assert sidecar["round"] == results["best_round"] and sidecar["run_name"] == "keep"
    assert sidecar["structural_sha256"] == results["structural_sha256"] and sidecar["strategy"] == "fedsq"
    assert sidecar["num_classes"] == results["num_classes"] and sidecar["node_id"] == FIRST_NODE_ID
    assert sidecar["val_accuracy"] is None and sidecar["validation"].startswith("none")
    assert sidecar["federation_val_accuracy"] == results["best_val_accuracy"]
    from fedsq_app import load_trained

    trained = load_trained(kept / "keep" / MODEL)  # the silo's copy is usable as it is: S rebuilt and checked
    assert trained.num_classes == results["num_classes"] and trained.metadata["node_id"] == FIRST_NODE_ID
