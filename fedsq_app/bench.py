"""``fedsq-bench``: the grid that tests the paper's claims, with tables and plots.

strategies × partitions (IID, Dirichlet α) × local epochs × seeds × model/dataset setups. Every cell is a
real Flower simulation of the project's own ServerApp and ClientApp (``fedsq_app.simulation.simulate``),
run one after another. A cell is done when its ``results.json`` holds ``test_accuracy``; done cells are
skipped, so an interrupted grid continues where it stopped.

FedProx's μ is tuned first (on the first seed, over ``mu_grid``); the best μ by BVA then runs on every
seed, so the FedProx row is the tuned baseline.

Claims are decided by paired statistics: a seed fixes the partition and the head for every strategy (and,
with ``val-seed``, all seeds share one validation split), so each candidate is compared with each baseline
by its per-seed differences: mean, 95 % CI (paired t) and p-value (``paired_comparisons``, ``claim_checks``).

    fedsq-bench --preset quick --out outputs/bench-quick
    fedsq-bench --preset fmnist-paired --out outputs/bench13/fmnist-paired --threads 1   # docs/RESULTS.md
    fedsq-bench --preset paper-full --out outputs/bench-paper   # a GPU machine with the Hub and ImageNet weights
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsq_app.config import STRATEGIES, RunConfig
from fedsq_app.metrics import LAST_K, mean_std, rounds_to_best, rounds_to_within, last_k_std

PAPER_CLAIMS_NOTE = ("fedsq-adam, fedsq-m and fedsq-warmup are extensions beyond the paper: FedAdam's server step "
                     "on Q; FedAvgM's server momentum on Q; warm-up FedAvg rounds, then S frozen at that global model.")
TTA_FRACTIONS = (0.95, 0.99)  # time-to-accuracy: rounds to reach this fraction of FedAvg's BVA (same seed)


@dataclass(frozen=True)
class Setup:
    """One model/dataset pair and the run-config keys that go with it."""

    model: str
    dataset: str = "embedded"
    overrides: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model}-{self.dataset.replace('/', '_').replace(':', '_')}"


PAIRED_STRATEGIES = ("fedsq", "fedavg", "fedprox", "fedsq-m", "fedsq-warmup")
# Sized for a shared 2-core CPU: 800-image federated pool, 200-image validation split fixed across seeds
# (val-seed=0), up to 20 rounds, stopped after 5 rounds without a new best; masks cached (no augmentation).
# The server's defences are off: the grid compares the methods' plain n_k-weighted averaging, as the paper.
PAIRED_BASE = {"num-server-rounds": 20, "patience": 5, "max-train-samples": 1000, "val-fraction": 0.2,
               "val-seed": 0, "mask-cache": "on", "probe-size": 32, "max-update-norm-ratio": 0.0,
               "max-num-examples-ratio": 0.0}
CROSS_BACKBONE = "outputs/bench13/smallcnn-fmnist-classes0-4.safetensors"  # fedsq-pretrain --classes 0-4 --out


@dataclass(frozen=True)
class Preset:
    setups: tuple[Setup, ...]
    strategies: tuple[str, ...] = ("fedsq", "fedavg", "fedprox", "fedadam")
    partitions: tuple[str, ...] = ("iid", "0.1", "0.5")  # "iid" or a Dirichlet α
    epochs: tuple[int, ...] = (1, 5)
    seeds: tuple[int, ...] = (0, 1, 2)
    num_clients: int = 10
    base: dict = field(default_factory=dict)  # run-config keys shared by every cell
    mu_grid: tuple[float, ...] = (0.001, 0.01, 0.1)
    tune_on: tuple[tuple[str, int], ...] = ()  # (partition, epochs) combos to tune μ on; () = every combo
    last_k: int = LAST_K
    num_cpus: int = 2
    cpus_per_client: int = 1
    gpus_per_client: float = 0.0
    engine: str = "inprocess"  # inprocess: the apps in this process (fedsq_app.inprocess); ray: Flower's engine


PRESETS = {
    # <= 20 minutes on 2 CPU cores: small CNN, embedded Fashion-MNIST subset, one seed, E = 1.
    "quick": Preset(setups=(Setup("smallcnn"),), epochs=(1,), seeds=(0,), num_clients=5, tune_on=(("0.1", 1),),
                    base={"num-server-rounds": 8, "max-train-samples": 1500, "val-fraction": 0.2}),
    # The grid behind docs/RESULTS.md: real Fashion-MNIST subset, 3 seeds, E ∈ {1, 5}, about an hour on 2 cores
    # (μ tuned on α=0.1, E=1 only, to fit the budget).
    "fmnist": Preset(setups=(Setup("smallcnn"),), num_clients=10, tune_on=(("0.1", 1),),
                     base={"num-server-rounds": 8, "max-train-samples": 1500, "val-fraction": 0.2}),
    # The paper's setting, for a GPU: ImageNet-pretrained ResNet-18 and AlexNet on CIFAR-10/100.
    "paper": Preset(
        setups=tuple(Setup(model, dataset, {"pretrained": "imagenet", "batch-size": 64, "lr": 0.01})
                     for model in ("resnet18", "alexnet") for dataset in ("uoft-cs/cifar10", "uoft-cs/cifar100")),
        num_clients=10, base={"num-server-rounds": 50, "probe-size": 32},
        num_cpus=8, cpus_per_client=2, gpus_per_client=0.25, engine="ray"),
    # The grids behind docs/RESULTS.md (issue 13): paired seeds with one fixed validation split, Dirichlet
    # α=0.1, the variants, runs stopped by a patience rule. μ = 0.1 won the earlier tuning on this setting;
    # 0.01 is tuned against it again on seed 0.
    "fmnist-paired": Preset(setups=(Setup("smallcnn"),), strategies=PAIRED_STRATEGIES, partitions=("0.1",),
                            epochs=(1,), seeds=(0, 1, 2, 3, 4), num_clients=10, mu_grid=(0.01, 0.1),
                            base=PAIRED_BASE),
    # Cross-domain transfer: S pretrained on Fashion-MNIST classes 0-4 (fedsq-pretrain --classes 0-4 on the
    # embedded 'pretrain' split), federated on classes 5-9 with a new 5-way head.
    # Five classes over 10 clients at α=0.1 cannot give every client 10 samples: min-partition-size 5. FedProx
    # keeps μ=0.01 (the same-domain grid's pick), untuned here to fit the CPU budget.
    "fmnist-cross": Preset(setups=(Setup("smallcnn", "embedded", {"classes": "5-9", "pretrained": CROSS_BACKBONE,
                                                                  "min-partition-size": 5}),),
                           strategies=PAIRED_STRATEGIES, partitions=("0.1",), epochs=(1,), seeds=(0, 1, 2, 3, 4),
                           num_clients=10, mu_grid=(0.01,), base=PAIRED_BASE),
    # The paper's datasets and backbones (CINIC-10, CIFAR-100; AlexNet, ResNet-18; CIFAR-10 optional via
    # --set dataset=...), ImageNet weights at their native 224 px, augmentation on: for a GPU machine.
    "paper-full": Preset(
        setups=tuple(Setup(model, dataset, {"pretrained": "imagenet", "batch-size": 64, "lr": 0.01,
                                            "input-size": 224, "augment": True, **extra})
                     for model in ("resnet18", "alexnet")
                     for dataset, extra in (("flwrlabs/cinic10", {"test-split": "test"}),
                                            ("uoft-cs/cifar100", {"label-column": "fine_label"}))),
        strategies=PAIRED_STRATEGIES, partitions=("iid", "0.1", "0.5"), epochs=(1,), seeds=(0, 1, 2, 3, 4),
        num_clients=10, base={"num-server-rounds": 50, "patience": 10, "val-seed": 0, "probe-size": 32},
        num_cpus=8, cpus_per_client=2, gpus_per_client=0.25, engine="ray"),
}


# ---------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    setup: Setup
    strategy: str
    partition: str
    epochs: int
    seed: int
    mu: float | None = None  # FedProx only

    @property
    def name(self) -> str:
        mu = f"-mu{self.mu:g}" if self.mu is not None else ""
        return f"{self.setup.name}-{self.strategy}{mu}-{partition_label(self.partition)}-e{self.epochs}-s{self.seed}"

    @property
    def group(self) -> tuple[str, str, str, int]:
        return self.setup.name, self.strategy, self.partition, self.epochs

    def run_config(self, preset: Preset, cells_dir: Path) -> dict:
        config = {**preset.base, "model": self.setup.model, "dataset": self.setup.dataset,
                  **self.setup.overrides, "strategy": self.strategy, "local-epochs": self.epochs,
                  "seed": self.seed, "out-dir": str(cells_dir), "run-name": self.name}
        if self.partition == "iid":
            config["partitioner"] = "iid"
        else:
            config.update(partitioner="dirichlet", alpha=float(self.partition))
        if self.mu is not None:
            config["proximal-mu"] = self.mu
        return config


def partition_label(partition: str) -> str:
    return "iid" if partition == "iid" else f"a{float(partition):g}"


def partition_title(partition: str) -> str:
    return "IID" if partition == "iid" else f"Dirichlet α={float(partition):g}"


def load_results(cells_dir: Path, cell: Cell) -> dict | None:
    """The cell's results.json if the run finished (it holds test_accuracy), else None."""
    path = cells_dir / cell.name / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if "test_accuracy" in results else None


