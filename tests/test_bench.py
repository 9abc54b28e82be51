"""Baselines (FedProx, FedAdam) and the benchmark grid: reports, resume, μ tuning."""

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam

from conftest import TINY_RUN
from fedsq_app.core.packing import decode_arrays
from fedsq_app.tools.bench.grid import Cell, main_cells, run_grid
from fedsq_app.tools.bench.presets import Preset, Setup
from fedsq_app.tools.bench.report import write_report
from fedsq_app.core.strategy import ValidatedFedAdam, ValidatedFedProx, parameter_keys


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch):
    """Messages built outside a running ServerApp need a run id (Flower sets it when a run starts)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class _Grid:
    """Just enough of a Grid for configure_train: two connected nodes."""

    def get_node_ids(self):
        return [11, 12]


def _reply(arrays: dict, num_examples: int, node_id: int) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                        message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"train_loss": 0.5, "num-examples": num_examples})})
    return Message(content=content, metadata=metadata)


# Flower's maths on claimed counts, with the trust model's bounds off: what these tests compare with Flower.
FLOWER_MATHS = dict(weigh=lambda replies: [r.claimed for r in replies], min_valid_replies=2, clip_multiplier=0.0,
                    influence_bound=0.0, deviation_bound=0.0, bn_clamp=False)


# ---------------------------------------------------------------------------------------------- FedAdam
def test_fedadam_steps_parameters_only_with_flowers_maths():
    rng = np.random.default_rng(0)
    current = {"conv.weight": rng.normal(size=(3, 2)).astype(np.float32),
               "bn.running_mean": np.zeros(3, np.float32),
               "bn.num_batches_tracked": np.array(5, np.int64)}
    clients = [{"conv.weight": current["conv.weight"] + rng.normal(size=(3, 2)).astype(np.float32) * 0.1,
                "bn.running_mean": np.full(3, float(i + 1), np.float32),
                "bn.num_batches_tracked": np.array(50 + i, np.int64)} for i in range(2)]
    strategy = ValidatedFedAdam(server_lr=0.05, min_train_nodes=2, min_available_nodes=2, **FLOWER_MATHS)
    reference = FedAdam(eta=0.05, min_train_nodes=2, min_available_nodes=2)  # Flower's own, params only
    assert parameter_keys(current) == ["conv.weight"]
    for server_round in (1, 2):
        list(strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in current.items()}),
                                      ConfigRecord(), _Grid()))
        list(reference.configure_train(server_round, ArrayRecord({"conv.weight": Array(current["conv.weight"])}),
                                       ConfigRecord(), _Grid()))
        replies = [_reply(c, n, i) for i, (c, n) in enumerate(zip(clients, (10, 30)))]
        new, _ = strategy.aggregate_train(server_round, replies)
        expected, _ = reference.aggregate_train(server_round, [_reply({"conv.weight": c["conv.weight"]}, n, i)
                                                               for i, (c, n) in enumerate(zip(clients, (10, 30)))])
        new = {k: a.numpy() for k, a in new.items()}
        np.testing.assert_allclose(new["conv.weight"], expected["conv.weight"].numpy(), rtol=1e-5)
        assert new["conv.weight"].dtype == np.float32
        # BN running stats: the plain weighted mean; the counter: the server's own value, same dtype and shape.
        np.testing.assert_allclose(new["bn.running_mean"], np.full(3, 1.75, np.float32))
        assert new["bn.num_batches_tracked"].shape == () and int(new["bn.num_batches_tracked"]) == 5
        current = new
    # Adam's moments go into the server's checkpoint and come back.
    arrays, info = strategy.state_dict()
    assert set(arrays) == {"adam-m/conv.weight", "adam-v/conv.weight"} and info == {}
    restored = ValidatedFedAdam(server_lr=0.05)
    restored.load_state_dict(arrays, info)
    np.testing.assert_array_equal(restored.adam.v_t["conv.weight"], strategy.adam.v_t["conv.weight"])


# ---------------------------------------------------------------------------------------------- FedProx
def _client_weights(client_app, strategy, run_config: dict, arrays: ArrayRecord) -> dict:
    message = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.05}), _Grid()))[0]
    context = Context(run_id=1, node_id=11, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=run_config)
    reply = client_app.train(message, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return decode_arrays(reply.content["arrays"], {k: a.numpy() for k, a in arrays.items()})  # packed on the wire


def test_fedprox_with_mu_zero_equals_fedavg(fedsq_cache):
    from fedsq_app import client_app
    from fedsq_app.config import RunConfig
    from fedsq_app.core.strategy import ValidatedFedAvg
    from fedsq_app.task import global_arrays

    fedavg_config = {"strategy": "fedavg", "max-train-samples": 300}
    model, _, _ = client_app.local_model(RunConfig.from_mapping(fedavg_config))
    start = global_arrays(model)  # the client's model object is trained in place: keep the start
    start = ArrayRecord({k: Array(a.numpy().copy()) for k, a in start.items()})
    common = dict(min_train_nodes=2, min_available_nodes=2)
    fedavg = _client_weights(client_app, ValidatedFedAvg(**common), fedavg_config, start)
    prox_config = {**fedavg_config, "strategy": "fedprox"}
    prox0 = _client_weights(client_app, ValidatedFedProx(proximal_mu=0.0, **common), prox_config, start)
    prox1 = _client_weights(client_app, ValidatedFedProx(proximal_mu=1.0, **common), prox_config, start)
    for key in fedavg:
        np.testing.assert_array_equal(prox0[key], fedavg[key])
    # And the proximal term is live: a large μ keeps the weights closer to the global model.
    drift = lambda w: sum(float(np.sum((w[k] - start[k].numpy()) ** 2)) for k in w if w[k].dtype.kind == "f")
    assert drift(prox1) < drift(fedavg)


# ---------------------------------------------------------------------------------------------- the grid
TINY = Preset(setups=(Setup("smallcnn"),), strategies=("fedsq", "fedavg"), partitions=("iid", "0.5"), epochs=(1,),
              seeds=(0,), num_clients=3, base={**TINY_RUN, "max-train-samples": 300, "probe-size": 16})


def test_tiny_grid_writes_reports_and_resumes(fedsq_cache, tmp_path):
    log = run_grid(TINY, tmp_path)
    assert len(log["ran"]) == 4 and not log["failed"], log["failed"]
    written = write_report(TINY, tmp_path, "fedsq-bench (test)", 1.0)
    assert written["cells"] == 4
    for name in ("cells.csv", "summary.csv", "summary.md", "curves_smallcnn-embedded_e1.png",
                 "gates_smallcnn-embedded_e1.png", "rounds_to_best_smallcnn-embedded.png"):
        assert (tmp_path / name).is_file(), name
    for png in written["pngs"]:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "summary.md").read_text()
    assert "| smallcnn-embedded | IID | 1 | fedsq |" in markdown and "Dirichlet α=0.5" in markdown
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 4 and summary[0].startswith("setup,strategy,partition,epochs")
    cell = tmp_path / "cells" / "smallcnn-embedded-fedavg-a0.5-e1-s0"
    rounds = json.loads((cell / "results.json").read_text())["rounds"]
    assert all(0 <= r["gate_disagreement"] <= 1 and r["l2_from_pretrained"] > 0 for r in rounds)
    assert (cell / "rounds.csv").is_file()

    # Resuming a finished grid runs nothing.
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    log = run_grid(TINY, tmp_path, simulate_fn=must_not_run)
    assert log["ran"] == [] and len(log["skipped"]) == 4 and not log["failed"]

    # An interrupted cell (results.json without test_accuracy) runs again, and only it.
    results = json.loads((cell / "results.json").read_text())
    results.pop("test_accuracy")
    (cell / "results.json").write_text(json.dumps(results))
    calls = []

    def fake(run_config, num_supernodes, **kwargs):
        calls.append(run_config["run-name"])
        (cell / "results.json").write_text(json.dumps({**results, "test_accuracy": 0.5}))

    log = run_grid(TINY, tmp_path, simulate_fn=fake)
    assert calls == [cell.name] and log["ran"] == [cell.name] and len(log["skipped"]) == 3


def _fake_simulation(calls: list):
    """Writes a results.json whose BVA depends on the strategy and μ (best μ = 0.01)."""

    def simulate(run_config, num_supernodes, **kwargs):
        calls.append(run_config["run-name"])
        bva = {0.001: 0.70, 0.01: 0.80, 0.1: 0.75}.get(run_config.get("proximal-mu"), 0.78)
        curve = [bva - 0.1, bva, bva - 0.01]
        folder = tmp / run_config["run-name"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps({
            "initial": {"val_accuracy": 0.1}, "test_accuracy": bva - 0.02,
            "rounds": [{"round": i + 1, "val_accuracy": a, "wall_time_s": 1.0} for i, a in enumerate(curve)]}))

    tmp = None

    def bind(cells_dir):
        nonlocal tmp
        tmp = cells_dir
        return simulate

    return bind


def test_fedprox_mu_is_tuned_then_used_on_every_seed(tmp_path):
    preset = Preset(setups=(Setup("smallcnn"),), strategies=("fedavg", "fedprox"), partitions=("0.1",),
                    epochs=(1,), seeds=(0, 1), num_clients=3, base={"num-server-rounds": 3})
    calls = []
    simulate = _fake_simulation(calls)(tmp_path / "cells")
    log = run_grid(preset, tmp_path, simulate_fn=simulate)
    tuned = [c for c in calls if "-fedprox-" in c]
    # 3 tuning runs on seed 0, then the best μ (0.01) on seed 1; seed 0 with μ=0.01 is not run twice.
    assert tuned == ["smallcnn-embedded-fedprox-mu0.001-a0.1-e1-s0", "smallcnn-embedded-fedprox-mu0.01-a0.1-e1-s0",
                     "smallcnn-embedded-fedprox-mu0.1-a0.1-e1-s0", "smallcnn-embedded-fedprox-mu0.01-a0.1-e1-s1"]
    assert len(calls) == len(set(calls)) == 6 and not log["failed"]
    write_report(preset, tmp_path)
    markdown = (tmp_path / "summary.md").read_text()
    assert "fedprox (μ=0.01)" in markdown and "FedProx μ tuning" in markdown



def test_a_grid_split_over_processes_tunes_mu_on_the_grids_seed(tmp_path):
    """--seeds 1 after --seeds 0: the second process reuses seed 0's tuning, it does not tune on seed 1."""
    import dataclasses

    preset = Preset(setups=(Setup("smallcnn"),), strategies=("fedprox",), partitions=("0.1",), epochs=(1,),
                    seeds=(0, 1), num_clients=3, base={"num-server-rounds": 3})
    calls = []
    simulate = _fake_simulation(calls)(tmp_path / "cells")
    run_grid(dataclasses.replace(preset, seeds=(0,), tune_seed=0), tmp_path, simulate_fn=simulate)
    run_grid(dataclasses.replace(preset, seeds=(1,), tune_seed=0), tmp_path, simulate_fn=simulate)
    assert calls == ["smallcnn-embedded-fedprox-mu0.001-a0.1-e1-s0", "smallcnn-embedded-fedprox-mu0.01-a0.1-e1-s0",
                     "smallcnn-embedded-fedprox-mu0.1-a0.1-e1-s0", "smallcnn-embedded-fedprox-mu0.01-a0.1-e1-s1"]
    from fedsq_app.tools.bench.cli import build_preset

    split = build_preset(_args("--preset", "fmnist-cross-robust", "--seeds", "12", "13", "--out", str(tmp_path),
                               "--report-only"))
    assert split.seeds == (12, 13) and split.tuning_seed == 0

