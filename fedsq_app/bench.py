"""``fedsq-bench``: the grid that tests the paper's claims, with tables and plots.

strategies × partitions (IID, Dirichlet α) × local epochs × seeds × model/dataset setups. Every cell is a
real Flower simulation of the project's own ServerApp and ClientApp (``fedsq_app.simulation.simulate``),
run one after another. A cell is done when its ``results.json`` holds ``test_accuracy``; done cells are
skipped, so an interrupted grid continues where it stopped.

FedProx's μ is tuned first (on the first seed, over ``mu_grid``); the best μ by BVA then runs on every
seed, so the FedProx row is the tuned baseline.

    fedsq-bench --preset quick --out outputs/bench-quick
    fedsq-bench --preset paper --out outputs/bench-paper   # a GPU machine with CIFAR and ImageNet weights
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

from fedsq_app.config import STRATEGIES, RunConfig
from fedsq_app.metrics import LAST_K, mean_std, rounds_to_best, rounds_to_within, last_k_std

PAPER_CLAIMS_NOTE = "fedsq-adam is an extension beyond the paper (FedAdam's server step applied to Q)."


@dataclass(frozen=True)
class Setup:
    """One model/dataset pair and the run-config keys that go with it."""

    model: str
    dataset: str = "embedded"
    overrides: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model}-{self.dataset.replace('/', '_').replace(':', '_')}"


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
        num_cpus=8, cpus_per_client=2, gpus_per_client=0.25),
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

    if simulate_fn is None:
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
CELL_COLUMNS = ("setup", "strategy", "partition", "epochs", "seed", "mu", "best_val_accuracy", "rounds_to_best",
                "rounds_to_within_0.5pp", "last_k_std", "test_accuracy", "round_time_s", "bytes_per_client",
                "final_gate_disagreement", "final_l2_from_pretrained")
METRICS = ("best_val_accuracy", "rounds_to_best", "rounds_to_within_0.5pp", "last_k_std", "test_accuracy",
           "round_time_s", "bytes_per_client")


def cell_row(cell: Cell, results: dict, last_k: int) -> dict:
    rounds = results["rounds"]
    curve = [r["val_accuracy"] for r in rounds]
    times = [r["wall_time_s"] for r in rounds[1:]] or [r["wall_time_s"] for r in rounds]  # round 1: start-up
    last = rounds[-1]
    return {"setup": cell.setup.name, "strategy": cell.strategy, "partition": cell.partition, "epochs": cell.epochs,
            "seed": cell.seed, "mu": cell.mu if cell.mu is not None else "",
            "best_val_accuracy": max(curve), "rounds_to_best": rounds_to_best(curve),
            "rounds_to_within_0.5pp": rounds_to_within(curve), "last_k_std": last_k_std(curve, last_k),
            "test_accuracy": results["test_accuracy"], "round_time_s": sum(times) / len(times),
            "bytes_per_client": last.get("bytes_per_client", math.nan),
            "final_gate_disagreement": last.get("gate_disagreement", ""),
            "final_l2_from_pretrained": last.get("l2_from_pretrained", ""),
            "_curve": [results["initial"]["val_accuracy"], *curve],
            "_gates": [r.get("gate_disagreement", math.nan) for r in rounds],
            "_l2": [r.get("l2_from_pretrained", math.nan) for r in rounds]}


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
        summary.append(entry)
    return summary


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _num(mean: float, std: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def claim_checks(summary: list[dict]) -> list[dict]:
    """The paper's statistical claims (docs/RESULTS.md), checked per setup × partition × epochs.

    BVA: IID parity within 0.5 pp of FedAvg; Dirichlet: above FedAvg and tuned FedProx. Rounds-to-best: not
    more than FedAvg's and FedProx's. Robustness (any one definition): lower last-k std, lower seed-std of
    BVA, or a smaller IID→Dirichlet BVA drop than FedAvg. Accuracy preserved: within 1 pp of the best
    baseline.
    """
    by = {(s["setup"], s["strategy"], s["partition"], s["epochs"]): s for s in summary}
    checks = []
    for (setup, strategy, partition, epochs), fedsq in sorted(by.items(), key=lambda kv: str(kv[0])):
        if strategy != "fedsq":
            continue
        base = {name: by.get((setup, name, partition, epochs)) for name in ("fedavg", "fedprox", "fedadam")}
        base = {k: v for k, v in base.items() if v is not None}
        if "fedavg" not in base:
            continue
        bva = fedsq["best_val_accuracy_mean"]
        row = {"setup": setup, "partition": partition, "epochs": epochs}
        if partition == "iid":
            row["BVA claim"] = bva >= base["fedavg"]["best_val_accuracy_mean"] - 0.005
        else:
            row["BVA claim"] = all(bva > base[k]["best_val_accuracy_mean"] for k in ("fedavg", "fedprox") if k in base)
        row["rounds-to-best claim"] = all(fedsq["rounds_to_best_mean"] <= base[k]["rounds_to_best_mean"]
                                          for k in ("fedavg", "fedprox") if k in base)
        row["lower last-k std"] = fedsq["last_k_std_mean"] < base["fedavg"]["last_k_std_mean"]
        row["lower seed-std of BVA"] = fedsq["best_val_accuracy_std"] < base["fedavg"]["best_val_accuracy_std"]
        iid_sq, iid_avg = by.get((setup, "fedsq", "iid", epochs)), by.get((setup, "fedavg", "iid", epochs))
        row["smaller IID→Dirichlet drop"] = None if partition == "iid" or not (iid_sq and iid_avg) else (
            iid_sq["best_val_accuracy_mean"] - bva
            < iid_avg["best_val_accuracy_mean"] - base["fedavg"]["best_val_accuracy_mean"])
        row["accuracy preserved (≤1 pp)"] = bva >= max(b["best_val_accuracy_mean"] for b in base.values()) - 0.01
        checks.append(row)
    return checks


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
    summary = summarise(rows)
    written = {"cells": len(rows)}

    _write_csv(out / "cells.csv", [{k: r[k] for k in CELL_COLUMNS} for r in rows + tuning_rows], CELL_COLUMNS)
    columns = list(summary[0]) if summary else ["setup"]
    _write_csv(out / "summary.csv", summary, columns)
    written["pngs"] = _plots(preset, rows, out)
    (out / "summary.md").write_text(_markdown(preset, summary, tuning_rows, claim_checks(summary), written["pngs"],
                                              command, wall_time_s))
    written["files"] = ["cells.csv", "summary.csv", "summary.md", *written["pngs"]]
    return written


def _write_csv(path: Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _markdown(preset: Preset, summary: list[dict], tuning_rows: list[dict], checks: list[dict], pngs: list[str],
              command: str, wall_time_s: float | None) -> str:
    k = preset.last_k
    lines = ["# fedsq-bench summary", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if wall_time_s is not None:
        lines += [f"Wall time of this invocation: {wall_time_s / 60:.1f} min", ""]
    base = ", ".join(f"{key}={value}" for key, value in sorted(preset.base.items()))
    lines += [f"Setups: {', '.join(s.name for s in preset.setups)}; {preset.num_clients} clients; "
              f"seeds {list(preset.seeds)}; {base}.",
              f"Mean ± std over seeds. BVA = best validation accuracy; rounds-to-best = first round reaching BVA; "
              f"≤0.5 pp = first round within 0.5 pp of BVA; last-{k} std = std of validation accuracy over the "
              f"last {k} rounds (pp); test accuracy of the best round's model; s/round excludes round 1 "
              "(process start-up); kB/client/round = the model arrays sent to each client (replies carry the same).",
              ""]
    if "fedsq-adam" in preset.strategies:
        lines += [PAPER_CLAIMS_NOTE, ""]
    lines += ["| setup | partition | E | strategy | BVA (%) | rounds-to-best | ≤0.5 pp | "
              f"last-{k} std (pp) | test acc (%) | s/round | kB/client/round | seeds |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(preset.strategies)}
    parts = {p: i for i, p in enumerate(preset.partitions)}
    for s in sorted(summary, key=lambda s: (s["setup"], s["epochs"], parts.get(s["partition"], 99),
                                            order.get(s["strategy"], 99))):
        strategy = s["strategy"] + (f" (μ={s['mu']:g})" if s["strategy"] == "fedprox" and s["mu"] != "" else "")
        lines.append(
            f"| {s['setup']} | {partition_title(s['partition'])} | {s['epochs']} | {strategy} | "
            f"{_pct(s['best_val_accuracy_mean'], s['best_val_accuracy_std'])} | "
            f"{_num(s['rounds_to_best_mean'], s['rounds_to_best_std'])} | "
            f"{_num(s['rounds_to_within_0.5pp_mean'], s['rounds_to_within_0.5pp_std'])} | "
            f"{_num(100 * s['last_k_std_mean'], 100 * s['last_k_std_std'], 2)} | "
            f"{_pct(s['test_accuracy_mean'], s['test_accuracy_std'])} | "
            f"{_num(s['round_time_s_mean'], s['round_time_s_std'])} | {s['bytes_per_client_mean'] / 1000:.0f} | "
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
    if checks:
        keys = [c for c in checks[0] if c not in ("setup", "partition", "epochs")]
        lines += ["", "Paper claims, FedSQ vs baselines (means over seeds; ✓ = held, ✗ = did not):", "",
                  "| setup | partition | E | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
        parts = {p: i for i, p in enumerate(preset.partitions)}
        for c in sorted(checks, key=lambda c: (c["setup"], c["epochs"], parts.get(c["partition"], 99))):
            marks = " | ".join("–" if c[key] is None else "✓" if c[key] else "✗" for key in keys)
            lines.append(f"| {c['setup']} | {partition_title(c['partition'])} | {c['epochs']} | {marks} |")
        held = [f"{key}: {sum(1 for c in checks if c[key])}/{sum(1 for c in checks if c[key] is not None)}"
                for key in keys]
        lines += ["", "Held in: " + "; ".join(held) + "."]
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
        length = min(len(s) for s in series)
        return np.asarray([s[:length] for s in series], dtype=np.float64)

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
                    mean, std = 100 * curves.mean(0), 100 * curves.std(0)
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


def _legend(axes, **kwargs) -> None:
    """One legend (on the first panel) with every strategy drawn in any panel of the row."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        axes[0].legend(list(handles.values()), list(handles), **kwargs)


# ---------------------------------------------------------------------------------------------- CLI
def build_preset(args: argparse.Namespace) -> Preset:
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
    base = dict(preset.base)
    if args.rounds:
        base["num-server-rounds"] = args.rounds
    if args.max_train_samples is not None:
        base["max-train-samples"] = args.max_train_samples
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:
            base[key] = json.loads(value)  # numbers
        except ValueError:
            base[key] = value  # strings
    changes["base"] = base
    if args.num_cpus:
        changes["num_cpus"] = args.num_cpus
    if args.gpus_per_client is not None:
        changes["gpus_per_client"] = args.gpus_per_client
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
    # Every cell's run config is checked before the first simulation starts.
    probe = Cell(preset.setups[0], preset.strategies[0], preset.partitions[0], preset.epochs[0], preset.seeds[0])
    RunConfig.from_mapping(probe.run_config(preset, Path(args.out) / "cells"))
    return preset


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
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key for every cell")
    parser.add_argument("--num-cpus", type=int, help="CPUs given to the simulation")
    parser.add_argument("--gpus-per-client", type=float)
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's per-round logs")
    args = parser.parse_args(argv)
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