def tuning_cells(preset: Preset) -> list[Cell]:
    if "fedprox" not in preset.strategies:
        return []
    combos = list(preset.tune_on) or [(p, e) for p in preset.partitions for e in preset.epochs]
    return [Cell(s, "fedprox", p, e, preset.seeds[0], mu)
            for s in preset.setups for p, e in combos for mu in preset.mu_grid]


def best_mu(preset: Preset, cells_dir: Path, setup: Setup, partition: str, epochs: int) -> tuple[float, dict]:
    """The μ with the highest BVA on the tuning seed (tuned here, else averaged over the tuned combos).

    Ties go to the smaller μ. Returns (μ, {μ: BVA}) — the BVAs of this combo when it was tuned.
    """
    scores: dict[float, list[float]] = {mu: [] for mu in preset.mu_grid}
    own = {c.mu: c for c in tuning_cells(preset) if c.setup == setup and (c.partition, c.epochs) == (partition, epochs)}
    pool = own.values() if own else [c for c in tuning_cells(preset) if c.setup == setup]
    for cell in pool:
        results = load_results(cells_dir, cell)
        if results is not None:
            scores[cell.mu].append(max(r["val_accuracy"] for r in results["rounds"]))
    means = {mu: sum(v) / len(v) for mu, v in scores.items() if v}
    if not means:
        return preset.mu_grid[0], {}
    best = max(sorted(means), key=lambda mu: means[mu])  # sorted + max: first (smallest) μ wins ties
    return best, means


