"""Aggregation: the weighted average FedAvg and FedSQ use, and the Byzantine-robust alternatives.

Pure functions of checked replies (``fedsq_app.core.replies.CheckedReply``) and the global model's arrays.
``AGGREGATIONS`` is the one registry of aggregation names (run config ``aggregation``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedsq_app.core.replies import CheckedReply
from fedsq_app.core.wire import IDENTITY_METRICS, NUM_EXAMPLES, TRAIN_LOSS

def median_average(replies: list[CheckedReply], template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Coordinate-wise median of every floating array (Flower's FedMedian maths; claims play no part)."""
    return _per_coordinate(replies, template, lambda stack: np.median(stack, axis=0))


def trimmed_average(replies: list[CheckedReply], template: dict[str, np.ndarray],
                    trim_fraction: float) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean (Flower's FedTrimmedAvg ``trim_mean``): the int(trim_fraction x n)
    largest and smallest values of each coordinate are dropped. With few replies that may drop none."""
    return _per_coordinate(replies, template, lambda stack: trim_mean(stack, trim_fraction))


def _per_coordinate(replies: list[CheckedReply], template: dict[str, np.ndarray], reduce) -> dict[str, np.ndarray]:
    if not replies:
        raise ValueError("a robust average needs at least one reply")
    replies = sorted(replies, key=lambda r: r.node_id)  # np.median / partition do not depend on order anyway
    result = {}
    for key, current in template.items():
        if current.dtype.kind != "f":  # counters (num_batches_tracked): the server's value is kept
            result[key] = current.copy()
            continue
        stack = np.stack([reply.arrays[key].astype(np.float64) for reply in replies])
        result[key] = np.asarray(reduce(stack)).astype(current.dtype).reshape(current.shape)
    return result


def canonical_order(replies: list[CheckedReply]) -> list[CheckedReply]:
    """Replies in an order fixed by their content, not by arrival or by (randomly drawn) node ids.

    Float sums depend on their order; sorting by what a reply says makes a seeded run repeat bit for bit.
    Two replies that tie on both keys carry the same figures, so their relative order cannot matter.
    """
    return sorted(replies, key=lambda r: (r.num_examples, r.metrics.get(TRAIN_LOSS, 0.0)))


def weighted_average(replies: list[CheckedReply], template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``num-examples``-weighted mean of every floating array (weights, biases, BN running stats).

    Integer arrays (BN ``num_batches_tracked``) are counters, not quantities: the server's value is kept.
    Sums run in float64 in ``canonical_order``, so the result depends only on the accepted replies.
    """
    if not replies:
        raise ValueError("weighted_average needs at least one reply")
    replies = canonical_order(replies)
    total = float(sum(r.num_examples for r in replies))
    averaged = {}
    for key, current in template.items():
        if current.dtype.kind != "f":
            averaged[key] = current.copy()
            continue
        acc = np.zeros(current.shape, dtype=np.float64)
        for reply in replies:
            acc += reply.arrays[key].astype(np.float64) * (reply.num_examples / total)
        averaged[key] = acc.astype(current.dtype)
    return averaged


def weighted_metrics(replies: list[CheckedReply]) -> dict[str, float]:
    """The server-weighted mean of each metric all replies report (checked replies: finite, |v| <= 1e15),
    and the total weight under ``num-examples``."""
    total = float(sum(r.num_examples for r in replies))
    keys = set.intersection(*(set(r.metrics) for r in replies)) - set(IDENTITY_METRICS)
    # fsum is exactly rounded, so the mean does not depend on the order replies arrived in.
    metrics = {k: math.fsum(r.metrics[k] * r.num_examples for r in replies) / total for k in sorted(keys)}
    metrics[NUM_EXAMPLES] = int(total)
    return metrics


def _mean(replies: list[CheckedReply], template: dict[str, np.ndarray], trim_fraction: float) -> dict[str, np.ndarray]:
    return weighted_average(replies, template)


def _median(replies: list[CheckedReply], template: dict[str, np.ndarray], trim_fraction: float) -> dict[str, np.ndarray]:
    return median_average(replies, template)


def _krum_selection(replies: list[CheckedReply], template: dict[str, np.ndarray], hostile: int,
                    keep: int) -> list[CheckedReply]:
    """The ``keep`` replies Flower's Krum / Multi-Krum picks (``select_multikrum``: lowest sums of squared
    distances to their n − f − 2 nearest), assuming ``hostile`` (f) of them hostile; in node order."""
    replies = sorted(replies, key=lambda r: r.node_id)
    keys = [k for k, v in template.items() if v.dtype.kind == "f"]
    contents = [RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(r.arrays[k])) for k in keys})})
                for r in replies]
    chosen = {id(c) for c in select_multikrum(contents, num_malicious_nodes=hostile, num_nodes_to_select=keep)}
    return [reply for reply, content in zip(replies, contents) if id(content) in chosen]


