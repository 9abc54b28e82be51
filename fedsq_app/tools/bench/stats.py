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
    """Every candidate (FedSQ, its variants) against every baseline, each variant against FedSQ, and each
    other baseline (FedProx, FedAdam) against FedAvg: per-seed paired differences (candidate − baseline) of each metric, with ``paired_test``'s CI and p."""
    by = {(r["setup"], r["partition"], r["epochs"], r["strategy"], r["seed"]): r for r in rows}
    settings = sorted({(r["setup"], r["partition"], r["epochs"]) for r in rows}, key=str)
    present = {r["strategy"] for r in rows}
    pairs = [(c, b) for c in CANDIDATES for b in BASELINES if {c, b} <= present]
    pairs += [(c, "fedsq") for c in CANDIDATES if c != "fedsq" and {c, "fedsq"} <= present]
    pairs += [(b, "fedavg") for b in BASELINES if b != "fedavg" and {b, "fedavg"} <= present]  # FedProx, FedAdam
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

    BVA: Dirichlet: higher than FedAvg, FedProx and FedAdam, those that ran (CI > 0); IID: parity, CI above
    −0.5 pp.
    Rounds-to-best and rounds to 99 % of FedAvg's BVA: fewer than FedAvg's / FedProx's (CI < 0).
    Robustness: a lower last-k std than FedAvg (CI < 0). Accuracy preserved: BVA CI above −1 pp against
    every baseline. "≥3 rounds earlier": rounds-to-best at least 3 fewer on average with a CI below 0, and a
    BVA that is not significantly lower (CI reaches 0 or above), against both FedAvg and FedProx.
    """
    index = {(c["setup"], c["partition"], c["epochs"], c["candidate"], c["baseline"], c["metric"]): c
             for c in comparisons}
    checks = []
    for setup, partition, epochs, candidate in sorted({(c["setup"], c["partition"], c["epochs"], c["candidate"])
                                                       for c in comparisons if c["candidate"] in CANDIDATES},
                                                      key=str):
        def get(baseline, metric):
            return index.get((setup, partition, epochs, candidate, baseline, metric))

        row = {"setup": setup, "partition": partition, "epochs": epochs, "candidate": candidate, "cells": {}}
        iid = partition == "iid"
        for baseline in ("fedavg", "fedprox", "fedadam"):
            bva = get(baseline, "best_val_accuracy")
            if bva is None:
                continue
            name = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam"}[baseline]
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


# ---------------------------------------------------------------------------------------------- power
def paired_t_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t-test at level ``alpha`` to detect a true mean difference ``effect``
    when the per-seed differences have standard deviation ``sd``, with ``n`` seeds: P(|T| > t_crit) under the
    noncentral t with n − 1 df and noncentrality effect·√n / sd (``scipy.stats.nct``)."""
    if n < 2 or sd <= 0:
        return math.nan
    df = n - 1
    noncentrality = abs(effect) * math.sqrt(n) / sd  # the test is two-sided: the sign does not matter
    critical = float(scipy_stats.t.ppf(1 - alpha / 2, df))
    upper = float(scipy_stats.nct.sf(critical, df, noncentrality))
    lower = float(scipy_stats.nct.cdf(-critical, df, noncentrality))  # the wrong-side rejections
    if math.isnan(lower):  # scipy underflows far in the tail of a large noncentrality: that mass is ~0
        lower = 0.0
    return min(1.0, upper + lower)


def seeds_for_power(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05, max_n: int = 10_000) -> int:
    """The smallest number of paired seeds whose two-sided paired t-test has at least ``power`` to detect
    ``effect`` (same units as ``sd``, the std of the per-seed differences); ``max_n`` + 1 if none up to it."""
    for n in range(2, max_n + 1):
        if paired_t_power(effect, sd, n, alpha) >= power:
            return n
    return max_n + 1


