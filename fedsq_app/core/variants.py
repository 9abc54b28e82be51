"""FedSQ's variants beyond the paper, aimed at rounds-to-best (docs/RESULTS.md judges them): server momentum
on Q, and a FedAvg warm-up that freezes S at the switch round. Imports numpy and flwr, never torch."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM

from fedsq_app.core.strategy import FedSQ, GivenAverage, contiguous, parameter_keys
from fedsq_app.core.wire import STRUCTURAL


class MomentumServerUpdate(FedAvgM, GivenAverage):
    """Flower's own FedAvgM update (pseudo-gradient, momentum vector, server learning rate), fed a
    validated average: ``FedAvgM.aggregate_train``'s ``super()`` resolves to ``GivenAverage``."""

    def step(self, server_round: int, current: dict[str, np.ndarray],
             averaged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """x_{t+1} from x_t = ``current`` and the clients' average ``averaged`` (same keys, same order)."""
        self.current_arrays = ArrayRecord({k: Array(contiguous(v)) for k, v in current.items()})
        self.given = ArrayRecord({k: Array(contiguous(averaged[k])) for k in current})
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
        return ArrayRecord({k: Array(contiguous(stepped.get(k, v))) for k, v in averaged.items()}), metrics

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
                    message.content[STRUCTURAL] = self.structural
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
        arrays = {f"{STRUCTURAL}/{k}": a.numpy() for k, a in self.structural.items()}
        return arrays, {"structural_sha256": self.structural_sha256, "holders": sorted(self.holders)}

    def load_state_dict(self, arrays: dict[str, np.ndarray], info: dict) -> None:
        if not arrays and not info:
            return  # saved before the switch
        if any(not k.startswith(f"{STRUCTURAL}/") for k in arrays) or "structural_sha256" not in info:
            raise ValueError(f"{type(self).__name__}: the checkpoint's strategy state is not a warm-up S: "
                             "was it written by another strategy?")
        self.switch(ArrayRecord({k.removeprefix(f"{STRUCTURAL}/"): Array(contiguous(v))
                                 for k, v in arrays.items()}), info["structural_sha256"])
        self.holders = set(info.get("holders", []))

