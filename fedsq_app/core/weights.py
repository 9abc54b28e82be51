"""Aggregation weights the server knows, never the ``num-examples`` a node claims.

FedAvg weights node k by n_k, its sample count; but n_k is the one figure a silo can inflate at will, and
any clip of it to a multiple of the round's claims (which attackers move too) cuts honest large silos. So
the weight is a fact the server holds, and a node's bad claim costs that node alone:

- **partitions** (simulation, and the demo deployments that split the server's pool): the sizes of the
  server's own partitions, computed by the same seeded partitioner the nodes use. ``num-partitions`` is the
  run's, from the server's node count (``count_nodes``, fixed at the first round weighed): a reply naming
  another count is that node's rejection. A partition belongs to the first node that names it alone; when
  several name it in the same round, the server decides which holds it (``decide``: in a run, the claimant
  whose model fits that partition's data best), and a reply naming a partition that is another node's is
  rejected, whatever the node order.
- **silo sizes** (cross-silo deployment): a file the operator writes, one size per authenticated silo,
  keyed by the SHA-256 of the SuperNode's registered public key (or its registered name); a silo missing
  from it is rejected.
- **equal**: every node counts once (silos whose sizes the server does not know).

Which of them a run uses is the run's setting (``weights``), never a reply's metric.
Pure functions and small objects; the ServerApp wires them to its data and its grid (``runtime/weighting.py``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

from fedsq_app.core.wire import NUM_PARTITIONS, PARTITION_ID, SILO

WEIGHT_MODES = ("auto", "partitions", "silo-sizes", "equal")
# (partition id, the replies naming it this round) -> the node id of the one that holds it, or None: undecided.
Decider = Callable[[int, list], "int | None"]


class PartitionWeights:
    """Each reply weighted by the size of the partition it names; ``sizes_of(num_partitions)`` gives the
    server's own partition sizes. ``num_partitions``: the run's count (``fix``; if never fixed, the
    ``count_nodes()`` of the first round weighed). ``owners``: partition -> node, for the whole run."""

    def __init__(self, sizes_of: Callable[[int], Sequence[int]], num_partitions: int | None = None, *,
                 decide: Decider | None = None, count_nodes: Callable[[], int] | None = None) -> None:
        self.sizes_of, self.decide, self.count_nodes = sizes_of, decide, count_nodes
        self.num_partitions = num_partitions if num_partitions and num_partitions >= 1 else None
        self.owners: dict[int, int] = {}
        self.contested: dict[int, list[int]] = {}  # partition -> claimants, of the latest round with a contest

    def fix(self, num_partitions: int) -> None:
        """The run's partition count, from what the server controls (its node count at the start)."""
        if num_partitions >= 1:
            self.num_partitions = num_partitions

    def __call__(self, replies: list) -> list[int | str]:
        if self.num_partitions is None and self.count_nodes is not None:
            self.fix(self.count_nodes())
        weights: list[int | str] = [self.claim(reply) for reply in replies]
        claimants: dict[int, list[int]] = defaultdict(list)
        for i, claim in enumerate(weights):
            if not isinstance(claim, str):
                claimants[claim].append(i)
        self.contested = {}
        for pid, indices in claimants.items():
            owner = self.owners.get(pid)
            if owner is None:
                owner = self.settle(pid, [replies[i] for i in indices])
            for i in indices:
                node = replies[i].node_id
                if owner is None:
                    weights[i] = (f"names partition {pid}, as {len(indices) - 1} other node(s) did this round, and "
                                  "the server could not tell which holds it")
                elif node != owner:
                    weights[i] = f"names partition {pid}, which is node {owner}'s in this run"
                else:
                    weights[i] = int(self.sizes_of(self.num_partitions)[pid])
        return weights

    def claim(self, reply) -> int | str:
        """The partition ``reply`` names, or why it names none this run's server can weigh."""
        pid, count = reply.metrics.get(PARTITION_ID), reply.metrics.get(NUM_PARTITIONS)
        if pid is None or count is None or pid != int(pid) or count != int(count):
            return f"names no partition ('{PARTITION_ID}', '{NUM_PARTITIONS}'): the server cannot weigh it"
        pid, count = int(pid), int(count)
        if self.num_partitions is None:
            return "the run's partition count is not known yet (no node was connected when it started)"
        if count != self.num_partitions:
            return f"names {count} partitions, but this run's nodes split the pool into {self.num_partitions}"
        if not 0 <= pid < count:
            return f"names partition {pid}, outside [0, {count})"
        return pid

    def settle(self, pid: int, claimants: list) -> int | None:
        """Who holds unowned partition ``pid``: its only claimant, or the one ``decide`` picks."""
        if len(claimants) == 1:
            owner = claimants[0].node_id
        else:
            self.contested[pid] = sorted(reply.node_id for reply in claimants)
            try:
                owner = self.decide(pid, claimants) if self.decide is not None else None
            except Exception:  # deciding is the server's work: if it fails, nobody gets the partition this round
                owner = None
            if owner not in {reply.node_id for reply in claimants}:
                return None
        self.owners[pid] = owner
        return owner


