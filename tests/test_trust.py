"""The trust model (docs/RELIABILITY.md): what the server never takes on a silo's word.

Weights are the server's; arrays are checked on what they decode to; each silo's influence is bounded
(its pull on the mean, norm clipping in two-silo rounds, BN statistics clamp); a round below
min-valid-replies keeps the model. The property-based
test at the end throws thousands of forged replies at ``aggregate_train``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsq_app.config import ConfigError, RunConfig
from fedsq_app.core import defenses
from fedsq_app.core.aggregation import AGGREGATIONS, aggregate
from fedsq_app.core.defenses import (DEFAULT_DEVIATION_BOUND, DEFAULT_INFLUENCE_BOUND, alignments, bound_deviation, bound_influence, clamp_bn_statistics,
                                    clip_updates, deviations, median_update, update_keys, update_norm)
from fedsq_app.core.packing import decode_arrays, pack, pack_record
from fedsq_app.core.replies import CheckedReply, bound_note, screen_replies, weigh_each
from fedsq_app.core.strategy import ValidatedFedAvg
from fedsq_app.core.weights import AutoWeights, PartitionWeights, SiloSizes, load_silo_sizes

GLOBAL = {
    "conv.weight": np.full((4, 3, 3, 3), 0.1, np.float32),
    "bn.weight": np.ones(4, np.float32),
    "bn.running_mean": np.zeros(4, np.float32),
    "bn.running_var": np.ones(4, np.float32),
    "bn.num_batches_tracked": np.array(5, np.int64),
    "fc.weight": np.full((2, 4), -0.2, np.float32),
}
PARAMS = ("conv.weight", "bn.weight", "fc.weight")


def _metadata(node_id: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=3600.0, message_type="train")


def _reply(arrays: dict, node_id: int, **metrics) -> Message:
    metrics = {"train_loss": 0.5, "num-examples": 100, **metrics}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, metadata=_metadata(node_id))


def _honest(rng: np.random.Generator, step: float = 0.01) -> dict:
    """A shared direction plus node noise: honest non-IID updates agree only partly."""
    return {k: (v + (rng.normal(scale=step, size=v.shape) + step).astype(v.dtype) if v.dtype.kind == "f" else v)
            for k, v in GLOBAL.items()}


def _with_update(arrays: dict, factor: float) -> dict:
    """global + factor x (arrays - global) on the parameters (BN statistics as they are)."""
    return {k: (GLOBAL[k] + np.float32(factor) * (v - GLOBAL[k]) if k in PARAMS else v) for k, v in arrays.items()}


def _strategy(**kwargs) -> ValidatedFedAvg:
    strategy = ValidatedFedAvg(min_train_nodes=1, min_available_nodes=1, **kwargs)
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    return strategy


def _aggregate(replies: list[Message], **kwargs):
    strategy = _strategy(**kwargs)
    arrays, metrics = strategy.aggregate_train(1, replies)
    return (None if arrays is None else {k: a.numpy() for k, a in arrays.items()}), metrics, strategy.round_replies[1]


def _damage(honest: list[dict], attackers: list[dict], **kwargs) -> float:
    """D = ||aggregate - honest-only aggregate|| / median honest update norm, on the parameters."""
    messages = [_reply(a, n) for n, a in enumerate(honest + attackers, start=1)]
    mixed, _, _ = _aggregate(messages, **kwargs)
    alone, _, _ = _aggregate(messages[: len(honest)], **kwargs)
    distance = np.sqrt(sum(float(np.sum((mixed[k].astype(np.float64) - alone[k]) ** 2)) for k in PARAMS))
    norms = [update_norm(CheckedReply(0, a, 1, {}), GLOBAL) for a in honest]
    return distance / float(np.median(norms))


# ------------------------------------------------------------------------------------------ weights
def _claim(node, pid, count=3, claim=5, **metrics):
    return CheckedReply(node, {}, claim, {"partition-id": pid, "num-partitions": count, **metrics})


def test_partition_weights_are_the_servers_sizes_never_the_claim():
    weigh = PartitionWeights(lambda count: [50, 300, 1000][:count], 3)
    replies = [_claim(n, pid, claim=claim) for n, claim, pid in ((1, 10**9, 0), (2, 7, 1), (3, 1000, 2))]
    assert weigh(replies) == [50, 300, 1000]
    assert "is node 2's in this run" in weigh(replies + [_claim(4, 1)])[-1]
    assert "split the pool into 3" in weigh([_claim(5, 0, count=1)])[0]  # a bigger "partition"
    assert "outside" in weigh([_claim(6, 3)])[0]
    assert "names no partition" in weigh([CheckedReply(7, {}, 5, {})])[0]


def test_the_partition_count_is_the_runs_and_a_wrong_one_costs_only_its_node():
    """A node naming 7 partitions (a typo would do), even first, is rejected; the five others are weighed."""
    weigh = PartitionWeights(lambda count: list(range(10, 10 + count)), 6)
    first = [_claim(6, 0, count=7)] + [_claim(n, n - 1, count=6) for n in range(1, 6)]
    got = weigh(first)
    assert "split the pool into 6" in got[0] and got[1:] == [10, 11, 12, 13, 14]
    lazy = PartitionWeights(lambda count: [1] * count, count_nodes=lambda: 4)  # no node at the start: fixed later
    assert lazy([_claim(1, 0, count=7)])[0].startswith("names 7") and lazy.num_partitions == 4


def test_a_stolen_partition_goes_to_the_node_the_server_picks_whatever_the_node_order():
    picks = []

    def decide(pid, claimants):
        picks.append((pid, sorted(r.node_id for r in claimants)))
        return 9  # the server's judgement (a run: fit to the partition's data), not the lower node id

    weigh = PartitionWeights(lambda count: [50, 300, 1000], 3, decide=decide)
    got = weigh([_claim(1, 0), _claim(2, 1), _claim(9, 1)])
    assert got[0] == 50 and "is node 9's" in got[1] and got[2] == 300 and picks == [(1, [2, 9])]
    assert weigh.contested == {1: [2, 9]}
    assert "is node 9's" in weigh([_claim(2, 1), _claim(9, 1)])[0] and len(picks) == 1  # settled for the run
    assert "is node 9's" in weigh([_claim(2, 1)])[0]  # even when the owner is absent
    undecided = PartitionWeights(lambda count: [50, 300, 1000], 3, decide=lambda pid, c: 1 / 0)
    assert all("could not tell" in w for w in undecided([_claim(1, 2), _claim(2, 2)]))
    assert undecided([_claim(2, 2)]) == [1000]  # decided when it is named alone


def test_a_weight_policy_failure_costs_only_the_replies_it_fails_on():
    def weigh(replies):
        if any(r.node_id == 3 for r in replies):
            raise KeyError("node 3's identity")
        return [100 * r.node_id for r in replies]

    assert weigh_each(weigh, [CheckedReply(n, {}, 1, {}) for n in (1, 2, 3)])[:2] == [100, 200]
    assert "KeyError" in weigh_each(weigh, [CheckedReply(3, {}, 1, {})])[0]
    assert "not a positive integer" in weigh_each(lambda r: 1 / 0 if len(r) > 1 else [0],
                                                  [CheckedReply(1, {}, 1, {}), CheckedReply(2, {}, 1, {})])[0]


def test_silo_sizes_are_keyed_by_registered_key_or_name(tmp_path):
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps({"ab" * 32: 3000, "clinic-b": 200}))
    sizes = load_silo_sizes(path)
    identities = {1: ["ab" * 32, "clinic-a"], 2: ["cd" * 32, "clinic-b"], 3: ["ef" * 32, ""]}
    weigh = SiloSizes(sizes, lambda node_id: identities.get(node_id, []), str(path))
    replies = [CheckedReply(n, {}, 10**9, {"silo": 1}) for n in (1, 2, 3)]
    got = weigh(replies)
    assert got[:2] == [3000, 200]
    assert "node 3" in got[2] and "ef" * 32 in got[2] and "no size in silo-sizes" in got[2]
    for bad, match in (("[1, 2]", "JSON object"), ('{"a": 0}', "positive integers"), ('{"a": true}', "positive"),
                       ("{", "cannot read")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=match):
            load_silo_sizes(path)


def test_the_weight_mode_is_the_runs_never_one_replys_metric():
    sizes = lambda count: [10, 20, 30][:count]  # noqa: E731
    auto = AutoWeights(PartitionWeights(sizes, 3))
    parts = [_claim(n, n - 1, count=3) for n in (1, 2, 3)]
    one_silo = parts[:2] + [CheckedReply(3, {}, 10**6, {"silo": 1})]
    got = auto(one_silo)  # the first round fixes 'auto' by most replies: one silo's metric changes nothing
    assert got[:2] == [10, 20] and "own data" in got[2] and auto.source == "partitions"
    assert auto(parts) == [10, 20, 30]
    silos = AutoWeights(PartitionWeights(sizes, 3))
    assert silos([CheckedReply(n, {}, 10**6 * n, {"silo": 1}) for n in (1, 2)]) == [1, 1] and silos.source == "equal"
    assert silos(parts) == [1, 1, 1]  # fixed for the run
    assert AutoWeights(PartitionWeights(sizes, 3), mode="equal")(parts) == [1, 1, 1]
    with pytest.raises(ValueError, match="silo-sizes"):
        AutoWeights(PartitionWeights(sizes, 3), mode="silo-sizes")


def test_a_claim_changes_neither_the_weight_nor_any_bound():
    rng = np.random.default_rng(0)
    honest = [_honest(rng) for _ in range(5)]
    base = [_reply(a, n) for n, a in enumerate(honest, start=1)]
    liar = [_reply(a, n, **{"num-examples": 10**9 if n == 5 else 100}) for n, a in enumerate(honest, start=1)]
    plain, _, checked_plain = _aggregate(base)
    lied, _, checked_lied = _aggregate(liar)
    assert checked_plain.clip_bound == checked_lied.clip_bound
    assert all(np.array_equal(plain[k], lied[k]) for k in GLOBAL)
    assert [o.weight for o in checked_lied.outcomes] == [1] * 5


# ------------------------------------------------------------------------------------------ influence
def _pull(reply: CheckedReply, center: dict, share: float) -> float:
    """A reply's pull on the weighted mean: its weight share x its update's distance from ``center``."""
    return share * np.sqrt(sum(float(np.sum((reply.arrays[k].astype(np.float64) - GLOBAL[k] - center[k]) ** 2))
                               for k in PARAMS))


INFLUENCE = 0.3  # the influence bound's usual setting (off by default)


def test_an_inflated_updates_pull_is_bounded_and_honest_ones_are_left_as_sent():
    rng = np.random.default_rng(1)
    honest = [_honest(rng) for _ in range(5)]
    attacker = _with_update(_honest(rng), -50.0)  # reversed, 50x the honest length
    replies = [CheckedReply(n, a, 1, {}) for n, a in enumerate(honest + [attacker], start=1)]
    messages = [_reply(a, n) for n, a in enumerate(honest + [attacker], start=1)]
    _, _, by_default = _aggregate(messages)  # the deviation bound
    assert by_default.bound_kind == "deviation" and by_default.rejected == []
    assert [o.clip_scale for o in by_default.outcomes][:5] == [1.0] * 5 and by_default.outcomes[5].clip_scale < 0.05
    _, _, checked = _aggregate(messages, influence_bound=INFLUENCE, deviation_bound=0.0)
    assert checked.rejected == []
    outcome = {o.node_id: o for o in checked.outcomes}
    assert outcome[6].clip_scale < 0.05 and all(outcome[n].clip_scale == 1.0 for n in range(1, 6))
    median_norm = sorted(update_norm(r, GLOBAL) for r in replies)[2]
    assert checked.clip_bound == pytest.approx(INFLUENCE * median_norm)
    center = median_update(replies, GLOBAL, update_keys(GLOBAL))
    accepted = {r.node_id: r for r in checked.accepted}
    assert _pull(accepted[6], center, 1 / 6) == pytest.approx(checked.clip_bound, rel=1e-5)
    assert all(np.array_equal(accepted[n].arrays[k], honest[n - 1][k]) for n in range(1, 6) for k in PARAMS)


@pytest.mark.parametrize("attack", ["inflated", "flip at honest length", "flip inflated"])
def test_damage_is_bounded_by_the_defaults(attack):
    """D <= 0.5 with 1 attacker of 6 and <= 1.1 with 2 of 6 (equal weights), for any direction: each attacker
    moves the mean by at most β / n × the round's median distance from the median update, plus the median's
    own shift."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        factor = {"inflated": 30.0, "flip at honest length": -1.0, "flip inflated": -30.0}[attack]
        for attackers, limit in ((1, 0.5), (2, 1.1)):
            honest = [_honest(rng) for _ in range(6 - attackers)]
            mean_update = {k: (np.mean([a[k] for a in honest], axis=0).astype(v.dtype) if v.dtype.kind == "f" else v)
                           for k, v in GLOBAL.items()}
            bad = [_with_update(mean_update, factor) for _ in range(attackers)]
            damage = _damage(honest, bad)
            assert damage <= limit, (seed, attackers, damage)
            undefended = _damage(honest, bad, clip_multiplier=0.0, influence_bound=0.0, deviation_bound=0.0)
            if abs(factor) > 1:
                assert undefended > 2 * limit  # the bound, not the attack, keeps D small


