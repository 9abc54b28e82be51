"""Aggregation weights the server knows, never the ``num-examples`` a node claims.

FedAvg weights node k by n_k, its sample count; but n_k is the one figure a silo can inflate at will, and
any clip of it to a multiple of the round's claims (which attackers move too) cuts honest large silos. So
the weight is a fact the server holds:

- **partitions** (simulation, and the demo deployments that split the server's pool): the sizes of the
  server's own partitions, computed by the same seeded partitioner the nodes use. The node names its
  partition (``partition-id`` / ``num-partitions``, which the simulation engine or the operator sets in
  its node config); a partition counts once per round, and ``num-partitions`` is fixed by the run's first
  reply that names one.
- **silo sizes** (cross-silo deployment): a file the operator writes, one size per authenticated silo,
  keyed by the SHA-256 of the SuperNode's registered public key (or its registered name); a silo missing
  from it is rejected.
- **equal** otherwise: every node counts once (a silo whose size the server does not know).

Pure functions and small objects; the ServerApp wires them to its data and its grid (``server_app``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from fedsq_app.core.wire import NUM_PARTITIONS, PARTITION_ID, SILO


class PartitionWeights:
    """Each reply weighted by the size of the partition it names; ``sizes_of(num_partitions)`` gives the
    server's own partition sizes."""

    def __init__(self, sizes_of: Callable[[int], Sequence[int]]) -> None:
        self.sizes_of = sizes_of
        self.num_partitions: int | None = None

    def __call__(self, replies: list) -> list[int | str]:
        taken: set[int] = set()  # partitions already named this round
        return [self.weigh(reply, taken) for reply in replies]

    def weigh(self, reply, taken: set[int]) -> int | str:
        pid, count = reply.metrics.get(PARTITION_ID), reply.metrics.get(NUM_PARTITIONS)
        if pid is None or count is None or pid != int(pid) or count != int(count):
            return f"names no partition ('{PARTITION_ID}', '{NUM_PARTITIONS}'): the server cannot weigh it"
        pid, count = int(pid), int(count)
        if self.num_partitions is None and count >= 1:
            self.num_partitions = count
        if count != self.num_partitions:
            return f"names {count} partitions, but this run's nodes split the pool into {self.num_partitions}"
        if not 0 <= pid < count:
            return f"names partition {pid}, outside [0, {count})"
        if pid in taken:
            return f"names partition {pid}, which another reply this round already named"
        taken.add(pid)
        return int(self.sizes_of(count)[pid])


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
    """The app's default: the operator's silo sizes if given; else partition sizes, as long as every reply
    of the round names a partition; else (a silo whose size the server does not know) equal weights."""

    def __init__(self, partitions: PartitionWeights, silos: SiloSizes | None = None) -> None:
        self.partitions, self.silos = partitions, silos
        self.source = "silo-sizes" if silos else "partitions"

    def __call__(self, replies: list) -> list[int | str]:
        if self.silos is not None:
            self.source = "silo-sizes"
            return self.silos(replies)
        if any(reply.metrics.get(SILO) for reply in replies):
            self.source = "equal"
            return [1] * len(replies)
        self.source = "partitions"
        return self.partitions(replies)
