"""The one registry of strategies: each name, the Flower strategy it builds from a run config, and what it
trains. Config validation, the ServerApp, the ClientApp and the bench read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fedsq_app.core.strategy import FedSQ, FedSQAdam, ValidatedFedAdam, ValidatedFedAvg, ValidatedFedProx
from fedsq_app.core.variants import FedSQMomentum, FedSQWarmup


@dataclass(frozen=True)
class StrategyEntry:
    build: Callable[..., ValidatedFedAvg]  # (config, structural_sha256, common FedAvg kwargs) -> strategy
    gated: bool  # trains a DualCopy (S gates Q) from round 1; fedsq-warmup gates only after its switch
    candidate: bool  # FedSQ or a variant of it (the bench compares each with every baseline)
    switches: bool = False  # starts plain and switches to an S the server sends once (fedsq-warmup)


def _adam(config) -> dict:
    return dict(server_lr=config.server_lr, beta_1=config.server_beta1, beta_2=config.server_beta2,
                tau=config.server_tau)


# Beyond the paper: fedsq-adam (FedAdam's server step on Q), fedsq-m (FedAvgM's server momentum on Q),
# fedsq-warmup (warmup-rounds of FedAvg, then S frozen at that global model and FedSQ from there).
STRATEGIES: dict[str, StrategyEntry] = {
    "fedsq": StrategyEntry(lambda c, sha, common: FedSQ(structural_sha256=sha, **common), True, True),
    "fedavg": StrategyEntry(lambda c, sha, common: ValidatedFedAvg(**common), False, False),
    "fedprox": StrategyEntry(lambda c, sha, common: ValidatedFedProx(proximal_mu=c.proximal_mu, **common),
                             False, False),
    "fedadam": StrategyEntry(lambda c, sha, common: ValidatedFedAdam(**_adam(c), **common), False, False),
    "fedsq-adam": StrategyEntry(lambda c, sha, common: FedSQAdam(structural_sha256=sha, **_adam(c), **common),
                                True, True),
    "fedsq-m": StrategyEntry(lambda c, sha, common: FedSQMomentum(structural_sha256=sha,
                                                                  server_momentum=c.server_momentum, **common),
                             True, True),
    "fedsq-warmup": StrategyEntry(lambda c, sha, common: FedSQWarmup(structural_sha256=sha,
                                                                     warmup_rounds=c.warmup_rounds, **common),
                                  False, True, switches=True),
}
CANDIDATES = tuple(name for name, entry in STRATEGIES.items() if entry.candidate)  # FedSQ and its variants
BASELINES = tuple(name for name, entry in STRATEGIES.items() if not entry.candidate)


def make_strategy(config, structural_sha256: str, weigh=None) -> ValidatedFedAvg:
    """The strategy ``config`` (a RunConfig) names. ``weigh``: the weight policy (``fedsq_app.core.weights``;
    None: equal weights)."""
    # Federated evaluation (each node's own validation data) only when fraction-evaluate > 0.
    common = dict(fraction_train=config.fraction_train, fraction_evaluate=config.fraction_evaluate,
                  min_evaluate_nodes=1,
                  min_train_nodes=config.min_train_nodes, min_available_nodes=config.min_available_nodes,
                  min_valid_replies=config.min_valid_replies, clip_multiplier=config.clip_multiplier, bn_clamp=config.bn_clamp,
                  influence_bound=config.influence_bound, deviation_bound=config.deviation_bound,
                  aggregation=config.aggregation, direction_check=config.direction_check,
                  trim_fraction=config.trim_fraction, pack_arrays=True)  # this app's ClientApp unpacks
    if weigh is not None:
        common["weigh"] = weigh
    return STRATEGIES[config.strategy].build(config, structural_sha256, common)
