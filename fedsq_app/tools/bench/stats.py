"""The bench's statistics: paired t-tests over seeds (``scipy.stats``), verdicts on the paper's claims, and
per-run figures (time to accuracy, censoring)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats

from fedsq_app.runtime.metrics import rounds_to_best
from fedsq_app.runtime.strategies import BASELINES, CANDIDATES

TTA_FRACTIONS = (0.95, 0.99)  # time-to-accuracy: rounds to reach this fraction of FedAvg's BVA (same seed)


def still_improving(curve: list[float], results: dict) -> bool:
    """Censored: the run hit its last round without ``patience`` rounds past its best (with no patience
    rule: its best came in the last round), so a longer run might have found a later, better best."""
    if "stopped_early" in results:
        return False
    patience = int(results.get("config", {}).get("patience", 0) or 1)
    return len(curve) - rounds_to_best(curve) < patience


def rounds_to_reach(curve: list[float], target: float) -> int | None:
    """First round (1-based) whose validation accuracy is >= ``target``; None if the run never got there."""
    return next((i + 1 for i, value in enumerate(curve) if value >= target - 1e-12), None)


def t_interval(mean: float, std: float, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, two-sided p against 0) of a paired t-test with sample mean ``mean``, sample std ``std``
    (> 0) and ``n`` >= 2 differences."""
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    t = mean / (std / math.sqrt(n))
    return mean - half, mean + half, float(2 * scipy_stats.t.sf(abs(t), n - 1))


def paired_test(differences: list[float], level: float = 0.95) -> dict:
    """Paired t on per-seed differences (candidate − baseline, same seed = same split, partition and head):
    mean, sample std, the ``level`` confidence interval of the mean and the two-sided p-value."""
    values = np.asarray([d for d in differences if d is not None and not math.isnan(d)], dtype=np.float64)
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "low": math.nan, "high": math.nan, "p": math.nan}
    mean = float(values.mean())
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "low": math.nan, "high": math.nan, "p": math.nan}
    std = float(values.std(ddof=1))
    if std == 0:  # every seed gave the same difference: the interval is that point
        return {"n": n, "mean": mean, "std": 0.0, "low": mean, "high": mean, "p": 1.0 if mean == 0 else 0.0}
    low, high, p = t_interval(mean, std, n, level)
    return {"n": n, "mean": mean, "std": std, "low": low, "high": high, "p": p}


def verdict(test: dict | None, direction: int, margin: float = 0.0) -> str:
    """✓ when the CI lies wholly beyond ``margin`` on the claimed side (``direction`` +1: candidate higher,
    −1: lower), ✗ when it lies wholly on the other side (significantly against), ≈ when it straddles it."""
    if test is None or math.isnan(test["low"]):
        return "–"
    low, high = (test["low"], test["high"]) if direction > 0 else (-test["high"], -test["low"])
    return "✓" if low > margin else "✗" if high < margin else "≈"


# metric -> (label, scale for the tables, claimed direction: +1 candidate higher, -1 candidate lower)
PAIRED_METRICS = {"best_val_accuracy": ("BVA (pp)", 100, +1), "rounds_to_best": ("rounds-to-best", 1, -1),
                  **{f"tta_{f:g}": (f"rounds to {100 * f:g}% of FedAvg's BVA", 1, -1) for f in TTA_FRACTIONS},
                  "last_k_std": ("last-k std (pp)", 100, -1), "test_accuracy": ("test acc (pp)", 100, +1)}


def add_time_to_accuracy(rows: list[dict]) -> None:
    """``tta_<f>`` per row: rounds to reach f × the same seed's FedAvg BVA. A run that never reaches it
    counts as its rounds run + 1 (a lower bound on its true time) and is flagged in ``tta_<f>_missed``."""
    fedavg = {(r["setup"], r["partition"], r["epochs"], r["seed"]): r["best_val_accuracy"]
              for r in rows if r["strategy"] == "fedavg"}
    for row in rows:
        target = fedavg.get((row["setup"], row["partition"], row["epochs"], row["seed"]))
        for fraction in TTA_FRACTIONS:
            reached = None if target is None else rounds_to_reach(row["_curve"][1:], fraction * target)
            row[f"tta_{fraction:g}"] = math.nan if target is None else reached or row["rounds_run"] + 1
            row[f"tta_{fraction:g}_missed"] = target is not None and reached is None


