"""A deployed round that waits for replies says, every ``WAIT_LOG_S``, which nodes it waits on and which of
them the SuperLink lists as offline, instead of waiting out ``round-timeout`` silently."""

from __future__ import annotations

from types import SimpleNamespace

from fedsq_app import server_app


class HttpGrid:  # the name is what send_and_receive recognises as Flower's deployment grid
    def __init__(self, connected):
        self.connected = connected

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m0"))] if "m0" in ids else []

    def get_node_ids(self):
        return self.connected


def test_a_waiting_round_names_the_nodes_it_waits_on_and_those_gone(monkeypatch):
    lines = []
    monkeypatch.setattr(server_app, "WAIT_LOG_S", 0.1)
    monkeypatch.setattr(server_app, "log", lambda level, fmt, *args: lines.append(fmt % args))
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (11, 22, 33)]
    replies = server_app.send_and_receive(HttpGrid([11, 22]), messages, timeout=0.35, poll_s=0.02)
    assert len(replies) == 1
    assert lines, "no wait line logged"
    assert "for 2 replies, from nodes [22, 33]" in lines[0] and "offline now: [33]" in lines[0]
    assert "of round-timeout 0 s" in lines[0]
    lines.clear()
    server_app.send_and_receive(HttpGrid([11, 22, 33]), messages, timeout=0.25, poll_s=0.02)
    assert lines and "all still online" in lines[0]
