"""The attacks ``fedsq-defenses`` measures the defenses with (``fedsq_app.tools.attacks``): each must send
what its name says, or the damage table measures something else."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from flwr.app import Message, Metadata, MetricRecord, RecordDict

from fedsq_app.core import wire
from fedsq_app.core.defenses import distance, update_keys
from fedsq_app.core.packing import pack
from fedsq_app.tools.attacks import (UNDER_BOUND, across_honest, against_honest, alie, boosted, fixed_target, ipm,
                                     message_arrays, min_max_or_sum)

START = {"conv.weight": np.full((4, 3, 3, 3), 0.1, np.float32), "bn.running_mean": np.zeros(4, np.float32),
         "fc.weight": np.full((2, 4), -0.2, np.float32)}


def _honest(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0.01, 0.01, v.shape)).astype(v.dtype) for k, v in START.items()}


def _reply(arrays: dict) -> Message:
    metadata = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=0, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=RecordDict({wire.ARRAYS: pack(arrays), wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10})}),
                   metadata=metadata)


def _update(arrays: dict) -> np.ndarray:
    return np.concatenate([(arrays[k].astype(np.float64) - START[k]).ravel() for k in update_keys(START)])


def test_reversed_and_orthogonal_attacks_send_what_they_say_at_the_length_they_say():
    honest = [_honest(seed) for seed in range(4)]
    mean = np.mean([_update(h) for h in honest], axis=0)
    median_norm = float(np.median([distance(h, START, update_keys(START)) for h in honest]))
    for attack, cosine in ((against_honest(UNDER_BOUND), -1.0), (across_honest(UNDER_BOUND), 0.0)):
        hostile = [_reply(_honest(9))]
        attack(START, hostile, honest)
        sent = _update(message_arrays(hostile[0], START))
        assert np.linalg.norm(sent) == pytest.approx(UNDER_BOUND * median_norm, rel=1e-4)
        assert sent @ mean / (np.linalg.norm(sent) * np.linalg.norm(mean)) == pytest.approx(cosine, abs=1e-4)
        assert np.array_equal(message_arrays(hostile[0], START)["bn.running_mean"], _honest(9)["bn.running_mean"])


def test_boosted_scales_the_nodes_own_update():
    own = _honest(3)
    hostile = [_reply(own)]
    boosted(30.0)(START, hostile, [])
    assert np.allclose(_update(message_arrays(hostile[0], START)), 30 * _update(own), rtol=1e-4)
    assert math.isclose(UNDER_BOUND, 1.9)  # just inside the default clip-multiplier of 2 (two-silo rounds)


def _sent(attack, honest: list[dict]) -> np.ndarray:
    hostile = [_reply(_honest(9)), _reply(_honest(8))]
    attack(START, hostile, honest)
    first, second = (_update(message_arrays(reply, START)) for reply in hostile)
    assert np.allclose(first, second)  # colluders send the same update
    return first


def test_the_fields_attacks_send_what_the_papers_define():
    honest = [_honest(seed) for seed in range(5)]
    rows = np.stack([_update(h) for h in honest])
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    assert np.allclose(_sent(alie(1.0), honest), mean - std, atol=1e-6)
    assert np.allclose(_sent(ipm(0.1), honest), -0.1 * mean, atol=1e-6)
    assert np.allclose(_sent(ipm(10.0), honest), -10 * mean, atol=1e-5)
    pairwise = np.linalg.norm(rows[:, None] - rows[None], axis=2)
    for kind, within in (("min-max", lambda d: d.max() <= pairwise.max() * (1 + 1e-6)),
                         ("min-sum", lambda d: (d ** 2).sum() <= (pairwise ** 2).sum(axis=1).max() * (1 + 1e-6))):
        sent = _sent(min_max_or_sum(kind), honest)
        distances = np.linalg.norm(rows - sent, axis=1)
        assert within(distances), kind  # inside the honest spread ...
        assert sent @ mean < 0.5 * mean @ mean, kind  # ... and moved against the honest mean


def test_the_fixed_target_attack_pulls_one_bias_the_same_way_every_round():
    start = {**START, "fc.bias": np.zeros(2, np.float32)}
    honest = [{**_honest(seed), "fc.bias": np.full(2, 0.01, np.float32)} for seed in range(3)]
    directions = []
    for _ in range(2):
        hostile = [_reply({**_honest(9), "fc.bias": np.zeros(2, np.float32)})]
        fixed_target(length=100.0)(start, hostile, honest)
        sent = message_arrays(hostile[0], start)
        update = {k: sent[k].astype(np.float64) - start[k] for k in update_keys(start)}
        assert all(not update[k].any() for k in update if k != "fc.bias") and update["fc.bias"][1] == 0
        directions.append(update["fc.bias"][0])
    median = float(np.median([distance(h, start, update_keys(start)) for h in honest]))
    assert directions[0] == directions[1] == pytest.approx(100 * median, rel=1e-4)


def test_reports_of_one_experiment_merge_into_one_table(tmp_path):
    """Further arms of the same attacks, run later, join the earlier table; a later cell replaces an earlier
    one; reports of different sizes are refused rather than mixed."""
    import json

    from fedsq_app.tools.defense_report import main, merge

    def run(defense: str, seed: int, bva: float) -> dict:
        return {"scenario": "ALIE z=1 (1 of 6)", "defense": defense, "seed": seed, "bva": bva, "final_val": bva,
                "damage_mean": 0.1, "damage_max": 0.2, "rounds_kept": 0, "hostile_replies": 8,
                "hostile_rejected": 0, "hostile_clipped": 0}

    sizes = {"clients": 6, "num-server-rounds": 8, "dataset": "embedded", "max-train-samples": 1200, "alpha": 0.3,
             "seeds": [0], "wall_time_s": 60.0}
    first = {"experiment": "attacks", "sizes": sizes, "runs": [run("none", 0, 0.5), run("defaults", 0, 0.6)]}
    second = {"experiment": "attacks", "sizes": {**sizes, "seeds": [0, 1]},
              "runs": [run("krum", 0, 0.7), run("defaults", 0, 0.65)]}
    merged = merge([first, second])
    assert {(r["defense"], r["bva"]) for r in merged["runs"]} == {("none", 0.5), ("defaults", 0.65), ("krum", 0.7)}
    assert merged["sizes"]["wall_time_s"] == 120.0 and merged["sizes"]["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="different experiments or sizes"):
        merge([first, {**second, "sizes": {**sizes, "num-server-rounds": 4}}])
    paths = []
    for i, report in enumerate((first, second)):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps(report))
    main([*map(str, paths), "--out", str(tmp_path / "merged")])
    table = (tmp_path / "merged" / "summary.md").read_text()
    assert "| ALIE z=1 (1 of 6) | krum |" in table and (tmp_path / "merged" / "damage.png").is_file()


def test_an_honest_run_is_read_back_only_if_it_ran_the_same_settings(tmp_path):
    """A benchmark resumes from finished runs of the very config it asks for, whatever they were named; a run
    of other settings (the defaults of an older version) or one that did not finish is run again."""
    import json

    from fedsq_app.config import RunConfig
    from fedsq_app.server_app import config_json
    from fedsq_app.tools.defenses import finished_before

    config = RunConfig.from_mapping({"out-dir": str(tmp_path), "run-name": "cost-defaults-s0", "seed": 0})
    results = tmp_path / "results.json"
    assert not finished_before(results, config)
    recorded = {**config_json(config), "run-name": "cost-direction check-s0", "out-dir": "/elsewhere"}
    results.write_text(json.dumps({"config": recorded, "test_accuracy": 0.8}))
    assert finished_before(results, config)
    results.write_text(json.dumps({"config": recorded}))
    assert not finished_before(results, config)
    for key, value in (("direction-check", 0.35), ("seed", 1)):
        results.write_text(json.dumps({"config": {**recorded, key: value}, "test_accuracy": 0.8}))
        assert not finished_before(results, config), key
    older = {k: v for k, v in recorded.items() if k != "direction-check"}
    results.write_text(json.dumps({"config": older, "test_accuracy": 0.8}))
    assert not finished_before(results, config)
    # Written before the check had a judge: the repeat rule, not today's default; with the check off, the same run.
    unjudged = {k: v for k, v in recorded.items() if k != "reply-judge"}
    results.write_text(json.dumps({"config": unjudged, "test_accuracy": 0.8}))
    assert not finished_before(results, config)
    assert finished_before(results, RunConfig.from_mapping({"out-dir": str(tmp_path), "seed": 0,
                                                            "reply-judge": "repeat"}))
    off = {**unjudged, "direction-check": 0.0}
    results.write_text(json.dumps({"config": off, "test_accuracy": 0.8}))
    assert finished_before(results, RunConfig.from_mapping({"out-dir": str(tmp_path), "seed": 0,
                                                            "direction-check": 0.0}))


def test_the_honest_cost_counts_rejected_replies_by_silo_size_beside_the_bounded_ones():
    """A rejected honest reply is the bound's limit case (scale 0): the by-size table counts it in its silo's
    third, apart from the accepted replies it bounded."""
    from fedsq_app.tools.defense_report import scales_by_size

    run = {"honest_scales": [(10, None, 1.0, 0.1), (20, 0.8, 1.0, 0.1), (30, 0.4, 1.0, 0.1), (30, 1.0, 1.0, 0.1)],
           "honest_rejected_weights": [30, 10]}
    assert scales_by_size([run]) == {"smallest third": (2, 0, 0, 1), "middle third": (1, 1, 0, 0),
                                     "largest third": (3, 1, 1, 1)}
    bounded_to_nothing = {**run, "honest_scales": run["honest_scales"] + [(20, 0.0, 1.0, 0.1)]}
    assert scales_by_size([bounded_to_nothing])["middle third"] == (2, 2, 1, 0)  # accepted, not rejected


@pytest.mark.parametrize("judge", ["validation", "repeat"])
def test_ipm_colluders_are_judged_by_the_servers_validation_loss_from_their_first_reply(fedsq_cache, tmp_path, judge):
    """The real ServerApp and ClientApp, two IPM colluders (ε = 10) of six: the default judge rejects both from
    round 1, naming the two losses (results.json's ``judged``); the repeat rule lets their first replies in."""
    from fedsq_app.tools.attacks import ipm
    from fedsq_app.tools.defenses import run_one

    run = {"num-server-rounds": 2, "max-train-samples": 600, "probe-size": 0, "min-available-nodes": 6,
           "min-train-nodes": 6, "reply-judge": judge, "out-dir": str(tmp_path), "run-name": judge, "seed": 0}
    run_one(run, 6, ipm(10.0), hostile=2)
    first = json.loads((tmp_path / judge / "results.json").read_text())["rounds"][0]
    hostile = [r for r in first["replies"] if r["node_id"] in (1001, 1002)]
    assert len(hostile) == 2 and all(r["alignment"] < -0.2 for r in hostile)
    if judge == "validation":
        assert all(not r["accepted"] and "lower loss on the server's validation split" in r["reason"] for r in hostile)
        assert all(first["judged"][str(r["node_id"])][1] < first["judged"][str(r["node_id"])][0] for r in hostile)
    else:
        assert all(r["accepted"] for r in hostile) and first["judged"] == {}
    assert all(r["accepted"] for r in first["replies"] if r["node_id"] not in (1001, 1002))
