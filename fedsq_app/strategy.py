"""Server-side aggregation: reply validation and sample-weighted averaging (pure functions), and thin
Flower strategy classes that use them.

Flower's own ``FedAvg`` ends the whole run when one reply has a different key set or lacks
``num-examples``, and it averages ``num_batches_tracked`` into a float. Here every reply is checked
against the global model's keys, shapes and dtypes; a bad reply is dropped and logged, the round goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.serverapp.strategy.fedopt import FedOpt

ArraySpecs = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype name)
NUM_EXAMPLES = "num-examples"


def array_specs(arrays: ArrayRecord) -> ArraySpecs:
    return {key: (tuple(array.shape), str(array.dtype)) for key, array in arrays.items()}


@dataclass(frozen=True)
class CheckedReply:
    """A reply that passed validation: its arrays by key, its weight and its metrics."""

    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


@dataclass
class RoundReplies:
    accepted: list[CheckedReply] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (node id, reason)


def check_train_reply(message: Message, expected: ArraySpecs, max_examples: int | None = None) -> CheckedReply | str:
    """Return the reply's checked contents, or the reason it must be rejected. Never raises.

    Accepted only if: no error; exactly one ArrayRecord (the expected keys, shapes and dtypes, every value
    finite) and one MetricRecord (``num-examples`` a positive integer <= ``max_examples``, every metric a
    finite number). ``max_examples`` is the sane bound on a node's dataset size (the server cannot see a
    node's partition, so it uses the size of the whole federated pool: no honest node holds more).
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
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                return f"'{key}' holds NaN or Inf"
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


def split_replies(replies: Iterable[Message], expected: ArraySpecs, max_examples: int | None = None) -> RoundReplies:
    """Check every reply; accepted ones come back sorted by node id, so the aggregate does not depend
    on the order in which replies happened to arrive (a resumed run then matches an uninterrupted one)."""
    result = RoundReplies()
    for message in replies:
        checked = check_train_reply(message, expected, max_examples)
        if isinstance(checked, CheckedReply):
            result.accepted.append(checked)
        else:
            try:
                node_id = int(message.metadata.src_node_id)
            except Exception:
                node_id = -1
            result.rejected.append((node_id, checked))
    result.accepted.sort(key=lambda reply: reply.node_id)  # stable: equal ids keep arrival order
    return result


def update_distance(reply: CheckedReply, template: dict[str, np.ndarray]) -> float:
    """L2 distance (float64, over every floating array) between a reply and the current global model."""
    total = 0.0
    for key, current in template.items():
        if current.dtype.kind == "f":
            total += float(np.sum((reply.arrays[key].astype(np.float64) - current.astype(np.float64)) ** 2))
    return math.sqrt(total)


def distance_outliers(replies: list[CheckedReply], template: dict[str, np.ndarray],
                      max_ratio: float) -> list[tuple[CheckedReply, str]]:
    """Replies whose distance from the global model exceeds ``max_ratio`` × the round's median distance.

    Off when ``max_ratio`` is 0, with fewer than 3 replies (a median of two is their mean: it cannot tell
    which one is the outlier) or when the median is 0 (nothing moved, no scale to compare with).
    """
    if max_ratio <= 0 or len(replies) < 3:
        return []
    distances = [update_distance(reply, template) for reply in replies]
    median = float(np.median(distances))
    if median <= 0:
        return []
    return [(reply, f"update L2 distance {d:.4g} > {max_ratio:g} x the round's median {median:.4g}")
            for reply, d in zip(replies, distances) if d > max_ratio * median]


def screen_replies(replies: Iterable[Message], template: dict[str, np.ndarray], *,
                   max_examples: int | None = None, max_update_norm_ratio: float = 0.0) -> RoundReplies:
    """All server-side checks of one round's training replies (pure): validation, then the distance guard."""
    expected = {key: (tuple(value.shape), str(value.dtype)) for key, value in template.items()}
    result = split_replies(replies, expected, max_examples)
    outliers = distance_outliers(result.accepted, template, max_update_norm_ratio)
    for reply, reason in outliers:
        result.accepted.remove(reply)
        result.rejected.append((reply.node_id, reason))
    return result


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

    Used as is for the FedAvg baseline. Keeps a per-round log of accepted and rejected replies.
    """

    def __init__(self, *, min_valid_replies: int = 1, max_examples: int | None = None,
                 max_update_norm_ratio: float = 0.0, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.min_valid_replies = min_valid_replies
        self.max_examples = max_examples
        self.max_update_norm_ratio = max_update_norm_ratio
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
                                 max_update_norm_ratio=self.max_update_norm_ratio)
        self.round_replies[server_round] = checked
        log(INFO, "aggregate_train: %d replies accepted, %d rejected", len(checked.accepted), len(checked.rejected))
        for node_id, reason in checked.rejected:
            log(WARNING, "\t> rejected reply from node %s: %s", node_id, reason)
        if len(checked.accepted) < self.min_valid_replies:
            log(WARNING, "round %d: %d valid replies < minimum %d; keeping the previous global model",
                server_round, len(checked.accepted), self.min_valid_replies)
            return None, None
        averaged = weighted_average(checked.accepted, template)
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
