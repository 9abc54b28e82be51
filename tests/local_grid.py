"""An in-process Flower ``Grid`` for tests: the real ServerApp ``main`` talks to the real ClientApp
``train``, called directly in this process, one node after another (no Ray, no SuperLink).

It can also play the failures the reliability tests need: a server killed before a given round, and
nodes whose replies a test replaces (hostile or broken silos).
"""

from __future__ import annotations

from typing import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsq_app import client_app, server_app

FIRST_NODE_ID = 1001


class ServerKilled(BaseException):
    """Stands for SIGKILL of the ServerApp: a BaseException, so no ``except Exception`` can swallow it."""


class LocalGrid(Grid):
    def __init__(self, run_config: dict, num_nodes: int = 3, *, kill_before_round: int | None = None,
                 tamper: Callable[[int, Message], Message | None] | None = None) -> None:
        """``tamper(node_id, reply)`` may return a replacement reply, or None to drop it (a lost reply)."""
        self.run_config = dict(run_config)
        for name, value in (("run_id", 1), ("node_id", 0), ("task_id", 0)):  # what a real ServerApp process has
            if getattr(TaskIdentity, f"_{name}") is None:
                setattr(TaskIdentity, name, value)
        self.kill_before_round = kill_before_round
        self.tamper = tamper
        self.rounds_served = 0
        self.contexts = {
            FIRST_NODE_ID + i: Context(run_id=1, node_id=FIRST_NODE_ID + i,
                                       node_config={"partition-id": i, "num-partitions": num_nodes},
                                       state=RecordDict(), run_config=self.run_config)
            for i in range(num_nodes)
        }

    def set_run(self, run) -> None:  # not used in-process
        pass

    @property
    def run(self):
        raise NotImplementedError("LocalGrid has no Run")

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
        if self.kill_before_round is not None and self.rounds_served + 1 >= self.kill_before_round:
            raise ServerKilled(f"server killed before round {self.rounds_served + 1}")
        self.rounds_served += 1
        replies = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            reply = client_app.train(message, self.contexts[node_id])
            if self.tamper is not None:
                reply = self.tamper(node_id, reply)
            if reply is not None:
                replies.append(reply)
        return replies


def run_server(run_config: dict, grid: LocalGrid) -> None:
    """The real ServerApp entry point with ``run_config`` (what ``flwr run --run-config`` would give)."""
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=dict(run_config)))