class SiloSizes:
    """Each reply weighted by the size the operator fixed for its silo. ``identities_of(node_id)`` gives
    the node's registered identities (its public key's SHA-256 and its name) from the SuperLink."""

    def __init__(self, sizes: dict[str, int], identities_of: Callable[[int], Sequence[str]], source: str = "") -> None:
        self.sizes, self.identities_of, self.source = sizes, identities_of, source

    def __call__(self, replies: list) -> list[int | str]:
        weights: list[int | str] = []
        for reply in replies:
            identities = [i for i in self.identities_of(reply.node_id) if i]
            known = [self.sizes[i] for i in identities if i in self.sizes]
            if not known:
                shown = ", ".join(identities) or "no registered key or name (start the SuperLink with "\
                                                 "--enable-supernode-auth)"
                weights.append(f"node {reply.node_id} ({shown}) has no size in silo-sizes {self.source}")
            else:
                weights.append(known[0])
        return weights


def load_silo_sizes(path: str | Path) -> dict[str, int]:
    """The operator's silo sizes: a JSON object {key-sha256 or registered name: positive int}."""
    path = Path(path).expanduser()
    try:
        sizes = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"silo-sizes='{path}': cannot read a JSON object ({error})") from error
    if not isinstance(sizes, dict) or not sizes:
        raise ValueError(f"silo-sizes='{path}' must be a non-empty JSON object {{\"<key sha256 or name>\": size}}")
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v <= 0}
    if bad:
        raise ValueError(f"silo-sizes='{path}': sizes must be positive integers, got {dict(list(bad.items())[:3])}")
    return {str(k): int(v) for k, v in sizes.items()}


class AutoWeights:
    """The run's weight mode (``mode``, one of ``WEIGHT_MODES``) applied to every round. 'auto': the
    operator's silo sizes if given; else the mode is fixed once, by the first round with replies: partitions
    unless most replies come from silos on their own data (then equal). A reply that does not fit the run's
    mode (a silo in a partition run) is that node's rejection; it never changes the mode."""

    def __init__(self, partitions: PartitionWeights, silos: SiloSizes | None = None, mode: str = "auto") -> None:
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {mode!r}")
        if mode == "silo-sizes" and silos is None:
            raise ValueError("weights='silo-sizes' needs the silo-sizes file")
        if mode == "auto" and silos is not None:
            mode = "silo-sizes"
        self.partitions, self.silos = partitions, silos
        self.mode = mode
        self.source = None if mode == "auto" else mode  # the mode in force (None until 'auto' is settled)

    def __call__(self, replies: list) -> list[int | str]:
        if self.source is None and replies:
            from_silos = sum(1 for reply in replies if reply.metrics.get(SILO))
            self.source = "equal" if 2 * from_silos > len(replies) else "partitions"
        if self.source == "silo-sizes":
            return self.silos(replies)
        if self.source == "equal":
            return [1] * len(replies)
        weights = self.partitions(replies)
        return [f"trains on its own data (metric '{SILO}'), but this run weighs partitions of the server's pool"
                if isinstance(w, str) and reply.metrics.get(SILO) else w for reply, w in zip(replies, weights)]
