"""Where the server's aggregation weights come from in a run (``fedsq_app.core.weights``): the operator's
``silo-sizes`` file matched against the SuperLink's registered node identities, or the server's own
partition sizes, or equal weights; never a node's claim."""

from __future__ import annotations

import hashlib
from logging import INFO, WARNING

from flwr.common.logger import log
from flwr.serverapp import Grid

from fedsq_app.core.weights import AutoWeights, PartitionWeights, SiloSizes, load_silo_sizes
from fedsq_app.data.partitions import DataKey, partition_sizes
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


def weight_policy(config, data_key: DataKey, grid: Grid) -> AutoWeights:
    """Where each node's aggregation weight comes from (core/weights.py): the operator's silo sizes, the
    server's own partition sizes, or equal weights; never a node's claim. ``config``: the RunConfig."""
    partitions = PartitionWeights(lambda count: partition_sizes(data_key, count))
    if not config.silo_sizes:
        return AutoWeights(partitions)
    try:
        sizes = load_silo_sizes(config.silo_sizes)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    known: dict[int, list[str]] = {}

    def identities_of(node_id: int) -> list[str]:
        if node_id not in known:  # a node that joined since: ask the SuperLink again
            known.update(node_identities(grid))
        return known.get(node_id, [])

    return AutoWeights(partitions, SiloSizes(sizes, identities_of, f"'{config.silo_sizes}'"))


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
