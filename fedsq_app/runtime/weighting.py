"""Where the server's aggregation weights come from in a run (``fedsq_app.core.weights``): the operator's
``silo-sizes`` file matched against the SuperLink's registered node identities, or the server's own
partition sizes, or equal weights; never a node's claim.

``silo-sizes`` (a path on the coordinator) maps a silo's registered name or its public key's SHA-256 to
**all the images of its training split, before any validation hold-out**. A reply's ``num-examples`` is
what the silo trained on, after its hold-out; ``SizeCheckedSiloSizes`` compares the two like with like (the
registry's size less the run's hold-out) and logs, at WARNING, a silo whose count is far from it."""

from __future__ import annotations

import hashlib
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import nn

from fedsq_app.core.dualcopy import travelling_module
from fedsq_app.core.weights import AutoWeights, Decider, PartitionWeights, SiloSizes, load_silo_sizes
from fedsq_app.core.wire import NUM_PARTITIONS
from fedsq_app.data.partitions import DataKey, client_partition, partition_sizes
from fedsq_app.runtime.train import evaluate
from fedsq_app.util import ConfigError


def node_identities(grid: Grid) -> dict[int, list[str]]:
    """Each connected node's registered identities, from the SuperLink: its public key's SHA-256 and its
    name (empty in simulation and without node authentication)."""
    identities = {}
    for node in grid.get_nodes():
        key = bytes(getattr(node, "public_key", b"") or b"")
        identities[int(node.node_id)] = [hashlib.sha256(key).hexdigest() if key else "",
                                         str(getattr(node, "name", "") or "")]
    return identities


def weight_policy(config, data_key: DataKey, grid: Grid, decide: Decider | None = None) -> AutoWeights:
    """Where each node's aggregation weight comes from (core/weights.py): the run's ``weights`` mode, over the
    operator's silo sizes, the server's own partition sizes (the pool split among the nodes connected at the
    start or at the first round, whichever are more) or equal weights; never a node's claim. ``config``: the RunConfig;
    ``decide``: who holds a partition several nodes name (``fit_decider``)."""
    at_start = len(list(grid.get_node_ids()))  # fixed at the first round weighed: nodes may join until then
    partitions = PartitionWeights(lambda count: partition_sizes(data_key, count), decide=decide,
                                  count_nodes=lambda: max(at_start, len(list(grid.get_node_ids()))))
    if not config.silo_sizes or config.weights in ("partitions", "equal"):
        return AutoWeights(partitions, mode=config.weights)
    try:
        sizes = load_silo_sizes(config.silo_sizes)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    known: dict[int, list[str]] = {}

    def identities_of(node_id: int) -> list[str]:
        if node_id not in known:  # a node that joined since: ask the SuperLink again
            known.update(node_identities(grid))
        return known.get(node_id, [])

    held_out = config.local_val_fraction if config.fraction_evaluate > 0 else 0.0
    return AutoWeights(partitions, SizeCheckedSiloSizes(sizes, identities_of, f"'{config.silo_sizes}'",
                                                        held_out=held_out), mode=config.weights)


def fit_decider(model: nn.Module, data_key: DataKey, spec, device: torch.device, reference=None) -> Decider:
    """Who holds a partition several nodes name: the claimant whose model is most specialised to that
    partition's own data (the server holds the pool): its loss there less its loss on ``reference`` (the
    server's validation split, when it has one) is the lowest. A node that trained on the partition fits it
    better than it fits the rest; one that names it by mistake, or to take its weight, trained on other data
    (a better model overall is not a better claim). ``model``: the run's model (its travelling part is
    restored after)."""
    travelling = travelling_module(model)

    def decide(pid: int, claimants: list) -> int | None:
        data = client_partition(data_key, pid, int(claimants[0].metrics[NUM_PARTITIONS]))
        saved = {k: v.clone() for k, v in travelling.state_dict().items()}
        scored = []
        try:
            for reply in claimants:
                travelling.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in reply.arrays.items()})
                loss, _ = evaluate(model, data, spec, device=device)
                baseline = evaluate(model, reference, spec, device=device)[0] if reference is not None and len(
                    reference) else 0.0
                scored.append((loss - baseline, reply.node_id))
        finally:
            travelling.load_state_dict(saved)
        score, owner = min(scored)
        log(WARNING, "partition %d was named by nodes %s: it is node %d's (its loss on that partition's data, less "
            "its loss on the server's validation split: %.4g; the others: %s)", pid, sorted(n for _, n in scored),
            owner, score, ", ".join(f"{value:.4g}" for value, _ in sorted(scored)[1:]))
        return owner

    return decide


