"""Per-round and per-run metrics: what the paper's claims are measured with.

Curve metrics are pure functions of a list of per-round validation accuracies (round 1 first).
``DriftProbe`` measures the paper's premise each round: how far the global model's ReLU gates (on a fixed
probe batch) and its weights have moved from the pretrained model's.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsq_app.core.dualcopy import DualCopy
from fedsq_app.util import write_atomic

WITHIN_PP = 0.005  # "within 0.5 pp of the best" for the second rounds-to-best definition
LAST_K = 5  # rounds over which the end-of-run std of validation accuracy is taken


# ---------------------------------------------------------------------------------------------- curves
def rounds_to_best(curve: list[float]) -> int:
    """First round (1-based) that reaches the best validation accuracy (BVA)."""
    if not curve:
        raise ValueError("rounds_to_best needs at least one round")
    return int(np.argmax(curve)) + 1


def rounds_to_within(curve: list[float], tolerance: float = WITHIN_PP) -> int:
    """First round (1-based) whose accuracy is within ``tolerance`` (absolute, 0.005 = 0.5 pp) of BVA."""
    if not curve:
        raise ValueError("rounds_to_within needs at least one round")
    best = max(curve)
    return next(i + 1 for i, value in enumerate(curve) if value >= best - tolerance - 1e-12)


def last_k_std(curve: list[float], k: int = LAST_K) -> float:
    """Population std of the last ``k`` rounds' accuracies: how much the end of a run still wobbles."""
    if not curve:
        raise ValueError("last_k_std needs at least one round")
    return float(np.std(np.asarray(curve[-k:], dtype=np.float64)))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value) over seeds; NaN for no values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def run_summary(rounds: list[dict], last_k: int = LAST_K) -> dict:
    """Per-run numbers from results.json's ``rounds`` (test accuracy is added by the server)."""
    # A round without a validation accuracy (validated by the nodes, none of whose replies counted) is no
    # candidate; the server's own best round and BVA (results.json) count rounds from 1 regardless.
    curve = [r["val_accuracy"] for r in rounds if r.get("val_accuracy") is not None]
    if not curve:
        return {}
    # Round 1 also pays for starting the client processes and decoding their data: leave it out if we can.
    times = [r["wall_time_s"] for r in (rounds[1:] or rounds) if r.get("wall_time_s") is not None]
    sent = [r["bytes_per_client"] for r in rounds if r.get("bytes_per_client") is not None]
    return {"best_val_accuracy": max(curve), "rounds_to_best": rounds_to_best(curve),
            "rounds_to_within_0.5pp": rounds_to_within(curve), f"last_{last_k}_std": last_k_std(curve, last_k),
            "mean_round_time_s": float(np.mean(times)) if times else None,
            "bytes_per_client_per_round": int(np.mean(sent)) if sent else None}


ROUND_COLUMNS = ("round", "val_accuracy", "val_loss", "train_loss", "best_val_accuracy_so_far",
                 "gate_disagreement", "l2_from_pretrained", "bytes_per_client", "accepted", "rejected",
                 "wall_time_s")


def write_rounds_csv(path: str | Path, rounds: list[dict]) -> None:
    """One row per round, the scalar columns of results.json's ``rounds``."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=ROUND_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for record in rounds:
                writer.writerow({k: record.get(k, "") for k in ROUND_COLUMNS})

    write_atomic(path, write)


# ---------------------------------------------------------------------------------------------- drift
@torch.no_grad()
def gate_masks(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The ReLU gates ``1[z > 0]`` of a plain network on ``x``, in call order (eval mode).

    Same recording trick as FedSQ's structural copy: wrap the network in a DualCopy and read S's masks.
    """
    return DualCopy(model).masks(x)


def gate_disagreement(reference: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    """Fraction of all gate entries (every ReLU, every probe image) that differ between two mask lists."""
    if len(reference) != len(masks):
        raise ValueError(f"mask lists differ in length: {len(reference)} vs {len(masks)} ReLU calls")
    differ = sum(int((a != b).sum()) for a, b in zip(reference, masks))
    total = sum(a.numel() for a in reference)
    return differ / max(total, 1)


def l2_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys: list[str]) -> float:
    """Euclidean distance between two state dicts over ``keys`` (as one flat vector)."""
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in keys))


class DriftProbe:
    """How far the global model is from the pretrained one: gates on a fixed probe batch, and weights.

    ``start_model`` is the plain pretrained network with its seeded head, snapshotted here (the FedAvg
    baseline trains that very module in place). The global arrays are loaded into a plain copy: for FedSQ
    that is Q with its own ReLUs, a diagnostic only (the function FedSQ evaluates is gated by S, so its
    disagreement is 0 by construction).
    """

    def __init__(self, start_model: nn.Module, probe: torch.Tensor) -> None:
        self.reference = copy.deepcopy(start_model).cpu().eval()
        self.probe = probe.cpu()
        self.reference_masks = gate_masks(self.reference, self.probe)
        self.reference_weights = {k: v.detach().numpy().copy() for k, v in self.reference.state_dict().items()}
        self.weight_keys = [name for name, _ in self.reference.named_parameters()]

    def measure(self, arrays: ArrayRecord) -> dict:
        weights = {k: a.numpy() for k, a in arrays.items()}
        plain = copy.deepcopy(self.reference)
        plain.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        return {"gate_disagreement": gate_disagreement(self.reference_masks, gate_masks(plain, self.probe)),
                "l2_from_pretrained": l2_distance(weights, self.reference_weights, self.weight_keys)}