def test_silos_holding_half_the_data_cannot_buy_influence_with_their_weight():
    """Two reversed Sybils with 47 % of the server's weight: the influence bound (``influence-bound=0.3``) keeps
    D <= 1.0 (each pulls at most 0.3 x the median norm); a length bound alone (norm clip, even with no weight
    factor) does not, nor does the default deviation bound, which lets a silo the operator made large keep
    its share (docs/RELIABILITY.md)."""
    rng = np.random.default_rng(10)
    honest = [_honest(rng) for _ in range(4)]
    mean_update = {k: (np.mean([a[k] for a in honest], axis=0).astype(v.dtype) if v.dtype.kind == "f" else v)
                   for k, v in GLOBAL.items()}
    bad = [_with_update(mean_update, -30.0) for _ in range(2)]
    sizes = {1: 100, 2: 100, 3: 100, 4: 100, 5: 180, 6: 180}

    def weigh(replies):
        return [sizes[r.node_id] for r in replies]

    assert _damage(honest, bad, weigh=weigh, influence_bound=INFLUENCE, deviation_bound=0.0) <= 1.0
    assert _damage(honest, bad, weigh=weigh, influence_bound=0.0, deviation_bound=0.0) > 1.5
    assert 1.0 < _damage(honest, bad, weigh=weigh) <= 2.0


