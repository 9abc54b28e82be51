"""Config errors: every run-config and node-config key is checked once at start, and a mistake surfaces as a
``ConfigError`` naming the key, before any training. One test per class of error."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedsq_app.config import ConfigError, NodeConfig, RunConfig
from local_grid import FIRST_NODE_ID, LocalGrid, run_server

REPO = Path(__file__).resolve().parents[1]


def _error(mapping: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_mapping(mapping)
    return str(caught.value)


def test_pyproject_keys_and_defaults_match_runconfig():
    with open(REPO / "pyproject.toml", "rb") as handle:
        app_config = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    defaults = {f.name.replace("_", "-"): f.default for f in fields(RunConfig)}
    assert set(app_config) == set(defaults)
    assert {k: v for k, v in app_config.items() if v != defaults[k]} == {}
    RunConfig.from_mapping(app_config)  # what `flwr run .` hands the apps is valid as is


def test_unknown_key_with_did_you_mean():
    assert "unknown run-config key 'num-server-round'; did you mean 'num-server-rounds'?" in \
        _error({"num-server-round": 3})
    assert "did you mean 'min-train-nodes'" in _error({"min-train-node": 2})
    assert "unknown run-config key 'colour'" in _error({"colour": "blue"})


def test_wrong_types_name_the_key():
    assert "lr must be a number" in _error({"lr": "fast"})
    assert "num-server-rounds must be an integer" in _error({"num-server-rounds": 2.5})
    assert "batch-size must be a int, got the boolean True" in _error({"batch-size": True})
    assert "model must be a string" in _error({"model": 3})
    assert RunConfig.from_mapping({"num-server-rounds": 3.0}).num_server_rounds == 3  # TOML 3.0 is fine


@pytest.mark.parametrize("mapping, key", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"lr": 0}, "lr"), ({"momentum": 1.0}, "momentum"),
    ({"fraction-train": 0.0}, "fraction-train"), ({"fraction-train": 1.5}, "fraction-train"),
    ({"val-fraction": 1.0}, "val-fraction"), ({"num-server-rounds": 0}, "num-server-rounds"),
    ({"min-train-nodes": 0}, "min-train-nodes"), ({"min-available-nodes": 0}, "min-available-nodes"),
    ({"min-valid-replies": 0}, "min-valid-replies"), ({"round-timeout": 0}, "round-timeout"),
    ({"clip-multiplier": 0.5}, "clip-multiplier"), ({"max-num-examples": -1}, "max-num-examples"),
    ({"influence-bound": -0.1}, "influence-bound"), ({"influence-bound": 1.5}, "influence-bound"),
    ({"weight-decay": -0.1}, "weight-decay"), ({"seed": -1}, "seed"), ({"out-dir": ""}, "out-dir"),
])
def test_out_of_range_values_name_the_key(mapping, key):
    assert key in _error(mapping)


@pytest.mark.parametrize("key, value, hint", [
    ("strategy", "fedsqq", "fedsq"), ("model", "resnet19", "resnet18"), ("partitioner", "dirichlett", "dirichlet"),
    ("device", "gpu", None),
])
def test_unknown_choices_with_did_you_mean(key, value, hint):
    message = _error({key: value})
    assert f"{key}='{value}' is not one of" in message
    if hint:
        assert f"did you mean '{hint}'?" in message


@pytest.mark.parametrize("mapping, needle", [
    ({}, "lacks ['partition-id', 'num-partitions']"),
    ({"partition-id": 3, "num-partitions": 3}, "partition-id must be in [0, 3)"),
    ({"partition-id": 0, "num-partitions": 0}, "num-partitions must be >= 1"),
    ({"partition-id": "0", "num-partitions": 2}, "partition-id must be an integer"),
    ({"partition-id": 0, "num-partition": 2}, "unknown node-config key 'num-partition'; did you mean 'num-partitions'?"),
    ({"partition-id": 0, "num-partitions": 2, "datapath": "/x"}, "did you mean 'data-path'?"),
])
def test_node_config_errors(mapping, needle):
    with pytest.raises(ConfigError) as caught:
        NodeConfig.from_mapping(mapping)
    assert needle in str(caught.value)


# ---------------------------------------------------------------------------------------------- at start
def _fails_before_training(config: dict, needle: str, num_nodes: int = 3) -> None:
    """The real ServerApp raises a ConfigError naming the problem, and no node was asked to train."""
    grid = LocalGrid(config, num_nodes=num_nodes)
    with pytest.raises(ConfigError) as caught:
        run_server(config, grid)
    assert needle in str(caught.value)
    assert grid.rounds_served == 0


@pytest.mark.parametrize("dataset, needle", [
    ("cifar11", "unknown dataset 'cifar11'"),
    ("embeded", "unknown dataset 'embeded'"),
])
def test_unknown_dataset(fedsq_cache, tmp_path, dataset, needle):
    _fails_before_training({"dataset": dataset, "out-dir": str(tmp_path)}, needle)


def test_missing_data_path(fedsq_cache, tmp_path):
    _fails_before_training({"dataset": str(tmp_path / "no-such-dir"), "out-dir": str(tmp_path)}, "does not exist")
    _fails_before_training({"dataset": f"idx:{tmp_path / 'no-such-dir'}", "out-dir": str(tmp_path)},
                           "no-such-dir")


def test_cache_not_prepared(tmp_path, monkeypatch):
    # Data (unless an earlier test left it in this process's cache) or backbone missing: both say what to run.
    monkeypatch.setenv("FEDSQ_CACHE_DIR", str(tmp_path / "empty-cache"))
    _fails_before_training({"out-dir": str(tmp_path)}, "fedsq-prepare")


def test_missing_pretrained_checkpoint(fedsq_cache, tmp_path):
    _fails_before_training({"pretrained": str(tmp_path / "nope.safetensors"), "out-dir": str(tmp_path)},
                           "pretrained=")


def test_more_partitions_than_samples_on_the_server(fedsq_cache, tmp_path):
    # 40 training samples -> 36 in the federated pool; 40 connected nodes cannot each get a partition.
    _fails_before_training({"max-train-samples": 40, "out-dir": str(tmp_path)}, "num-partitions=40", num_nodes=40)


def test_more_partitions_than_samples_on_a_node(fedsq_cache):
    """A node whose node config asks for more partitions than there are samples replies with the reason."""
    from fedsq_app import client_app

    grid = LocalGrid({"max-train-samples": 40}, num_nodes=1)
    context = grid.contexts[FIRST_NODE_ID]
    context.node_config = {"partition-id": 0, "num-partitions": 500}
    message = Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=FIRST_NODE_ID, message_type="train")
    reply = client_app.train(message, context)
    assert reply.has_error() and "num-partitions=500" in reply.error.reason
