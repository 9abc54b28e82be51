"""How the ServerApp waits for a round's replies in a deployment: pull often, say what it waits on, and end
at ``round-timeout`` even while Flower is stuck pulling one reply's objects (docs/PERFORMANCE.md, the 12-silo
soak: a listed reply whose upload was still in flight held a round for minutes, with nothing logged)."""

from __future__ import annotations

import threading
import time
from logging import WARNING

from flwr.common.logger import log
from flwr.serverapp import Grid

WAIT_LOG_S = 30.0  # a round still waiting says so this often, naming the silos it waits on


def send_and_receive(grid: Grid, messages: list, timeout: float | None, poll_s: float = 0.2) -> list:
    """``grid.send_and_receive``, but Flower's deployment grid (HttpGrid) pulls replies only every 3 s, so a
    round would end up to 3 s after its last reply: pull every ``poll_s`` instead (one cheap request to the
    local SuperLink). Same result: the replies that arrived before ``timeout``. Other grids (simulation,
    tests) poll fast already and are used as they are. A round still waiting after ``WAIT_LOG_S`` logs which
    nodes it waits on and which of them the SuperLink lists as offline, every ``WAIT_LOG_S``.

    Flower's ``pull_messages`` blocks while a listed reply's objects are still being uploaded (it retries for
    up to ``PULL_MAX_TIME``, 2 h): each pull runs in a daemon thread, so the round keeps logging and ends at
    ``timeout`` whatever the pull does; a pull still running then is abandoned (its replies are late)."""
    if type(grid).__name__ != "HttpGrid":
        return list(grid.send_and_receive(messages, timeout=timeout))
    ids = list(grid.push_messages(messages))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
    waiting = set(ids)

    def pending() -> list[int]:  # the nodes still to reply
        return sorted(node_of.get(m, 0) for m in waiting)

    start = time.time()
    end = float("inf") if timeout is None else start + timeout
    next_log = start + WAIT_LOG_S
    replies: list = []
    while waiting and time.time() < end:
        done, box = _pull_aside(grid, frozenset(waiting))
        while not done.wait(max(0.0, min(next_log, end) - time.time())) and time.time() < end:
            if time.time() >= next_log:
                next_log += WAIT_LOG_S
                log_wait(grid, pending(), time.time() - start, timeout, pulling=True)
        if not done.is_set():
            log(WARNING, "round-timeout reached while Flower was still pulling a reply's objects (an upload "
                "still in flight): ending the round with %d replies", len(replies))
            break
        if "error" in box:
            raise box["error"]
        arrived = box["replies"]
        replies.extend(arrived)
        waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if waiting and time.time() >= next_log:
            next_log += WAIT_LOG_S
            log_wait(grid, pending(), time.time() - start, timeout)
        if waiting:
            time.sleep(poll_s)
    return replies


def _pull_aside(grid: Grid, asked: frozenset) -> tuple[threading.Event, dict]:
    """``grid.pull_messages(asked)`` in a daemon thread (an abandoned pull never holds the process at exit):
    an event set when it ends, and a box that then holds its ``replies`` or its ``error``."""
    done, box = threading.Event(), {}

    def pull() -> None:
        try:
            box["replies"] = list(grid.pull_messages(asked))
        except Exception as error:  # handed to the round's thread, which raises it as the pull would have
            box["error"] = error
        finally:
            done.set()

    threading.Thread(target=pull, name="fedsq-pull", daemon=True).start()
    return done, box


def log_wait(grid: Grid, nodes: list[int], waited_s: float, timeout: float | None, pulling: bool = False) -> None:
    try:
        connected = set(grid.get_node_ids())
    except Exception as error:  # the log line is a diagnostic: never let it end the round
        connected, gone = None, f"; the SuperLink's node list failed ({type(error).__name__})"
    if connected is not None:
        lost = [n for n in nodes if n not in connected]
        gone = (f"; offline now: {lost} (their replies will not come unless they return)" if lost else
                "; all still online (a ClientApp still running, or one that ended without a reply: see "
                "the silo's SuperExec log)")
    if pulling:
        gone += ("; Flower is still pulling a listed reply's objects (its upload is in flight; Flower retries "
                 "until it completes or the SuperLink's push session expires)")
    until = f" of round-timeout {timeout:.0f} s" if timeout is not None else ""
    log(WARNING, "waited %.0f s%s for %d replies, from nodes %s%s", waited_s, until, len(nodes), nodes, gone)