def test_the_influence_bound_needs_a_median_of_three():
    rng = np.random.default_rng(9)
    replies = [CheckedReply(1, _honest(rng), 1, {}), CheckedReply(2, _with_update(_honest(rng), -100.0), 1, {})]
    bounded, scales, limit = bound_influence(replies, GLOBAL, DEFAULT_INFLUENCE_BOUND)
    assert bounded == replies and scales == [1.0, 1.0] and limit is None  # two-silo rounds: the norm clip


def test_bn_statistics_cannot_leave_the_other_replies_range():
    rng = np.random.default_rng(2)
    honest = [_honest(rng) for _ in range(5)]
    shifted = dict(_honest(rng))
    shifted["bn.running_mean"] = shifted["bn.running_mean"] + np.float32(1.2)  # ~1.2 sigma, inside every bound
    shifted["bn.running_var"] = shifted["bn.running_var"] * np.float32(50.0)
    arrays, _, checked = _aggregate([_reply(a, n) for n, a in enumerate(honest + [shifted], start=1)])
    assert checked.rejected == []
    for key in ("bn.running_mean", "bn.running_var"):
        stack = np.stack([a[key] for a in honest])
        assert (arrays[key] <= stack.max(0) + 1e-7).all() and (arrays[key] >= stack.min(0) - 1e-7).all(), key
    assert {o.node_id: o.bn_clamped for o in checked.outcomes}[6] == 8


def test_a_bn_running_variance_of_zero_is_rejected():
    rng = np.random.default_rng(3)
    bad = _honest(rng)
    bad["bn.running_var"][2] = 0.0
    _, _, checked = _aggregate([_reply(bad, 1)] + [_reply(_honest(rng), n) for n in (2, 3, 4)])
    assert [n for n, _ in checked.rejected] == [1] and "<= 0" in checked.rejected[0][1]


def test_clamp_and_bounds_leave_honest_lookalikes_alone():
    rng = np.random.default_rng(4)
    replies = [CheckedReply(n, _honest(rng), 1, {}) for n in range(6)]
    bounded, scales, limit = bound_influence(replies, GLOBAL, INFLUENCE)
    assert scales == [1.0] * 6 and limit > 0 and all(b is r for b, r in zip(bounded, replies))
    bounded, scales, limit = bound_deviation(replies, GLOBAL, DEFAULT_DEVIATION_BOUND)
    assert scales == [1.0] * 6 and limit > 0 and all(b is r for b, r in zip(bounded, replies))
    clipped, scales, bound = clip_updates(replies, GLOBAL, 2.0)
    assert scales == [1.0] * 6 and bound > 0
    _, counts = clamp_bn_statistics(clipped, GLOBAL)
    assert sum(counts) == 2 * 2 * 4  # each coordinate's extreme pair, nothing else


