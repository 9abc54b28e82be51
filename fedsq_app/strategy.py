"""Server-side aggregation: reply validation, the default defenses and robust averaging (pure functions),
and thin Flower strategy classes that use them.

Flower's own ``FedAvg`` ends the whole run when one reply has a different key set or lacks
``num-examples``, and it averages ``num_batches_tracked`` into a float. Here every reply is checked
against the global model's keys, shapes, dtypes and magnitudes; a bad reply is dropped and logged, the
round goes on. On by default, and tuned so that an honest federation never trips them (docs/RELIABILITY.md):
a robust distance guard (median + MAD of the round's update distances) and a clip of each node's
aggregation weight to a multiple of the round's median ``num-examples``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedsq_app.warmup import STRUCTURAL_RECORD

ArraySpecs = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype name)
NUM_EXAMPLES = "num-examples"
AGGREGATIONS = ("mean", "median", "trimmed-mean")
# An honest reply's arrays stay within this factor of the global model's largest |value| (floored at 1):
# local SGD moves weights by far less, and BN running statistics are moving averages of batch statistics.
# It stops finite poison (a weight at 1e30, everything x 1e6) even in rounds too small for the distance guard.
MAGNITUDE_RATIO = 1e3
# The distance guard's robust z: median + MAD_Z x 1.4826 x MAD is ~6 standard deviations for normal data.
MAD_Z = 6.0
MAD_TO_SIGMA = 1.4826


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


def update_distance(reply: CheckedReply, template: dict[str, np.ndarray]) -> float:
    """L2 distance (float64, over every floating array) between a reply and the current global model."""
    total = 0.0
    for key, current in template.items():
        if current.dtype.kind == "f":
            total += float(np.sum((reply.arrays[key].astype(np.float64) - current.astype(np.float64)) ** 2))
    return math.sqrt(total)


def distance_outliers(replies: list[CheckedReply], template: dict[str, np.ndarray],
                      max_ratio: float, weights: list[int] | None = None) -> list[tuple[int, str]]:
    """(index in ``replies``, reason) of each update too far from the global model to be honest.

    Far means beyond both ``max_ratio`` x the round's median distance and median + ``MAD_Z`` robust
    standard deviations (1.4826 x the median absolute deviation). The second term widens the bound when
    honest updates are spread out, so honest rounds do not trip it; the first keeps a floor when they are
    all alike (MAD near 0). A node with more data takes more local steps and moves further: with
    ``weights`` (the clipped num-examples claims) a node's bound grows by sqrt(its weight / the median
    weight) when above 1, so a large silo is not mistaken for an attacker (the clip caps that allowance).
    Off when ``max_ratio`` is 0, with fewer than 3 replies (a median of two is their mean: it cannot tell
    which one is the outlier) or when the median is 0 (nothing moved, no scale to compare with).
    """
    if max_ratio <= 0 or len(replies) < 3:
        return []
    distances = np.array([update_distance(reply, template) for reply in replies])
    median = float(np.median(distances))
    if median <= 0:
        return []
    mad = float(np.median(np.abs(distances - median)))
    bound = max(max_ratio * median, median + MAD_Z * MAD_TO_SIGMA * mad)
    weights = weights or [1] * len(replies)
    median_weight = float(np.median(weights))
    outliers = []
    for i, (d, weight) in enumerate(zip(distances, weights)):
        allowance = math.sqrt(max(1.0, weight / median_weight))
        if d > bound * allowance:
            outliers.append((i, f"update L2 distance {d:.4g} > {bound * allowance:.4g} (the round's median "
                                f"{median:.4g}; bound = max({max_ratio:g} x median, median + {MAD_Z:g} x 1.4826 x "
                                f"MAD {mad:.4g}) x sqrt(weight share) {allowance:.3g})"))
    return outliers


def clipped_weights(claims: list[int], max_ratio: float) -> list[int]:
    """Each claimed ``num-examples`` clipped to ``max_ratio`` x the round's median claim (from 3 replies on).

    Why a clip and not a weight fixed at a node's first claim: a first claim can already be a lie, and a
    silo that reconnects gets a new node id; the clip bounds every node's share in every round. A large
    honest node is never rejected, only weighted as ``max_ratio`` median nodes at most.
    """
    if max_ratio <= 0 or len(claims) < 3:
        return list(claims)
    cap = max(1, math.floor(max_ratio * float(np.median(claims))))
    return [min(claim, cap) for claim in claims]


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
            train_loss=reply.metrics.get("train_loss") if reply else None, created_at=_created_at(message)))
    return result


def split_replies(replies: Iterable[Message], expected: ArraySpecs, max_examples: int | None = None) -> RoundReplies:
    """Validation alone (no magnitude bounds, guard or clip): ``screen_replies`` is what strategies use."""
    template = {key: np.zeros(shape, dtype=dtype) for key, (shape, dtype) in expected.items()}
    return screen_replies(replies, template, max_examples=max_examples, check_magnitudes=False)


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


def aggregate(replies: list[CheckedReply], template: dict[str, np.ndarray], method: str = "mean",
              trim_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """The round's new arrays: the weighted mean (FedAvg), or a Byzantine-robust coordinate-wise
    median / trimmed mean, on whatever travels (Q for FedSQ, the whole network otherwise)."""
    if method == "median":
        return median_average(replies, template)
    if method == "trimmed-mean":
        return trimmed_average(replies, template, trim_fraction)
    if method != "mean":
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {method!r}")
    return weighted_average(replies, template)


def canonical_order(replies: list[CheckedReply]) -> list[CheckedReply]:
    """Replies in an order fixed by their content, not by arrival or by (randomly drawn) node ids.

    Float sums depend on their order; sorting by what a reply says makes a seeded run repeat bit for bit.
    Two replies that tie on both keys carry the same figures, so their relative order cannot matter.
    """
    return sorted(replies, key=lambda r: (r.num_examples, r.metrics.get("train_loss", 0.0)))


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
    total = float(sum(r.num_examples for r in replies))
    keys = set.intersection(*(set(r.metrics) for r in replies)) - {NUM_EXAMPLES}
    # fsum is exactly rounded, so the mean does not depend on the order replies arrived in.
    metrics = {k: math.fsum(r.metrics[k] * r.num_examples for r in replies) / total for k in sorted(keys)}
    metrics[NUM_EXAMPLES] = int(total)
    return metrics


class ValidatedFedAvg(FedAvg):
    """FedAvg whose ``aggregate_train`` validates every reply and never lets one bad reply end the run.

    Used as is for the FedAvg baseline. Keeps a per-round log of accepted and rejected replies. The
    defaults are the run config's: distance guard and weight clip on, plain (weighted) mean;
    ``aggregation`` 'median' or 'trimmed-mean' makes the average Byzantine-robust.
    """

    def __init__(self, *, min_valid_replies: int = 1, max_examples: int | None = None,
                 max_update_norm_ratio: float = 5.0, max_num_examples_ratio: float = 5.0,
                 aggregation: str = "mean", trim_fraction: float = 0.2, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        self.min_valid_replies = min_valid_replies
        self.max_examples = max_examples
        self.max_update_norm_ratio = max_update_norm_ratio
        self.max_num_examples_ratio = max_num_examples_ratio
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.current_arrays: ArrayRecord | None = None
        self.round_replies: dict[int, RoundReplies] = {}

    # Server-side state for checkpoints (e.g. a server optimiser's moments). Stateless here; a strategy
    # with state returns its arrays (saved as safetensors) and JSON-able scalars, and restores them.
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        return {}, {}

    def load_state_dict(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        if arrays or info:
            raise ValueError(f"{type(self).__name__} keeps no server state, but the checkpoint holds some "
                             f"({sorted(arrays)[:3]}, {sorted(info)[:3]}): was it written by another strategy?")

    def extra_train_config(self) -> dict:
        return {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays  # the template replies are checked against, and the fallback model
        config = ConfigRecord({**dict(config), **self.extra_train_config()})  # never mutate the caller's
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current_arrays is not None, "configure_train must run before aggregate_train"
        template = {k: a.numpy() for k, a in self.current_arrays.items()}
        checked = screen_replies(list(replies), template, max_examples=self.max_examples,
                                 max_update_norm_ratio=self.max_update_norm_ratio,
                                 max_num_examples_ratio=self.max_num_examples_ratio)
        self.round_replies[server_round] = checked
        log(INFO, "aggregate_train: %d replies accepted, %d rejected", len(checked.accepted), len(checked.rejected))
        for node_id, reason in checked.rejected:
            log(WARNING, "\t> rejected reply from node %s: %s", node_id, reason)
        for outcome in checked.outcomes:
            if outcome.accepted and outcome.weight != outcome.num_examples:
                log(INFO, "\t> node %s claims num-examples=%s, weighted as %s (%g x the round's median claim)",
                    outcome.node_id, outcome.num_examples, outcome.weight, self.max_num_examples_ratio)
        if len(checked.accepted) < self.min_valid_replies:
            log(WARNING, "round %d: %d valid replies < minimum %d; keeping the previous global model",
                server_round, len(checked.accepted), self.min_valid_replies)
            return None, None
        averaged = aggregate(checked.accepted, template, self.aggregation, self.trim_fraction)
        arrays = ArrayRecord({k: Array(v) for k, v in averaged.items()})
        return arrays, MetricRecord(weighted_metrics(checked.accepted))


class FedSQ(ValidatedFedAvg):
    """FedSQ's server: averages only Q (the travelling arrays) and tells clients which S to gate with.

    Guarantees: S never travels: the arrays this strategy sends, validates and averages are Q's only
    (``ArrayRecord(travelling_module(dual).state_dict())``), with exactly the plain model's keys. Every
    reply is validated against them (keys, shapes, dtypes, finite values, a positive integer
    ``num-examples``); a bad reply is dropped and logged (``round_replies``) and the round goes on, where
    Flower's FedAvg would end the run. Every client must gate with the same structural copy, or averaging
    would mix models whose gates disagree: S's SHA-256 (``DualCopy.structural_sha256()``) goes out with each
    round's train config under ``structural-sha256``, and ``check_structural`` on a node raises
    ``StructuralMismatchError`` for another S (its error reply is then rejected here).
    ``structural_sha256`` is required; other keyword arguments are Flower's ``FedAvg``'s.
    """

    def __init__(self, *, structural_sha256: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.structural_sha256 = structural_sha256

    def extra_train_config(self) -> dict:
        return {"structural-sha256": self.structural_sha256}


# ---------------------------------------------------------------------------------------------- baselines
# FedProx and FedAdam reuse Flower's classes; only reply validation and "what the update touches" are ours.
BN_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def parameter_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    """The trainable parameters among a state dict's arrays: floating arrays that are not BN buffers.

    A server optimiser must step only these: BN running statistics are data statistics (averaged, not
    optimised) and ``num_batches_tracked`` is a counter.
    """
    return [k for k, v in arrays.items() if v.dtype.kind == "f" and not k.endswith(BN_BUFFER_SUFFIXES)]


def _contiguous(array: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays (BN's num_batches_tracked) into shape (1,)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


class ValidatedFedProx(ValidatedFedAvg, FedProx):
    """Flower's FedProx (sends ``proximal-mu`` in the train config; the client adds (μ/2)·‖w − w_global‖²
    on its trained parameters) with validated aggregation. With μ = 0 it is FedAvg."""


class _GivenAverage(FedOpt):
    """Stands in for FedAvg's aggregation inside Flower's FedAdam: hands over an average computed elsewhere."""

    given: ArrayRecord | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return self.given, None


class AdamServerUpdate(FedAdam, _GivenAverage):
    """Flower's own FedAdam update (m_t, v_t, bias-corrected η, τ), fed a validated average.

    ``FedAdam.aggregate_train`` calls ``super().aggregate_train``, which the MRO resolves to
    ``_GivenAverage``: so every line of Flower's Adam maths runs unchanged on arrays we choose.
    """

    def step(self, server_round: int, current: dict[str, np.ndarray],
             averaged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """x_{t+1} from x_t = ``current`` and the clients' average ``averaged`` (same keys)."""
        self.current_arrays = current  # FedOpt's x_t: the arrays sent out this round
        self.given = ArrayRecord({k: Array(_contiguous(v)) for k, v in averaged.items()})
        stepped, _ = self.aggregate_train(server_round, [])
        # Flower's bias correction is a float64 scalar: cast back, or the next round's replies (float32)
        # would no longer match the global model's dtypes.
        return {k: a.numpy().astype(current[k].dtype) for k, a in stepped.items()}


