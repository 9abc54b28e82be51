"""Federated evaluation: each node's accuracy on its own validation data, checked before it counts.

Flower's ``configure_evaluate`` (``fraction-evaluate`` of the nodes, ``min_evaluate_nodes``) sends the global
model; ``aggregate_evaluate`` is replaced by ``screen_evaluate_replies``: a node's reply is a claim the
server cannot verify (it never sees the node's data), so every reply is checked on what decodes and a bad
one is dropped with its reason, never raised:

* an error reply, a reply without the ``metrics`` record, or a second reply from one node: rejected;
* ``eval_accuracy`` must be a finite number in [0, 1], ``eval_loss`` finite and >= 0;
* ``num-examples`` a positive integer no larger than ``MAX_EVAL_EXAMPLES`` (recorded, never a weight).

The round's accuracy is the mean over the accepted replies weighted by the server's own weights for those
nodes (the weights this round's training was averaged with: partition sizes, the operator's silo sizes, or
equal; ``fedsq_app.core.weights``), never by the counts the nodes claim. Before any training round (round 0)
every node counts once. What a node can still do is report a wrong accuracy; docs/DEPLOYMENT.md says what
that means for the BVA.
Imports numpy and flwr, never torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Iterable

from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedsq_app.core.packing import pack_record
from fedsq_app.core.wire import EVAL_ACCURACY, EVAL_LOSS, METRICS, NUM_EXAMPLES

MAX_EVAL_EXAMPLES = 10_000_000  # no silo of this app validates on more; a larger claim is not a count


@dataclass
class EvalOutcome:
    node_id: int
    accepted: bool
    accuracy: float | None = None
    loss: float | None = None
    num_examples: int | None = None  # as claimed: recorded only
    reason: str = ""
    weight: int = 1  # the server's weight for this node


@dataclass
class EvaluateReplies:
    """One round's evaluate replies, each accepted or rejected with its reason."""

    outcomes: list[EvalOutcome] = field(default_factory=list)

    @property
    def accepted(self) -> list[EvalOutcome]:
        return [o for o in self.outcomes if o.accepted]

    def weighted(self) -> tuple[float, float, int] | None:
        """(accuracy, loss, claimed samples) over the accepted replies, weighted by the server's weights;
        None without any."""
        accepted = self.accepted
        total = sum(o.weight for o in accepted)
        if not total:
            return None
        return (sum(o.accuracy * o.weight for o in accepted) / total,
                sum(o.loss * o.weight for o in accepted) / total, sum(o.num_examples for o in accepted))

    def to_json(self) -> dict:
        """results.json: the weighted accuracy, and each node's own (keyed by node id) with its count."""
        weighted = self.weighted()
        return {
            "accuracy": weighted[0] if weighted else None, "loss": weighted[1] if weighted else None,
            "num_examples": weighted[2] if weighted else 0,
            "nodes": {str(o.node_id): {"accuracy": o.accuracy, "loss": o.loss, "num_examples": o.num_examples,
                                       "weight": o.weight}
                      for o in sorted(self.accepted, key=lambda o: o.node_id)},
            "rejected": [{"node_id": o.node_id, "reason": o.reason} for o in self.outcomes if not o.accepted],
        }


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def check_evaluate_reply(reply: Message, max_examples: int | None = None) -> EvalOutcome:
    """One evaluate reply, checked on what decodes; never raises."""
    try:
        node_id = int(reply.metadata.src_node_id)
    except Exception:  # a reply without usable metadata: nothing in it can be attributed
        return EvalOutcome(-1, False, reason="reply without a source node id")
    try:
        if reply.has_error():
            return EvalOutcome(node_id, False, reason=f"error reply: {str(reply.error.reason)[:300]}")
        if not reply.has_content() or METRICS not in reply.content.metric_records:
            return EvalOutcome(node_id, False, reason=f"no '{METRICS}' metric record in the reply")
        metrics = reply.content.metric_records[METRICS]
        accuracy, loss = _number(metrics.get(EVAL_ACCURACY)), _number(metrics.get(EVAL_LOSS))
        count = _number(metrics.get(NUM_EXAMPLES))
    except Exception as error:  # malformed content of any kind
        return EvalOutcome(node_id, False, reason=f"unreadable reply ({type(error).__name__}: {error})")
    bound = max_examples or MAX_EVAL_EXAMPLES
    if accuracy is None or not 0.0 <= accuracy <= 1.0:
        return EvalOutcome(node_id, False, reason=f"{EVAL_ACCURACY} must be a finite number in [0, 1], got "
                                                  f"{metrics.get(EVAL_ACCURACY)!r}")
    if loss is None or loss < 0:
        return EvalOutcome(node_id, False, reason=f"{EVAL_LOSS} must be a finite number >= 0, got "
                                                  f"{metrics.get(EVAL_LOSS)!r}")
    if count is None or not count.is_integer() or not 0 < count <= bound:
        return EvalOutcome(node_id, False, reason=f"{NUM_EXAMPLES} must be an integer in [1, {bound}], got "
                                                  f"{metrics.get(NUM_EXAMPLES)!r}")
    return EvalOutcome(node_id, True, accuracy, loss, int(count))