def test_a_larger_silos_bound_grows_with_its_server_weight_only():
    """A silo of 16x the median size may send an update up to 16 ** 0.25 = 2x longer before it is clipped;
    the factor comes from the server's weight (num_examples after weighing), so a claim cannot buy it."""
    rng = np.random.default_rng(7)
    sizes = [100, 100, 100, 100, 1600]
    replies = [CheckedReply(n, _with_update(_honest(rng), 2.5 if size > 100 else 1.0), size, {})
               for n, size in enumerate(sizes)]
    _, scales, bound = clip_updates(replies, GLOBAL, 1.5)
    assert scales == [1.0] * 5  # 2.5x the median norm, inside 1.5 x 2 = 3x
    equal = [replace(r, num_examples=1) for r in replies]
    _, scales_equal, bound_equal = clip_updates(equal, GLOBAL, 1.5)
    assert bound_equal == bound and scales_equal[4] < 0.7  # the same update, without the weight, is cut
    longer = replies[:4] + [replace(replies[4], arrays=_with_update(replies[4].arrays, 2.0))]
    clipped, scales_long, _ = clip_updates(longer, GLOBAL, 1.5)
    assert update_norm(clipped[4], GLOBAL) == pytest.approx(2 * bound, rel=1e-5)  # at most 2 x tau


# ------------------------------------------------------------------------------------------ fail closed
def test_two_valid_replies_keep_the_model_under_the_defaults():
    rng = np.random.default_rng(5)
    replies = [_reply(_honest(rng), 1), _reply(_honest(rng), 2),
               Message(error=Error(code=2, reason="x"), metadata=_metadata(3))]
    arrays, metrics, checked = _aggregate(replies)
    assert arrays is None and metrics is None and len(checked.accepted) == 2


def test_two_silo_mode_clips_to_the_smaller_update():
    """min-valid-replies=2: a median of two cannot tell which silo lies; the larger update is cut to
    2 x the smaller one, so one silo cannot replace the model (it can still pull it, by that much)."""
    rng = np.random.default_rng(6)
    honest = _honest(rng)
    huge = _with_update(_honest(rng), 1240.0)
    arrays, _, checked = _aggregate([_reply(honest, 1), _reply(huge, 2)], min_valid_replies=2)
    assert arrays is not None and checked.rejected == []
    honest_norm = update_norm(CheckedReply(1, honest, 1, {}), GLOBAL)
    moved = np.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - GLOBAL[k]) ** 2)) for k in PARAMS))
    assert moved <= 1.5 * honest_norm + 1e-6  # (1 + 2) / 2 x the honest norm at most


def test_a_simulation_with_fewer_nodes_than_min_valid_replies_is_refused(fedsq_cache, tmp_path):
    from local_grid import LocalGrid, run_server

    config = {"num-server-rounds": 1, "max-train-samples": 300, "out-dir": str(tmp_path), "device": "cpu",
              "min-valid-replies": 4}
    with pytest.raises(ConfigError, match="min-valid-replies=4 but the simulation has 3 nodes.*two-silo"):
        run_server(config, LocalGrid(config))


def test_removed_keys_fail_with_their_replacement():
    for key in ("max-update-norm-ratio", "max-num-examples-ratio", "max-num-examples", "direction-bound"):
        with pytest.raises(ConfigError, match=f"'{key}' is gone"):
            RunConfig.from_mapping({key: 5})
    with pytest.raises(ConfigError, match="clip-multiplier"):
        RunConfig.from_mapping({"clip-multiplier": 0.5})


# ------------------------------------------------------------------------------------------ packed arrays
def test_packed_arrays_round_trip_and_are_read_by_the_receivers_own_layout():
    arrays = _honest(np.random.default_rng(8))
    record = pack(arrays)
    assert sorted(record.keys()) == ["packed/float32", "packed/int64"]  # 6 tensors, 2 arrays on the wire
    back = decode_arrays(record, GLOBAL)
    assert list(back) == list(GLOBAL) and all(np.array_equal(back[k], arrays[k]) for k in GLOBAL)
    assert all(back[k].dtype == GLOBAL[k].dtype and back[k].shape == GLOBAL[k].shape for k in GLOBAL)
    _, _, checked = _aggregate([_reply(a, n) for n, a in enumerate([_honest(np.random.default_rng(n))
                                                                     for n in range(3)], start=1)])
    packed = [_reply(_honest(np.random.default_rng(n)), n + 1) for n in range(3)]
    for reply in packed:
        reply.content["arrays"] = pack_record(reply.content["arrays"])
    _, _, checked_packed = _aggregate(packed)
    assert [r.arrays.keys() for r in checked_packed.accepted] == [r.arrays.keys() for r in checked.accepted]
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for a, b in zip(checked.accepted, checked_packed.accepted)
               for k in GLOBAL)


@pytest.mark.parametrize("forgery, reason", [
    ("short payload", "decodes to float32[3], expected float32"),
    ("complex payload", "decodes to complex128"),
    ("one array too many", "differ from the global model's"),
    ("missing int64", "differ from the global model's"),
    ("mixed with a per-key array", "array keys differ"),
])
def test_a_packed_reply_is_checked_on_what_it_decodes_to(forgery, reason):
    rng = np.random.default_rng(9)
    record = pack(_honest(rng))
    declared = record["packed/float32"]
    if forgery in ("short payload", "complex payload"):
        carried = Array(np.zeros(3, np.float32) if forgery == "short payload" else np.full(declared.shape, 1 + 1j))
        record["packed/float32"] = Array(dtype=declared.dtype, shape=tuple(declared.shape), stype=carried.stype,
                                         data=carried.data)
    elif forgery == "one array too many":
        record["packed/float64"] = Array(np.zeros(2))
    elif forgery == "missing int64":
        del record["packed/int64"]
    else:
        record["fc.weight"] = Array(GLOBAL["fc.weight"])
    bad = _reply(_honest(rng), 1)
    bad.content["arrays"] = record
    _, _, checked = _aggregate([bad] + [_reply(_honest(rng), n) for n in (2, 3, 4)])
    assert [n for n, _ in checked.rejected] == [1] and reason in checked.rejected[0][1], checked.rejected