class ValidatedFedAdam(ValidatedFedAvg):
    """FedAdam (Reddi et al. 2021) on the validated average, applied to trainable parameters only.

    Flower's ``FedAdam`` steps *every* array, BN running statistics and integer counters included. Here
    the validated, sample-weighted average is computed first; Adam's server step then replaces only the
    parameter keys, while BN running statistics stay plainly averaged and ``num_batches_tracked`` is kept.
    """

    def __init__(self, *, server_lr: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.adam = AdamServerUpdate(eta=server_lr, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        averaged_record, metrics = super().aggregate_train(server_round, replies)
        if averaged_record is None:  # too few valid replies: the previous global model stays, Adam does not step
            return averaged_record, metrics
        current = {k: a.numpy() for k, a in self.current_arrays.items()}
        averaged = {k: a.numpy() for k, a in averaged_record.items()}
        keys = parameter_keys(averaged)
        stepped = self.adam.step(server_round, {k: current[k] for k in keys}, {k: averaged[k] for k in keys})
        return ArrayRecord({k: Array(_contiguous(stepped.get(k, v))) for k, v in averaged.items()}), metrics

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """Adam's moments m_t and v_t (per parameter key), for the server's checkpoint."""
        arrays = {f"adam-m/{k}": v for k, v in (self.adam.m_t or {}).items()}
        arrays.update({f"adam-v/{k}": v for k, v in (self.adam.v_t or {}).items()})
        return arrays, {}

    def load_state_dict(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        unknown = sorted(k for k in arrays if not k.startswith(("adam-m/", "adam-v/")))
        if unknown or info:
            raise ValueError(f"{type(self).__name__}: the checkpoint's strategy state holds {unknown[:3]} "
                             f"{sorted(info)[:3]}, not Adam moments: was it written by another strategy?")
        m_t = {k.removeprefix("adam-m/"): v.copy() for k, v in arrays.items() if k.startswith("adam-m/")}
        v_t = {k.removeprefix("adam-v/"): v.copy() for k, v in arrays.items() if k.startswith("adam-v/")}
        self.adam.m_t, self.adam.v_t = m_t or None, v_t or None


class FedSQAdam(ValidatedFedAdam, FedSQ):
    """Extension beyond the paper: FedSQ (S gates, only Q travels) with FedAdam's server step on Q."""


# ---------------------------------------------------------------------------------------------- variants
# Two FedSQ variants beyond the paper, aimed at rounds-to-best (docs/RESULTS.md judges them).
class MomentumServerUpdate(FedAvgM, _GivenAverage):
    """Flower's own FedAvgM update (pseudo-gradient, momentum vector, server learning rate), fed a
    validated average: ``FedAvgM.aggregate_train``'s ``super()`` resolves to ``_GivenAverage``."""

    def step(self, server_round: int, current: dict[str, np.ndarray],
             averaged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """x_{t+1} from x_t = ``current`` and the clients' average ``averaged`` (same keys, same order)."""
        self.current_arrays = ArrayRecord({k: Array(_contiguous(v)) for k, v in current.items()})
        self.given = ArrayRecord({k: Array(_contiguous(averaged[k])) for k in current})
        stepped, _ = self.aggregate_train(server_round, [])
        return {k: a.numpy().astype(current[k].dtype) for k, a in stepped.items()}


class FedSQMomentum(FedSQ):
    """FedSQ with FedAvgM's server momentum on Q: v ← β·v + (x_t − avg), x_{t+1} = x_t − η·v, on Q's
    trainable parameters only (BN running statistics stay plainly averaged, counters kept), as FedAdam here."""

    def __init__(self, *, server_momentum: float = 0.5, server_lr: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.momentum = MomentumServerUpdate(server_learning_rate=server_lr, server_momentum=server_momentum)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        averaged_record, metrics = super().aggregate_train(server_round, replies)
        if averaged_record is None:  # too few valid replies: the previous model stays, the momentum too
            return averaged_record, metrics
        current = {k: a.numpy() for k, a in self.current_arrays.items()}
        averaged = {k: a.numpy() for k, a in averaged_record.items()}
        keys = parameter_keys(averaged)
        stepped = self.momentum.step(server_round, {k: current[k] for k in keys}, averaged)
        return ArrayRecord({k: Array(_contiguous(stepped.get(k, v))) for k, v in averaged.items()}), metrics

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        vector = self.momentum.momentum_vector
        keys = list(self.momentum.current_arrays.keys()) if vector is not None else []
        return {f"momentum/{k}": v for k, v in zip(keys, vector or [])}, {}

    def load_state_dict(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        unknown = sorted(k for k in arrays if not k.startswith("momentum/"))
        if unknown or info:
            raise ValueError(f"{type(self).__name__}: the checkpoint's strategy state holds {unknown[:3]} "
                             f"{sorted(info)[:3]}, not a momentum vector: was it written by another strategy?")
        # Kept in the checkpoint's (= the parameters') key order, as FedAvgM pairs it with x_t's arrays.
        self.momentum.momentum_vector = [v.copy() for v in arrays.values()] or None


class FedSQWarmup(FedSQ):
    """FedAvg for the first ``warmup_rounds`` rounds, then FedSQ with S frozen at that round's global model.

    Tests the premise that gates settle early. The S hash in the train config names the start model during
    the warm-up (clients then train the plain network) and S's new hash after ``switch``: it changes exactly
    once. S's arrays travel once per node, in a second ArrayRecord, until that node's reply is accepted
    (from then on the node keeps S in its context state); Q's traffic is FedAvg's.
    """

    def __init__(self, *, warmup_rounds: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.warmup_rounds = warmup_rounds
        self.structural: ArrayRecord | None = None  # S after the switch
        self.holders: set[int] = set()  # nodes known to hold it

    def switch(self, structural: ArrayRecord, structural_sha256: str) -> None:
        self.structural, self.structural_sha256 = structural, structural_sha256

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.structural is not None:
            for message in messages:
                if message.metadata.dst_node_id not in self.holders:
                    message.content[STRUCTURAL_RECORD] = self.structural
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = super().aggregate_train(server_round, replies)
        if self.structural is not None:
            self.holders.update(reply.node_id for reply in self.round_replies[server_round].accepted)
        return result

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        if self.structural is None:
            return {}, {}
        arrays = {f"{STRUCTURAL_RECORD}/{k}": a.numpy() for k, a in self.structural.items()}
        return arrays, {"structural_sha256": self.structural_sha256, "holders": sorted(self.holders)}

    def load_state_dict(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        if not arrays and not info:
            return  # saved before the switch
        if any(not k.startswith(f"{STRUCTURAL_RECORD}/") for k in arrays) or "structural_sha256" not in info:
            raise ValueError(f"{type(self).__name__}: the checkpoint's strategy state is not a warm-up S: "
                             "was it written by another strategy?")
        self.switch(ArrayRecord({k.removeprefix(f"{STRUCTURAL_RECORD}/"): Array(_contiguous(v))
                                 for k, v in arrays.items()}), info["structural_sha256"])
        self.holders = set(info.get("holders", []))

