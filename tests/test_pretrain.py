"""fedsq-pretrain on local data -> safetensors + JSON -> calibration TOML -> a simulation that uses them;
a node whose structural copy differs is refused and the run still finishes; a silo trains on its own data."""

from __future__ import annotations

import json
import time
import tomllib

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import parse_config_args
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from PIL import Image as PILImage
from safetensors.torch import load_file

from fedsq_app import client_app, server_app
from fedsq_app.config import RunConfig
from fedsq_app.data.sources import write_idx
from fedsq_app.core.dualcopy import state_dict_sha256
from fedsq_app.tools.pretrain import calibrate, main as pretrain_main, pretrain
from fedsq_app.harness.simulation import simulate


def _learnable_images(count: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Noise plus a bright bar whose row encodes the label (4 classes): easy to learn, not trivial."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 4
    images = rng.integers(0, 120, size=(count, size, size), dtype=np.uint8)
    for image, label in zip(images, labels):
        image[3 * label + 1 : 3 * label + 3, 2:-2] = 250
    return images, labels


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx-data")
    for prefix, count, seed in (("train", 900, 0), ("t10k", 120, 1)):
        images, labels = _learnable_images(count, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return f"idx:{folder}"


@pytest.fixture(scope="module")
def backbone(idx_data, tmp_path_factory):
    """A small CNN pretrained on train[:300]; the federated runs below use train[300:] only."""
    out = tmp_path_factory.mktemp("backbone") / "smallcnn.safetensors"
    pretrain_main(["--model", "smallcnn", "--dataset", idx_data, "--split", "train[:300]", "--epochs", "1",
                   "--out", str(out)])
    return str(out)


RUN = {"model": "smallcnn", "train-split": "train[300:]", "num-server-rounds": 2, "batch-size": 16,
       "lr": 0.05, "min-partition-size": 5}


def test_pretrain_writes_safetensors_and_metadata(backbone, idx_data):
    weights = load_file(backbone)
    with open(f"{backbone}.json") as handle:
        meta = json.load(handle)
    assert meta["model"] == "smallcnn" and meta["num_classes"] == 4
    assert meta["classes"] == ["0", "1", "2", "3"]
    assert meta["input"]["channels"] == 1 and len(meta["input"]["mean"]) == 1
    assert meta["source_data"] == {"dataset": idx_data, "split": "train[:300]", "samples": 270,
                                   "holdout_samples": 30, "max_samples": 0, "label_subset": ""}
    assert meta["sha256"] == state_dict_sha256(weights)  # the hash identifies exactly these weights
    assert 0.0 <= meta["training"]["holdout_accuracy"] <= 1.0


def test_calibration_writes_a_run_config_every_strategy_can_use(backbone, idx_data, tmp_path):
    out = tmp_path / "calibrated.toml"
    result = calibrate("smallcnn", backbone, idx_data, "train[300:600]", lrs=(0.01, 0.1), max_epochs=2,
                       batch_size=16, out=out)
    assert len(result["trials"]) == 4  # 2 learning rates x epochs 1..2
    chosen = tomllib.loads(out.read_text())
    assert chosen["lr"] in (0.01, 0.1) and chosen["local-epochs"] in (1, 2)
    assert chosen["pretrained"] == backbone and chosen["model"] == "smallcnn"
    # flwr run . --run-config calibrated.toml reads it like this, and every key is a valid run-config key.
    parsed = parse_config_args([str(out)])
    assert parsed == chosen
    for strategy in ("fedsq", "fedavg"):
        assert RunConfig.from_mapping({**parsed, "strategy": strategy}).lr == chosen["lr"]


def test_calibration_counts_a_diverging_learning_rate_as_a_losing_candidate(backbone, idx_data, tmp_path):
    out = tmp_path / "calibrated.toml"
    result = calibrate("smallcnn", backbone, idx_data, "train[300:600]", lrs=(0.01, 1e9), max_epochs=2,
                       batch_size=16, out=out)
    diverged = [t for t in result["trials"] if t["lr"] == 1e9]
    assert diverged == [{"lr": 1e9, "local-epochs": 1, "val_accuracy": None, "val_loss": None}]  # no 2nd epoch
    assert tomllib.loads(out.read_text())["lr"] == 0.01
    assert "1e+09, 1 -> diverged" in out.read_text()
    with pytest.raises(FloatingPointError, match="every learning rate diverged"):
        calibrate("smallcnn", backbone, idx_data, "train[300:600]", lrs=(1e9,), max_epochs=1, batch_size=16,
                  out=tmp_path / "none.toml")
    assert not (tmp_path / "none.toml").exists()


def test_simulation_uses_the_pretrained_checkpoint(backbone, idx_data, tmp_path):
    run = {**RUN, "dataset": idx_data, "pretrained": backbone, "out-dir": str(tmp_path), "run-name": "ckpt"}
    results = simulate(run, num_supernodes=3)
    assert results["pretrained_from"] == backbone
    assert [r["accepted"] for r in results["rounds"]] == [3, 3]
    assert results["best_val_accuracy"] > results["initial"]["val_accuracy"]
    report = results["label_distribution"]
    assert report["num_partitions"] == 3
    assert (tmp_path / "ckpt" / "label_distribution.png").is_file()
    assert (tmp_path / "ckpt" / "label_distribution.csv").is_file()


def _with(context: Context, run_config: dict) -> Context:
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=context.state, run_config={**context.run_config, **run_config})


def test_node_with_another_structural_copy_is_dropped_and_the_run_finishes(backbone, idx_data, tmp_path):
    other = str(tmp_path / "other.safetensors")
    pretrain("smallcnn", idx_data, "train[:300]", epochs=1, seed=7, out=other)  # same shape, other weights
    run = {**RUN, "dataset": idx_data, "pretrained": backbone, "out-dir": str(tmp_path), "run-name": "mismatch",
           "num-server-rounds": 1, "min-valid-replies": 2}  # 3 nodes, one refused: two valid replies
    server, client = ServerApp(), ClientApp()

    @server.main()
    def _main(grid, context):
        server_app.main(grid, _with(context, run))

    @client.train()
    def _train(msg, context):
        # Node 0's silo holds another backbone: its S hash differs from the one the server sends.
        own = {"pretrained": other} if context.node_config["partition-id"] == 0 else {}
        return client_app.train(msg, _with(context, {**run, **own}))

    run_simulation(server_app=server, client_app=client, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "logging_level": "ERROR"}})
    results = json.loads((tmp_path / "mismatch" / "results.json").read_text())
    assert "test_accuracy" in results  # the run finished
    record = results["rounds"][0]
    assert record["accepted"] == 2 and record["rejected"] == 1 and record["aggregated"]
    reason = record["rejections"][0]["reason"]
    with open(f"{other}.json") as handle:
        other_meta = json.load(handle)
    assert "structural copy mismatch" in reason and results["structural_sha256"] in reason
    assert other_meta["sha256"] != results["structural_sha256"]


