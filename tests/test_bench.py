"""Baselines (FedProx, FedAdam) and the benchmark grid: reports, resume, μ tuning."""

import json
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam

from conftest import TINY_RUN
from fedsq_app.bench import Preset, Setup, run_grid, write_report
from fedsq_app.strategy import ValidatedFedAdam, ValidatedFedProx, parameter_keys


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


# ---------------------------------------------------------------------------------------------- FedAdam
def test_fedadam_steps_parameters_only_with_flowers_maths():
    rng = np.random.default_rng(0)
    current = {"conv.weight": rng.normal(size=(3, 2)).astype(np.float32),
               "bn.running_mean": np.zeros(3, np.float32),
               "bn.num_batches_tracked": np.array(5, np.int64)}
    clients = [{"conv.weight": current["conv.weight"] + rng.normal(size=(3, 2)).astype(np.float32) * 0.1,
                "bn.running_mean": np.full(3, float(i + 1), np.float32),
                "bn.num_batches_tracked": np.array(50 + i, np.int64)} for i in range(2)]
    strategy = ValidatedFedAdam(server_lr=0.05, min_train_nodes=2, min_available_nodes=2)
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
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def test_fedprox_with_mu_zero_equals_fedavg(fedsq_cache):
    from fedsq_app import client_app
    from fedsq_app.config import RunConfig
    from fedsq_app.strategy import ValidatedFedAvg
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


def test_fedsq_adam_sends_the_structural_hash_and_steps_q():
    from fedsq_app.strategy import FedSQAdam

    current = {"w": np.ones((2, 2), np.float32), "bn.running_var": np.ones(2, np.float32)}
    strategy = FedSQAdam(structural_sha256="ab" * 32, server_lr=0.1, min_train_nodes=2, min_available_nodes=2)
    messages = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in current.items()}),
                                             ConfigRecord(), _Grid()))
    assert all(m.content["config"]["structural-sha256"] == "ab" * 32 for m in messages)
    replies = [_reply({"w": np.full((2, 2), 2.0, np.float32), "bn.running_var": np.full(2, 3.0, np.float32)}, 5, i)
               for i in range(2)]
    new, _ = strategy.aggregate_train(1, replies)
    assert 1.0 < float(new["w"].numpy()[0, 0]) < 2.0  # an Adam step towards the average, not the average
    np.testing.assert_array_equal(new["bn.running_var"].numpy(), np.full(2, 3.0, np.float32))