def main_cells(preset: Preset, cells_dir: Path) -> list[Cell]:
    """Every reported cell; FedProx's carry the tuned μ (so call this after the tuning cells ran)."""
    cells = []
    # Seeds outermost: an interrupted grid still has every setting for its first seeds.
    for seed in preset.seeds:
        for setup in preset.setups:
            for epochs in preset.epochs:
                for partition in preset.partitions:
                    mu = best_mu(preset, cells_dir, setup, partition, epochs)[0] \
                        if "fedprox" in preset.strategies else None
                    for strategy in preset.strategies:
                        cells.append(Cell(setup, strategy, partition, epochs, seed,
                                          mu if strategy == "fedprox" else None))
    return cells


# ---------------------------------------------------------------------------------------------- running
def run_grid(preset: Preset, out: Path, *, verbose: bool = False, simulate_fn=None) -> dict:
    """Run every cell not yet done; returns {"ran": [...], "skipped": [...], "failed": [(name, error)]}."""
    from tqdm.auto import tqdm

    if simulate_fn is None and preset.engine == "inprocess":
        from fedsq_app.inprocess import simulate_in_process as simulate_fn
    elif simulate_fn is None:
        from fedsq_app.simulation import simulate as simulate_fn
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    if not verbose:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        logging.getLogger("flwr").setLevel(logging.WARNING)
    log = {"ran": [], "skipped": [], "failed": []}
    tuning = tuning_cells(preset)
    main_count = (len(preset.setups) * len(preset.partitions) * len(preset.epochs) * len(preset.strategies)
                  * len(preset.seeds))
    progress = tqdm(total=len(tuning) + main_count, desc="fedsq-bench", unit="cell", file=sys.stdout)
    seen: set[str] = set()

    def run(cell: Cell) -> None:
        if cell.name in seen:  # a tuning cell that is also a reported cell (tuning seed, best μ)
            progress.total -= 1
            progress.refresh()
            return
        seen.add(cell.name)
        progress.set_postfix_str(cell.name)
        if load_results(cells_dir, cell) is not None:
            log["skipped"].append(cell.name)
        else:
            start = time.time()
            try:
                simulate_fn(cell.run_config(preset, cells_dir), preset.num_clients, num_cpus=preset.num_cpus,
                            cpus_per_client=preset.cpus_per_client, gpus_per_client=preset.gpus_per_client)
                log["ran"].append(cell.name)
                progress.write(f"done {cell.name} in {time.time() - start:.0f}s")
            except Exception as error:  # one broken cell must not cost the rest of the grid
                log["failed"].append((cell.name, f"{type(error).__name__}: {error}"))
                progress.write(f"FAILED {cell.name}: {type(error).__name__}: {error}")
        progress.update(1)

    for cell in tuning:
        run(cell)
    for cell in main_cells(preset, cells_dir):
        run(cell)
    progress.close()
    return log


# ---------------------------------------------------------------------------------------------- report
CELL_COLUMNS = ("setup", "model", "dataset", "classes", "pretrained", "strategy", "partition", "epochs", "seed", "mu",
                "best_val_accuracy", "rounds_to_best",
                "rounds_to_within_0.5pp", "last_k_std", "test_accuracy", "round_time_s", "bytes_per_client",
                "final_gate_disagreement", "final_l2_from_pretrained", "rounds_run", "stopped_early",
                "still_improving", *(f"tta_{f:g}" for f in TTA_FRACTIONS))
PAIRED_COLUMNS = ("setup", "partition", "epochs", "candidate", "baseline", "metric", "n", "mean", "std", "low",
                  "high", "p", "seeds")
METRICS = ("best_val_accuracy", "rounds_to_best", "rounds_to_within_0.5pp", "last_k_std", "test_accuracy",
           "round_time_s", "bytes_per_client", *(f"tta_{f:g}" for f in TTA_FRACTIONS))


