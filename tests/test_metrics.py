"""Curve metrics on hand-made curves, gate disagreement on hand-made masks, and the per-round drift probe."""

import csv
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsq_app.runtime.metrics import DriftProbe, gate_disagreement, gate_masks, l2_distance, last_k_std, mean_std, rounds_to_best, rounds_to_within, run_summary, write_rounds_csv


def test_rounds_to_best_is_the_first_round_reaching_the_best():
    assert rounds_to_best([0.5, 0.7, 0.9, 0.9, 0.8]) == 3
    assert rounds_to_best([0.9]) == 1
    with pytest.raises(ValueError):
        rounds_to_best([])


def test_rounds_to_within_half_a_point():
    curve = [0.50, 0.800, 0.901, 0.905, 0.90]
    assert rounds_to_within(curve) == 3  # 0.901 >= 0.905 - 0.005
    assert rounds_to_within(curve, tolerance=0.0) == rounds_to_best(curve) == 4
    assert rounds_to_within([0.5, 0.5, 0.5]) == 1


def test_last_k_std_uses_only_the_last_k_rounds():
    assert last_k_std([0.1, 0.9, 0.5, 0.5, 0.5], k=3) == 0.0
    assert last_k_std([0.2, 0.4], k=5) == pytest.approx(0.1)  # fewer rounds than k: all of them, population std
    assert last_k_std([0.0, 0.0, 0.6, 0.8], k=2) == pytest.approx(0.1)


def test_mean_std_over_seeds():
    assert mean_std([0.8, 0.9, 1.0]) == (pytest.approx(0.9), pytest.approx(0.1))
    assert mean_std([0.7]) == (0.7, 0.0)
    mean, std = mean_std([])
    assert math.isnan(mean) and math.isnan(std)


def test_run_summary_and_round_csv(tmp_path):
    rounds = [{"round": i + 1, "val_accuracy": acc, "val_loss": 1.0, "wall_time_s": t, "bytes_per_client": 1000}
              for i, (acc, t) in enumerate([(0.5, 30.0), (0.8, 2.0), (0.8, 4.0)])]
    summary = run_summary(rounds, last_k=2)
    assert summary["best_val_accuracy"] == 0.8 and summary["rounds_to_best"] == 2
    assert summary["rounds_to_within_0.5pp"] == 2 and summary["last_2_std"] == 0.0
    assert summary["mean_round_time_s"] == 3.0  # round 1 (process start-up) left out
    assert summary["bytes_per_client_per_round"] == 1000
    write_rounds_csv(tmp_path / "rounds.csv", rounds)
    rows = list(csv.DictReader(open(tmp_path / "rounds.csv")))
    assert [float(r["val_accuracy"]) for r in rows] == [0.5, 0.8, 0.8]
    assert rows[0]["gate_disagreement"] == ""


def test_gate_disagreement_counts_differing_entries():
    a = [torch.tensor([[True, False], [True, True]]), torch.tensor([False, False])]
    b = [torch.tensor([[True, True], [True, True]]), torch.tensor([False, True])]
    assert gate_disagreement(a, a) == 0.0
    assert gate_disagreement(a, b) == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        gate_disagreement(a, b[:1])


def test_l2_distance_over_chosen_keys():
    a = {"w": np.array([3.0, 0.0], np.float32), "b": np.zeros(1, np.float32)}
    b = {"w": np.array([0.0, 4.0], np.float32), "b": np.ones(1, np.float32)}
    assert l2_distance(a, b, ["w"]) == pytest.approx(5.0)
    assert l2_distance(a, b, ["w", "b"]) == pytest.approx(math.sqrt(26))


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8),
                         nn.ReLU(), nn.Linear(8, 3))


def test_gate_masks_match_relu_outputs():
    net = _tiny_net().eval()
    x = torch.randn(5, 1, 6, 6)
    masks = gate_masks(net, x)
    assert len(masks) == 2
    with torch.no_grad():
        hidden = net[:3](x)
    assert torch.equal(masks[0], hidden > 0)


def test_drift_probe_zero_at_start_and_grows_with_change():
    net = _tiny_net()
    probe = DriftProbe(net, torch.randn(16, 1, 6, 6))
    same = probe.measure(ArrayRecord(net.state_dict()))
    assert same == {"gate_disagreement": 0.0, "l2_from_pretrained": 0.0}
    moved = {k: v.clone() for k, v in net.state_dict().items()}
    moved["0.bias"] += 0.5
    result = probe.measure(ArrayRecord(moved))
    assert result["gate_disagreement"] > 0
    assert result["l2_from_pretrained"] == pytest.approx(0.5 * math.sqrt(4), rel=1e-5)
    # The probe snapshots the start model: training it in place later does not move the reference.
    with torch.no_grad():
        net[0].bias += 1.0
    assert probe.measure(ArrayRecord(moved)) == result