# ------------------------------------------------------------------------------------------ fuzz
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e308, 1e15, 0.0]))
DTYPES = st.sampled_from(["float32", "float64", "float16", "complex64", "complex128", "int64", "int32", "bool",
                          "uint8"])
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def forged_array(draw, key: str):
    """An Array for ``key``: honest, with odd values, or declaring one dtype/shape while carrying another."""
    template = GLOBAL[key]
    kind = draw(st.sampled_from(["honest", "values", "payload", "metadata", "bytes"]))
    value = (template + np.float32(0.01)) if template.dtype.kind == "f" else template.copy()
    if kind == "values" and template.dtype.kind == "f":
        value = value.copy()
        with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf: one more forged value
            value.flat[draw(st.integers(0, value.size - 1))] = np.float32(draw(FLOATS))
    if kind in ("payload", "metadata"):
        payload = np.zeros(draw(SHAPES), dtype=draw(DTYPES))
        honest_array = Array(np.ascontiguousarray(payload))
        if kind == "payload":  # declares the template's dtype and shape, carries something else
            return Array(dtype=str(template.dtype), shape=tuple(template.shape), stype=honest_array.stype,
                         data=honest_array.data)
        return honest_array
    if kind == "bytes":
        return Array(dtype=str(template.dtype), shape=tuple(template.shape), stype="numpy.ndarray",
                     data=draw(st.binary(max_size=64)))
    return Array(np.ascontiguousarray(value))


@st.composite
def forged_packed(draw, honest: ArrayRecord, key: str):
    """One array of a packed record (``core/packing.py``): honest, with odd values, or declaring the honest
    flat dtype and length while carrying another; a key the layout does not have carries anything."""
    if key not in honest:
        return Array(np.zeros(draw(SHAPES), dtype=draw(DTYPES)))
    declared = honest[key]
    value = declared.numpy().copy()
    kind = draw(st.sampled_from(["honest", "values", "payload", "bytes"]))
    if kind == "values" and value.dtype.kind == "f":
        with np.errstate(over="ignore"):
            value[draw(st.integers(0, value.size - 1))] = np.float32(draw(FLOATS))
    if kind == "payload":
        carried = Array(np.zeros(draw(SHAPES), dtype=draw(DTYPES)))
        return Array(dtype=declared.dtype, shape=tuple(declared.shape), stype=carried.stype, data=carried.data)
    if kind == "bytes":
        return Array(dtype=declared.dtype, shape=tuple(declared.shape), stype="numpy.ndarray",
                     data=draw(st.binary(max_size=64)))
    return Array(value)


METRIC_VALUES = st.one_of(FLOATS, st.integers(-2**62, 2**62), st.booleans(), st.none(), st.text(max_size=3),
                          st.lists(st.integers(0, 3), max_size=2))


@st.composite
def forged_reply(draw, node_id: int):
    kind = draw(st.sampled_from(["reply", "packed", "error", "empty", "extra-record"]))
    if kind == "error":
        return Message(error=Error(code=draw(st.integers(0, 5)), reason=draw(st.text(max_size=5))),
                       metadata=_metadata(node_id))
    if kind == "empty":
        return Message(content=RecordDict(), metadata=_metadata(node_id))
    keys = draw(st.lists(st.sampled_from(sorted(GLOBAL) + ["extra"]), unique=True, min_size=len(GLOBAL) - 1,
                         max_size=len(GLOBAL) + 1))
    arrays = ArrayRecord({k: draw(forged_array(k)) if k in GLOBAL else Array(np.zeros(2, np.float32)) for k in keys})
    if kind == "packed":  # as the ClientApp sends Q: one flat array per dtype
        honest = pack({k: (v + np.float32(0.01)) if v.dtype.kind == "f" else v for k, v in GLOBAL.items()})
        keys = draw(st.lists(st.sampled_from(sorted(honest.keys()) + ["packed/float64", "extra"]), unique=True,
                             min_size=1, max_size=3))
        arrays = ArrayRecord({k: draw(forged_packed(honest, k)) for k in keys})
    metrics = MetricRecord()
    values = draw(st.dictionaries(st.sampled_from(["num-examples", "train_loss", "partition-id", "x"]),
                                  METRIC_VALUES, max_size=4))
    metrics.__dict__["_data"].update(values)  # what MetricRecord's own type check would refuse, too
    content = {"arrays": arrays, "metrics": metrics}
    if kind == "extra-record":
        content["config"] = ConfigRecord({"x": 1})
    return Message(content=RecordDict(content), metadata=_metadata(node_id))


FUZZ_CASES = 2000


@settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), aggregation=st.sampled_from(sorted(AGGREGATIONS)),
       floor=st.integers(1, 3))
