"""``fedsq-perf deploy --flower-floor``: the cheapest possible federated round, to measure what Flower itself
costs per round in simulation and in deployment on the same machine.

The ClientApp returns the arrays it received (no torch, no data, no training); the ServerApp sends arrays
shaped like the default small CNN's 22 (so each message is as many objects as a FedSQ message) to every node
and waits for all replies, as FedSQ's ServerApp does (pulling every 0.2 s), and writes ``rounds[].wall_time_s``
to ``<out-dir>/<run-name>/results.json`` like the real app. Whatever a deployed round of this app costs
above a simulated one is Flower's: processes, transport and polls. The ClientApp imports numpy and flwr
only (the ServerApp reuses FedSQ's reply polling).

Run config ``floor-arrays=N`` (``fedsq-perf deploy --floor-arrays``) sends the same bytes as N flat float32
arrays instead of the 22: Flower moves about two objects per array, one RPC each, so this measures what
packing a message into fewer arrays would save on the wire.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

# The default small CNN's travelling arrays: conv 32-64-128 with BN, hidden 512 -> 128, head 128 -> 10.
SMALL_CNN_SHAPES = [(32, 1, 3, 3), (32,), (32,), (32,), (32,), (), (64, 32, 3, 3), (64,), (64,), (64,), (64,), (),
                    (128, 64, 3, 3), (128,), (128,), (128,), (128,), (), (128, 512), (128,), (10, 128), (10,)]

client = ClientApp()
server = ServerApp()


def _array(shape: tuple, seed: int) -> np.ndarray:
    """Distinct random values (Flower stores equal arrays once: zeros would travel as fewer objects); the
    scalars are equal, as the model's three BN batch counters are."""
    if shape == ():
        return np.array(0, dtype=np.int64)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def floor_arrays(count: int) -> list[np.ndarray]:
    """The small CNN's arrays (``count`` = 22), or their total bytes as ``count`` flat float32 arrays."""
    model = [_array(shape, seed=i) for i, shape in enumerate(SMALL_CNN_SHAPES)]
    if count == len(model):
        return model
    if count < 1:
        raise ValueError(f"floor-arrays must be >= 1, got {count}")
    total = sum(a.nbytes for a in model) // 4  # float32 values; every array's size is a multiple of 4 bytes
    flat = np.random.default_rng(len(model)).standard_normal(total).astype(np.float32)
    return np.array_split(flat, count)


@client.train()
def echo(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=msg)


@server.main()
def rounds(grid: Grid, context: Context) -> None:
    # FedSQ's own reply polling and results writer (this import brings torch into the ServerApp only)
    import json

    from fedsq_app.server_app import send_and_receive
    from fedsq_app.util import write_atomic

    config = context.run_config
    nodes_needed = int(config["min-train-nodes"])
    count = int(config["floor-arrays"])
    arrays = ArrayRecord({f"a{i}": Array(a) for i, a in enumerate(floor_arrays(count))})
    while len(nodes := list(grid.get_node_ids())) < nodes_needed:
        time.sleep(0.5)
    out_dir = Path(str(config["out-dir"])) / str(config["run-name"])
    results = {"floor_arrays": count, "rounds": []}
    total_rounds = int(config["num-server-rounds"])
    for server_round in range(1, total_rounds + 1):
        start = time.time()
        log(INFO, "[ROUND %d/%d]", server_round, total_rounds)  # FedSQ's round start, as --trace reads it
        messages = [Message(RecordDict({"arrays": arrays}), dst_node_id=node, message_type="train",
                            group_id=str(server_round)) for node in nodes]
        replies = send_and_receive(grid, messages, timeout=None)
        if len(replies) != len(nodes) or any(reply.has_error() for reply in replies):
            raise RuntimeError(f"round {server_round}: {len(replies)} of {len(nodes)} replies, or an error")
        results["rounds"].append({"round": server_round, "wall_time_s": time.time() - start})
        log(INFO, "round %d: val skipped (no-op app), %d arrays per message, %d replies (%.2fs)", server_round,
            count, len(replies), time.time() - start)  # starts as FedSQ's round-end line, which --trace reads
    results["test_accuracy"] = None  # the mark of a finished run that fedsq-perf waits for
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2))


PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "flower-floor"
version = "0.1.0"
dependencies = ["flwr>=1.42,<1.43", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsq"

[tool.flwr.app.components]
serverapp = "flower_floor:server"
clientapp = "flower_floor:client"

[tool.flwr.app.config]
num-server-rounds = 5
min-available-nodes = 3
min-train-nodes = 3
out-dir = "outputs"
run-name = "floor"
max-train-samples = 0
device = "cpu"
floor-arrays = 22
"""


def make_app(folder: Path) -> Path:
    """A Flower app folder holding only this module and its pyproject.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flower_floor.py").write_text(Path(__file__).read_text())
    (folder / "pyproject.toml").write_text(PYPROJECT)
    return folder