def screen_evaluate_replies(replies: Iterable[Message], max_examples: int | None = None,
                            weights: dict[int, int] | None = None) -> EvaluateReplies:
    """Every reply checked (``check_evaluate_reply``); a node counts once (its first valid reply), with the
    server's ``weights`` (node id -> weight; None: equal). A node without a weight is not counted."""
    checked = EvaluateReplies()
    seen: set[int] = set()
    for reply in replies:
        outcome = check_evaluate_reply(reply, max_examples)
        if outcome.accepted and weights is not None:
            if outcome.node_id in weights:
                outcome.weight = weights[outcome.node_id]
            else:
                outcome.accepted, outcome.reason = False, ("the server has no weight for this node this round "
                                                           "(its training reply was not accepted)")
        if outcome.accepted and outcome.node_id in seen:
            outcome = EvalOutcome(outcome.node_id, False, reason="a second evaluate reply from this node")
        if outcome.accepted:
            seen.add(outcome.node_id)
        checked.outcomes.append(outcome)
    return checked


class ScreenedEvaluation:
    """Mixed into a Flower strategy before ``FedAvg``: Flower's ``configure_evaluate`` with the strategy's
    extra train config (FedSQ's S hash: a node evaluates under the S the server names), and an
    ``aggregate_evaluate`` that screens replies instead of trusting (or raising on) them. The checked
    replies of each round are kept in ``evaluate_rounds``."""

    @property
    def evaluate_rounds(self) -> dict[int, EvaluateReplies]:
        return vars(self).setdefault("_evaluate_rounds", {})

    def outgoing_arrays(self, arrays):
        """Q as the nodes receive it: packed when the strategy's ``pack_arrays`` says so (core/packing.py)."""
        return pack_record(arrays) if getattr(self, "pack_arrays", False) else arrays

    def configure_evaluate(self, server_round: int, arrays, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        extra = self.extra_train_config() if hasattr(self, "extra_train_config") else {}
        return super().configure_evaluate(server_round, self.outgoing_arrays(arrays),
                                          ConfigRecord({**dict(config), **extra}), grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        # The weights this round's training used (the server's, never a claim); none before round 1.
        trained = getattr(self, "round_replies", {}).get(server_round)
        weights = {r.node_id: r.num_examples for r in trained.accepted} if trained is not None else None
        checked = screen_evaluate_replies(list(replies), weights=weights)
        self.evaluate_rounds[server_round] = checked
        for outcome in checked.outcomes:
            if not outcome.accepted:
                log(WARNING, "\t> evaluate reply from node %s not counted: %s", outcome.node_id, outcome.reason)
        weighted = checked.weighted()
        if weighted is None:
            return None
        how = ("each node counting once (no training round yet: no server weights)" if weights is None
               else "weighted by the server's weights for the nodes")
        log(INFO, "aggregate_evaluate: %d of %d replies counted, accuracy %.4f %s; %d validation samples "
            "(as the nodes report them)", len(checked.accepted), len(checked.outcomes), weighted[0], how,
            weighted[2])
        return MetricRecord({EVAL_ACCURACY: weighted[0], EVAL_LOSS: weighted[1], NUM_EXAMPLES: weighted[2]})