def test_fuzzed_rounds_never_raise_and_the_aggregate_is_always_finite(data, aggregation, floor):
    count = data.draw(st.integers(1, 6))
    forged = [data.draw(forged_reply(node_id)) for node_id in range(1, count + 1)]
    honest = [_reply(_honest(np.random.default_rng(n)), 100 + n) for n in range(data.draw(st.integers(0, 3)))]
    for reply in honest[: data.draw(st.integers(0, len(honest)))]:
        reply.content["arrays"] = pack_record(reply.content["arrays"])
    strategy = _strategy(aggregation=aggregation, min_valid_replies=floor, direction_check=data.draw(st.sampled_from([0.0, 0.2])))
    strategy.opposition.nodes = set(range(1, 7)) | set(range(100, 104))  # every node opposed before: checked
    strategy.judge = data.draw(st.sampled_from([None, _loss_towards(1.0), lambda arrays: float("nan")]))
    arrays, metrics = strategy.aggregate_train(1, forged + honest)  # must not raise
    checked = strategy.round_replies[1]
    assert len(checked.accepted) + len(checked.rejected) == len(forged) + len(honest)
    assert all(reason for _, reason in checked.rejected)
    if arrays is None:
        assert len(checked.accepted) < floor or not checked.accepted
        return
    for key, template in GLOBAL.items():
        value = arrays[key].numpy()
        assert value.dtype == template.dtype and value.shape == template.shape
        if value.dtype.kind == "f":
            assert np.isfinite(value).all()
    assert all(np.isfinite(v) for v in dict(metrics).values())
    assert float(arrays["bn.running_var"].numpy().min()) > 0


def test_screen_replies_never_raises_on_a_weight_policy_failure():
    def broken(replies):
        raise RuntimeError("SuperLink unreachable")

    rng = np.random.default_rng(7)
    checked = screen_replies([_reply(_honest(rng), n) for n in (1, 2, 3)], GLOBAL, weigh=broken)
    assert checked.accepted == [] and all("could not weigh" in r for _, r in checked.rejected)


# ------------------------------------------------------------------------------------------ deviation bound
def test_the_deviation_bound_cuts_an_outlier_but_not_a_large_silo_for_its_weight():
    """Each update's distance from the median update is bounded by β × the round's median distance, widened
    by √(weight / median weight): a large honest silo's longer update passes; the same update from a silo of
    median weight, or a far longer one, is pulled back to its allowance."""
    rng = np.random.default_rng(11)
    base = [CheckedReply(n, _honest(rng), 100, {}) for n in range(1, 6)]
    keys = update_keys(GLOBAL)
    _, devs = deviations(base, GLOBAL, keys)
    typical = sorted(devs)[2]
    longer = _with_update(_honest(rng), 6.0)
    large = replace(base[4], arrays=longer, num_examples=4900)  # 49 x the median weight: allowance x 7
    _, scales, median_dev = bound_deviation(base[:4] + [large], GLOBAL, 3.0)
    assert scales == [1.0] * 5 and median_dev > 0
    small = replace(large, num_examples=100)
    bounded, scales, median_dev = bound_deviation(base[:4] + [small], GLOBAL, 3.0)
    assert scales[:4] == [1.0] * 4 and scales[4] < 1  # cut to exactly its allowance
    center = median_update(base[:4] + [small], GLOBAL, keys)
    moved = np.sqrt(sum(float(np.sum((bounded[4].arrays[k].astype(np.float64) - GLOBAL[k] - center[k]) ** 2))
                        for k in keys))
    assert moved == pytest.approx(3.0 * median_dev, rel=1e-4)
    huge = replace(base[4], arrays=_with_update(base[4].arrays, 1000.0))
    bounded, scales, median_dev = bound_deviation(base[:4] + [huge], GLOBAL, 3.0)
    assert scales[:4] == [1.0] * 4 and scales[4] < 0.05
    assert bound_deviation(base[:2], GLOBAL, 3.0)[2] is None and bound_deviation(base, GLOBAL, 0.0)[2] is None
    assert typical > 0


def test_the_deviation_bound_is_the_rounds_bound_when_the_influence_bound_is_off():
    rng = np.random.default_rng(12)
    honest = [_reply(_honest(rng), n) for n in range(1, 6)]
    hostile = _reply(_with_update(_honest(rng), -50.0), 6)
    arrays, _, checked = _aggregate(honest + [hostile], influence_bound=0.0, deviation_bound=3.0)
    assert checked.bound_kind == "deviation" and arrays is not None
    outcome = checked.outcomes[-1]
    assert outcome.clip_scale < 0.1 and outcome.update_norm > 0 and outcome.deviation > 0
    assert "deviation bounded" in bound_note(checked, outcome.clip_scale)

def test_flowers_krum_multi_krum_and_bulyan_leave_out_the_outlier():
    rng = np.random.default_rng(13)
    honest = [CheckedReply(n, _honest(rng), 100, {}) for n in range(1, 7)]
    outlier = CheckedReply(7, _with_update(_honest(rng), -40.0), 100, {})
    replies = honest + [outlier]
    clean = aggregate(honest, GLOBAL, "mean")
    for method in ("krum", "multi-krum", "bulyan"):
        got = aggregate(replies, GLOBAL, method, 0.2)  # f = 1 of 7
        assert set(got) == set(GLOBAL) and all(got[k].dtype == GLOBAL[k].dtype for k in GLOBAL)
        far = np.sqrt(sum(float(np.sum((got[k].astype(np.float64) - clean[k]) ** 2)) for k in PARAMS))
        poisoned = np.sqrt(sum(float(np.sum((aggregate(replies, GLOBAL, "mean")[k].astype(np.float64) - clean[k]) ** 2))
                               for k in PARAMS))
        assert far < 0.2 * poisoned, method
    assert np.array_equal(aggregate(replies, GLOBAL, "krum", 0.2)["conv.weight"],
                          aggregate(list(reversed(replies)), GLOBAL, "krum", 0.2)["conv.weight"])


# ------------------------------------------------------------------------------------------ across rounds
def test_alignment_is_the_cosine_with_the_rounds_median_update():
    keys = update_keys(GLOBAL)
    center = {k: np.full(GLOBAL[k].shape, 0.01) for k in keys}
    along = {k: (GLOBAL[k] + 0.03 if k in keys else GLOBAL[k]) for k in GLOBAL}
    against = {k: (GLOBAL[k] - 0.02 if k in keys else GLOBAL[k]) for k in GLOBAL}
    replies = [CheckedReply(n, a, 1, {}) for n, a in enumerate((along, against, GLOBAL))]
    assert np.allclose(alignments(replies, GLOBAL, keys, center), [1.0, -1.0, 0.0])


