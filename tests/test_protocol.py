"""The federated protocol: weighted aggregation by key, BN buffers, what travels, the S-hash check."""

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from fedsq_app.core import wire
from fedsq_app.core.aggregation import weighted_average
from fedsq_app.core.packing import decode_arrays, pack_record
from fedsq_app.core.replies import CheckedReply, array_specs, split_replies


def _message(content: RecordDict, node_id: int = 7, message_type: str = "train") -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                        message_type=message_type)
    return Message(content=content, metadata=metadata)


def _reply(arrays: dict, num_examples, node_id: int) -> Message:
    return _message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                "metrics": MetricRecord({"train_loss": 0.5, "num-examples": num_examples})}),
                    node_id)


def test_weighted_average_is_the_num_examples_weighted_mean():
    rng = np.random.default_rng(0)
    template = {"conv.weight": rng.normal(size=(4, 3)).astype(np.float32),
                "bn.running_var": np.ones(4, dtype=np.float32),
                "bn.num_batches_tracked": np.array(17, dtype=np.int64)}
    clients = [{k: (rng.normal(size=v.shape).astype(v.dtype) if v.dtype.kind == "f" else np.array(99 + i))
                for k, v in template.items()} for i in range(3)]
    counts = [10, 30, 60]
    replies = [CheckedReply(i, c, n, {}) for i, (c, n) in enumerate(zip(clients, counts))]
    averaged = weighted_average(replies, template)
    for key in ("conv.weight", "bn.running_var"):
        expected = sum(c[key].astype(np.float64) * n for c, n in zip(clients, counts)) / sum(counts)
        np.testing.assert_allclose(averaged[key], expected, rtol=1e-6)
        assert averaged[key].dtype == np.float32
    # num_batches_tracked is a counter, not averaged: the server keeps its own value and dtype.
    assert averaged["bn.num_batches_tracked"] == 17 and averaged["bn.num_batches_tracked"].dtype == np.int64


def test_split_replies_indexes_by_key_and_rejects_bad_ones():
    template = ArrayRecord({"a": Array(np.zeros(3, np.float32)), "b": Array(np.zeros((2, 2), np.float32))})
    good = {"b": np.ones((2, 2), np.float32), "a": np.full(3, 2, np.float32)}  # other key order
    replies = [
        _reply(good, 5, 1),
        _reply({"a": np.zeros(3, np.float32)}, 5, 2),  # missing key
        _reply({**good, "a": np.array([np.nan, 0, 0], np.float32)}, 5, 3),
        _reply(good, 0, 4),
        _reply({**good, "b": np.ones((2, 3), np.float32)}, 5, 5),
    ]
    checked = split_replies(replies, array_specs(template))
    assert [r.node_id for r in checked.accepted] == [1]
    assert [n for n, _ in checked.rejected] == [2, 3, 4, 5]
    np.testing.assert_array_equal(checked.accepted[0].arrays["a"], good["a"])


@pytest.fixture(scope="module")
def fedsq_client(fedsq_cache):
    from fedsq_app import client_app
    from fedsq_app.config import RunConfig

    config = {"max-train-samples": 300}
    model, _, sha = client_app.local_model(RunConfig.from_mapping(config))
    return client_app, config, model, sha


def _train_message(arrays: ArrayRecord, config: dict) -> Message:
    return _message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), node_id=0)


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=3, node_config={"partition-id": 1, "num-partitions": 3},
                   state=RecordDict(), run_config=run_config)


def test_client_sends_only_q_and_never_s(fedsq_client):
    client_app, config, model, sha = fedsq_client
    q_keys = set(model.quantitative.state_dict())
    sent = pack_record(ArrayRecord(model.quantitative.state_dict()))  # as this app's server sends Q
    reply = client_app.train(_train_message(sent, {"server-round": 1, "structural-sha256": sha}), _context(config))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    # Packed on the wire (one array per dtype), read back by Q's own keys, shapes and dtypes.
    assert sorted(reply.content["arrays"].keys()) == ["packed/float32", "packed/int64"]
    template = {k: v.numpy() for k, v in model.quantitative.state_dict().items()}
    sent = decode_arrays(reply.content["arrays"], template)
    assert not isinstance(sent, str), sent
    assert set(sent) == q_keys and not any(k.startswith("structural") for k in sent)
    # Q's bytes only: same as the plain network's, so FedSQ's traffic equals FedAvg's.
    assert sum(v.nbytes for v in sent.values()) == sum(v.numpy().nbytes for v in model.structural.state_dict().values())
    assert reply.content["metrics"]["num-examples"] > 0
    # A server that sends one array per key (Flower's own strategies) gets one array per key back.
    plain = client_app.train(_train_message(ArrayRecord(model.quantitative.state_dict()),
                                            {"server-round": 1, "structural-sha256": sha}), _context(config))
    assert set(plain.content["arrays"].keys()) == q_keys


def test_client_refuses_a_different_structural_copy(fedsq_client):
    client_app, config, model, sha = fedsq_client
    reply = client_app.train(_train_message(ArrayRecord(model.quantitative.state_dict()),
                                            {"server-round": 1, "structural-sha256": "0" * 64}), _context(config))
    assert reply.has_error()
    assert "0" * 64 in reply.error.reason and sha in reply.error.reason
    assert reply.error.code == wire.REFUSED_PERMANENTLY  # the server samples this node no more this run


def test_client_error_reply_instead_of_crash(fedsq_client):
    client_app, config, model, sha = fedsq_client
    broken = ArrayRecord({"not-a-key": Array(np.zeros(2, np.float32))})
    reply = client_app.train(_train_message(broken, {"server-round": 1, "structural-sha256": sha}), _context(config))
    assert reply.has_error() and "not-a-key" in reply.error.reason


def test_client_structural_copy_unchanged_by_training(fedsq_client):
    client_app, config, model, sha = fedsq_client
    for server_round in (1, 2):
        client_app.train(_train_message(ArrayRecord(model.quantitative.state_dict()),
                                        {"server-round": server_round, "structural-sha256": sha}), _context(config))
    assert model.structural_sha256() == sha
    assert torch.is_grad_enabled()
