"""Where a run's validation comes from: the server's held-out split, or the nodes' own data (Flower's
federated evaluation, ``fraction-evaluate``; replies screened by ``fedsq_app.core.evaluation``)."""

from __future__ import annotations

from logging import INFO
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid


def fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def validation_source(config, validation_size: int) -> str:
    """What results.json's ``validation_source`` and the log say (``config``: the RunConfig)."""
    if config.server_validation:
        return f"server: its held-out validation split ({validation_size} samples)"
    return (f"nodes: accuracy on the nodes' own validation data, weighted by the server's weights for them "
            f"(equal in round 0) (fraction-evaluate={config.fraction_evaluate:g}; server-validation=false)")


def federated_evaluation(strategy, arrays: ArrayRecord, server_round: int, grid: Grid, send: Callable,
                         timeout: float) -> dict:
    """Flower's ``configure_evaluate`` sends the global ``arrays``, each sampled node validates them on its
    own data, ``aggregate_evaluate`` screens the replies (``send``: the server's send-and-receive). Returns
    the round's record for results.json: per-node accuracy and counts (keyed by node id), the weighted
    accuracy, and the replies that were not counted."""
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord({}), grid))
    replies = send(grid, messages, timeout=timeout) if messages else []
    strategy.aggregate_evaluate(server_round, replies)
    checked = strategy.evaluate_rounds.get(server_round)
    record = checked.to_json() if checked is not None else {"accuracy": None, "loss": None, "num_examples": 0,
                                                            "nodes": {}, "rejected": []}
    record.update(expected=len(messages), received=len(replies))
    for node_id, entry in record["nodes"].items():
        log(INFO, "\t> node %s: validation accuracy %.4f on %d of its own samples", node_id, entry["accuracy"],
            entry["num_examples"])
    return record