def test_the_direction_check_rejects_a_node_pulling_against_the_median_two_replies_running():
    """Round 1: the reversed node is only recorded (honest noise may point anywhere once). Round 2: its
    reply is rejected; round 3 it is rejected again and quarantined (the default, τ = 0.2). With the check off
    it is never rejected; honest nodes never are."""
    rng = np.random.default_rng(3)

    def round_of(strategy, server_round):
        honest = [_honest(rng) for _ in range(4)]
        reversed_ = _with_update(_honest(rng), -1.0)
        strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
        strategy.aggregate_train(server_round, [_reply(a, n) for n, a in enumerate(honest + [reversed_], start=1)])
        return strategy.round_replies[server_round]

    checked = _strategy()
    outcomes = [{o.node_id: o for o in round_of(checked, r).outcomes} for r in (1, 2, 3)]
    assert outcomes[0][5].accepted and outcomes[0][5].alignment < 0
    assert not outcomes[1][5].accepted and "points against the round's median update" in outcomes[1][5].reason
    assert not outcomes[2][5].accepted and [q["node_id"] for q in checked.quarantine.records] == [5]
    assert all(o[n].accepted and o[n].alignment > 0 for o in outcomes for n in range(1, 5))
    unchecked = _strategy(direction_check=0.0)
    assert all(o.accepted for r in (1, 2, 3) for o in round_of(unchecked, r).outcomes)
    assert all(o.alignment is not None for r in (1, 2, 3) for o in unchecked.round_replies[r].outcomes)  # recorded


@pytest.mark.parametrize("count", [4, 5])
def test_the_median_update_taken_a_slice_at_a_time_is_the_whole_arrays_median(monkeypatch, count):
    """Slicing bounds the median's memory (a model-sized float64 stack per reply otherwise) and changes no value."""
    rng = np.random.default_rng(count)
    replies = [CheckedReply(node_id=n, arrays=_honest(rng), num_examples=100, metrics={}) for n in range(count)]
    keys = update_keys(GLOBAL)
    whole = {k: np.median(np.stack([r.arrays[k].astype(np.float64) for r in replies]), axis=0)
             - GLOBAL[k].astype(np.float64) for k in keys}
    monkeypatch.setattr(defenses, "MEDIAN_SLICE", 7)  # conv.weight's 108 coordinates: 16 slices, the last short
    sliced = median_update(replies, GLOBAL, keys)
    assert all(np.array_equal(sliced[k], whole[k]) and sliced[k].shape == GLOBAL[k].shape for k in keys)


def test_the_server_keeps_only_the_current_rounds_reply_arrays():
    """A long run must not hold every round's replies: earlier rounds keep their nodes, weights and metrics
    (results.json and model delivery read them), not their arrays (a model per reply, round after round)."""
    rng = np.random.default_rng(5)
    strategy = _strategy()
    for server_round in (1, 2, 3):
        strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
        strategy.aggregate_train(server_round, [_reply(_honest(rng), n) for n in range(1, 6)])
    for server_round in (1, 2, 3):
        accepted = strategy.round_replies[server_round].accepted
        assert [r.node_id for r in accepted] == [1, 2, 3, 4, 5]
        assert all(r.num_examples > 0 and r.metrics for r in accepted)
        held = [bool(r.arrays) for r in accepted]
        assert held == [server_round == 3] * 5, (server_round, held)


def test_the_direction_check_lets_a_slightly_opposed_update_through_and_rejects_a_clearly_opposed_one():
    """τ = 0.2: with the node opposed the round before, cosine −0.1 passes, −0.5 is rejected; a node not
    opposed before passes at any cosine; τ = 0 checks nothing."""
    step = {k: np.full(GLOBAL[k].shape, 0.01, np.float32) for k in PARAMS}
    across = np.resize(np.array([1.0, -1.0], np.float32), GLOBAL["conv.weight"].shape)

    def arrays(along: float, sideways: float) -> dict:
        return {k: (GLOBAL[k] + along * step[k] + (sideways * 0.01 * across if k == "conv.weight" else 0)
                    ).astype(np.float32) if k in PARAMS else GLOBAL[k] for k in GLOBAL}

    honest = [_reply(arrays(1.0, 0.0), n) for n in range(1, 5)]
    norm = np.sqrt(sum(float(np.sum(step[k] ** 2)) for k in PARAMS))
    sideways_for = lambda cos: np.sqrt((1 / cos ** 2 - 1)) * norm / (0.01 * np.linalg.norm(across))  # noqa: E731
    slight, clear = arrays(-1.0, sideways_for(0.1)), arrays(-1.0, sideways_for(0.5))
    for opponent, opposed_before, tau, rejected in ((slight, {9}, 0.2, False), (clear, {9}, 0.2, True),
                                                    (clear, set(), 0.2, False), (clear, {9}, 0.0, False)):
        checked = screen_replies(honest + [_reply(opponent, 9)], GLOBAL, opposed_before=frozenset(opposed_before),
                                 opposition=tau)
        outcome = {o.node_id: o for o in checked.outcomes}[9]
        assert outcome.accepted is not rejected and outcome.alignment < 0, (tau, outcome)


def test_a_round_computes_the_median_update_once_unless_the_direction_check_removes_replies(monkeypatch):
    """The median update (a sort per coordinate, seconds for a ResNet-18-sized round) is shared by the
    direction check, the recorded deviations and the deviation bound; a rejection changes the set of
    replies, and so the median, once."""
    from fedsq_app.core import defenses, replies as replies_module

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return defenses_median(*args, **kwargs)

    defenses_median = defenses.median_update
    monkeypatch.setattr(defenses, "median_update", counted)
    monkeypatch.setattr(replies_module, "median_update", counted)
    rng = np.random.default_rng(4)
    honest = [_reply(_honest(rng), n) for n in range(1, 5)]
    reversed_ = _reply(_with_update(_honest(rng), -1.0), 9)
    for opposed_before, expected in ((frozenset(), 1), (frozenset({9}), 2)):
        calls.clear()
        checked = screen_replies(honest + [reversed_], GLOBAL, opposition=0.2, opposed_before=opposed_before)
        assert len(calls) == expected and len(checked.accepted) == 6 - expected, opposed_before


