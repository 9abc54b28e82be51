"""Reply checking on the server: what a training reply must hold before it may touch the global model.

Pure functions; nothing a node sends may raise out of them. Every check reads what a reply *decodes* to
(dtype, shape, byte length and values of each array's bytes), never what its metadata declares: an
``Array`` may declare float32[10, 128] and carry three complex numbers. A silo's word is taken for
nothing the average depends on: its weight comes from ``fedsq_app.core.weights``, and each update's
influence is bounded by ``fedsq_app.core.defenses`` (docs/RELIABILITY.md, "Trust model").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, Message

from fedsq_app.core.defenses import (DEFAULT_CLIP_MULTIPLIER, DEFAULT_DEVIATION_BOUND, DEFAULT_INFLUENCE_BOUND,
                                     MIN_REPLIES_FOR_MEDIAN, alignments, bound_deviation, bound_influence,
                                     clamp_bn_statistics, clip_updates, deviations, lower_median, median_update,
                                     update_keys, update_norm)
from fedsq_app.core.packing import decode_arrays
from fedsq_app.core.wire import NUM_EXAMPLES, REFUSED_PERMANENTLY, TRAIN_LOSS

ArraySpecs = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype name)
# An honest reply's arrays stay within this factor of the global model's largest |value| (floored at 1):
# local SGD moves weights by far less, and BN running statistics are moving averages of batch statistics.
# It needs no other reply, so it also works in rounds of one or two replies.
MAGNITUDE_RATIO = 1e3
# A metric beyond this is no loss or count an honest node reports; the bound keeps every weighted sum
# of metrics finite (math.fsum raises on +1e308 + -1e308).
METRIC_BOUND = 1e15


def array_specs(arrays: ArrayRecord) -> ArraySpecs:
    return {key: (tuple(array.shape), str(array.dtype)) for key, array in arrays.items()}


@dataclass(frozen=True)
class CheckedReply:
    """A reply that passed validation: its decoded arrays by key, its aggregation weight and its metrics.

    ``num_examples`` is the weight the average uses: after ``screen_replies`` the server's own figure
    (``fedsq_app.core.weights``); ``claimed`` is what the node said, kept for the record only."""

    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    claimed: int | None = None


@dataclass(frozen=True)
class ReplyOutcome:
    """What the server made of one reply (results.json's ``replies``): claims are recorded only once the
    reply parsed (a malformed reply's figures mean nothing)."""

    node_id: int
    accepted: bool
    reason: str = ""  # why it was rejected; "" if accepted
    num_examples: int | None = None  # as claimed (never used as a weight)
    weight: int | None = None  # the server's weight for this node; None if rejected
    train_loss: float | None = None
    created_at: float | None = None  # when the node created the reply (its clock), seconds since the epoch
    # Its update (influence bound: its distance from the median update) was scaled by this; < 1: bounded.
    clip_scale: float | None = None  # None if rejected
    bn_clamped: int | None = None  # BN statistics coordinates clamped into the other replies' range
    update_norm: float | None = None  # ‖Δ_k‖ as sent (before any bound); None if rejected
    deviation: float | None = None  # ‖Δ_k − c‖, c the round's median update (from 3 replies)
    alignment: float | None = None  # cos(Δ_k, c): below 0, against the round's median update (from 3 replies)


@dataclass
class RoundReplies:
    accepted: list[CheckedReply] = field(default_factory=list)  # server weights, clipped updates
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (node id, reason)
    outcomes: list[ReplyOutcome] = field(default_factory=list)  # one per reply, in arrival order
    # The round's bound: the limit on each silo's pull (influence bound) or on each update's norm (norm
    # clip); None: off or no replies.
    clip_bound: float | None = None
    bound_kind: str | None = None  # which: "pull" (influence bound) or "norm" (norm clip); None: no bound
    reference_norm: float | None = None  # the accepted updates' lower median norm (the next rounds' floor)
    reference_deviation: float | None = None  # their lower median distance from the median update (likewise)


def magnitude_bounds(template: dict[str, np.ndarray]) -> dict[str, float]:
    """The largest |value| a reply may hold in each floating array: ``MAGNITUDE_RATIO`` x the global
    model's largest |value| there, floored at 1 (a freshly zeroed bias still gets room to move)."""
    return {key: MAGNITUDE_RATIO * max(float(np.max(np.abs(value), initial=0.0)), 1.0)
            for key, value in template.items() if value.dtype.kind == "f"}


def check_array_sanity(key: str, value: np.ndarray, bound: float | None) -> str:
    """Why a finite floating array cannot be an honest update ("" if it can): a BN running variance
    <= 0 (evaluation divides by its square root), or a value far beyond the global model's scale."""
    if key.endswith("running_var") and value.size and float(value.min()) <= 0:
        return f"'{key}' holds a BN running variance <= 0 ({float(value.min()):.4g})"
    if bound is not None and value.size:
        largest = float(np.max(np.abs(value)))
        if largest > bound:
            return f"'{key}' holds |value| {largest:.4g} > {bound:.4g} ({MAGNITUDE_RATIO:g} x the global model's scale)"
    return ""


def check_metrics(metrics) -> dict[str, float] | str:
    """Every metric a finite number within ``METRIC_BOUND``, and ``num-examples`` a positive int."""
    num_examples = metrics.get(NUM_EXAMPLES)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
        return f"'{NUM_EXAMPLES}' must be a positive integer, got {num_examples!r}"
    scalars = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric '{key}' is not a number: {value!r}"
        value = float(value)
        if not math.isfinite(value) or abs(value) > METRIC_BOUND:
            return f"metric '{key}' is not a finite number within +-{METRIC_BOUND:g}: {value!r}"
        scalars[key] = value
    return scalars


def check_train_reply(message: Message, template: dict[str, np.ndarray],
                      bounds: dict[str, float] | None = None) -> CheckedReply | str:
    """Return the reply's checked contents, or the reason it must be rejected. Never raises.

    Accepted only if: no error; exactly one ArrayRecord whose arrays (packed or not, ``core/packing.py``)
    decode to exactly the global model's keys, dtypes, shapes and byte lengths, every floating value finite, BN running variances > 0 and every
    floating array within ``bounds`` (see ``magnitude_bounds``); and exactly one MetricRecord (see
    ``check_metrics``).
    """
    try:
        if message.has_error():
            return f"error reply: {message.error.reason}"
        content = message.content
        array_records, metric_records = list(content.array_records.values()), list(content.metric_records.values())
        if len(array_records) != 1 or len(metric_records) != 1:
            return f"expected one ArrayRecord and one MetricRecord, got {len(array_records)} and {len(metric_records)}"
        arrays, metrics = array_records[0], metric_records[0]
        values = decode_arrays(arrays, template)
        if isinstance(values, str):
            return values
        for key, value in values.items():
            if value.dtype.kind == "f":
                if not np.isfinite(value).all():
                    return f"'{key}' holds NaN or Inf"
                insane = check_array_sanity(key, value, (bounds or {}).get(key))
                if insane:
                    return insane
        scalars = check_metrics(metrics)
        if isinstance(scalars, str):
            return scalars
        node_id = message.metadata.src_node_id
        claimed = int(metrics[NUM_EXAMPLES])
        return CheckedReply(node_id if isinstance(node_id, int) else -1, values, claimed, scalars, claimed)
    except Exception as error:  # a malformed message must never end the run
        return f"malformed reply ({type(error).__name__}: {error})"


def node_id_of(message: Message) -> int:
    """The sending node's id, or -1 if the message has none that reads as an int."""
    try:
        return int(message.metadata.src_node_id)
    except Exception:
        return -1


def permanent_refusals(replies: Iterable[Message]) -> list[tuple[int, str]]:
    """(node id, reason) of each error reply whose code is ``wire.REFUSED_PERMANENTLY``: the node refuses for
    a reason that will not change this run (leakage, another S). Pure, never raises; a reply without a node
    id that reads as an int, or whose error cannot be read, is left out."""
    refused = []
    for message in replies:
        try:
            if not message.has_error() or message.error.code != REFUSED_PERMANENTLY:
                continue
            node_id = int(message.metadata.src_node_id)
            refused.append((node_id, str(message.error.reason)[:1000]))
        except Exception:  # a malformed reply is screened elsewhere; it excludes nobody
            continue
    return refused


def _created_at(message: Message) -> float | None:
    try:
        return float(message.metadata.created_at)
    except Exception:
        return None


# (checked replies) -> each one's weight, or the reason the server cannot weigh it.
WeightPolicy = Callable[[list[CheckedReply]], list["int | str"]]


def equal_weights(replies: list[CheckedReply]) -> list[int | str]:
    """Every node counts once: the choice when the server knows no node's size (a claim is never one)."""
    return [1] * len(replies)


def weigh_each(weigh: WeightPolicy, replies: list[CheckedReply]) -> list[int | str]:
    """``weigh(replies)``; if the policy fails on the round, each reply is weighed alone, so that its failure
    costs only the replies it fails on (never ends the run)."""
    try:
        weighed = list(weigh(replies))
        if len(weighed) == len(replies):
            return weighed
    except Exception:
        pass
    result: list[int | str] = []
    for reply in replies:
        try:
            (weight,) = weigh([reply])
            result.append(weight if isinstance(weight, str) or (isinstance(weight, int) and weight > 0)
                          else f"the server's weight for it is not a positive integer ({weight!r})")
        except Exception as error:
            result.append(f"the server could not weigh this reply ({type(error).__name__}: {error})")
    return result


def screen_replies(replies: Iterable[Message], template: dict[str, np.ndarray], *,
                   weigh: WeightPolicy = equal_weights, clip_multiplier: float = DEFAULT_CLIP_MULTIPLIER,
                   influence_bound: float = DEFAULT_INFLUENCE_BOUND, check_magnitudes: bool = True,
                   clamp_bn: bool = True, norm_floor: float = 0.0, deviation_bound: float = DEFAULT_DEVIATION_BOUND,
                   deviation_floor: float = 0.0, opposed_before: frozenset[int] = frozenset(),
                   opposition: float = 0.0) -> RoundReplies:
    """All server-side checks of one round's training replies (pure, never raises): validation of what
    decodes, one reply per node, the server's weights, the direction check, then the influence bounds
    (``fedsq_app.core.defenses``: from 3 replies each silo's pull bounded by ``influence_bound``, else each
    update norm-clipped by ``clip_multiplier``; the BN statistics clamp).

    Direction check (``opposition`` τ > 0): a reply whose update points against the round's median update
    (``alignment`` < −τ), from a node in ``opposed_before`` (its previous reply did too), is rejected before
    the bounds are set.

    Accepted replies come back sorted by node id, so nothing depends on the order in which replies
    happened to arrive. Replies are tracked by index, never by equality.
    """
    messages = list(replies)
    bounds = magnitude_bounds(template) if check_magnitudes else {}
    checked = [check_train_reply(message, template, bounds) for message in messages]
    reasons = {i: c for i, c in enumerate(checked) if isinstance(c, str)}
    seen: set[int] = set()
    for i, reply in enumerate(checked):
        if i not in reasons:
            if reply.node_id in seen:  # a second reply must not double a node's weight
                reasons[i] = f"duplicate reply: node {reply.node_id} already sent one this round"
            seen.add(reply.node_id)
    candidates = sorted((i for i in range(len(messages)) if i not in reasons), key=lambda i: checked[i].node_id)
    weighed = weigh_each(weigh, [checked[i] for i in candidates])
    weights = {}
    for i, weight in zip(candidates, weighed):
        if isinstance(weight, str):
            reasons[i] = weight
        else:
            weights[i] = weight
    kept = [i for i in candidates if i not in reasons]
    keys = update_keys(template)
    norm_of = {i: update_norm(checked[i], template, keys) for i in kept} if keys else {}
    aligned, center = {}, None
    if len(kept) >= MIN_REPLIES_FOR_MEDIAN and keys:
        replies_kept = [checked[i] for i in kept]
        center = median_update(replies_kept, template, keys)
        aligned = dict(zip(kept, alignments(replies_kept, template, keys, center, [norm_of[i] for i in kept])))
        for i in kept:
            if opposition > 0 and aligned[i] < -opposition and checked[i].node_id in opposed_before:
                reasons[i] = (f"its update points against the round's median update (cosine {aligned[i]:.3f}), "
                              "as its previous reply's did")
        if any(i in reasons for i in kept):  # fewer replies, another median
            center = None
        kept = [i for i in kept if i not in reasons]
    weighted = [replace(checked[i], num_examples=weights[i]) for i in kept]
    norms = [norm_of[i] for i in kept] if keys else []
    # The median update is the costliest figure here (a sort per coordinate): computed once for the round.
    measured = deviations(weighted, template, keys, center) if len(weighted) >= MIN_REPLIES_FOR_MEDIAN and keys \
        else None
    spread = measured[1] if measured else []
    deviated, deviation_scales, typical = bound_deviation(weighted, template, deviation_bound, deviation_floor,
                                                          measured)
    clipped, scales, bound = bound_influence(deviated, template, influence_bound, norm_floor)
    kind = "pull"
    if bound is None and typical is not None:
        scales, bound, kind = deviation_scales, typical, "deviation"
    elif bound is None:  # both bounds off, or fewer than 3 replies: the norm clip
        clipped, scales, bound = clip_updates(weighted, template, clip_multiplier, norm_floor)
        kind = "norm"
    else:
        scales = [a * b for a, b in zip(scales, deviation_scales)]
    clamped, clamp_counts = clamp_bn_statistics(clipped, template) if clamp_bn else (clipped, [0] * len(clipped))

    result = RoundReplies(accepted=clamped, clip_bound=bound, bound_kind=kind if bound is not None else None,
                          reference_norm=max(lower_median(norms), norm_floor) if norms else None,
                          reference_deviation=max(lower_median(spread), deviation_floor) if spread else None)
    position = {i: p for p, i in enumerate(kept)}
    for i, message in enumerate(messages):
        reply = checked[i] if isinstance(checked[i], CheckedReply) else None
        node_id = reply.node_id if reply else node_id_of(message)
        if i in reasons:
            result.rejected.append((node_id, reasons[i]))
        p = position.get(i)
        result.outcomes.append(ReplyOutcome(
            node_id=node_id, accepted=i not in reasons, reason=reasons.get(i, ""),
            num_examples=reply.claimed if reply else None, weight=weights.get(i),
            train_loss=reply.metrics.get(TRAIN_LOSS) if reply else None, created_at=_created_at(message),
            clip_scale=scales[p] if p is not None else None,
            update_norm=norms[p] if p is not None and norms else None,
            deviation=spread[p] if p is not None and spread else None, alignment=aligned.get(i),
            bn_clamped=clamp_counts[p] if p is not None else None))
    return result


def split_replies(replies: Iterable[Message], expected: ArraySpecs) -> RoundReplies:
    """Validation alone (equal weights; no magnitude bounds, clipping or clamp)."""
    template = {key: np.zeros(shape, dtype=dtype) for key, (shape, dtype) in expected.items()}
    return screen_replies(replies, template, clip_multiplier=0.0, influence_bound=0.0, deviation_bound=0.0,
                          check_magnitudes=False, clamp_bn=False)


def bound_note(checked: RoundReplies, scale: float) -> str:
    """What the round's bound did to one reply, in the log: its pull on the mean (influence bound), or its
    update's length (norm clip, below 3 replies), and the factor its update (its deviation from the round's
    median update, for the pull) was scaled by."""
    limit = checked.clip_bound
    if checked.bound_kind == "deviation":
        return (f"deviation bounded: its distance from the median update scaled by {scale:.3g} (the round's median "
                f"distance {limit:.4g}, times the bound, wider for a larger weight)")
    if checked.bound_kind == "pull":
        pull = f"{limit / scale:.4g}" if scale > 0 else "any"
        return f"pull bounded: deviation from the median update scaled by {scale:.3g} (pull {pull} -> limit {limit:.4g})"
    return (f"update norm-clipped: scaled by {scale:.3g} (round's length bound {limit:.4g}, wider for a "
            "larger weight)")