def cell_row(cell: Cell, results: dict, last_k: int) -> dict:
    rounds = results["rounds"]
    curve = [r["val_accuracy"] for r in rounds]
    times = [r["wall_time_s"] for r in rounds[1:]] or [r["wall_time_s"] for r in rounds]  # round 1: start-up
    last = rounds[-1]
    used = results.get("config", {})  # what the cell actually ran on, from its own results.json
    return {"setup": cell.setup.name, "model": used.get("model", ""), "dataset": used.get("dataset", ""),
            "classes": used.get("classes", ""), "pretrained": results.get("pretrained_from", ""),
            "strategy": cell.strategy, "partition": cell.partition, "epochs": cell.epochs,
            "seed": cell.seed, "mu": cell.mu if cell.mu is not None else "",
            "best_val_accuracy": max(curve), "rounds_to_best": rounds_to_best(curve),
            "rounds_to_within_0.5pp": rounds_to_within(curve), "last_k_std": last_k_std(curve, last_k),
            "test_accuracy": results["test_accuracy"], "round_time_s": sum(times) / len(times),
            "bytes_per_client": last.get("bytes_per_client", math.nan),
            "final_gate_disagreement": last.get("gate_disagreement", ""),
            "final_l2_from_pretrained": last.get("l2_from_pretrained", ""),
            "rounds_run": len(curve), "stopped_early": "stopped_early" in results,
            "still_improving": still_improving(curve, results),
            "_curve": [results["initial"]["val_accuracy"], *curve],
            "_gates": [r.get("gate_disagreement", math.nan) for r in rounds],
            "_l2": [r.get("l2_from_pretrained", math.nan) for r in rounds]}


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


# ---------------------------------------------------------------------------------------------- statistics
def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4: exact finite sums)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, term = math.cos(theta) ** 2, 1.0
    if df % 2:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ...))
        total = 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    else:  # even: sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...)
        total = 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    return 0.5 + 0.5 * inside if t >= 0 else 0.5 - 0.5 * inside


def student_t_quantile(probability: float, df: int) -> float:
    """The t with P(T <= t) = ``probability`` (bisection on the exact CDF; 0.5 < probability < 1)."""
    low, high = 0.0, 1e4
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, df) < probability else (low, middle)
    return (low + high) / 2


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
    half = student_t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    t = mean / (std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half,
            "p": 2 * (1 - student_t_cdf(abs(t), n - 1))}


def verdict(test: dict | None, direction: int, margin: float = 0.0) -> str:
    """✓ when the CI lies wholly beyond ``margin`` on the claimed side (``direction`` +1: candidate higher,
    −1: lower), ✗ when it lies wholly on the other side (significantly against), ≈ when it straddles it."""
    if test is None or math.isnan(test["low"]):
        return "–"
    low, high = (test["low"], test["high"]) if direction > 0 else (-test["high"], -test["low"])
    return "✓" if low > margin else "✗" if high < margin else "≈"


CANDIDATES = ("fedsq", "fedsq-m", "fedsq-warmup", "fedsq-adam")  # FedSQ and its variants
BASELINES = ("fedavg", "fedprox", "fedadam")
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


