"""An in-process Flower ``Grid`` for tests: the real ServerApp ``main`` talks to the real ClientApp
``train``, called directly in this process, one node after another (no Ray, no SuperLink).

It can also play the failures the reliability tests need: a server killed before a given round, and
nodes whose replies a test replaces (hostile or broken silos).
"""

from __future__ import annotations

from typing import Callable, Iterable

from flwr.app import Context, Message, RecordDict

from fedsq_app import server_app
from fedsq_app.harness.inprocess import FIRST_NODE_ID, InProcessGrid  # noqa: F401 (FIRST_NODE_ID: tests import it here


class ServerKilled(BaseException):
    """Stands for SIGKILL of the ServerApp: a BaseException, so no ``except Exception`` can swallow it."""


class LocalGrid(InProcessGrid):
    def __init__(self, run_config: dict, num_nodes: int = 3, *, kill_before_round: int | None = None,
                 tamper: Callable[[int, Message], Message | None] | None = None) -> None:
        """``tamper(node_id, reply)`` may return a replacement reply, or None to drop it (a lost reply)."""
        super().__init__(run_config, num_nodes)
        self.kill_before_round = kill_before_round
        self.tamper = tamper
        self.rounds_served = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        if self.kill_before_round is not None and self.rounds_served + 1 >= self.kill_before_round:
            raise ServerKilled(f"server killed before round {self.rounds_served + 1}")
        self.rounds_served += 1
        replies = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            reply = super().send_and_receive([message])[0]
            if self.tamper is not None:
                reply = self.tamper(node_id, reply)
            if reply is not None:
                replies.append(reply)
        return replies


def run_server(run_config: dict, grid: LocalGrid) -> None:
    """The real ServerApp entry point with ``run_config`` (what ``flwr run --run-config`` would give)."""
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=dict(run_config)))