# ------------------------------------------------------------------------------------------ the judge
def _judged_rounds(judge, rounds=3, factor=-10.0, seed=3):
    """Rounds of 4 honest nodes and node 5 sending ``factor`` x an honest update (IPM at ε = 10 by default),
    under the default direction check with ``judge`` (None: the repeat rule)."""
    rng = np.random.default_rng(seed)
    strategy = _strategy()
    strategy.judge = judge
    for server_round in range(1, rounds + 1):
        honest = [_honest(rng) for _ in range(4)]
        strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
        strategy.aggregate_train(server_round, [_reply(a, n) for n, a in enumerate(honest + [_with_update(
            _honest(rng), factor)], start=1)])
    return strategy, [{o.node_id: o for o in strategy.round_replies[r].outcomes} for r in range(1, rounds + 1)]


def _loss_towards(sign: float):
    """A validation loss whose best model lies one honest step (``_honest``'s shared +0.01) times ``sign`` away."""
    return lambda arrays: sum(float(np.sum((arrays[k].astype(np.float64) - GLOBAL[k] - sign * 0.01) ** 2))
                              for k in PARAMS)


def test_the_judge_rejects_an_opposed_reply_the_round_is_worse_with_from_its_first_reply():
    """IPM at ε = 10: the repeat rule lets the first reply in (bounded) and rejects the next; the judge rejects
    it from round 1, with both losses in the reason and in ``judged``, and the node is quarantined after two."""
    _, repeat = _judged_rounds(None)
    assert repeat[0][5].accepted and not repeat[1][5].accepted
    strategy, outcomes = _judged_rounds(_loss_towards(+1.0))
    assert all(not o[5].accepted and "lower loss on the server's validation split" in o[5].reason
               for o in outcomes[:2])
    with_, without = strategy.judged[1][5]
    assert without < with_
    assert {q["node_id"] for q in strategy.quarantine.records} == {5}
    assert all(o[n].accepted for o in outcomes for n in range(1, 5))


def test_the_judge_keeps_an_opposed_reply_the_round_is_better_with_round_after_round():
    """An update against the others that the server's validation data agrees with (a silo whose data the
    others lack) stays, every round, as sent: no rejection, no quarantine."""
    strategy, outcomes = _judged_rounds(_loss_towards(-1.0), factor=-1.0)
    assert all(o[5].accepted and o[5].alignment < -0.2 for o in outcomes)
    assert all(strategy.judged[r][5][1] >= strategy.judged[r][5][0] for r in (1, 2, 3))
    assert not strategy.quarantine.records


def test_a_failing_or_non_finite_judge_never_raises_and_never_rejects_for_nothing():
    def raising(arrays):
        raise RuntimeError("no validation data")

    _, outcomes = _judged_rounds(raising, rounds=1)
    assert all(o.accepted for o in outcomes[0].values())  # the judge failed: nothing is removed
    losses = iter([float("nan")])  # the round with every reply first, then each leave-one-out
    _, outcomes = _judged_rounds(lambda arrays: next(losses, 1.0), rounds=1)
    assert not outcomes[0][5].accepted  # with it the loss is not finite, without it it is
    _, outcomes = _judged_rounds(lambda arrays: float("nan"), rounds=1)
    assert all(o.accepted for o in outcomes[0].values())  # no finite loss either way: nothing to tell by


def test_the_judge_also_judges_a_reply_the_bound_scaled_whatever_its_direction():
    """An update along the others' but ten times as long (cosine > 0, beyond the deviation bound): judged, and
    rejected where the round is worse with it; honest replies within the bound are never judged."""
    strategy, outcomes = _judged_rounds(_loss_towards(+1.0), rounds=1, factor=10.0)
    assert outcomes[0][5].alignment > 0 and not outcomes[0][5].accepted
    assert "beyond the round's bound" in outcomes[0][5].reason and set(strategy.judged[1]) == {5}


def test_judge_replies_judges_only_suspects():
    from fedsq_app.core.judge import judge_replies

    calls = []
    replies = [_reply(_honest(np.random.default_rng(n)), n) for n in range(1, 5)]
    checked = screen_replies(replies, GLOBAL, opposition=0.2)
    assert judge_replies(checked, 0.2, lambda r: calls.append(r) or 0.0) == (checked, {})
    assert not calls  # nothing opposed, nothing bounded: no evaluation at all


def test_reply_judge_is_a_checked_setting():
    assert RunConfig.from_mapping({}).reply_judge == "validation"
    assert RunConfig.from_mapping({"reply-judge": "repeat"}).reply_judge == "repeat"
    with pytest.raises(ConfigError, match="reply-judge='validaton'.*did you mean 'validation'"):
        RunConfig.from_mapping({"reply-judge": "validaton"})


def test_two_reply_rounds_are_not_judged():
    """With two valid replies a rejection could only keep the previous model: the norm clip bounds them instead."""
    from fedsq_app.core.judge import judge_replies

    replies = [_reply(_honest(np.random.default_rng(1)), 1), _reply(_with_update(_honest(np.random.default_rng(2)),
                                                                                   10.0), 2)]
    checked = screen_replies(replies, GLOBAL, opposition=0.2)
    assert any(o.clip_scale < 1 for o in checked.outcomes)  # bounded by the two-reply clip
    assert judge_replies(checked, 0.2, lambda r: 1.0 / len(r))[0] is checked