def test_fedsq_adam_sends_the_structural_hash_and_steps_q():
    from fedsq_app.core.strategy import FedSQAdam

    current = {"w": np.ones((2, 2), np.float32), "bn.running_var": np.ones(2, np.float32)}
    strategy = FedSQAdam(structural_sha256="ab" * 32, server_lr=0.1, min_train_nodes=2, min_available_nodes=2,
                         **FLOWER_MATHS)
    messages = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in current.items()}),
                                             ConfigRecord(), _Grid()))
    assert all(m.content["config"]["structural-sha256"] == "ab" * 32 for m in messages)
    replies = [_reply({"w": np.full((2, 2), 2.0, np.float32), "bn.running_var": np.full(2, 3.0, np.float32)}, 5, i)
               for i in range(2)]
    new, _ = strategy.aggregate_train(1, replies)
    assert 1.0 < float(new["w"].numpy()[0, 0]) < 2.0  # an Adam step towards the average, not the average
    np.testing.assert_array_equal(new["bn.running_var"].numpy(), np.full(2, 3.0, np.float32))


# ---------------------------------------------------------------------------------------------- statistics
def test_paired_t_matches_the_t_table_and_the_verdicts_follow_the_ci():
    from fedsq_app.tools.bench.stats import paired_test, t_interval, verdict

    # Two-sided 95 % critical values of Student's t (any table): df 1, 2, 4, 9, 30 (n = df + 1, std = √n).
    for df, expected in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        low, high, _ = t_interval(0.0, (df + 1) ** 0.5, df + 1)
        assert high == pytest.approx(expected, abs=1e-4) and low == pytest.approx(-expected, abs=1e-4)
    test = paired_test([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, sd √2.5, t = 4.243 on 4 df
    assert test["n"] == 5 and test["mean"] == pytest.approx(3.0)
    assert (test["low"], test["high"]) == pytest.approx((3 - 2.7764 * 2.5 ** 0.5 / 5 ** 0.5,
                                                         3 + 2.7764 * 2.5 ** 0.5 / 5 ** 0.5), abs=1e-3)
    assert test["p"] == pytest.approx(0.01324, abs=1e-4)
    assert verdict(test, +1) == "✓" and verdict(test, -1) == "✗"
    straddles = paired_test([-1.0, 2.0, 0.5, -0.5, 1.0])
    assert verdict(straddles, +1) == verdict(straddles, -1) == "≈"
    assert verdict(paired_test([0.2, 0.3, 0.1]), +1, -0.5) == "✓"  # a margin: non-inferiority
    assert verdict(paired_test([1.0]), +1) == "–"  # one seed: no interval, no verdict


def _curve_simulation(curves: dict):
    """A fake ``simulate`` whose validation curve is ``curves[strategy](seed)``."""

    def simulate(run_config, num_supernodes, **kwargs):
        curve = curves[run_config["strategy"]](run_config["seed"])
        folder = Path(run_config["out-dir"]) / run_config["run-name"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps({
            "config": {"dataset": run_config["dataset"], "patience": 2}, "initial": {"val_accuracy": 0.1},
            "test_accuracy": max(curve), "stopped_early": {"after_round": len(curve)},
            "rounds": [{"round": i + 1, "val_accuracy": a, "wall_time_s": 1.0} for i, a in enumerate(curve)]}))

    return simulate


def test_claims_come_from_paired_cis_over_seeds(tmp_path):
    preset = Preset(setups=(Setup("smallcnn"),), strategies=("fedsq", "fedavg", "fedsq-m"), partitions=("0.1",),
                    epochs=(1,), seeds=(0, 1, 2, 3, 4), num_clients=3, base={"num-server-rounds": 8})
    jitter = [0.00, 0.02, -0.01, 0.01, -0.02]  # per seed, shared by all strategies: the pairing removes it
    curves = {
        # FedSQ: 1 pp above FedAvg on every seed, best 4 rounds earlier; fedsq-m: a coin flip around FedAvg.
        "fedavg": lambda seed: [0.5, 0.6, 0.7, 0.75, 0.78, 0.79, 0.8 + jitter[seed], 0.79],
        "fedsq": lambda seed: [0.6, 0.7, 0.81 + jitter[seed], 0.80, 0.80, 0.79],
        "fedsq-m": lambda seed: [0.5, 0.6, 0.7, 0.75, 0.78, 0.79, 0.8 + jitter[seed] + (-1) ** seed * 0.01, 0.79],
    }
    run_grid(preset, tmp_path, simulate_fn=_curve_simulation(curves))
    write_report(preset, tmp_path)
    from fedsq_app.tools.bench.grid import main_cells
    from fedsq_app.tools.bench.report import cell_row
    from fedsq_app.tools.bench.stats import add_time_to_accuracy, claim_checks, paired_comparisons

    rows = [cell_row(c, json.loads((tmp_path / "cells" / c.name / "results.json").read_text()), 5)
            for c in main_cells(preset, tmp_path / "cells")]
    add_time_to_accuracy(rows)
    comparisons = paired_comparisons(rows)
    bva = next(c for c in comparisons if (c["candidate"], c["baseline"], c["metric"])
               == ("fedsq", "fedavg", "best_val_accuracy"))
    assert bva["n"] == 5 and bva["mean"] == pytest.approx(1.0) and bva["low"] == pytest.approx(1.0)
    checks = {c["candidate"]: c for c in claim_checks(comparisons)}
    assert checks["fedsq"]["cells"]["BVA vs FedAvg (pp)"][1] == "✓"
    assert checks["fedsq"]["cells"]["rounds-to-best vs FedAvg"][1] == "✓"
    assert checks["fedsq-m"]["cells"]["BVA vs FedAvg (pp)"][1] == "≈"
    assert checks["fedsq"]["three_rounds_earlier"] is False  # no FedProx in this grid: not against both
    # Time to 95 % of FedAvg's BVA: FedSQ reaches 0.95 × 0.8 at round 2 (0.7 < 0.76 at jitter 0... per seed).
    fedsq_rows = [r for r in rows if r["strategy"] == "fedsq"]
    assert all(r["tta_0.95"] <= 3 and not r["still_improving"] for r in fedsq_rows)
    markdown = (tmp_path / "summary.md").read_text()
    assert "✓ +1.0 [+1.0, +1.0]" in markdown and "no candidate in any setting" in markdown
    assert (tmp_path / "paired.csv").is_file() and (tmp_path / "paired_differences.png").is_file()
    assert "embedded" in (tmp_path / "cells.csv").read_text().splitlines()[1]  # the dataset each cell used


def test_still_improving_and_time_to_accuracy():
    from fedsq_app.tools.bench.stats import rounds_to_reach, still_improving

    assert rounds_to_reach([0.5, 0.7, 0.9], 0.7) == 2 and rounds_to_reach([0.5], 0.9) is None
    assert still_improving([0.5, 0.6, 0.7], {"config": {"patience": 3}})  # best in the last 3 rounds, no stop
    assert not still_improving([0.7, 0.6, 0.6, 0.6], {"config": {"patience": 3}})
    assert not still_improving([0.5, 0.7], {"stopped_early": {"after_round": 2}})
    assert still_improving([0.5, 0.7], {"config": {"patience": 0}})  # no rule: best at the end = censored


# ---------------------------------------------------------------------------------------------- --set
def _args(*argv):
    from fedsq_app.tools.bench.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_set_takes_toml_values_and_wins_over_the_preset(fedsq_cache, tmp_path):
    from fedsq_app.tools.bench.cli import build_preset, parse_set

    assert parse_set(["pretrained='/a b/c.safetensors'", "lr=0.01", "classes=5", "augment=true",
                      "dataset=idx:/data/fm", 'run-name-x="q"']) == {
        "pretrained": "/a b/c.safetensors", "lr": 0.01, "classes": "5", "augment": True, "dataset": "idx:/data/fm",
        "run-name-x": "q"}
    backbone = next((fedsq_cache / "backbones").glob("smallcnn-embedded*.safetensors"))
    preset = build_preset(_args("--preset", "paper", "--out", str(tmp_path), "--set", "model=smallcnn",
                                "--set", "dataset=embedded", "--set", f"pretrained='{backbone}'", "--set", "lr=0.02"))
    assert [s.name for s in preset.setups] == ["smallcnn-embedded"]  # four paper setups became one
    cell = main_cells(preset, tmp_path)[0]
    config = cell.run_config(preset, tmp_path)
    assert (config["model"], config["dataset"], config["pretrained"], config["lr"]) == \
        ("smallcnn", "embedded", str(backbone), 0.02)


@pytest.mark.parametrize("setting, message", [
    ("bogus=1", "unknown run-config key 'bogus'"),
    ("pretrained='/no/such.safetensors'", "no such checkpoint file"),
    ("classes=42", "labels [42] do not occur"),
    ("seed=3", "use --seeds"),
])
def test_bad_settings_are_refused_once_before_the_grid(fedsq_cache, tmp_path, setting, message):
    from fedsq_app.tools.bench.cli import build_preset

    with pytest.raises(SystemExit, match=re.escape(message)):
        build_preset(_args("--preset", "fmnist-paired", "--out", str(tmp_path), "--set", setting))
    assert not (tmp_path / "cells").exists()  # nothing ran


def test_every_preset_builds_valid_run_configs():
    from fedsq_app.tools.bench.presets import PRESETS
    from fedsq_app.config import RunConfig

    for name, preset in PRESETS.items():
        for setup in preset.setups:
            for strategy in preset.strategies:
                cell = Cell(setup, strategy, preset.partitions[-1], preset.epochs[0], preset.seeds[0])
                config = RunConfig.from_mapping(cell.run_config(preset, Path("cells")))
                assert config.strategy == strategy, name
    paper = PRESETS["paper-full"]
    assert {s.dataset for s in paper.setups} == {"flwrlabs/cinic10", "uoft-cs/cifar100"}
    assert {s.model for s in paper.setups} == {"resnet18", "alexnet"} and paper.engine == "ray"
    assert all(s.overrides["augment"] is True and s.overrides["input-size"] == 224 for s in paper.setups)
    assert len(PRESETS["fmnist-paired"].seeds) >= 5 and PRESETS["fmnist-paired"].base["val-seed"] == 0


# ---------------------------------------------------------------------------------------------- variants
def test_fedsq_momentum_steps_q_with_flowers_fedavgm_maths():
    from flwr.serverapp.strategy import FedAvgM

    from fedsq_app.core.variants import FedSQMomentum

    rng = np.random.default_rng(1)
    current = {"conv.weight": rng.normal(size=(3, 2)).astype(np.float32),
               "bn.running_mean": np.zeros(3, np.float32), "bn.num_batches_tracked": np.array(5, np.int64)}
    strategy = FedSQMomentum(structural_sha256="cd" * 32, server_momentum=0.5, min_train_nodes=2,
                             min_available_nodes=2, **FLOWER_MATHS)
    reference = FedAvgM(server_momentum=0.5, min_train_nodes=2, min_available_nodes=2)
    for server_round in (1, 2, 3):
        clients = [{"conv.weight": current["conv.weight"] + rng.normal(size=(3, 2)).astype(np.float32) * 0.1,
                    "bn.running_mean": np.full(3, float(i + 1), np.float32),
                    "bn.num_batches_tracked": np.array(50, np.int64)} for i in range(2)]
        messages = list(strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in current.items()}),
                                                 ConfigRecord(), _Grid()))
        assert all(m.content["config"]["structural-sha256"] == "cd" * 32 for m in messages)
        list(reference.configure_train(server_round, ArrayRecord({"conv.weight": Array(current["conv.weight"])}),
                                       ConfigRecord(), _Grid()))
        new, _ = strategy.aggregate_train(server_round, [_reply(c, n, i) for i, (c, n) in
                                                         enumerate(zip(clients, (10, 30)))])
        expected, _ = reference.aggregate_train(server_round, [_reply({"conv.weight": c["conv.weight"]}, n, i)
                                                               for i, (c, n) in enumerate(zip(clients, (10, 30)))])
        new = {k: a.numpy() for k, a in new.items()}
        np.testing.assert_allclose(new["conv.weight"], expected["conv.weight"].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(new["bn.running_mean"], np.full(3, 1.75, np.float32))  # averaged, no momentum
        assert int(new["bn.num_batches_tracked"]) == 5
        current = new
    arrays, info = strategy.state_dict()  # the momentum vector goes into the checkpoint and comes back
    restored = FedSQMomentum(structural_sha256="cd" * 32, server_momentum=0.5)
    restored.load_state_dict(arrays, info)
    np.testing.assert_array_equal(restored.momentum.momentum_vector[0], strategy.momentum.momentum_vector[0])


def test_fedsq_warmup_switches_s_exactly_once(fedsq_cache, tmp_path):
    """2 warm-up rounds of FedAvg, then S = that global model: its hash travels and changes once; S's arrays
    go to each node once; from then on the nodes gate with it (their S hash matches the server's)."""
    from fedsq_app.core import wire
    from fedsq_app.core.dualcopy import DualCopy
    from fedsq_app.harness.inprocess import InProcessGrid
    from fedsq_app.runtime import warmup
    from fedsq_app.server_app import main as server_main

    sent = []

    class Recording(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            sent.append([(m.content["config"]["structural-sha256"], wire.STRUCTURAL in m.content)
                         for m in messages])
            return super().send_and_receive(messages, timeout=timeout)

    config = {**TINY_RUN, "strategy": "fedsq-warmup", "warmup-rounds": 2, "num-server-rounds": 4,
              "max-train-samples": 200, "probe-size": 0, "out-dir": str(tmp_path), "run-name": "w"}
    grid = Recording(config, 3)
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    hashes = [{sha for sha, _ in round_} for round_ in sent]
    assert all(len(h) == 1 for h in hashes)  # every node is named the same S in a round
    hashes = [h.pop() for h in hashes]
    assert hashes[0] == hashes[1] != hashes[2] == hashes[3]  # the switch, after round 2, and only then
    assert [[carried for _, carried in round_] for round_ in sent] == [[False] * 3, [False] * 3, [True] * 3,
                                                                       [False] * 3]
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert [r["structural_sha256"] for r in results["rounds"]] == hashes
    assert all(r["accepted"] == 3 for r in results["rounds"])  # every node verified and used the new S
    gated = warmup._gated[hashes[2]]
    assert isinstance(gated, DualCopy) and gated.structural_sha256() == hashes[2]


def test_patience_stops_a_run_and_records_it(fedsq_cache, tmp_path):
    from fedsq_app.harness.inprocess import simulate_in_process

    results = simulate_in_process({**TINY_RUN, "num-server-rounds": 6, "patience": 2, "lr": 1e-6, "probe-size": 0,
                                   "max-train-samples": 200, "out-dir": str(tmp_path), "run-name": "p",
                                   "min-valid-replies": 2}, 2)
    curve = [results["initial"]["val_accuracy"]] + [r["val_accuracy"] for r in results["rounds"]]
    # A learning rate too small to matter: no new best for 2 rounds comes long before round 6.
    best = max(range(len(curve)), key=lambda i: (curve[i], -i))  # round 0 competes; the first best counts
    assert len(curve) - 1 < 6 and results["stopped_early"] == {"after_round": len(curve) - 1, "patience": 2}
    assert len(curve) - 1 - best == 2


# ---------------------------------------------------------------------------------------------- classes
def test_classes_filters_and_renumbers_labels(fedsq_cache):
    from fedsq_app.config import ConfigError, RunConfig, parse_classes
    from fedsq_app.data.partitions import DataKey, dataset_info, pool_and_validation
    from fedsq_app.data.splits import load_split

    assert parse_classes("5-9") == parse_classes("5,6,7,8,9") == parse_classes("9, 5-8") == (5, 6, 7, 8, 9)
    with pytest.raises(ConfigError, match="classes"):
        RunConfig.from_mapping({"classes": "5-x"})
    full, subset = load_split(RunConfig(), "test"), load_split(RunConfig(classes="5-9"), "test")
    wanted = [i for i, label in enumerate(full["label"]) if label >= 5]
    assert len(subset) == len(wanted) and sorted(set(subset["label"])) == [0, 1, 2, 3, 4]
    assert subset["label"] == [full["label"][i] - 5 for i in wanted]  # order kept, labels renumbered
    assert subset.features["label"].names == list(full.features["label"].names[5:])
    key = DataKey.of(RunConfig(classes="5-9", max_train_samples=400))
    assert dataset_info(key).num_classes == 5 and len(pool_and_validation(key)[0]) == 360


def test_val_seed_fixes_the_validation_split_across_seeds(fedsq_cache):
    from fedsq_app.config import RunConfig
    from fedsq_app.data.partitions import DataKey, pool_and_validation, server_split

    def validation(seed, val_seed):
        return server_split(DataKey.of(RunConfig(seed=seed, val_seed=val_seed, max_train_samples=300)), "validation")

    assert torch_equal(validation(1, 0).images, validation(2, 0).images)
    assert not torch_equal(validation(1, -1).images, validation(2, -1).images)  # default: redrawn per seed
    pools = [pool_and_validation(DataKey.of(RunConfig(seed=s, val_seed=0, max_train_samples=300)))[0] for s in (1, 2)]
    assert pools[0]["label"] == pools[1]["label"]


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_pretrain_on_a_class_subset(fedsq_cache, tmp_path):
    from fedsq_app.runtime.models import load_checkpoint
    from fedsq_app.tools.pretrain import main as pretrain_main

    out = tmp_path / "b.safetensors"
    pretrain_main(["--classes", "0-4", "--epochs", "1", "--max-samples", "500", "--out", str(out)])
    _, meta = load_checkpoint(str(out))
    assert meta["num_classes"] == 5 and meta["source_data"]["label_subset"] == "0-4"
    assert meta["classes"] == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]


# ---------------------------------------------------------------------------------------------- paper preset
def test_augmentation_crops_and_flips_reproducibly():
    import torch

    from fedsq_app.runtime.train import augment_batch

    x = torch.randn(16, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(3))
    again = augment_batch(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and torch.equal(out, again)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):  # every image is one crop of its padded self, flipped or not
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    assert not torch.equal(out, x)


def test_input_size_sets_the_backbones_resolution():
    from fedsq_app.config import ConfigError, RunConfig
    from fedsq_app.data.partitions import DatasetInfo
    from fedsq_app.task import build_start_model

    start = build_start_model(RunConfig(model="resnet18", pretrained="none", input_size=48), DatasetInfo(10, 3, 32))
    assert start.spec.size == 48
    with pytest.raises(ConfigError, match="input-size"):
        RunConfig.from_mapping({"model": "smallcnn", "input-size": 224})


def test_pretrain_with_the_standard_stem_at_32_px(fedsq_cache, tmp_path):
    """torchvision's own ResNet-18 stem, at a size the checkpoint records: runs from it build the same."""
    from fedsq_app.config import RunConfig
    from fedsq_app.data.partitions import DatasetInfo
    from fedsq_app.runtime.models import load_checkpoint
    from fedsq_app.task import build_start_model
    from fedsq_app.tools.pretrain import main as pretrain_main, pretrain

    out = tmp_path / "r18.safetensors"
    pretrain_main(["--model", "resnet18", "--stem", "standard", "--input-size", "32", "--epochs", "1",
                   "--max-samples", "64", "--out", str(out)])
    _, meta = load_checkpoint(str(out))
    assert meta["small_stem"] is False and meta["input"]["size"] == 32 and meta["input"]["channels"] == 3
    start = build_start_model(RunConfig(model="resnet18", pretrained=str(out)), DatasetInfo(10, 1, 28))
    assert start.model.conv1.kernel_size == (7, 7) and start.spec.size == 32
    auto = tmp_path / "auto.safetensors"  # the default: the small-image stem at <= 32 px
    pretrain("resnet18", epochs=1, max_samples=64, out=str(auto), input_size=32)
    assert load_checkpoint(str(auto))[1]["small_stem"] is True
    with pytest.raises(ValueError, match="no small-image stem"):
        pretrain("smallcnn", epochs=1, max_samples=64, out=str(tmp_path / "x.safetensors"), stem="small")


def test_one_switch_names_the_defences_a_grid_ran(tmp_path):
    from fedsq_app.config import DEFENCES_OFF, RunConfig
    from fedsq_app.tools.bench.cli import build_preset
    from fedsq_app.tools.bench.presets import PRESETS, parse_preset

    def config(preset):
        return RunConfig.from_mapping(main_cells(preset, tmp_path)[0].run_config(preset, tmp_path))

    off = PRESETS["fmnist-cross-robust"]
    assert off.defences == "off"
    plain = config(off)
    assert all(getattr(plain, key.replace("-", "_")) == value for key, value in DEFENCES_OFF.items())
    defaults = config(build_preset(_args("--preset", "fmnist-cross-robust", "--defences", "defaults",
                                         "--out", str(tmp_path), "--report-only")))
    for key in ("clip_multiplier", "influence_bound", "deviation_bound", "bn_clamp", "direction_check",
                "min_valid_replies", "reply_judge", "aggregation"):  # what a user gets
        assert getattr(defaults, key) == getattr(RunConfig(), key), key
    assert defaults.direction_check > 0 and defaults.min_valid_replies == 3 and defaults.bn_clamp
    # --set still wins over the switch: one defence on top of "off"
    one = config(build_preset(_args("--preset", "fmnist-cross-robust", "--set", "bn-clamp=true",
                                    "--out", str(tmp_path), "--report-only")))
    assert one.bn_clamp and one.deviation_bound == 0 and one.direction_check == 0
    with pytest.raises(ValueError, match=r"sets \['bn-clamp'\]; say defences"):
        parse_preset('seeds = [0]\n[base]\nbn-clamp = false\n[[setups]]\nmodel = "smallcnn"\n', "x")
    with pytest.raises(ValueError, match="defences = 'some'"):
        parse_preset('defences = "some"\n[[setups]]\nmodel = "smallcnn"\n', "x")


def test_two_arms_of_a_grid_pair_by_seed():
    from fedsq_app.tools.bench.arms import compare_arms, markdown

    def cell(strategy, seed, bva, rounds=5):
        return {"setup": "s", "strategy": strategy, "partition": "0.1", "epochs": 1, "seed": seed,
                "best_val_accuracy": bva, "test_accuracy": bva, "rounds_to_best": rounds, "last_k_std": 0.01}

    a = [cell("fedsq", 0, 0.80), cell("fedsq", 1, 0.90), cell("fedsq", 2, 0.70), cell("fedavg", 0, 0.5)]
    b = [cell("fedsq", 0, 0.80), cell("fedsq", 1, 0.85), cell("fedsq", 2, 0.60), cell("fedsq", 3, 0.9)]
    (row,) = compare_arms(a, b)  # fedavg ran in one arm only; seed 3 in one arm only
    assert (row["strategy"], row["seeds"], row["identical"]) == ("fedsq", 3, 1)
    assert row["best_val_accuracy"]["mean"] == pytest.approx(5.0)  # (0 + 5 + 10) / 3 pp
    assert row["best_val_accuracy"]["low"] < 5.0 < row["best_val_accuracy"]["high"]
    assert row["tail_a"]["worst"] == pytest.approx(70.0) and row["tail_b"]["worst"] == pytest.approx(60.0)
    assert "| fedsq | 0.1 | 3 | +5.00 [" in markdown([row], ("defaults", "off"))
