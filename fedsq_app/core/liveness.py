"""Liveness: a node whose replies are rejected round after round costs the federation nothing.

A node can fail every round for reasons of its own (a local run that diverged to NaN, a wrong partition
count, a partition that is another node's). The server then

- **quarantines** it: from its second rejected round in a row it is not sampled for 1, then 2, 4, up to
  ``MAX_QUARANTINE`` rounds (doubling while it keeps failing when it comes back), logged and listed in
  results.json; an accepted reply clears its record;
- lets the round go on without it: the replies the round needs (``needed``) are ``min-valid-replies`` less
  the sampled nodes already rejected in the round before, down to 2 (the norm-clip bound of two replies,
  ``core/defenses.py``), so one failing node in three does not keep the start model all run. A node's own
  failures lower the requirement only by itself: honest replies are never the ones dropped.

Pure bookkeeping (no flwr, no numpy); the strategy calls it (``core/strategy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIRST_QUARANTINE_STRIKE = 2  # consecutive rejected rounds before a node is set aside
MAX_QUARANTINE = 8  # rounds


@dataclass
class Quarantine:
    strikes: dict[int, int] = field(default_factory=dict)  # node -> rejected rounds in a row
    until: dict[int, int] = field(default_factory=dict)  # node -> last round it is not sampled
    records: list[dict] = field(default_factory=list)  # results.json's ``quarantined_nodes``

    def held(self, server_round: int) -> set[int]:
        """The nodes not to sample in ``server_round``."""
        return {node for node, last in self.until.items() if last >= server_round}

    def needed(self, min_valid_replies: int, sampled: list[int]) -> int:
        """How many valid replies a round sampling ``sampled`` needs: ``min_valid_replies`` less the sampled
        nodes that are failing already (rejected the round before), never below 2 (nor above it)."""
        if not sampled:  # unknown: the full requirement
            return min_valid_replies
        failing = sum(1 for node in sampled if self.strikes.get(node, 0) > 0)
        return min(min_valid_replies, max(2, len(sampled) - failing))

    def update(self, server_round: int, accepted: list[int], rejected: list[tuple[int, str]]) -> list[dict]:
        """Record one round's outcome; returns the quarantines it starts (each also in ``records``)."""
        for node in accepted:
            self.strikes.pop(node, None)
        started = []
        for node, reason in dict(rejected).items():  # one strike per node and round
            strikes = self.strikes.get(node, 0) + 1
            self.strikes[node] = strikes
            if strikes < FIRST_QUARANTINE_STRIKE:
                continue
            length = min(MAX_QUARANTINE, 2 ** (strikes - FIRST_QUARANTINE_STRIKE))
            self.until[node] = server_round + length
            record = {"node_id": node, "round": server_round, "rounds": length, "strikes": strikes,
                      "reason": str(reason)[:500]}
            self.records.append(record)
            started.append(record)
        return started


@dataclass
class Opposition:
    """The direction check's memory (``direction-check`` τ, docs/RELIABILITY.md): the nodes whose last reply
    pointed against its round's median update, cosine below −τ. τ = 0: off, nothing is kept."""

    tau: float = 0.0
    nodes: set[int] = field(default_factory=set)

    def before(self) -> frozenset[int]:
        return frozenset(self.nodes)

    def record(self, outcomes) -> None:
        """One round's reply outcomes (``alignment``: the cosine, None where the round had too few replies)."""
        for outcome in outcomes:
            if self.tau > 0 and outcome.alignment is not None:
                (self.nodes.add if outcome.alignment < -self.tau else self.nodes.discard)(outcome.node_id)
