"""The federation's final model for the silos that ask for it (node config ``keep-model``; docs/DEPLOYMENT.md).

A node config is the silo's own, so a node that wants the model says so: ``wants-model`` = 1 in its train
replies. After the last round the server sends the best round's arrays once, in an evaluate message whose
config says ``final-model``, to each connected node that said so in an accepted train reply; the node checks
that it gates with the S the server names, saves the model and replies ``kept`` = 1 with its own validation
accuracy on it. Nobody else is sent anything: a run in which no node asks (a simulation) sends no message.
results.json records every asking node under ``model_delivered_to``: its reply is a claim, checked on what
decodes, never trusted and never raised.
"""

from __future__ import annotations

import math
import time
from logging import INFO, WARNING
from typing import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedsq_app.core.replies import node_id_of
from fedsq_app.core.wire import ARRAYS, CONFIG, EVAL_ACCURACY, KEPT, METRICS, NUM_EXAMPLES, STRUCTURAL, WANTS_MODEL

REASON_CHARS = 300  # a node's error reason, as much as results.json keeps of it


def nodes_that_asked(round_replies: dict) -> set[int]:
    """The nodes whose accepted train replies (a strategy's ``round_replies``) said ``wants-model`` = 1: members
    of the federation that ask for its model."""
    return {reply.node_id for checked in round_replies.values() for reply in checked.accepted
            if reply.metrics.get(WANTS_MODEL) == 1}


def final_model_messages(node_ids: Iterable[int], arrays: ArrayRecord, config: dict,
                         structural: ArrayRecord | None = None, holders: Iterable[int] = ()) -> list[Message]:
    """One evaluate message per node: ``arrays`` and ``config`` (``final-model`` and what the node's sidecar
    records), plus ``structural`` (fedsq-warmup's S) for a node not known to hold it."""
    holders = set(holders)
    messages = []
    for node_id in node_ids:
        content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(config)})
        if structural is not None and node_id not in holders:
            content[STRUCTURAL] = structural
        messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.EVALUATE))
    return messages


def _missing(node_id: int, reason: str | None) -> dict:
    return {"node_id": node_id, "kept": False, "val_accuracy": None, "num_examples": None, "reason": reason}


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def check_final_reply(reply: Message) -> dict:
    """One node's reply as results.json records it: ``kept`` (it says it saved the model), the accuracy it
    reports (None unless a finite number in [0, 1]), its validation count, and why not, if it did not keep
    it. Never raises, whatever the reply holds."""
    record = _missing(node_id_of(reply), None)
    try:
        if reply.has_error():
            record["reason"] = f"error reply: {str(reply.error.reason)[:REASON_CHARS]}"
            return record
        if not reply.has_content() or METRICS not in reply.content.metric_records:
            record["reason"] = f"no '{METRICS}' metric record in the reply"
            return record
        metrics = reply.content.metric_records[METRICS]
        kept = metrics.get(KEPT)
        accuracy, count = _number(metrics.get(EVAL_ACCURACY)), _number(metrics.get(NUM_EXAMPLES))
    except Exception as error:  # malformed content of any kind
        record["reason"] = f"unreadable reply ({type(error).__name__}: {str(error)[:REASON_CHARS]})"
        return record
    if kept not in (0, 1) or isinstance(kept, bool):
        record["reason"] = ("the node's app does not deliver the final model (no 'kept' in its reply)" if kept is None
                            else f"'{KEPT}' must be 0 or 1, got {str(kept)[:40]}")
        return record
    record["kept"] = kept == 1
    if not record["kept"]:
        record["reason"] = "the node says its config does not ask for it (no keep-model)"
        return record
    record["val_accuracy"] = accuracy if accuracy is not None and 0.0 <= accuracy <= 1.0 else None
    record["num_examples"] = int(count) if count is not None and count.is_integer() and count > 0 else None
    return record


def delivery_records(node_ids: Iterable[int], replies: Iterable[Message]) -> list[dict]:
    """One record per node the model was sent to, by node id: its checked reply (the first one: a node
    speaks once), or a missing one. Replies from nodes it was not sent to are ignored."""
    records = {node_id: _missing(node_id, "no reply within round-timeout") for node_id in node_ids}
    replied: set[int] = set()
    for reply in replies:
        record = check_final_reply(reply)
        if record["node_id"] in records and record["node_id"] not in replied:
            replied.add(record["node_id"])
            records[record["node_id"]] = record
    return [records[node_id] for node_id in sorted(records)]


def deliver_final_model(grid: Grid, asked: Iterable[int], arrays: ArrayRecord, config: dict, send: Callable,
                        timeout: float, *, structural: ArrayRecord | None = None,
                        holders: Iterable[int] = ()) -> list[dict]:
    """Send the final model to the ``asked`` nodes that are connected and wait up to ``timeout`` for their
    replies (``send``: the server's send-and-receive). Returns one record per asking node (offline ones
    included); nothing asked, nothing sent. The run has ended by now: a failure to send is logged and
    recorded, never raised."""
    asked = sorted(set(asked))
    if not asked:
        return []
    start = time.time()
    try:
        online = set(grid.get_node_ids())
    except Exception as error:
        log(WARNING, "final model not sent: the SuperLink's node list failed (%s: %s)", type(error).__name__, error)
        return [_missing(n, f"not sent: the node list failed ({type(error).__name__})") for n in asked]
    node_ids = [n for n in asked if n in online]
    offline = [_missing(n, "offline when the run ended") for n in asked if n not in online]
    try:
        messages = final_model_messages(node_ids, arrays, config, structural, holders)
        replies = send(grid, messages, timeout=timeout) if messages else []
    except Exception as error:
        log(WARNING, "final model not delivered (%s: %s)", type(error).__name__, error)
        reason = f"not sent: {type(error).__name__}: {str(error)[:REASON_CHARS]}"
        return sorted([_missing(n, reason) for n in node_ids] + offline, key=lambda r: r["node_id"])
    records = sorted(delivery_records(node_ids, replies) + offline, key=lambda r: r["node_id"])
    kept = [r["node_id"] for r in records if r["kept"]]
    log(INFO, "final model: %d nodes asked, %d kept it%s (%.2fs)", len(records), len(kept),
        f" ({kept})" if kept else "", time.time() - start)
    return records
