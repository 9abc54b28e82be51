"""Each silo's own validation (federated evaluation, screened replies, BVA from the silos) and the leakage
check by content (pretraining-image digests in the backbone's sidecar)."""

from __future__ import annotations

import json
import logging
import math
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict

from fedsq_app import client_app
from fedsq_app.config import ConfigError, NodeConfig, RunConfig
from fedsq_app.core import wire
from fedsq_app.core.evaluation import MAX_EVAL_EXAMPLES, check_evaluate_reply, screen_evaluate_replies
from fedsq_app.data import digests
from fedsq_app.data.leakage import PretrainOverlapError, check_content_overlap
from fedsq_app.data.sources import read_idx, write_idx
from fedsq_app.harness.inprocess import simulate_in_process
from fedsq_app.task import default_backbone_path


def _embedded(split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = resources.files("fedsq_app") / "embedded"
    return (read_idx(folder / f"{split}-images-idx3-ubyte.gz"), read_idx(folder / f"{split}-labels-idx1-ubyte.gz"))


def make_silo(folder: Path, images: np.ndarray, labels: np.ndarray) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    return f"idx:{folder}"


# ---------------------------------------------------------------------------------------------- digests
def test_digests_match_by_content_and_shape():
    images = np.random.default_rng(0).integers(0, 256, size=(50, 1, 28, 28), dtype=np.uint8)
    first = digests.image_digests(images)
    assert first.dtype == np.uint64 and len(np.unique(first)) == 50
    assert np.array_equal(first, digests.image_digests(images.copy()))  # deterministic
    assert digests.image_digests(images.reshape(50, 1, 14, 56))[0] != first[0]  # same bytes, another shape
    entry = digests.sidecar_entry(images[:20])
    reference = digests.parse_entry(json.loads(json.dumps(entry)))  # survives JSON
    assert entry["count"] == 20 and len(reference) == 20 and np.all(reference[1:] > reference[:-1])
    assert digests.count_in(first, reference) == 20
    assert digests.count_in(digests.image_digests(images[[3, 3, 30]]), reference) == 2  # duplicates count
    with pytest.raises(ValueError, match="unknown digest entry"):
        digests.parse_entry({"algorithm": "md5"})


def test_pretraining_writes_digests_and_the_embedded_splits_are_disjoint(fedsq_cache):
    backbone = default_backbone_path("smallcnn", "embedded")
    meta = json.loads(Path(f"{backbone}.json").read_text())
    pretrain_images, _ = _embedded("pretrain")
    assert meta[digests.FIELD]["count"] == len(pretrain_images) == 3000
    train_images, _ = _embedded("train")
    started = time.perf_counter()
    assert check_content_overlap(str(backbone), train_images[:, None], "embedded train") == 0
    print(f"\nhashing {len(train_images)} images + the check: {1000 * (time.perf_counter() - started):.0f} ms")


def test_a_sidecar_without_digests_warns_and_does_not_stop(fedsq_cache, tmp_path, caplog):
    backbone = default_backbone_path("smallcnn", "embedded")
    old = tmp_path / "old.safetensors"
    old.write_bytes(backbone.read_bytes())
    meta = json.loads(Path(f"{backbone}.json").read_text())
    del meta[digests.FIELD]
    Path(f"{old}.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        assert check_content_overlap(str(old), _embedded("pretrain")[0][:5, None], "x") is None
    assert "could not run" in caplog.text


# ---------------------------------------------------------------------------------------------- evaluate replies
def _metadata(node_id: int, message_type: str, src: bool = True) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id if src else 0,
                    dst_node_id=0 if src else node_id, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=3600.0, message_type=message_type)


def _reply(node_id: int, metrics: dict | None = None, error: str | None = None) -> Message:
    if error is not None:
        return Message(error=Error(code=2, reason=error), metadata=_metadata(node_id, "evaluate"))
    content = RecordDict({wire.METRICS: MetricRecord(metrics)} if metrics is not None else {})
    return Message(content=content, metadata=_metadata(node_id, "evaluate"))


GOOD = {wire.EVAL_ACCURACY: 0.5, wire.EVAL_LOSS: 1.2, wire.NUM_EXAMPLES: 100}


@pytest.mark.parametrize("metrics, reason", [
    ({**GOOD, wire.EVAL_ACCURACY: float("nan")}, "eval_accuracy"),
    ({**GOOD, wire.EVAL_ACCURACY: 1.5}, "eval_accuracy"),
    ({**GOOD, wire.EVAL_ACCURACY: -0.1}, "eval_accuracy"),
    ({k: v for k, v in GOOD.items() if k != wire.EVAL_ACCURACY}, "eval_accuracy"),
    ({**GOOD, wire.EVAL_LOSS: float("inf")}, "eval_loss"),
    ({**GOOD, wire.NUM_EXAMPLES: 0}, "num-examples"),
    ({**GOOD, wire.NUM_EXAMPLES: -5}, "num-examples"),
    ({**GOOD, wire.NUM_EXAMPLES: 2.5}, "num-examples"),
    ({**GOOD, wire.NUM_EXAMPLES: float(MAX_EVAL_EXAMPLES + 1)}, "num-examples"),
    ({**GOOD, wire.EVAL_ACCURACY: [0.5, 0.6]}, "eval_accuracy"),
    (None, "no 'metrics'"),
])
def test_bad_evaluate_replies_are_rejected_with_the_reason(metrics, reason):
    outcome = check_evaluate_reply(_reply(7, metrics))
    assert not outcome.accepted and reason in outcome.reason and outcome.node_id == 7


def test_evaluate_replies_are_weighted_by_the_servers_weights_never_their_counts():
    replies = [_reply(1, GOOD), _reply(2, {**GOOD, wire.EVAL_ACCURACY: 1.0, wire.NUM_EXAMPLES: 300}),
               _reply(1, {**GOOD, wire.EVAL_ACCURACY: 1.0}),  # a second reply from node 1
               _reply(3, error="boom"), _reply(4, {**GOOD, wire.NUM_EXAMPLES: 10**6}),
               _reply(5, GOOD)]  # no training weight this round
    checked = screen_evaluate_replies(replies, max_examples=1000, weights={1: 30, 2: 10, 4: 5})
    accuracy, _, claimed = checked.weighted()
    assert claimed == 400 and math.isclose(accuracy, (0.5 * 30 + 1.0 * 10) / 40)  # 300 claimed: no extra say
    record = checked.to_json()
    assert set(record["nodes"]) == {"1", "2"} and record["nodes"]["2"]["num_examples"] == 300
    assert record["nodes"]["2"]["weight"] == 10
    reasons = {r["node_id"]: r["reason"] for r in record["rejected"]}
    assert "second" in reasons[1] and "boom" in reasons[3] and "[1, 1000]" in reasons[4]
    assert "no weight" in reasons[5]
    equal = screen_evaluate_replies(replies[:2])  # before any training round: every node once
    assert math.isclose(equal.weighted()[0], 0.75)
    assert screen_evaluate_replies([_reply(3, error="x")]).weighted() is None


# ---------------------------------------------------------------------------------------------- config
def test_node_and_run_config_keys():
    node = NodeConfig.from_mapping({"data-path": "/x", "val-fraction": 0.2, "allow-pretrain-overlap": True})
    assert node.val_fraction == 0.2 and node.allow_pretrain_overlap
    assert NodeConfig.from_mapping({"partition-id": 0, "num-partitions": 2}).val_fraction == -1.0
    with pytest.raises(ConfigError, match="val-fraction"):
        NodeConfig.from_mapping({"data-path": "/x", "val-fraction": 1.5})
    with pytest.raises(ConfigError, match="allow-pretrain-overlap must be true or false"):
        NodeConfig.from_mapping({"data-path": "/x", "allow-pretrain-overlap": "yes"})
    with pytest.raises(ConfigError, match="server-validation=false needs fraction-evaluate"):
        RunConfig.from_mapping({"server-validation": False})


# ---------------------------------------------------------------------------------------------- silos
OVERLAP = 30  # pretraining images slipped into silo 2


@pytest.fixture(scope="module")
def silos(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("silos")
    images, labels = _embedded("train")
    pre_images, pre_labels = _embedded("pretrain")
    silo_1 = make_silo(folder / "silo-1", images[:240], labels[:240])
    silo_2 = make_silo(folder / "silo-2", np.concatenate([images[240:600], pre_images[:OVERLAP]]),
                       np.concatenate([labels[240:600], pre_labels[:OVERLAP]]))
    return [silo_1, silo_2]


def _context(node_config: dict, run: dict) -> Context:
    return Context(run_id=1, node_id=1002, node_config=node_config, state=RecordDict(), run_config=run)


def test_a_silo_with_pretraining_images_is_refused_unless_allowed(fedsq_cache, silos):
    run = {"max-train-samples": 300, "fraction-evaluate": 1.0}
    config = RunConfig.from_mapping(run)
    model, _, sha = client_app.local_model(config, silos[1])
    content = RecordDict({wire.ARRAYS: ArrayRecord(model.quantitative.state_dict()),
                          wire.CONFIG: ConfigRecord({"server-round": 1, "structural-sha256": sha})})
    message = Message(content=content, metadata=_metadata(1002, "train", src=False))
    refused = client_app.train(message, _context({"data-path": silos[1]}, run))
    assert refused.has_error()
    reason = refused.error.reason
    print(f"\nrefusal: {reason.splitlines()[0]}")
    assert f"{OVERLAP} of the 390 images of data-path='idx:<path>'" in reason  # the silo's path is its own
    assert "allow-pretrain-overlap=true" in reason and refused.error.code == wire.REFUSED_PERMANENTLY
    debug = client_app.train(message, _context({"data-path": silos[1], "debug-replies": True}, run))
    assert f"{OVERLAP} of the 390 images of data-path='{silos[1]}'" in debug.error.reason
    evaluated = client_app.evaluate_local(Message(content=content, metadata=_metadata(1002, "evaluate", src=False)),
                                          _context({"data-path": silos[1]}, run))
    assert evaluated.has_error() and "PretrainOverlapError" in evaluated.error.reason
    allowed = client_app.train(message, _context({"data-path": silos[1], "allow-pretrain-overlap": True}, run))
    assert not allowed.has_error(), allowed.error.reason if allowed.has_error() else ""
    assert allowed.content["metrics"]["num-examples"] == 351  # 390 less its 10 % validation hold-out (39)


def test_bva_comes_from_the_silos_when_the_server_validates_nothing(fedsq_cache, silos, tmp_path):
    """server-validation=false: BVA and rounds-to-best from the silos' weighted accuracy, asked every 2
    rounds (round 0 and the last round always): round 1 has no validation and is no candidate."""
    run = {"num-server-rounds": 3, "max-train-samples": 300, "fraction-evaluate": 1.0, "evaluate-every": 2,
           "server-validation": False, "out-dir": str(tmp_path), "run-name": "silos", "probe-size": 0,
           "min-valid-replies": 2}  # two silos: the two-silo mode
    nodes = [{"data-path": silos[0]}, {"data-path": silos[1], "allow-pretrain-overlap": True}]
    results = simulate_in_process(run, 2, node_configs=nodes)
    assert results["validation_source"].startswith("nodes:")
    skipped = results["rounds"][0]
    assert skipped["round"] == 1 and skipped["val_accuracy"] is None and "node_validation" not in skipped
    evaluated = [results["initial"], *results["rounds"][1:]]  # rounds 0, 2, 3
    for record in evaluated:
        validation = record["node_validation"]
        assert sorted(e["num_examples"] for e in validation["nodes"].values()) == [23, 39]  # about 10 % of 240 and 390, per label
        assert validation["rejected"] == [] and validation["num_examples"] == 62
        # Weighted by the server's weights (silos of unknown size: equal), never by the counts they report.
        assert all(e["weight"] == 1 for e in validation["nodes"].values())
        weighted = sum(e["accuracy"] for e in validation["nodes"].values()) / 2
        assert math.isclose(record["val_accuracy"], weighted) and math.isclose(validation["accuracy"], weighted)
    print("\nsilo validation per round:", [{n: round(e["accuracy"], 4) for n, e in r["node_validation"]["nodes"].items()}
                                          for r in evaluated])
    curve = {0: results["initial"]["val_accuracy"], 2: evaluated[1]["val_accuracy"], 3: evaluated[2]["val_accuracy"]}
    best = max(curve.values())
    assert results["best_val_accuracy"] == best
    assert results["rounds_to_best"] == min(r for r, v in curve.items() if v == best)
    assert all(r["accepted"] == 2 for r in results["rounds"])


def test_evaluate_messages_name_the_structural_copy():
    """A node evaluates the global Q under the S the server names, as it trains under it."""
    from fedsq_app.core.strategy import FedSQ
    from fedsq_app.harness.inprocess import InProcessGrid

    strategy = FedSQ(structural_sha256="abc123", fraction_evaluate=0.5, min_evaluate_nodes=1,
                     min_available_nodes=2)
    messages = list(strategy.configure_evaluate(3, ArrayRecord(), ConfigRecord({}), InProcessGrid({}, 4)))
    assert len(messages) == 2  # Flower's sampling: half of the 4 nodes
    for message in messages:
        assert message.metadata.message_type.startswith("evaluate")
        assert message.content["config"]["structural-sha256"] == "abc123"
        assert message.content["config"]["server-round"] == 3
