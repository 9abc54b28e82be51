"""The thin Flower strategy classes: FedSQ, the validated FedAvg it extends, and the baselines and variants.

Each subclasses Flower's own class and overrides only what FedSQ changes: replies are checked and screened
(``fedsq_app.core.replies``, ``fedsq_app.core.defenses``) and averaged (``fedsq_app.core.aggregation``)
by pure functions; the server optimisers (FedAdam, FedAvgM) are Flower's maths fed a validated average.
Imports numpy and flwr, never torch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from logging import INFO, WARNING
from typing import Callable, Iterable, Iterator

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.serverapp.strategy.fedopt import FedOpt

from fedsq_app.core.aggregation import aggregate, check_aggregation, weighted_metrics
from fedsq_app.core.defenses import (DEFAULT_CLIP_MULTIPLIER, DEFAULT_DEVIATION_BOUND, DEFAULT_DIRECTION_CHECK,
                                     DEFAULT_INFLUENCE_BOUND, MIN_REPLIES_FOR_MEDIAN, norm_floor, update_keys)
from fedsq_app.core.judge import judge_replies
from fedsq_app.core.liveness import Opposition, Quarantine
from fedsq_app.core.evaluation import ScreenedEvaluation
from fedsq_app.core.replies import WeightPolicy, bound_note, equal_weights, permanent_refusals, screen_replies
from fedsq_app.core.wire import STRUCTURAL_SHA256


class _SampledFrom:
    """``grid`` as Flower's sampling sees it: ``get_node_ids`` without the ``excluded`` nodes."""

    def __init__(self, grid: Grid, excluded: set[int]) -> None:
        self._grid, self._excluded = grid, excluded

    def get_node_ids(self) -> list[int]:
        return [node for node in self._grid.get_node_ids() if node not in self._excluded]

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class ValidatedFedAvg(ScreenedEvaluation, FedAvg):  # evaluate replies: screened too (core/evaluation.py)
    """FedAvg whose ``aggregate_train`` validates every reply and never lets one bad reply end the run.

    Used as is for the FedAvg baseline. The trust model (docs/RELIABILITY.md): replies are checked on what
    they decode to; each node's weight is the server's (``weigh``, a ``fedsq_app.core.weights`` policy;
    default: equal weights, never the claimed ``num-examples``); each update's distance from the round's
    median update is bounded by ``deviation_bound`` x the round's median such distance (x a size factor),
    and with ``influence_bound`` > 0 each silo's weighted pull too (below 3 replies, or both 0: each update
    is norm-clipped to ``clip_multiplier`` x the median norm); BN statistics are clamped into the other
    replies' range; a round with fewer valid replies than it needs (``min_valid_replies``, less nodes
    already failing: ``core/liveness.py``) keeps the previous model, and nodes failing round after round
    are quarantined. A node refusing for a reason that will not change (``wire.REFUSED_PERMANENTLY``:
    leakage, another S) is sampled no more (``excluded_nodes``). ``aggregation`` replaces the weighted
    mean by a robust one (``core/aggregation.AGGREGATIONS``). ``direction_check`` τ > 0: a reply pointing
    against the round's median update (cosine < −τ), or one the bound scaled, is rejected when ``judge``
    (arrays -> the server's validation loss) finds the round better without it (``core/judge.py``); with no
    judge, a reply pointing against the median is rejected when the node's previous one did too.
    ``pack_arrays`` sends Q packed (fewer transfers; this app's ClientApp unpacks it, Flower's do not).
    """

    def __init__(self, *, min_valid_replies: int = MIN_REPLIES_FOR_MEDIAN,
                 clip_multiplier: float = DEFAULT_CLIP_MULTIPLIER, influence_bound: float = DEFAULT_INFLUENCE_BOUND,
                 deviation_bound: float = DEFAULT_DEVIATION_BOUND, bn_clamp: bool = True,
                 weigh: WeightPolicy = equal_weights, aggregation: str = "mean",
                 trim_fraction: float = 0.2, pack_arrays: bool = False,
                 direction_check: float = DEFAULT_DIRECTION_CHECK, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        check_aggregation(aggregation)
        self.min_valid_replies = min_valid_replies
        self.clip_multiplier = clip_multiplier
        self.bn_clamp = bn_clamp
        self.influence_bound = influence_bound
        self.deviation_bound = deviation_bound
        self.weigh = weigh
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.pack_arrays = pack_arrays  # send Q as one array per dtype (core/packing.py): nodes must unpack it
        self.opposition = Opposition(direction_check)  # the direction check across rounds
        self.judge: Callable[[dict[str, np.ndarray]], float] | None = None  # arrays -> server validation loss
        self.judged: dict[int, dict] = {}  # round -> {node id: [validation loss with, without]}
        self.current_arrays: ArrayRecord | None = None
        self.round_replies: dict[int, RoundReplies] = {}
        self.excluded_nodes: list[dict] = []  # {node_id, round, reason}: refused for good, never sampled again
        self.quarantine = Quarantine()  # nodes rejected round after round: not sampled for a while
        self.sampled: list[int] = []  # the nodes asked to train this round
        self.references: dict[str, list[float]] = {"norm": [], "deviation": []}  # per round: the bounds' floors

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
        with self.sampling(grid, server_round) as nodes:
            messages = list(super().configure_train(server_round, self.outgoing_arrays(arrays), config, nodes))
        self.sampled = [message.metadata.dst_node_id for message in messages]
        if len(messages) < self.quarantine.needed(self.min_valid_replies, self.sampled):
            log(WARNING, "round %d: %d nodes sampled < min-valid-replies %d: this round cannot change the model "
                "(a two-silo federation sets min-valid-replies=2: docs/RELIABILITY.md)", server_round, len(messages),
                self.min_valid_replies)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        with self.sampling(grid, server_round) as nodes:
            return list(super().configure_evaluate(server_round, arrays, config, nodes))

    @contextmanager
    def sampling(self, grid: Grid, server_round: int) -> Iterator[Grid]:
        """Flower's sampling without the excluded and quarantined nodes: ``grid`` without them, and the minimum
        node counts lowered by their number (Flower would otherwise wait for nodes it cannot pick)."""
        excluded = {entry["node_id"] for entry in self.excluded_nodes} | self.quarantine.held(server_round)
        if not excluded:
            yield grid
            return
        saved = self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes
        self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = (max(0, n - len(excluded))
                                                                                  for n in saved)
        log(INFO, "sampling without node(s) %s (refused for the run, or quarantined)", sorted(excluded))
        try:
            yield _SampledFrom(grid, excluded)
        finally:
            self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes = saved

    def exclude_refusals(self, server_round: int, replies: list[Message]) -> None:
        """Stop sampling each node whose reply refuses for good (``permanent_refusals``), logged once."""
        known = {entry["node_id"] for entry in self.excluded_nodes}
        for node_id, reason in permanent_refusals(replies):
            if node_id not in known:
                known.add(node_id)
                self.excluded_nodes.append({"node_id": node_id, "round": server_round, "reason": reason})
                log(WARNING, "node %s refused round %d for a reason that will not change (%s): not sampled again "
                    "this run", node_id, server_round, reason)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.exclude_refusals(server_round, replies)
        return super().aggregate_evaluate(server_round, replies)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current_arrays is not None, "configure_train must run before aggregate_train"
        template = {k: a.numpy() for k, a in self.current_arrays.items()}
        replies = list(replies)
        checked = screen_replies(replies, template, weigh=self.weigh, clip_multiplier=self.clip_multiplier,
                                 influence_bound=self.influence_bound, clamp_bn=self.bn_clamp,
                                 deviation_bound=self.deviation_bound, norm_floor=norm_floor(self.references["norm"]),
                                 deviation_floor=norm_floor(self.references["deviation"]),
                                 opposed_before=self.opposition.before() if self.judge is None else frozenset(),
                                 opposition=self.opposition.tau)
        checked = self.judge_round(server_round, checked, template)
        # Earlier rounds keep what results.json and model delivery read (nodes, weights, metrics, outcomes),
        # not their arrays: one model per reply, they would add up round after round (ResNet-18, 20 replies:
        # 0.9 GB a round). Only the latest stored round still holds them.
        if self.round_replies:
            latest = self.round_replies[max(self.round_replies)]
            latest.accepted[:] = [replace(reply, arrays={}) for reply in latest.accepted]
        self.round_replies[server_round] = checked
        self.opposition.record(checked.outcomes)
        needed = self.quarantine.needed(self.min_valid_replies, self.sampled)
        for record in self.quarantine.update(server_round, [r.node_id for r in checked.accepted], checked.rejected):
            log(WARNING, "node %s: replies rejected %d rounds in a row (last: %s): not sampled for %d round(s)",
                record["node_id"], record["strikes"], record["reason"], record["rounds"])
        log(INFO, "aggregate_train: %d replies accepted, %d rejected", len(checked.accepted), len(checked.rejected))
        for node_id, reason in checked.rejected:
            log(WARNING, "\t> rejected reply from node %s: %s", node_id, reason)
        self.exclude_refusals(server_round, replies)
        for outcome in (o for o in checked.outcomes if o.accepted and o.clip_scale is not None and o.clip_scale < 1):
            log(INFO, "\t> node %s: %s", outcome.node_id, bound_note(checked, outcome.clip_scale))
        if len(checked.accepted) < needed:
            log(WARNING, "round %d: %d valid replies < %d needed (min-valid-replies %d, less nodes already failing): "
                "keeping the previous global model (fail closed: the defenses need that many)", server_round,
                len(checked.accepted), needed, self.min_valid_replies)
            return None, None
        for kind, value in (("norm", checked.reference_norm), ("deviation", checked.reference_deviation)):
            self.references[kind] += [] if value is None else [value]
        try:
            averaged = aggregate(checked.accepted, template, self.aggregation, self.trim_fraction)
            metrics = weighted_metrics(checked.accepted)
            if not all(np.isfinite(v).all() for v in averaged.values() if v.dtype.kind == "f"):
                raise FloatingPointError("the average is not finite")
        except Exception as error:  # checked replies cannot cause this; if anything does, keep the model
            log(WARNING, "round %d: aggregation failed (%s: %s): keeping the previous global model", server_round,
                type(error).__name__, error)
            return None, None
        arrays = ArrayRecord({k: Array(contiguous(v)) for k, v in averaged.items()})
        return arrays, MetricRecord(metrics)

    def judge_round(self, server_round: int, checked, template: dict[str, np.ndarray]):
        """``checked`` less the suspect replies (opposed or bounded) the server's validation split finds the round
        better without (``core/judge.py``)."""
        if self.judge is None or self.opposition.tau <= 0:
            return checked
        try:
            checked, self.judged[server_round] = judge_replies(checked, self.opposition.tau, lambda replies: self.judge(
                aggregate(replies, template, self.aggregation, self.trim_fraction)))
        except Exception as error:  # noqa: BLE001 - the judge only ever removes; failing, it removes nothing
            log(WARNING, "round %d: judging the suspect replies failed (%s: %s): they stay", server_round,
                type(error).__name__, error)
        return checked


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
        return {STRUCTURAL_SHA256: self.structural_sha256}


# ---------------------------------------------------------------------------------------------- baselines
# FedProx and FedAdam reuse Flower's classes; only reply validation and "what the update touches" are ours.
# The trainable parameters among a state dict's arrays: floating arrays that are not BN buffers. A server
# optimiser steps only these (BN running statistics are data statistics, averaged, not optimised), and the
# clipping measures updates on them.
parameter_keys = update_keys


def contiguous(array: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays (BN's num_batches_tracked) into shape (1,)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


class ValidatedFedProx(ValidatedFedAvg, FedProx):
    """Flower's FedProx (sends ``proximal-mu`` in the train config; the client adds (μ/2)·‖w − w_global‖²
    on its trained parameters) with validated aggregation. With μ = 0 it is FedAvg."""


class GivenAverage(FedOpt):
    """Stands in for FedAvg's aggregation inside Flower's FedAdam: hands over an average computed elsewhere."""

    given: ArrayRecord | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return self.given, None


class AdamServerUpdate(FedAdam, GivenAverage):
    """Flower's own FedAdam update (m_t, v_t, bias-corrected η, τ), fed a validated average.

    ``FedAdam.aggregate_train`` calls ``super().aggregate_train``, which the MRO resolves to
    ``GivenAverage``: so every line of Flower's Adam maths runs unchanged on arrays we choose.
    """

    def step(self, server_round: int, current: dict[str, np.ndarray],
             averaged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """x_{t+1} from x_t = ``current`` and the clients' average ``averaged`` (same keys)."""
        self.current_arrays = current  # FedOpt's x_t: the arrays sent out this round
        self.given = ArrayRecord({k: Array(contiguous(v)) for k, v in averaged.items()})
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
        return ArrayRecord({k: Array(contiguous(stepped.get(k, v))) for k, v in averaged.items()}), metrics

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