def _train_message(arrays: ArrayRecord, config: dict) -> Message:
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), metadata=metadata)


def test_silo_trains_on_its_own_data_path(backbone, tmp_path):
    """Deployment mode: node config data-path; the head size comes from the backbone's metadata."""
    for label in range(4):
        (tmp_path / "silo" / str(label)).mkdir(parents=True)
    images, labels = _learnable_images(24, seed=3)
    for i, (image, label) in enumerate(zip(images, labels)):
        PILImage.fromarray(image).save(tmp_path / "silo" / str(label) / f"{i}.png")
    run = {"model": "smallcnn", "pretrained": backbone, "dataset": "uoft-cs/cifar10", "batch-size": 8}
    config = RunConfig.from_mapping(run)
    model, _, sha = client_app.local_model(config, f"imagefolder:{tmp_path / 'silo'}")
    assert model.quantitative.head.out_features == 4  # from the backbone's metadata, not the server's data
    context = Context(run_id=1, node_id=5, node_config={"data-path": f"imagefolder:{tmp_path / 'silo'}"},
                      state=RecordDict(), run_config=run)
    reply = client_app.train(_train_message(ArrayRecord(model.quantitative.state_dict()),
                                            {"server-round": 1, "structural-sha256": sha}), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["num-examples"] == 24  # the whole silo, no partitioning
    missing = Context(run_id=1, node_id=5, node_config={"data-path": str(tmp_path / "nowhere")},
                      state=RecordDict(), run_config=run)
    reply = client_app.train(_train_message(ArrayRecord(model.quantitative.state_dict()),
                                            {"server-round": 1, "structural-sha256": sha}), missing)
    assert reply.has_error() and "data-path" in reply.error.reason and "does not exist" in reply.error.reason
