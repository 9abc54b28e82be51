"""The real ServerApp ``main`` and ClientApp ``train`` in one process, without Ray: a grid's fast path.

``InProcessGrid`` is a Flower ``Grid`` that delivers each message by calling the ClientApp's ``train``
directly, one node after another, each node with its own persistent ``Context`` (partition id, state).
The code that runs is exactly the apps' own; only the transport is gone, so a small-model run on a
CPU does not pay Ray's start-up (several seconds per run) or its actors' competition for cores.
Use ``fedsq_app.harness.simulation.simulate`` for Flower's own simulation engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsq_app import client_app, server_app
from fedsq_app.config import RunConfig

FIRST_NODE_ID = 1001


class InProcessGrid(Grid):
    def __init__(self, run_config: Mapping[str, Any], num_nodes: int,
                 node_configs: list[Mapping[str, Any]] | None = None) -> None:
        """``node_configs``: one node config per node (e.g. silos' ``data-path``); default: partitions."""
        self.run_config = dict(run_config)
        for name, value in (("run_id", 1), ("node_id", 0), ("task_id", 0)):  # what a real ServerApp process has
            if getattr(TaskIdentity, f"_{name}") is None:
                setattr(TaskIdentity, name, value)
        self.contexts = {
            FIRST_NODE_ID + i: Context(run_id=1, node_id=FIRST_NODE_ID + i,
                                       node_config=dict(node_configs[i]) if node_configs else
                                       {"partition-id": i, "num-partitions": num_nodes},
                                       state=RecordDict(), run_config=self.run_config)
            for i in range(num_nodes)
        }

    def set_run(self, run) -> None:  # no SuperLink run in-process
        pass

    @property
    def run(self):
        raise NotImplementedError("InProcessGrid has no Run")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._handler(message)(message, self.contexts[message.metadata.dst_node_id]) for message in messages]

    @staticmethod
    def _handler(message: Message):
        """The ClientApp function Flower would call for this message type (train, or evaluate)."""
        return client_app.evaluate_local if message.metadata.message_type.startswith("evaluate") else client_app.train


def simulate_in_process(run_config: Mapping[str, Any], num_supernodes: int, *,
                        node_configs: list[Mapping[str, Any]] | None = None, **_ignored) -> dict:
    """Same contract as ``fedsq_app.harness.simulation.simulate`` (resource arguments are ignored): run one
    federation in this process; returns its parsed results.json. ``node_configs``: see ``InProcessGrid``."""
    config = RunConfig.from_mapping(run_config)
    results_file = Path(config.out_dir).expanduser().resolve() / config.resolved_run_name() / "results.json"
    results_file.unlink(missing_ok=True)
    grid = InProcessGrid(run_config, num_supernodes, node_configs)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=dict(run_config)))
    results = json.loads(results_file.read_text())
    if "test_accuracy" not in results:
        raise RuntimeError(f"the run stopped before its final evaluation: {results_file}")
    return results
