"""Reply checking on the server: what a training reply must hold before it may touch the global model.

Pure functions; nothing a node sends may raise out of them. Flower's own ``FedAvg`` ends the whole run when
one reply has a different key set or lacks ``num-examples``, and it averages ``num_batches_tracked`` into a
float. Here every reply is checked against the global model's keys, shapes, dtypes and magnitudes; a bad
reply is dropped (with its reason) and the round goes on. ``screen_replies`` then applies the default
defenses (``fedsq_app.core.defenses``) to the replies that passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message

from fedsq_app.core.defenses import clipped_weights, distance_outliers
from fedsq_app.core.wire import NUM_EXAMPLES, TRAIN_LOSS

ArraySpecs = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype name)
# An honest reply's arrays stay within this factor of the global model's largest |value| (floored at 1):
# local SGD moves weights by far less, and BN running statistics are moving averages of batch statistics.
# It stops finite poison (a weight at 1e30, everything x 1e6) even in rounds too small for the distance guard.
MAGNITUDE_RATIO = 1e3


def array_specs(arrays: ArrayRecord) -> ArraySpecs:
    return {key: (tuple(array.shape), str(array.dtype)) for key, array in arrays.items()}


@dataclass(frozen=True)
class CheckedReply:
    """A reply that passed validation: its arrays by key, its weight and its metrics."""

    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class ReplyOutcome:
    """What the server made of one reply (results.json's ``replies``): claims are recorded only once the
    reply parsed (a malformed reply's figures mean nothing)."""

    node_id: int
    accepted: bool
    reason: str = ""  # why it was rejected; "" if accepted
    num_examples: int | None = None  # as claimed
    weight: int | None = None  # as used in the average (the claim, clipped); None if rejected
    train_loss: float | None = None
    created_at: float | None = None  # when the node created the reply (its clock), seconds since the epoch


@dataclass
class RoundReplies:
    accepted: list[CheckedReply] = field(default_factory=list)  # weights already clipped
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (node id, reason)
    outcomes: list[ReplyOutcome] = field(default_factory=list)  # one per reply, in arrival order


def magnitude_bounds(template: dict[str, np.ndarray]) -> dict[str, float]:
    """The largest |value| a reply may hold in each floating array: ``MAGNITUDE_RATIO`` x the global
    model's largest |value| there, floored at 1 (a freshly zeroed bias still gets room to move)."""
    return {key: MAGNITUDE_RATIO * max(float(np.max(np.abs(value), initial=0.0)), 1.0)
            for key, value in template.items() if value.dtype.kind == "f"}


def check_array_sanity(key: str, value: np.ndarray, bound: float | None) -> str:
    """Why a finite floating array cannot be an honest update ("" if it can): a negative BN running
    variance (evaluation would take its square root: NaN), or a value far beyond the global model's scale."""
    if key.endswith("running_var") and value.size and float(value.min()) < 0:
        return f"'{key}' holds a negative BN running variance ({float(value.min()):.4g})"
    if bound is not None and value.size:
        largest = float(np.max(np.abs(value)))
        if largest > bound:
            return f"'{key}' holds |value| {largest:.4g} > {bound:.4g} ({MAGNITUDE_RATIO:g} x the global model's scale)"
    return ""


def check_train_reply(message: Message, expected: ArraySpecs, max_examples: int | None = None,
                      bounds: dict[str, float] | None = None) -> CheckedReply | str:
    """Return the reply's checked contents, or the reason it must be rejected. Never raises.

    Accepted only if: no error; exactly one ArrayRecord (the expected keys, shapes and dtypes, every value
    finite, BN running variances >= 0, every floating array within ``bounds``, see ``magnitude_bounds``)
    and one MetricRecord (``num-examples`` a positive integer <= ``max_examples`` if given, every metric a
    finite number).
    """
    try:
        if message.has_error():
            return f"error reply: {message.error.reason}"
        content = message.content
        array_records, metric_records = list(content.array_records.values()), list(content.metric_records.values())
        if len(array_records) != 1 or len(metric_records) != 1:
            return f"expected one ArrayRecord and one MetricRecord, got {len(array_records)} and {len(metric_records)}"
        arrays, metrics = array_records[0], metric_records[0]
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        if missing or extra:
            return f"array keys differ from the global model: missing {missing[:3]}, unexpected {extra[:3]}"
        values = {}
        for key, (shape, dtype) in expected.items():
            array = arrays[key]
            if tuple(array.shape) != shape or str(array.dtype) != dtype:
                return f"'{key}' is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
            value = array.numpy()
            if value.dtype.kind == "f":
                if not np.isfinite(value).all():
                    return f"'{key}' holds NaN or Inf"
                insane = check_array_sanity(key, value, (bounds or {}).get(key))
                if insane:
                    return insane
            values[key] = value
        num_examples = metrics.get(NUM_EXAMPLES)
        if isinstance(num_examples, bool) or not isinstance(num_examples, int):
            return f"'{NUM_EXAMPLES}' must be an integer, got {num_examples!r}"
        if num_examples <= 0 or (max_examples is not None and num_examples > max_examples):
            return f"'{NUM_EXAMPLES}'={num_examples} is outside [1, {max_examples or 'inf'}]"
        scalars = {}
        for key, value in metrics.items():
            if isinstance(value, (list, bool)) or not math.isfinite(float(value)):
                return f"metric '{key}' is not a finite number: {value!r}"
            scalars[key] = float(value)
        node_id = message.metadata.src_node_id
        return CheckedReply(node_id if isinstance(node_id, int) else -1, values, num_examples, scalars)
    except Exception as error:  # a malformed message must never end the run
        return f"malformed reply ({type(error).__name__}: {error})"


def _node_id(message: Message) -> int:
    try:
        return int(message.metadata.src_node_id)
    except Exception:
        return -1


def _created_at(message: Message) -> float | None:
    try:
        return float(message.metadata.created_at)
    except Exception:
        return None


def screen_replies(replies: Iterable[Message], template: dict[str, np.ndarray], *,
                   max_examples: int | None = None, max_update_norm_ratio: float = 0.0,
                   max_num_examples_ratio: float = 0.0, check_magnitudes: bool = True) -> RoundReplies:
    """All server-side checks of one round's training replies (pure, never raises): validation (with
    magnitude sanity), one accepted reply per node, the distance guard, then the weight clip.

    Accepted replies come back sorted by node id, so nothing depends on the order in which replies
    happened to arrive (a resumed run then matches an uninterrupted one). Replies are tracked by index,
    never by equality (a CheckedReply holds numpy arrays, which do not compare to a single bool).
    """
    messages = list(replies)
    expected = {key: (tuple(value.shape), str(value.dtype)) for key, value in template.items()}
    bounds = magnitude_bounds(template) if check_magnitudes else {}
    checked = [check_train_reply(message, expected, max_examples, bounds) for message in messages]
    reasons = {i: c for i, c in enumerate(checked) if isinstance(c, str)}
    seen: set[int] = set()
    for i, reply in enumerate(checked):
        if i not in reasons:
            if reply.node_id in seen:  # a second reply must not double a node's weight
                reasons[i] = f"duplicate reply: node {reply.node_id} already sent one this round"
            seen.add(reply.node_id)
    candidates = sorted((i for i in range(len(messages)) if i not in reasons), key=lambda i: checked[i].node_id)
    claims = clipped_weights([checked[i].num_examples for i in candidates], max_num_examples_ratio)
    for position, reason in distance_outliers([checked[i] for i in candidates], template, max_update_norm_ratio,
                                              claims):
        reasons[candidates[position]] = reason
    kept = [i for i in candidates if i not in reasons]
    weights = dict(zip(kept, clipped_weights([checked[i].num_examples for i in kept], max_num_examples_ratio)))

    result = RoundReplies()
    result.accepted = [replace(checked[i], num_examples=weights[i]) for i in kept]
    for i, message in enumerate(messages):
        reply = checked[i] if isinstance(checked[i], CheckedReply) else None
        node_id = reply.node_id if reply else _node_id(message)
        if i in reasons:
            result.rejected.append((node_id, reasons[i]))
        result.outcomes.append(ReplyOutcome(
            node_id=node_id, accepted=i not in reasons, reason=reasons.get(i, ""),
            num_examples=reply.num_examples if reply else None, weight=weights.get(i),
            train_loss=reply.metrics.get(TRAIN_LOSS) if reply else None, created_at=_created_at(message)))
    return result


def split_replies(replies: Iterable[Message], expected: ArraySpecs, max_examples: int | None = None) -> RoundReplies:
    """Validation alone (no magnitude bounds, guard or clip): ``screen_replies`` is what strategies use."""
    template = {key: np.zeros(shape, dtype=dtype) for key, (shape, dtype) in expected.items()}
    return screen_replies(replies, template, max_examples=max_examples, check_magnitudes=False)

