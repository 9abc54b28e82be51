"""Hostile or broken replies: fuzzed replies never crash the server and never touch the aggregate.

The fuzz test mixes honest replies with randomly corrupted ones (every kind of corruption at least once)
and checks that the strategy's aggregate is bit-equal to the aggregate of the honest replies alone.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedsq_app.core.strategy import ValidatedFedAvg
from local_grid import FIRST_NODE_ID, LocalGrid, run_server

MAX_EXAMPLES = 1000
TEMPLATE = {
    "conv.weight": np.zeros((4, 3, 3, 3), np.float32),
    "conv.bias": np.zeros(4, np.float32),
    "bn.running_mean": np.zeros(4, np.float32),
    "bn.num_batches_tracked": np.array(5, np.int64),  # 0-d, like torch's
    "fc.weight": np.zeros((2, 4), np.float32),
}


def _metadata(node_id: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=3600.0, message_type="train")


def _message(content: RecordDict, node_id: int) -> Message:
    return Message(content=content, metadata=_metadata(node_id))


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _reply(arrays: dict[str, np.ndarray], metrics: dict, node_id: int) -> Message:
    return _message(RecordDict({"arrays": _record(arrays), "metrics": MetricRecord(metrics)}), node_id)


def _unchecked_metrics(values: dict) -> MetricRecord:
    """A MetricRecord holding what its type check refuses (a buggy sender or a hand-crafted payload)."""
    record = MetricRecord()
    record.__dict__["_data"].update(values)
    return record


def _honest_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (rng.normal(size=v.shape).astype(v.dtype) if v.dtype.kind == "f" else np.array(rng.integers(1, 99)))
            for k, v in TEMPLATE.items()}


def _honest(rng: np.random.Generator, node_id: int) -> Message:
    return _reply(_honest_arrays(rng), {"train_loss": float(rng.uniform(0.1, 2)),
                                        "num-examples": int(rng.integers(1, MAX_EXAMPLES + 1))}, node_id)


def _forged(payload: np.ndarray, dtype: str, shape: tuple) -> Array:
    """An Array whose metadata declares ``dtype[shape]`` while its bytes hold ``payload`` (Flower's wire keeps
    both as sent)."""
    honest = Array(payload)
    return Array(dtype=dtype, shape=shape, stype=honest.stype, data=honest.data)


def _poison(arrays: dict, key: str, value: float) -> dict:
    bad = arrays[key].copy()
    bad.flat[0] = value
    return {**arrays, key: bad}


# Each corruption: (name, build(rng, node_id) -> Message). All must be rejected.
def _corruptions():
    def arrays_with(rng, node_id, arrays=None, metrics=None):
        arrays = _honest_arrays(rng) if arrays is None else arrays
        return _reply(arrays, {"train_loss": 0.5, "num-examples": 10} if metrics is None else metrics, node_id)

    def float_key(rng):
        return str(rng.choice([k for k, v in TEMPLATE.items() if v.dtype.kind == "f"]))

    return [
        ("nan", lambda r, n: arrays_with(r, n, _poison(_honest_arrays(r), float_key(r), np.nan))),
        ("+inf", lambda r, n: arrays_with(r, n, _poison(_honest_arrays(r), float_key(r), np.inf))),
        ("-inf", lambda r, n: arrays_with(r, n, _poison(_honest_arrays(r), float_key(r), -np.inf))),
        ("wrong shape", lambda r, n: arrays_with(r, n, {**_honest_arrays(r), "conv.weight": np.zeros((4, 3, 3), np.float32)})),
        ("transposed", lambda r, n: arrays_with(r, n, {**_honest_arrays(r), "fc.weight": np.zeros((4, 2), np.float32)})),
        ("0-d counter as (1,)", lambda r, n: arrays_with(r, n, {**_honest_arrays(r), "bn.num_batches_tracked": np.array([5])})),
        ("float64", lambda r, n: arrays_with(r, n, {**_honest_arrays(r), "conv.bias": np.zeros(4, np.float64)})),
        ("float16", lambda r, n: arrays_with(r, n, {**_honest_arrays(r), "conv.bias": np.zeros(4, np.float16)})),
        ("int weights", lambda r, n: arrays_with(r, n, {**_honest_arrays(r), "fc.weight": np.zeros((2, 4), np.int32)})),
        ("missing key", lambda r, n: arrays_with(r, n, {k: v for k, v in _honest_arrays(r).items() if k != "conv.bias"})),
        ("extra key", lambda r, n: arrays_with(r, n, {**_honest_arrays(r), "structural.conv.weight": np.zeros(3, np.float32)})),
        ("renamed key", lambda r, n: arrays_with(r, n, {("fc.W" if k == "fc.weight" else k): v
                                                         for k, v in _honest_arrays(r).items()})),
        ("no arrays at all", lambda r, n: arrays_with(r, n, {})),
        ("num-examples < 0", lambda r, n: arrays_with(r, n, metrics={"num-examples": -int(r.integers(1, 100))})),
        ("num-examples = 0", lambda r, n: arrays_with(r, n, metrics={"num-examples": 0})),
        ("metric +1e308", lambda r, n: arrays_with(r, n, metrics={"train_loss": 1e308, "num-examples": 10})),
        ("metric -1e308", lambda r, n: arrays_with(r, n, metrics={"train_loss": -1e308, "num-examples": 10})),
        ("declares float32[2, 4], carries float32[3]", lambda r, n: _message(RecordDict({
            "arrays": ArrayRecord({**{k: Array(v) for k, v in _honest_arrays(r).items()},
                                   "fc.weight": _forged(np.zeros(3, np.float32), "float32", (2, 4))}),
            "metrics": MetricRecord({"num-examples": 10})}), n)),
        ("declares float32[4], carries complex128[4]", lambda r, n: _message(RecordDict({
            "arrays": ArrayRecord({**{k: Array(v) for k, v in _honest_arrays(r).items()},
                                   "conv.bias": _forged(np.full(4, 1 + 1j), "float32", (4,))}),
            "metrics": MetricRecord({"num-examples": 10})}), n)),
        ("BN running_mean as object array bytes", lambda r, n: _message(RecordDict({
            "arrays": ArrayRecord({**{k: Array(v) for k, v in _honest_arrays(r).items()},
                                   "bn.running_mean": Array(dtype="float32", shape=(4,), stype="numpy.ndarray",
                                                            data=b"\x93NUMPY garbage")}),
            "metrics": MetricRecord({"num-examples": 10})}), n)),
        ("num-examples bool", lambda r, n: _message(RecordDict({
            "arrays": _record(_honest_arrays(r)), "metrics": _unchecked_metrics({"num-examples": True})}), n)),
        ("num-examples string", lambda r, n: _message(RecordDict({
            "arrays": _record(_honest_arrays(r)), "metrics": _unchecked_metrics({"num-examples": "10"})}), n)),
        ("metric None", lambda r, n: _message(RecordDict({
            "arrays": _record(_honest_arrays(r)),
            "metrics": _unchecked_metrics({"num-examples": 10, "train_loss": None})}), n)),
        ("truncated array bytes", lambda r, n: _message(RecordDict({
            "arrays": ArrayRecord({**{k: Array(v) for k, v in _honest_arrays(r).items()},
                                   "conv.bias": Array(dtype="float32", shape=(4,), stype="numpy.ndarray",
                                                      data=b"\x00" * 7)}),
            "metrics": MetricRecord({"num-examples": 10})}), n)),
        ("num-examples float", lambda r, n: arrays_with(r, n, metrics={"num-examples": 10.0})),
        ("num-examples nan", lambda r, n: arrays_with(r, n, metrics={"num-examples": float("nan")})),
        ("num-examples list", lambda r, n: arrays_with(r, n, metrics={"num-examples": [10]})),
        ("num-examples missing", lambda r, n: arrays_with(r, n, metrics={"train_loss": 0.3})),
        ("metric nan", lambda r, n: arrays_with(r, n, metrics={"train_loss": float("nan"), "num-examples": 10})),
        ("metric inf", lambda r, n: arrays_with(r, n, metrics={"train_loss": float("inf"), "num-examples": 10})),
        ("metric list", lambda r, n: arrays_with(r, n, metrics={"train_loss": [0.1, 0.2], "num-examples": 10})),
        ("error reply", lambda r, n: Message(error=Error(code=2, reason="ClientApp raised: boom"), metadata=_metadata(n))),
        ("error reply, no reason", lambda r, n: Message(error=Error(code=0), metadata=_metadata(n))),
        ("empty content", lambda r, n: _message(RecordDict(), n)),
        ("only a config record", lambda r, n: _message(RecordDict({"config": ConfigRecord({"x": 1})}), n)),
        ("two ArrayRecords", lambda r, n: _message(RecordDict({
            "arrays": _record(_honest_arrays(r)), "more": _record(_honest_arrays(r)),
            "metrics": MetricRecord({"num-examples": 10})}), n)),
        ("missing MetricRecord", lambda r, n: _message(RecordDict({"arrays": _record(_honest_arrays(r))}), n)),
        ("two MetricRecords", lambda r, n: _message(RecordDict({
            "arrays": _record(_honest_arrays(r)), "metrics": MetricRecord({"num-examples": 10}),
            "m2": MetricRecord({"num-examples": 10})}), n)),
    ]


def _aggregate(replies: list[Message], template: dict, **kwargs):
    kwargs.setdefault("min_valid_replies", 1)
    strategy = ValidatedFedAvg(min_train_nodes=1, min_available_nodes=1, **kwargs)
    strategy.current_arrays = _record(template)  # what configure_train stores
    arrays, metrics = strategy.aggregate_train(1, replies)
    return arrays, metrics, strategy.round_replies[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuzzed_replies_never_crash_and_never_touch_the_aggregate(seed):
    rng = np.random.default_rng(seed)
    corruptions = _corruptions()
    num_corrupt, num_honest = 60, 10
    kinds = [corruptions[i % len(corruptions)] for i in range(num_corrupt)]  # every kind at least once
    rng.shuffle(kinds)
    honest = [_honest(rng, node_id) for node_id in range(1, num_honest + 1)]
    corrupt = [build(rng, 1000 + i) for i, (_, build) in enumerate(kinds)]
    mixed = honest + corrupt
    order = rng.permutation(len(mixed))
    mixed = [mixed[i] for i in order]

    expected_arrays, expected_metrics, _ = _aggregate(honest, TEMPLATE)
    arrays, metrics, checked = _aggregate(mixed, TEMPLATE)  # must not raise

    assert len(checked.accepted) == num_honest and len(checked.rejected) == num_corrupt
    assert {n for n, _ in checked.rejected} == set(range(1000, 1000 + num_corrupt))
    assert all(reason for _, reason in checked.rejected)
    assert arrays.keys() == expected_arrays.keys() == TEMPLATE.keys()
    for key in TEMPLATE:
        got, want = arrays[key].numpy(), expected_arrays[key].numpy()
        assert got.dtype == want.dtype == TEMPLATE[key].dtype and got.shape == TEMPLATE[key].shape
        assert np.array_equal(got, want), key
    assert dict(metrics) == dict(expected_metrics)
    print(f"\nfuzz seed={seed}: {len(mixed)} replies ({num_corrupt} corrupted, {len(corruptions)} kinds), "
          f"rejected {len(checked.rejected)}, accepted {len(checked.accepted)}, crashes 0")


def test_aggregate_does_not_depend_on_reply_order():
    rng = np.random.default_rng(5)
    honest = [_honest(rng, node_id) for node_id in range(1, 7)]
    first, _, _ = _aggregate(honest, TEMPLATE)
    second, _, _ = _aggregate(honest[::-1], TEMPLATE)
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in TEMPLATE)


def test_too_few_valid_replies_keep_the_previous_model():
    rng = np.random.default_rng(4)
    replies = [_honest(rng, 1), _honest(rng, 2), Message(error=Error(code=2, reason="x"), metadata=_metadata(3))]
    arrays, metrics, checked = _aggregate(replies, TEMPLATE, min_valid_replies=3)
    assert arrays is None and metrics is None
    assert len(checked.accepted) == 2 and len(checked.rejected) == 1


def test_client_whose_training_raises_replies_with_an_error(fedsq_cache, monkeypatch):
    from fedsq_app import client_app

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(client_app, "train_local", broken)
    grid = LocalGrid({"max-train-samples": 300})
    node_id = FIRST_NODE_ID
    model, _, sha = client_app.local_model(client_app.RunConfig.from_mapping(grid.run_config))
    # Arrays that fit the model and the right S: the failure comes from training itself.
    config = ConfigRecord({"server-round": 1, "structural-sha256": sha})
    message = Message(RecordDict({"arrays": ArrayRecord(model.quantitative.state_dict()), "config": config}),
                      dst_node_id=node_id, message_type="train")
    reply = client_app.train(message, grid.contexts[node_id])
    assert reply.has_error()
    assert "RuntimeError: disk on fire" in reply.error.reason
    assert reply.metadata.src_node_id == node_id


def test_server_run_survives_hostile_and_lost_replies(fedsq_cache, tmp_path):
    """The real ServerApp: round 1 with a NaN reply and a lost reply, round 2 with nothing valid."""

    def tamper(node_id: int, reply: Message) -> Message | None:
        server_round = grid.rounds_served
        if server_round == 1 and node_id == FIRST_NODE_ID + 1:
            arrays = reply.content["arrays"]
            key = next(k for k, a in arrays.items() if a.dtype == "float32")
            bad = arrays[key].numpy().copy()
            bad.flat[0] = np.nan
            arrays[key] = Array(bad)
            return reply
        if server_round == 1 and node_id == FIRST_NODE_ID + 2:
            return None  # timed out: never arrives
        if server_round == 2:
            instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
            return Message(Error(code=2, reason="silo offline"), reply_to=instruction)
        return reply

    config = {"num-server-rounds": 2, "max-train-samples": 300, "out-dir": str(tmp_path), "run-name": "hostile",
              "device": "cpu", "min-valid-replies": 1}
    grid = LocalGrid(config, tamper=tamper)
    run_server(config, grid)
    results = json.loads((tmp_path / "hostile" / "results.json").read_text())
    first, second = results["rounds"]
    assert (first["expected"], first["received"], first["missing"], first["accepted"], first["rejected"]) == \
        (3, 2, 1, 1, 1)
    assert first["missing_nodes"] == [FIRST_NODE_ID + 2] and first["aggregated"]
    assert "NaN" in first["rejections"][0]["reason"] and first["rejections"][0]["node_id"] == FIRST_NODE_ID + 1
    assert (second["accepted"], second["rejected"], second["aggregated"]) == (0, 3, False)
    assert second["val_accuracy"] == first["val_accuracy"]  # the previous global model was kept
    assert "test_accuracy" in results