# How far a silo's reported training count may be from what its registered size leads the server to expect
# (relative): a silo's own val-fraction or validation files move it by a few per cent, a wrong registry entry
# or a silo on other data by much more.
SIZE_TOLERANCE = 0.25


def expected_training_count(size: int, held_out: float) -> float:
    """What a silo of ``size`` images (all of its training split) trains on in a run holding out ``held_out``
    of it for validation (the run's local-val-fraction when fraction-evaluate > 0, else 0)."""
    return size * (1.0 - held_out)


def size_mismatch(size: int, reported, held_out: float, tolerance: float = SIZE_TOLERANCE) -> str | None:
    """Why ``reported`` (a reply's num-examples) is far from ``size`` (its silo-sizes entry), or None."""
    expected = expected_training_count(size, held_out)
    if reported is None or expected <= 0:
        return None
    if abs(reported - expected) <= tolerance * expected:
        return None
    hold_out = f" less the run's {held_out:.0%} validation hold-out" if held_out else ""
    return (f"reported {reported} training examples, but silo-sizes says {size} images ({expected:.0f} to train "
            f"on{hold_out}): off by more than {tolerance:.0%}")


class SizeCheckedSiloSizes(SiloSizes):
    """The operator's silo sizes as weights, and each reply's reported count checked against them: a silo
    reporting far fewer or more examples than its entry is logged at WARNING (once per node and count) and
    named in ``mismatches`` (node id -> why, for the replies of the latest round). The weight stays the
    registry's: a claim never becomes a weight."""

    def __init__(self, sizes, identities_of, source: str = "", *, held_out: float = 0.0) -> None:
        super().__init__(sizes, identities_of, source)
        self.held_out = held_out
        self.mismatches: dict[int, str] = {}
        self._logged: set[tuple[int, object]] = set()

    def __call__(self, replies: list) -> list[int | str]:
        weights = super().__call__(replies)
        self.mismatches = {}
        for reply, weight in zip(replies, weights):
            if isinstance(weight, str):
                continue
            why = size_mismatch(weight, getattr(reply, "claimed", None), self.held_out)
            if why is None:
                continue
            self.mismatches[reply.node_id] = why
            if (reply.node_id, reply.claimed) not in self._logged:
                self._logged.add((reply.node_id, reply.claimed))
                log(WARNING, "node %d: %s (silo-sizes %s; its weight stays %d)", reply.node_id, why, self.source,
                    weight)
        return weights

    def mismatch_of(self, node_id: int) -> str | None:
        """This round's size mismatch of ``node_id`` (for its reply's record), or None."""
        return self.mismatches.get(node_id)


def size_mismatch_of(weigh, node_id: int) -> str | None:
    """For a reply's record in results.json: why ``node_id``'s reported count this round is far from its
    silo-sizes entry (``weigh``: the strategy's weight policy from ``weight_policy``), or None."""
    silos = getattr(weigh, "silos", None)
    return silos.mismatch_of(node_id) if isinstance(silos, SizeCheckedSiloSizes) else None


def check_federation(config, grid: Grid, num_nodes: int) -> None:
    """At the start: refuse a simulation that could never change the model, and name each node's identity."""
    if type(grid).__name__ != "HttpGrid" and num_nodes < config.min_valid_replies:
        # Simulation: every node is there from the start, so this run could never change the model.
        raise ConfigError(f"min-valid-replies={config.min_valid_replies} but the simulation has {num_nodes} nodes: "
                          "every round would keep the start model. Run more nodes, or set min-valid-replies=2 for "
                          "a two-silo federation (it cannot tell which of two silos is lying: docs/RELIABILITY.md)")
    log_nodes(grid)


def log_nodes(grid: Grid) -> None:
    """Which node is which silo, for the operator's silo-sizes file (deployment with node authentication)."""
    try:
        for node_id, (key_sha256, name) in sorted(node_identities(grid).items()):
            if key_sha256:
                log(INFO, "node %d: name %r, public key sha256 %s", node_id, name, key_sha256)
    except Exception as error:  # a diagnostic: never end the run over it
        log(WARNING, "could not list the nodes' identities (%s: %s)", type(error).__name__, error)
