"""Safe by default (issue 16): defenses an honest federation never trips, robust aggregation, no silent
no-op, leakage refused, round 0 as best round, distinct silo seeds, and one record per reply.

Grouped by class: defaults (item 1), robust aggregation (2), zero steps (4), leakage (5), smaller ones (6),
per-reply records (8). Hostile replies are built by hand, as in tests/test_reliability.py.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from torch import nn

from fedsq_app.config import ConfigError, RunConfig
from fedsq_app.data.sources import write_idx
from fedsq_app.data.tensors import InputSpec, TensorData
from fedsq_app.core.aggregation import aggregate
from fedsq_app.core.strategy import FedSQ, ValidatedFedAvg
from fedsq_app.runtime.train import LocalSchedule, step_plan, train_local
from local_grid import FIRST_NODE_ID, LocalGrid, run_server

GLOBAL = {
    "conv.weight": np.full((4, 3, 3, 3), 0.1, np.float32),
    "bn.running_mean": np.zeros(4, np.float32),
    "bn.running_var": np.ones(4, np.float32),
    "bn.num_batches_tracked": np.array(5, np.int64),
    "fc.weight": np.full((2, 4), -0.2, np.float32),
}


def _reply(arrays: dict, node_id: int, num_examples: int = 100, train_loss: float = 0.5) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"train_loss": train_loss, "num-examples": num_examples})})
    return Message(content=content, metadata=metadata)


def _update(rng: np.random.Generator, scale: float = 1.0, step: float = 0.01) -> dict:
    """The global model moved by a random step (BN variances stay positive); ``scale`` boosts the step."""
    return {k: (v + scale * rng.normal(scale=step, size=v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
            for k, v in GLOBAL.items()}


def _scaled(arrays: dict, factor: float) -> dict:
    """global + factor x (reply - global) on the parameters: a boosted (factor > 1) or sign-flipped
    (factor < 0) update whose BN statistics stay plausible."""
    return {k: (GLOBAL[k] + np.float32(factor) * (v - GLOBAL[k]) if k.endswith("weight") else v)
            for k, v in arrays.items()}


def _defaults(**overrides) -> ValidatedFedAvg:
    """The strategy exactly as a default run config makes it (with ``overrides``)."""
    from fedsq_app.runtime.strategies import make_strategy

    strategy = make_strategy(RunConfig(strategy="fedavg", **overrides), structural_sha256="x")
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    return strategy


def _aggregate(strategy: ValidatedFedAvg, replies: list[Message]):
    arrays, metrics = strategy.aggregate_train(1, replies)
    return arrays, metrics, strategy.round_replies[1]


# ------------------------------------------------------------------------------------ 1. safe defaults
@pytest.mark.parametrize("poison", ["weight 1e30", "all x 1e6", "negative running_var"])
@pytest.mark.parametrize("num_honest", [1, 5])
def test_finite_poison_is_rejected_by_default_even_in_small_rounds(poison, num_honest):
    rng = np.random.default_rng(0)
    bad = _update(rng)
    if poison == "weight 1e30":
        bad["conv.weight"].flat[3] = 1e30
    elif poison == "all x 1e6":
        bad = {k: (v * np.float32(1e6) if v.dtype.kind == "f" else v) for k, v in bad.items()}
    else:
        bad["bn.running_var"][1] = -0.5
    honest = [_reply(_update(rng), n) for n in range(1, num_honest + 1)]
    small = dict(min_valid_replies=1)  # the magnitude checks need no other reply
    arrays, _, checked = _aggregate(_defaults(**small), honest + [_reply(bad, 99)])
    assert [n for n, _ in checked.rejected] == [99]
    alone, _, _ = _aggregate(_defaults(**small), honest)
    assert all(np.array_equal(arrays[k].numpy(), alone[k].numpy()) for k in GLOBAL)
    assert float(arrays["bn.running_var"].numpy().min()) >= 0


def test_duplicate_node_ids_never_crash_the_checks():
    rng = np.random.default_rng(3)
    replies = [_reply(_update(rng), n) for n in (1, 2, 3, 4)]
    replies += [_reply(_update(rng), 2), _reply(_scaled(_update(rng), 50.0), 3)]  # same ids again
    arrays, _, checked = _aggregate(_defaults(), replies)
    assert arrays is not None and len(checked.accepted) == 4
    assert sorted(n for n, _ in checked.rejected) == [2, 3]
    assert all("duplicate reply" in reason for _, reason in checked.rejected)


def test_defaults_are_on_in_the_run_config():
    strategy = _defaults()
    assert strategy.clip_multiplier == 2.0 and strategy.min_valid_replies == 3 and strategy.aggregation == "mean"
    assert strategy.deviation_bound == 3.0 and strategy.influence_bound == 0.0 and strategy.bn_clamp
    fedsq = FedSQ(structural_sha256="x")  # the classes' own defaults match the run config's
    assert (fedsq.clip_multiplier, fedsq.min_valid_replies, fedsq.influence_bound, fedsq.deviation_bound) == (
        strategy.clip_multiplier, strategy.min_valid_replies, strategy.influence_bound, strategy.deviation_bound)


# ------------------------------------------------------------------------------------ 2. robust options
@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_robust_aggregation_uses_flowers_maths_and_resists_one_attacker(method):
    rng = np.random.default_rng(4)
    honest = [_update(rng) for _ in range(9)]
    attacker = _scaled(_update(rng), -1000.0)  # within the magnitude bounds, far beyond any honest one
    replies = [_reply(a, n) for n, a in enumerate(honest + [attacker], start=1)]
    config = RunConfig(strategy="fedsq", aggregation=method, clip_multiplier=0, influence_bound=0, deviation_bound=0)
    from fedsq_app.runtime.strategies import make_strategy

    strategy = make_strategy(config, structural_sha256="x")  # FedSQ: the robust average applies to Q
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    arrays, _, checked = _aggregate(strategy, replies)
    assert len(checked.accepted) == 10  # nothing rejected: the aggregator alone absorbs the attacker
    for key, value in GLOBAL.items():
        got = arrays[key].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape
        if value.dtype.kind != "f":
            assert got == value  # counters: the server's value
            continue
        stack = np.stack([a[key].astype(np.float64) for a in honest + [attacker]])
        want = np.median(stack, axis=0) if method == "median" else trim_mean(stack, 0.2)
        np.testing.assert_allclose(got, want.astype(value.dtype), rtol=1e-6)
        honest_range = np.stack([a[key] for a in honest])
        assert (got >= honest_range.min(0) - 1e-6).all() and (got <= honest_range.max(0) + 1e-6).all()
    mean = aggregate(checked.accepted, GLOBAL, "mean")
    assert np.abs(mean["fc.weight"] - GLOBAL["fc.weight"]).max() > 10 * np.abs(
        arrays["fc.weight"].numpy() - GLOBAL["fc.weight"]).max()  # the plain mean is dragged far away


# ------------------------------------------------------------------------------------ 4. no silent no-op
def test_batch_size_one_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="batch-size=1.*BatchNorm.*one-sample batches"):
        RunConfig.from_mapping({"batch-size": 1})
    assert RunConfig.from_mapping({"batch-size": 1, "model": "alexnet"}).batch_size == 1  # no BN: it trains


def test_zero_training_steps_raise_before_training_and_one_sample_batches_are_counted():
    assert step_plan(33, 32, 2, drop_single=True) == (2, 2)  # the 33rd sample would be a batch of one
    assert step_plan(33, 32, 2, drop_single=False) == (4, 0)
    assert step_plan(5, 1, 1, drop_single=True) == (0, 5)
    spec = InputSpec(1, 0, (0.5,), (0.5,))
    schedule = LocalSchedule(epochs=1, batch_size=1, lr=0.1, momentum=0.0, weight_decay=0.0)
    data = TensorData(torch.randint(0, 255, (5, 1, 4, 4), dtype=torch.uint8), torch.arange(5) % 2)
    with_bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    before = [p.detach().clone() for p in with_bn.parameters()]
    with pytest.raises(ValueError, match="zero training steps.*BatchNorm"):
        train_local(with_bn, data, spec, schedule, device=torch.device("cpu"), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, with_bn.parameters()))  # refused, not run
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))  # no BN: batch-size 1 trains, one step per sample
    result = train_local(plain, data, spec, schedule, device=torch.device("cpu"), seed=0)
    assert (result.steps, result.skipped) == (5, 0)
    odd = TensorData(data.images[:3], data.labels[:3])
    result = train_local(with_bn, odd, spec, LocalSchedule(1, 2, 0.1, 0.0, 0.0), device=torch.device("cpu"), seed=0)
    assert (result.steps, result.skipped) == (1, 1)


# ------------------------------------------------------------------------------------ 5. leakage refused
@pytest.fixture(scope="module")
def idx_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("leak-idx")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 200), ("t10k", 40)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (count, 8, 8)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 4)
    return folder


def _backbone_sidecar(tmp_path, dataset: str, split: str) -> str:
    checkpoint = tmp_path / "backbone.safetensors"
    (tmp_path / "backbone.safetensors.json").write_text(json.dumps({"source_data": {"dataset": dataset,
                                                                                    "split": split}}))
    return str(checkpoint)


def test_overlap_with_the_pretraining_split_stops_the_run_unless_allowed(idx_dataset, tmp_path):
    from fedsq_app.data.leakage import check_pretrain_overlap

    backbone = _backbone_sidecar(tmp_path, f"idx:{idx_dataset}", "train[:100]")
    run = {"dataset": str(idx_dataset)}  # the same data, named as a bare path
    with pytest.raises(ConfigError) as caught:
        check_pretrain_overlap(RunConfig.from_mapping({**run, "train-split": "train[50:]"}), backbone)
    message = str(caught.value)
    assert "train-split 'train[50:]' overlaps the pretraining split 'train[:100]' (rows 50..99)" in message
    assert "allow-pretrain-overlap=true" in message
    with pytest.raises(ConfigError, match="train-split 'train' overlaps"):
        check_pretrain_overlap(RunConfig.from_mapping(run), backbone)
    allowed = RunConfig.from_mapping({**run, "allow-pretrain-overlap": True})
    assert len(check_pretrain_overlap(allowed, backbone)) == 1
    for disjoint in ({"train-split": "train[100:]"}, {"train-split": "train[50%:]"}, {"dataset": "embedded"}):
        assert check_pretrain_overlap(RunConfig.from_mapping({**run, **disjoint}), backbone) == []
    # A backbone pretrained on labels 0-1 only, a run on labels 2-3: the same rows hold different samples.
    meta = json.loads((tmp_path / "backbone.safetensors.json").read_text())
    meta["source_data"]["label_subset"] = "0-1"
    (tmp_path / "backbone.safetensors.json").write_text(json.dumps(meta))
    assert check_pretrain_overlap(RunConfig.from_mapping({**run, "classes": "2,3"}), backbone) == []
    with pytest.raises(ConfigError, match="overlaps"):
        check_pretrain_overlap(RunConfig.from_mapping({**run, "classes": "1-3"}), backbone)
    test_backbone = _backbone_sidecar(tmp_path, str(idx_dataset), "test")
    with pytest.raises(ConfigError, match="test-split 'test' overlaps the pretraining split 'test'"):
        check_pretrain_overlap(RunConfig.from_mapping({**run, "train-split": "train[100:]"}), test_backbone)


def test_server_refuses_an_overlapping_backbone_before_any_training(fedsq_cache, tmp_path):
    import shutil

    backbone = tmp_path / "leaky.safetensors"
    shutil.copy(fedsq_cache / "backbones" / "smallcnn-embedded.safetensors", backbone)
    meta = json.loads((fedsq_cache / "backbones" / "smallcnn-embedded.safetensors.json").read_text())
    meta["source_data"].update(dataset="embedded", split="train[:3000]")
    (tmp_path / "leaky.safetensors.json").write_text(json.dumps(meta))
    config = {"pretrained": str(backbone), "max-train-samples": 300, "out-dir": str(tmp_path), "device": "cpu"}
    grid = LocalGrid(config)
    with pytest.raises(ConfigError, match=r"pretrained on dataset 'embedded'.*train-split 'train' overlaps the "
                                          r"pretraining split 'train\[:3000\]'"):
        run_server(config, grid)
    assert grid.rounds_served == 0


def test_calibration_proxy_split_must_be_disjoint(idx_dataset, tmp_path):
    from fedsq_app.tools.pretrain import calibrate, main

    backbone = _backbone_sidecar(tmp_path, f"idx:{idx_dataset}", "train[:100]")
    with pytest.raises(ValueError, match="proxy split 'train\\[80:120\\]' overlaps the pretraining split"):
        calibrate("smallcnn", backbone, f"idx:{idx_dataset}", "train[80:120]")
    with pytest.raises(SystemExit):  # no default proxy split any more: it used to be the pretraining split
        main(["--dataset", f"idx:{idx_dataset}", "--backbone", backbone, "--calibrate"])


# ------------------------------------------------------------------------------------ 6. smaller ones
def test_round_zero_can_be_the_best_round(fedsq_cache, tmp_path, monkeypatch):
    from fedsq_app import client_app

    def training_fails(*args, **kwargs):
        raise RuntimeError("silo offline")

    monkeypatch.setattr(client_app, "train_local", training_fails)  # no round can improve on round 0
    config = {"num-server-rounds": 1, "max-train-samples": 300, "out-dir": str(tmp_path), "run-name": "r0",
              "device": "cpu"}
    run_server(config, LocalGrid(config))
    results = json.loads((tmp_path / "r0" / "results.json").read_text())
    assert results["best_round"] == 0 and results["rounds_to_best"] == 0
    assert results["best_val_accuracy"] == results["initial"]["val_accuracy"]
    assert "no round had an accepted reply" in results["label_distribution"]["skipped"]


def test_silos_without_partition_id_get_distinct_seeds():
    from fedsq_app.client_app import node_salt
    from fedsq_app.config import NodeConfig

    def salt(node_id: int, node_config: dict) -> int:
        context = Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})
        return node_salt(NodeConfig.from_mapping(node_config), context)

    silo = {"data-path": "/data/silo"}
    assert len({salt(node_id, silo) for node_id in (7, 8, 9, 2**62 + 5)}) == 4
    assert salt(7, {**silo, "partition-id": 3}) == salt(8, {**silo, "partition-id": 3}) == 3
    assert salt(7, {"partition-id": 1, "num-partitions": 2}) == 1


# ------------------------------------------------------------------------------------ 8. each silo seen
def test_results_record_every_reply(fedsq_cache, tmp_path):
    from fedsq_app.data.partitions import DataKey, partition_sizes

    def tamper(node_id: int, reply: Message) -> Message:
        arrays = reply.content["arrays"]
        if node_id == FIRST_NODE_ID + 1:  # boosted far beyond the others: bounded, not rejected
            arrays["packed/float32"] = Array(arrays["packed/float32"].numpy() * np.float32(40.0))  # Q, packed
        reply.content["metrics"]["num-examples"] = 10**9  # every node claims far more than it holds
        return reply

    config = {"num-server-rounds": 1, "max-train-samples": 300, "out-dir": str(tmp_path), "run-name": "replies",
              "device": "cpu"}
    started = time.time()
    run_server(config, LocalGrid(config, tamper=tamper))
    results = json.loads((tmp_path / "replies" / "results.json").read_text())
    first = results["rounds"][0]
    replies = sorted(first["replies"], key=lambda r: r["node_id"])  # they come in arrival order
    assert [r["node_id"] for r in replies] == [FIRST_NODE_ID, FIRST_NODE_ID + 1, FIRST_NODE_ID + 2]
    honest = [replies[0], replies[2]]
    assert all(r["accepted"] and r["reason"] is None for r in honest)
    # The boosted reply lay beyond the bound: judged on the server's validation split, and rejected (the round,
    # two valid replies of the three it needs, keeps the model: fail closed).
    boosted = replies[1]
    assert not boosted["accepted"] and "beyond the round's bound" in boosted["reason"]
    with_it, without_it = first["judged"][str(boosted["node_id"])]
    assert without_it < with_it and not first["aggregated"]
    assert first["weights_from"] == "partitions"
    sizes = partition_sizes(DataKey.of(RunConfig.from_mapping(config)), 3)
    assert [r["weight"] for r in replies] == list(sizes)  # the server's partition sizes, never the claim
    assert all(r["num_examples"] == 10**9 for r in replies)  # the claim is recorded, nothing more
    assert min(r["clip_scale"] for r in honest) > 0.5
    assert first["clip_bound"] > 0
    assert all(r["train_loss"] > 0 for r in replies)
    assert all(0 <= r["reply_time_s"] <= time.time() - started for r in replies)
    assert results["label_distribution"]["num_partitions"] == 3  # partitions: the server's split is theirs


def test_silo_runs_write_no_label_distribution_of_the_servers_pool(fedsq_cache, tmp_path):
    from fedsq_app.data.partitions import DataKey
    from fedsq_app.server_app import label_report
    from fedsq_app.core.replies import CheckedReply

    key = DataKey.of(RunConfig(max_train_samples=300))
    silo = CheckedReply(1, {}, 10, {"train_loss": 0.1, "silo": 1.0})
    report = label_report(key, [silo, CheckedReply(2, {}, 10, {"silo": 1.0})], 2, tmp_path)
    assert "skipped" in report and "2 of 2" in report["skipped"]
    assert not list(tmp_path.iterdir())  # no PNG/CSV of the server's own pool
    partition = CheckedReply(1, {}, 10, {"train_loss": 0.1})
    assert label_report(key, [partition], 2, tmp_path)["num_partitions"] == 2
