"""A deployed round that waits for replies says, every ``WAIT_LOG_S``, which nodes it waits on and which of
them the SuperLink lists as offline, instead of waiting out ``round-timeout`` silently; and it ends at
``round-timeout`` even while Flower's pull is stuck on a reply whose upload is still in flight."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from fedsq_app.runtime import waiting


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
    monkeypatch.setattr(waiting, "WAIT_LOG_S", 0.1)
    monkeypatch.setattr(waiting, "log", lambda level, fmt, *args: lines.append(fmt % args))
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (11, 22, 33)]
    replies = waiting.send_and_receive(HttpGrid([11, 22]), messages, timeout=0.35, poll_s=0.02)
    assert len(replies) == 1
    assert lines, "no wait line logged"
    assert "for 2 replies, from nodes [22, 33]" in lines[0] and "offline now: [33]" in lines[0]
    assert "of round-timeout 0 s" in lines[0]
    lines.clear()
    waiting.send_and_receive(HttpGrid([11, 22, 33]), messages, timeout=0.25, poll_s=0.02)
    assert lines and "all still online" in lines[0]


class StuckHttpGrid(HttpGrid):
    """Flower's pull_messages blocking on a listed reply whose objects are still uploading."""

    def __init__(self, connected, release: threading.Event):
        super().__init__(connected)
        self.release = release

    def pull_messages(self, ids):
        self.release.wait(10)
        return []


StuckHttpGrid.__name__ = "HttpGrid"  # what send_and_receive recognises


def test_a_round_ends_at_round_timeout_while_a_pull_is_stuck_and_says_why(monkeypatch):
    lines = []
    monkeypatch.setattr(waiting, "WAIT_LOG_S", 0.1)
    monkeypatch.setattr(waiting, "log", lambda level, fmt, *args: lines.append(fmt % args))
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (11, 22)]
    release = threading.Event()
    started = time.time()
    try:
        replies = waiting.send_and_receive(StuckHttpGrid([11, 22], release), messages, timeout=0.5, poll_s=0.02)
    finally:
        release.set()  # let the abandoned pull end
    assert replies == [] and time.time() - started < 2.0  # not the pull's 10 s
    assert any("still pulling a listed reply's objects" in line for line in lines[:-1]), lines
    assert "round-timeout reached while Flower was still pulling" in lines[-1]