def assumed_hostile(count: int, share: float) -> int:
    """f for Krum and Bulyan: ⌊``share`` × the replies⌋ (run config ``trim-fraction``)."""
    return int(share * count)


def _krum(replies: list[CheckedReply], template: dict[str, np.ndarray], share: float) -> dict[str, np.ndarray]:
    return weighted_average(_krum_selection(replies, template, assumed_hostile(len(replies), share), 1), template)


def _multi_krum(replies: list[CheckedReply], template: dict[str, np.ndarray], share: float) -> dict[str, np.ndarray]:
    hostile = assumed_hostile(len(replies), share)
    return weighted_average(_krum_selection(replies, template, hostile, max(1, len(replies) - hostile)), template)


def _bulyan(replies: list[CheckedReply], template: dict[str, np.ndarray], share: float) -> dict[str, np.ndarray]:
    """Flower's Bulyan: Multi-Krum picks θ = n − 2f, then each coordinate is the mean of the β = θ − 2f values
    nearest its median (``aggregate_n_closest_weights``). f is capped so that n ≥ 4f + 3."""
    hostile = min(assumed_hostile(len(replies), share), max(0, (len(replies) - 3) // 4))
    selected = _krum_selection(replies, template, hostile, len(replies) - 2 * hostile)
    keys = [k for k, v in template.items() if v.dtype.kind == "f"]
    stacks = [[reply.arrays[k].astype(np.float64) for k in keys] for reply in selected]
    medians = [np.median(np.stack(layer), axis=0) for layer in zip(*stacks)]
    nearest = aggregate_n_closest_weights(medians, stacks, max(1, len(selected) - 2 * hostile))
    result = {k: v.copy() for k, v in template.items()}  # counters: the server's value is kept
    result.update({k: np.asarray(v).astype(template[k].dtype).reshape(template[k].shape)
                   for k, v in zip(keys, nearest)})
    return result


# The one registry of aggregation names: mean is FedAvg's weighted mean; the others are Byzantine-robust
# (median and trimmed-mean coordinate-wise; krum, multi-krum and bulyan Flower's selection rules, assuming
# ``trim-fraction`` of the replies hostile).
AGGREGATIONS: dict[str, Callable[[list[CheckedReply], dict[str, np.ndarray], float], dict[str, np.ndarray]]] = {
    "mean": _mean, "median": _median, "trimmed-mean": trimmed_average, "krum": _krum, "multi-krum": _multi_krum,
    "bulyan": _bulyan}


def check_aggregation(method: str) -> None:
    if method not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {method!r}")


def aggregate(replies: list[CheckedReply], template: dict[str, np.ndarray], method: str = "mean",
              trim_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """The round's new arrays: the weighted mean (FedAvg), or a Byzantine-robust coordinate-wise
    median / trimmed mean, on whatever travels (Q for FedSQ, the whole network otherwise)."""
    check_aggregation(method)
    return AGGREGATIONS[method](replies, template, trim_fraction)