def _ci(test: dict, digits: int = 2) -> str:
    if math.isnan(test["mean"]):
        return "–"
    if math.isnan(test["low"]):
        return f"{test['mean']:+.{digits}f} (n={test['n']})"
    return f"{test['mean']:+.{digits}f} [{test['low']:+.{digits}f}, {test['high']:+.{digits}f}]"


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


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (setup, strategy, partition, epochs)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setup"], row["strategy"], row["partition"], row["epochs"]), []).append(row)
    summary = []
    for (setup, strategy, partition, epochs), members in groups.items():
        entry = {"setup": setup, "strategy": strategy, "partition": partition, "epochs": epochs,
                 "seeds": len(members), "mu": members[0]["mu"]}
        for metric in METRICS:
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean_std([m[metric] for m in members])
        entry["still_improving"] = sum(1 for m in members if m.get("still_improving"))
        entry["rounds_run_mean"] = mean_std([m.get("rounds_run", math.nan) for m in members])[0]
        summary.append(entry)
    return summary


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _num(mean: float, std: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(preset: Preset, out: Path, command: str = "", wall_time_s: float | None = None) -> dict:
    """cells.csv, summary.csv, summary.md and PNGs from every finished cell; returns what it wrote."""
    cells_dir = out / "cells"
    rows = []
    for cell in main_cells(preset, cells_dir):
        results = load_results(cells_dir, cell)
        if results is not None:
            rows.append(cell_row(cell, results, preset.last_k))
    tuning_rows = []
    for cell in tuning_cells(preset):
        results = load_results(cells_dir, cell)
        if results is not None:
            tuning_rows.append(cell_row(cell, results, preset.last_k))
    add_time_to_accuracy(rows)
    summary = summarise(rows)
    comparisons = paired_comparisons(rows)
    written = {"cells": len(rows)}

    _write_csv(out / "cells.csv", [{k: r.get(k, "") for k in CELL_COLUMNS} for r in rows + tuning_rows], CELL_COLUMNS)
    columns = list(summary[0]) if summary else ["setup"]
    _write_csv(out / "summary.csv", summary, columns)
    _write_csv(out / "paired.csv", comparisons, PAIRED_COLUMNS)
    written["pngs"] = _plots(preset, rows, out) + _paired_plot(comparisons, out)
    (out / "summary.md").write_text(_markdown(preset, summary, tuning_rows, comparisons, written["pngs"],
                                              command, wall_time_s))
    written["files"] = ["cells.csv", "summary.csv", "paired.csv", "summary.md", *written["pngs"]]
    return written


def _write_csv(path: Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _markdown(preset: Preset, summary: list[dict], tuning_rows: list[dict], comparisons: list[dict],
              pngs: list[str], command: str, wall_time_s: float | None) -> str:
    k = preset.last_k
    lines = ["# fedsq-bench summary", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if wall_time_s is not None:
        lines += [f"Wall time of this invocation: {wall_time_s / 60:.1f} min", ""]
    base = ", ".join(f"{key}={value}" for key, value in sorted(preset.base.items()))
    lines += [f"Setups: {'; '.join(f'{s.name} {s.overrides}' if s.overrides else s.name for s in preset.setups)}; "
              f"{preset.num_clients} clients; seeds {list(preset.seeds)}; {base}; engine {preset.engine}. The "
              "dataset, classes and backbone each cell actually used are in cells.csv.",
              f"Mean ± std over seeds. BVA = best validation accuracy; rounds-to-best = first round reaching BVA; "
              f"≤0.5 pp = first round within 0.5 pp of BVA; last-{k} std = std of validation accuracy over the "
              f"last {k} rounds (pp); test accuracy of the best round's model; s/round excludes round 1; "
              "rounds run (a patience rule may stop a run early); still improving = runs whose best came too late "
              "for the patience rule to end them (censored rounds-to-best); →95 % / →99 % = rounds to reach that "
              "fraction of the same seed's FedAvg BVA (a run that never does counts as its rounds + 1).", ""]
    if any(s in preset.strategies for s in ("fedsq-adam", "fedsq-m", "fedsq-warmup")):
        lines += [PAPER_CLAIMS_NOTE, ""]
    lines += ["| setup | partition | E | strategy | BVA (%) | rounds-to-best | ≤0.5 pp | →95 % | →99 % | "
              f"last-{k} std (pp) | test acc (%) | rounds run | still improving | s/round | seeds |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(preset.strategies)}
    parts = {p: i for i, p in enumerate(preset.partitions)}
    for s in sorted(summary, key=lambda s: (s["setup"], s["epochs"], parts.get(s["partition"], 99),
                                            order.get(s["strategy"], 99))):
        strategy = s["strategy"] + (f" (μ={s['mu']:g})" if s["strategy"] == "fedprox" and s["mu"] != "" else "")
        tta = " | ".join(_num(s[f"tta_{f:g}_mean"], s[f"tta_{f:g}_std"]) for f in TTA_FRACTIONS)
        lines.append(
            f"| {s['setup']} | {partition_title(s['partition'])} | {s['epochs']} | {strategy} | "
            f"{_pct(s['best_val_accuracy_mean'], s['best_val_accuracy_std'])} | "
            f"{_num(s['rounds_to_best_mean'], s['rounds_to_best_std'])} | "
            f"{_num(s['rounds_to_within_0.5pp_mean'], s['rounds_to_within_0.5pp_std'])} | {tta} | "
            f"{_num(100 * s['last_k_std_mean'], 100 * s['last_k_std_std'], 2)} | "
            f"{_pct(s['test_accuracy_mean'], s['test_accuracy_std'])} | {s['rounds_run_mean']:.1f} | "
            f"{s['still_improving']}/{s['seeds']} | {_num(s['round_time_s_mean'], s['round_time_s_std'])} | "
            f"{s['seeds']} |")
    if tuning_rows:
        lines += ["", f"FedProx μ tuning (seed {preset.seeds[0]}, BVA %):", "",
                  "| setup | partition | E | " + " | ".join(f"μ={mu:g}" for mu in preset.mu_grid) + " |",
                  "|---|---|---|" + "---|" * len(preset.mu_grid)]
        combos: dict[tuple, dict] = {}
        for r in tuning_rows:
            combos.setdefault((r["setup"], r["partition"], r["epochs"]), {})[r["mu"]] = r["best_val_accuracy"]
        for (setup, partition, epochs), scores in combos.items():
            cells = " | ".join(f"{100 * scores[mu]:.2f}" if mu in scores else "–" for mu in preset.mu_grid)
            lines.append(f"| {setup} | {partition_title(partition)} | {epochs} | {cells} |")
    checks = claim_checks(comparisons)
    if checks:
        keys = list(dict.fromkeys(key for c in checks for key in c["cells"]))
        lines += ["", "Claims, each decided by a paired 95 % CI over seeds (mean difference candidate − baseline "
                  "[CI]): ✓ = the CI lies on the claimed side, ≈ = it straddles 0 (or the margin), ✗ = it lies on "
                  "the other side. Claimed sides: higher BVA (IID: above −0.5 pp), fewer rounds, lower last-k std; "
                  "accuracy preserved = BVA CI above −1 pp against every baseline (the worst one shown).", "",
                  "| setup | partition | E | candidate | " + " | ".join(keys) + " |",
                  "|---|---|---|---|" + "---|" * len(keys)]
        for c in checks:
            marks = " | ".join(f"{c['cells'][key][1]} {_ci(c['cells'][key][0], 1)}" if key in c["cells"] else "–"
                               for key in keys)
            lines.append(f"| {c['setup']} | {partition_title(c['partition'])} | {c['epochs']} | {c['candidate']} | "
                         f"{marks} |")
        earlier = [c for c in checks if c["three_rounds_earlier"]]
        lines += ["", "Reaches its best ≥ 3 rounds before both FedAvg and FedProx (mean ≤ −3 rounds, CI below 0) at "
                  "a BVA that is not significantly lower: " + (", ".join(
                      f"{c['candidate']} ({c['setup']}, {partition_title(c['partition'])}, E={c['epochs']})"
                      for c in earlier) if earlier else "no candidate in any setting") + "."]
    if comparisons:
        lines += ["", "All paired comparisons (candidate − baseline, per seed; mean [95 % CI], two-sided paired-t p):",
                  "", "| setup | partition | E | candidate | baseline | metric | n | mean [95 % CI] | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            p = "–" if math.isnan(c["p"]) else f"{c['p']:.3f}"
            lines.append(f"| {c['setup']} | {partition_title(c['partition'])} | {c['epochs']} | {c['candidate']} | "
                         f"{c['baseline']} | {c['label']} | {c['n']} | {_ci(c)} | {p} |")
    if pngs:
        lines += ["", *[f"![{name}]({name})" for name in pngs]]
    return "\n".join(lines) + "\n"


def _plots(preset: Preset, rows: list[dict], out: Path) -> list[str]:
    """Validation-accuracy curves (mean ± std band), rounds-to-best bars, gate-disagreement / L2 curves."""
    if not rows:
        return []
    has_gates = any(not math.isnan(v) for r in rows for v in r["_gates"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = []
    colors = {s: f"C{i}" for i, s in enumerate(STRATEGIES)}

    def grouped(setup, partition, epochs, strategy, key):
        series = [r[key] for r in rows if (r["setup"], r["partition"], r["epochs"], r["strategy"])
                  == (setup, partition, epochs, strategy)]
        if not series:
            return None
        length = max(len(s) for s in series)  # runs stopped early by the patience rule: NaN afterwards
        return np.asarray([list(s) + [math.nan] * (length - len(s)) for s in series], dtype=np.float64)

    for setup in preset.setups:
        for epochs in preset.epochs:
            if not any(r["setup"] == setup.name and r["epochs"] == epochs for r in rows):
                continue
            # Validation accuracy per round, one panel per partition.
            fig, axes = plt.subplots(1, len(preset.partitions), figsize=(4.2 * len(preset.partitions), 3.4),
                                     squeeze=False, sharey=True)
            for ax, partition in zip(axes[0], preset.partitions):
                for strategy in preset.strategies:
                    curves = grouped(setup.name, partition, epochs, strategy, "_curve")
                    if curves is None:
                        continue
                    x = np.arange(curves.shape[1])
                    with np.errstate(all="ignore"):  # rounds only some runs reached: mean over those
                        mean, std = 100 * np.nanmean(curves, 0), 100 * np.nanstd(curves, 0)
                    ax.plot(x, mean, color=colors[strategy], label=strategy)
                    ax.fill_between(x, mean - std, mean + std, color=colors[strategy], alpha=0.2)
                ax.set_title(f"{partition_title(partition)}, E={epochs}")
                ax.set_xlabel("round")
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel("validation accuracy (%)")
            _legend(axes[0], fontsize=8)
            fig.tight_layout()
            name = f"curves_{setup.name}_e{epochs}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            names.append(name)

            if not has_gates:
                continue
            # The premise: gate disagreement with the pretrained model, and L2 distance, per round.
            fig, axes = plt.subplots(2, len(preset.partitions), figsize=(4.2 * len(preset.partitions), 5.6),
                                     squeeze=False, sharex=True, sharey="row")
            for col, partition in enumerate(preset.partitions):
                for strategy in preset.strategies:
                    for row, key, label in ((0, "_gates", "gate disagreement (%)"), (1, "_l2", "L2 from pretrained")):
                        values = grouped(setup.name, partition, epochs, strategy, key)
                        if values is None or np.isnan(values).all():
                            continue
                        scale = 100 if row == 0 else 1
                        style = "--" if strategy.startswith("fedsq") else "-"
                        axes[row][col].plot(np.arange(1, values.shape[1] + 1), scale * np.nanmean(values, 0),
                                            style, color=colors[strategy], label=strategy)
                        axes[row][0].set_ylabel(label)
                axes[0][col].set_title(f"{partition_title(partition)}, E={epochs}")
                axes[1][col].set_xlabel("round")
                for row in (0, 1):
                    axes[row][col].grid(alpha=0.3)
            _legend(axes[0], fontsize=7, title="dashed: FedSQ's Q with its own ReLUs", title_fontsize=7)
            fig.tight_layout()
            name = f"gates_{setup.name}_e{epochs}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            names.append(name)

        # Rounds-to-best, bars per strategy for every partition × epochs.
        combos = [(p, e) for e in preset.epochs for p in preset.partitions]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(combos)), 3.4))
        width = 0.8 / len(preset.strategies)
        for i, strategy in enumerate(preset.strategies):
            means, stds = [], []
            for partition, epochs in combos:
                values = [r["rounds_to_best"] for r in rows if (r["setup"], r["strategy"], r["partition"], r["epochs"])
                          == (setup.name, strategy, partition, epochs)]
                mean, std = mean_std(values)
                means.append(mean)
                stds.append(std)
            ax.bar(np.arange(len(combos)) + (i - (len(preset.strategies) - 1) / 2) * width, means, width,
                   yerr=stds, capsize=2, color=colors[strategy], label=strategy)
        ax.set_xticks(np.arange(len(combos)), [f"{partition_label(p)}, E={e}" for p, e in combos])
        ax.set_ylabel("rounds to best val. acc.")
        ax.legend(fontsize=8, ncol=len(preset.strategies))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        name = f"rounds_to_best_{setup.name}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _paired_plot(comparisons: list[dict], out: Path) -> list[str]:
    """Mean paired difference with its 95 % CI, candidate − baseline, for BVA and rounds-to-best."""
    shown = [c for c in comparisons if c["metric"] in ("best_val_accuracy", "rounds_to_best", "tta_0.99")
             and c["baseline"] in ("fedavg", "fedprox") and not math.isnan(c["low"])]
    if not shown:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("best_val_accuracy", "rounds_to_best", "tta_0.99") if any(c["metric"] == m for c in shown)]
    labels = list(dict.fromkeys(f"{c['candidate']} − {c['baseline']}\n{c['setup']}, {partition_label(c['partition'])}, "
                                f"E={c['epochs']}" for c in shown))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 0.45 * len(labels) + 1.4), sharey=True,
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for c in (c for c in shown if c["metric"] == metric):
            y = labels.index(f"{c['candidate']} − {c['baseline']}\n{c['setup']}, {partition_label(c['partition'])}, "
                             f"E={c['epochs']}")
            color = {"✓": "C2", "✗": "C3"}.get(verdict(c, c["direction"]), "C7")
            ax.errorbar(c["mean"], y, xerr=[[c["mean"] - c["low"]], [c["high"] - c["mean"]]], fmt="o",
                        color=color, capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(PAIRED_METRICS[metric][0] + (" (higher is better)" if PAIRED_METRICS[metric][2] > 0
                                                 else " (lower is better)"), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("paired difference per seed, mean and 95 % CI (green: claim holds, red: significantly against)",
                 fontsize=9)
    fig.tight_layout()
    name = "paired_differences.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return [name]


def _legend(axes, **kwargs) -> None:
    """One legend (on the first panel) with every strategy drawn in any panel of the row."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        axes[0].legend(list(handles.values()), list(handles), **kwargs)


# ---------------------------------------------------------------------------------------------- CLI
# Keys every cell sets itself: --set cannot change them (the grid's own flags do).
CELL_KEYS = {"strategy": "--strategies", "local-epochs": "--epochs", "seed": "--seeds", "partitioner": "--partitions",
             "alpha": "--partitions", "proximal-mu": "--mu-grid", "out-dir": "--out", "run-name": "--out"}


def parse_set(items: list[str]) -> dict:
    """``--set KEY=VALUE`` the way ``flwr run --run-config`` reads values (TOML: 0.1, 5, true, 'a string'),
    and bare strings too (``pretrained=/path``). A string-typed key keeps its text as written, unquoted."""
    from fedsq_app.config import ConfigError
    import tomllib

    types = {f.name.replace("_", "-"): f.type for f in dataclasses.fields(RunConfig)}
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(f"--set '{item}': expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare string: pretrained=/data/backbone.safetensors, classes=5-9
        if types.get(key) == "str" and not isinstance(value, str):
            value = text  # classes=5 is the string "5"
        values[key] = value
    return values


def build_preset(args: argparse.Namespace) -> Preset:
    """The preset with the command line applied; every setup's run config is checked here, once."""
    from fedsq_app.config import ConfigError

    preset = PRESETS[args.preset]
    changes = {}
    for key in ("strategies", "partitions", "epochs", "seeds", "mu_grid"):
        value = getattr(args, key)
        if value:
            changes[key] = tuple(value)
    if args.clients:
        changes["num_clients"] = args.clients
    if args.tune_on:
        changes["tune_on"] = tuple((p, int(e)) for p, _, e in (item.partition(":") for item in args.tune_on))
    try:
        forced = parse_set(args.set or [])
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    for key, flag in CELL_KEYS.items():
        if key in forced:
            raise SystemExit(f"--set {key}=...: every cell sets {key} itself; use {flag}")
    if args.model:
        forced["model"] = args.model
    if args.dataset:
        forced["dataset"] = args.dataset
    if args.rounds:
        forced["num-server-rounds"] = args.rounds
    if args.max_train_samples is not None:
        forced["max-train-samples"] = args.max_train_samples
    # --set wins over the preset, its setups included: model and dataset replace each setup's own (setups
    # that become equal merge), and a setup's override of a --set key is dropped.
    setups = []
    for setup in preset.setups:
        setup = Setup(forced.get("model", setup.model), forced.get("dataset", setup.dataset),
                      {k: v for k, v in setup.overrides.items() if k not in forced})
        if setup not in setups:
            setups.append(setup)
    changes["setups"] = tuple(setups)
    changes["base"] = {**preset.base, **{k: v for k, v in forced.items() if k not in ("model", "dataset")}}
    if args.num_cpus:
        changes["num_cpus"] = args.num_cpus
    if args.gpus_per_client is not None:
        changes["gpus_per_client"] = args.gpus_per_client
    if args.engine:
        changes["engine"] = args.engine
    preset = dataclasses.replace(preset, **changes)
    unknown = [s for s in preset.strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    for partition in preset.partitions:
        if partition != "iid":
            try:
                if float(partition) <= 0:
                    raise ValueError
            except ValueError:
                raise SystemExit(f"partition '{partition}' must be 'iid' or a Dirichlet α > 0") from None
    if not args.report_only:
        preflight(preset, Path(args.out) / "cells")
    return preset


def preflight(preset: Preset, cells_dir: Path) -> None:
    """Refuse, once and before any cell runs, what would fail in every cell: an unknown or ill-typed key,
    a missing checkpoint, a dataset that cannot be found or read, a split or class list it cannot give."""
    from fedsq_app.config import ConfigError
    from fedsq_app.data import DataKey, dataset_info

    for setup in preset.setups:
        for strategy in preset.strategies:
            cell = Cell(setup, strategy, preset.partitions[0], preset.epochs[0], preset.seeds[0])
            try:
                config = RunConfig.from_mapping(cell.run_config(preset, cells_dir))
                config.check_server_paths()
            except ConfigError as error:
                raise SystemExit(f"setup {setup.name}: {error}") from None
        try:
            dataset_info(DataKey.of(config))  # loads the train split, its slice and class filter, once
        except (ConfigError, FileNotFoundError, ValueError, IndexError) as error:
            raise SystemExit(f"setup {setup.name}: dataset='{config.dataset}' (train-split='{config.train_split}'"
                             f", classes='{config.classes}'): {type(error).__name__}: {error}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsq-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", default="outputs/bench", help="output folder (cells/, summary.*, PNGs)")
    parser.add_argument("--strategies", nargs="+", help=f"subset of {', '.join(STRATEGIES)}")
    parser.add_argument("--partitions", nargs="+", help="'iid' and/or Dirichlet α values, e.g. iid 0.1 0.5")
    parser.add_argument("--epochs", nargs="+", type=int, help="local epochs, e.g. 1 5")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--mu-grid", nargs="+", type=float, help="FedProx μ values to tune over")
    parser.add_argument("--tune-on", nargs="+", metavar="PARTITION:EPOCHS",
                        help="tune μ only on these combos, e.g. 0.1:1 (default: the preset's)")
    parser.add_argument("--clients", type=int, help="number of simulated clients")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--model", help="run every setup on this model (same as --set model=...)")
    parser.add_argument("--dataset", help="run every setup on this dataset (same as --set dataset=...)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="any run-config key for every cell, TOML values as flwr run --run-config takes them "
                             "(lr=0.01, pretrained='/path' or pretrained=/path); wins over the preset")
    parser.add_argument("--engine", choices=("inprocess", "ray"),
                        help="inprocess: the apps called in this process, no Ray (CPU grids; the preset's "
                             "default except 'paper'); ray: Flower's simulation engine (GPUs, num-cpus)")
    parser.add_argument("--threads", type=int, help="torch threads in this process (1 on a shared CPU)")
    parser.add_argument("--num-cpus", type=int, help="CPUs given to the simulation")
    parser.add_argument("--gpus-per-client", type=float)
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's per-round logs")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    preset = build_preset(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "fedsq-bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.time()
    if not args.report_only:
        log = run_grid(preset, out, verbose=args.verbose)
        print(f"ran {len(log['ran'])} cells, skipped {len(log['skipped'])} finished ones, "
              f"{len(log['failed'])} failed")
        for name, error in log["failed"]:
            print(f"  FAILED {name}: {error}")
    written = write_report(preset, out, command, None if args.report_only else time.time() - start)
    print(f"{written['cells']} cells reported: " + ", ".join(str(out / f) for f in written["files"]))


if __name__ == "__main__":
    main()