def paired_comparisons(rows: list[dict]) -> list[dict]:
    """Every candidate (FedSQ, its variants) against every baseline, and each variant against FedSQ:
    per-seed paired differences (candidate − baseline) of each metric, with ``paired_test``'s CI and p."""
    by = {(r["setup"], r["partition"], r["epochs"], r["strategy"], r["seed"]): r for r in rows}
    settings = sorted({(r["setup"], r["partition"], r["epochs"]) for r in rows}, key=str)
    present = {r["strategy"] for r in rows}
    pairs = [(c, b) for c in CANDIDATES for b in BASELINES if {c, b} <= present]
    pairs += [(c, "fedsq") for c in CANDIDATES if c != "fedsq" and {c, "fedsq"} <= present]
    comparisons = []
    for setup, partition, epochs in settings:
        for candidate, baseline in pairs:
            seeds = sorted(seed for (s, p, e, strategy, seed) in by
                           if (s, p, e, strategy) == (setup, partition, epochs, candidate)
                           and (setup, partition, epochs, baseline, seed) in by)
            if not seeds:
                continue
            for metric, (label, scale, direction) in PAIRED_METRICS.items():
                a = [by[(setup, partition, epochs, candidate, seed)].get(metric, math.nan) for seed in seeds]
                b = [by[(setup, partition, epochs, baseline, seed)].get(metric, math.nan) for seed in seeds]
                test = paired_test([scale * (x - y) for x, y in zip(a, b)])
                comparisons.append({"setup": setup, "partition": partition, "epochs": epochs,
                                    "candidate": candidate, "baseline": baseline, "metric": metric,
                                    "label": label, "direction": direction, "seeds": seeds, **test})
    return comparisons


def claim_checks(comparisons: list[dict]) -> list[dict]:
    """The paper's claims per setting and candidate, each decided by a paired CI (``verdict``).

    BVA: Dirichlet: higher than FedAvg and than FedProx (CI > 0); IID: parity, CI above −0.5 pp.
    Rounds-to-best and rounds to 99 % of FedAvg's BVA: fewer than FedAvg's / FedProx's (CI < 0).
    Robustness: a lower last-k std than FedAvg (CI < 0). Accuracy preserved: BVA CI above −1 pp against
    every baseline. "≥3 rounds earlier": rounds-to-best at least 3 fewer on average with a CI below 0, and a
    BVA that is not significantly lower (CI reaches 0 or above), against both FedAvg and FedProx.
    """
    index = {(c["setup"], c["partition"], c["epochs"], c["candidate"], c["baseline"], c["metric"]): c
             for c in comparisons}
    checks = []
    for setup, partition, epochs, candidate in sorted({(c["setup"], c["partition"], c["epochs"], c["candidate"])
                                                       for c in comparisons}, key=str):
        def get(baseline, metric):
            return index.get((setup, partition, epochs, candidate, baseline, metric))

        row = {"setup": setup, "partition": partition, "epochs": epochs, "candidate": candidate, "cells": {}}
        iid = partition == "iid"
        for baseline in ("fedavg", "fedprox"):
            bva = get(baseline, "best_val_accuracy")
            if bva is None:
                continue
            name = "FedAvg" if baseline == "fedavg" else "FedProx"
            row["cells"][f"BVA vs {name} (pp)"] = (bva, verdict(bva, +1, -0.5 if iid else 0.0))
            row["cells"][f"rounds-to-best vs {name}"] = (get(baseline, "rounds_to_best"),
                                                         verdict(get(baseline, "rounds_to_best"), -1))
            tta = get(baseline, "tta_0.99")
            row["cells"][f"rounds to 99% of FedAvg BVA vs {name}"] = (tta, verdict(tta, -1))
        std = get("fedavg", "last_k_std")
        if std is not None:
            row["cells"]["last-k std vs FedAvg (pp)"] = (std, verdict(std, -1))
        bvas = [get(b, "best_val_accuracy") for b in BASELINES if get(b, "best_val_accuracy") is not None]
        if bvas:
            marks = [verdict(t, +1, -1.0) for t in bvas]
            worst = min(bvas, key=lambda t: t["low"] if not math.isnan(t["low"]) else t["mean"])
            mark = "✗" if "✗" in marks else "≈" if "≈" in marks else marks[0]
            row["cells"]["accuracy preserved (≥ −1 pp)"] = (worst, mark)
        earlier = []
        for baseline in ("fedavg", "fedprox"):
            rtb, bva = get(baseline, "rounds_to_best"), get(baseline, "best_val_accuracy")
            if rtb is not None and bva is not None and not math.isnan(rtb["high"]):
                earlier.append(rtb["mean"] <= -3 and rtb["high"] < 0 and bva["high"] >= 0)
        row["three_rounds_earlier"] = len(earlier) == 2 and all(earlier)  # against both FedAvg and FedProx
        checks.append(row)
    return checks