def sd_interval(sd: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` confidence interval of a normal population's std from a sample std over ``n`` values
    (chi-square): how uncertain a power analysis built on ``sd`` is."""
    df = n - 1
    low = sd * math.sqrt(df / float(scipy_stats.chi2.ppf(0.5 + level / 2, df)))
    high = sd * math.sqrt(df / float(scipy_stats.chi2.ppf(0.5 - level / 2, df)))
    return low, high


def power_analysis(comparisons: list[dict], effect_pp: float = 5.0, power: float = 0.8,
                   metric: str = "best_val_accuracy") -> list[dict]:
    """Per paired comparison of ``metric`` (in the tables' units, pp for BVA): the std of its per-seed
    differences, the seeds a paired t-test needs to detect ``effect_pp`` at ``power`` (α = 0.05, two-sided),
    and the same for the ends of that std's 95 % CI (the std itself comes from few seeds)."""
    out = []
    for c in comparisons:
        if c["metric"] != metric or c["n"] < 3 or not c["std"] > 0:
            continue
        low, high = sd_interval(c["std"], c["n"])
        out.append({"setup": c["setup"], "partition": c["partition"], "epochs": c["epochs"],
                    "candidate": c["candidate"], "baseline": c["baseline"], "n": c["n"], "sd": c["std"],
                    "sd_low": low, "sd_high": high, "effect": effect_pp, "power": power,
                    "power_now": paired_t_power(effect_pp, c["std"], c["n"]),
                    "seeds_needed": seeds_for_power(effect_pp, c["std"], power),
                    "seeds_needed_sd_low": seeds_for_power(effect_pp, low, power),
                    "seeds_needed_sd_high": seeds_for_power(effect_pp, high, power)})
    return out


# ---------------------------------------------------------------------------------------------- robustness
TAIL_PP = 5.0  # a seed "collapses" when its BVA is more than this many pp below its strategy's own median


def lower_tail(values: list[float], tail_pp: float = TAIL_PP) -> dict:
    """Spread and lower tail of one strategy's per-seed BVA (in pp): median, std, IQR, the worst seed,
    the 10th percentile (linear interpolation, numpy's default) and how many seeds fall more than
    ``tail_pp`` below the median."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(x) == 0:
        return {"n": 0, "mean": math.nan, "median": math.nan, "std": math.nan, "iqr": math.nan,
                "worst": math.nan, "p10": math.nan, "below": 0}
    median = float(np.median(x))
    q25, q75 = np.percentile(x, [25, 75])
    return {"n": len(x), "mean": float(x.mean()), "median": median,
            "std": float(x.std(ddof=1)) if len(x) > 1 else math.nan, "iqr": float(q75 - q25),
            "worst": float(x.min()), "p10": float(np.percentile(x, 10)),
            "below": int(np.sum(x < median - tail_pp - 1e-9))}


def robustness_tests(candidate: list[float], baseline: list[float]) -> dict:
    """Candidate vs baseline on paired per-seed values (same seed at the same index):

    - Wilcoxon signed-rank (``scipy.stats.wilcoxon``, two-sided, zero differences dropped, exact where scipy
      can) and the sign test (``scipy.stats.binomtest`` on the non-zero differences, p = 1/2): does the
      candidate beat the baseline on a typical seed, whatever the shape of the tail;
    - Brown–Forsythe (``scipy.stats.levene(center='median')``): is the spread over seeds different. It treats
      the two sets of seeds as independent samples (the pairing is ignored), so it is conservative here.
    """
    pairs = [(a, b) for a, b in zip(candidate, baseline)
             if a is not None and b is not None and not math.isnan(a) and not math.isnan(b)]
    diffs = np.asarray([a - b for a, b in pairs], dtype=np.float64)
    diffs[np.abs(diffs) < 1e-9] = 0.0  # 0.915 − 0.91 and 0.92 − 0.915 are the same 0.5 pp
    nonzero = diffs[diffs != 0]
    result = {"n": len(diffs), "wins": int(np.sum(diffs > 0)), "losses": int(np.sum(diffs < 0)),
              "ties": int(np.sum(diffs == 0)), "median_diff": float(np.median(diffs)) if len(diffs) else math.nan,
              "wilcoxon_p": math.nan, "sign_p": math.nan, "bf_p": math.nan, "bf_stat": math.nan}
    if len(nonzero) >= 1:
        result["sign_p"] = float(scipy_stats.binomtest(int(np.sum(nonzero > 0)), len(nonzero), 0.5).pvalue)
        result["wilcoxon_p"] = float(scipy_stats.wilcoxon(diffs, zero_method="wilcox").pvalue)
    if len(pairs) >= 3:  # with 2 values a group's deviations from its median are equal: a degenerate F
        a = np.asarray([p[0] for p in pairs])
        b = np.asarray([p[1] for p in pairs])
        if np.ptp(a) > 0 or np.ptp(b) > 0:
            bf = scipy_stats.levene(a, b, center="median")
            result["bf_stat"], result["bf_p"] = float(bf.statistic), float(bf.pvalue)
    return result


def robustness(rows: list[dict], metric: str = "best_val_accuracy", scale: float = 100.0,
               tail_pp: float = TAIL_PP) -> tuple[list[dict], list[dict]]:
    """(per-strategy spread and lower tail, per-pair tests) of ``metric`` × ``scale`` per setting.

    The tests pair every candidate with every baseline (and each variant with FedSQ) on the seeds both ran,
    as ``paired_comparisons`` does."""
    groups: dict[tuple, dict[int, float]] = {}
    for r in rows:
        groups.setdefault((r["setup"], r["partition"], r["epochs"], r["strategy"]), {})[r["seed"]] = \
            scale * r[metric]
    tails = []
    for (setup, partition, epochs, strategy), by_seed in groups.items():
        tails.append({"setup": setup, "partition": partition, "epochs": epochs, "strategy": strategy,
                      **lower_tail(list(by_seed.values()), tail_pp)})
    tests = []
    present = {key[3] for key in groups}
    pairs = [(c, b) for c in CANDIDATES for b in BASELINES if {c, b} <= present]
    pairs += [(c, "fedsq") for c in CANDIDATES if c != "fedsq" and {c, "fedsq"} <= present]
    pairs += [(b, "fedavg") for b in BASELINES if b != "fedavg" and {b, "fedavg"} <= present]  # FedProx, FedAdam
    for setup, partition, epochs in sorted({key[:3] for key in groups}, key=str):
        for candidate, baseline in pairs:
            a = groups.get((setup, partition, epochs, candidate), {})
            b = groups.get((setup, partition, epochs, baseline), {})
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            tests.append({"setup": setup, "partition": partition, "epochs": epochs, "candidate": candidate,
                          "baseline": baseline, "seeds": seeds,
                          **robustness_tests([a[s] for s in seeds], [b[s] for s in seeds])})
    return tails, tests
