"""``fedsq-bench``: the grid that tests the paper's claims, with tables and plots.

strategies × partitions (IID, Dirichlet α) × local epochs × seeds × model/dataset setups. Every cell is a
real Flower simulation of the project's own ServerApp and ClientApp (``fedsq_app.harness.simulation.simulate``),
run one after another (or as Ray tasks on a cluster: ``--ray-address``, ``cluster.py``). A cell is done
when its ``results.json`` holds ``test_accuracy``; done cells are skipped, so an interrupted grid continues
where it stopped.

FedProx's μ is tuned first (on the first seed, over ``mu_grid``); the best μ by BVA then runs on every
seed, so the FedProx row is the tuned baseline.

Claims are decided by paired statistics: a seed fixes the partition and the head for every strategy (and,
with ``val-seed``, all seeds share one validation split), so each candidate is compared with each baseline
by its per-seed differences: mean, 95 % CI (paired t) and p-value (``paired_comparisons``, ``claim_checks``).

    fedsq-bench --preset quick --out outputs/bench-quick
    fedsq-bench --preset fmnist-paired --out outputs/bench/fmnist-paired --threads 1   # docs/RESULTS.md
    fedsq-bench --preset paper-full --out outputs/bench-paper   # a GPU machine with the Hub and ImageNet weights
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedsq_app.config import DEFENCES_OFF
from fedsq_app.tools.bench.presets import Preset, Setup


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
        off = DEFENCES_OFF if preset.defences == "off" else {}
        config = {**off, **preset.base, "model": self.setup.model, "dataset": self.setup.dataset,
                  **self.setup.overrides, **preset.strategy_overrides.get(self.strategy, {}),
                  "strategy": self.strategy, "local-epochs": self.epochs, "seed": self.seed,
                  "out-dir": str(cells_dir), "run-name": self.name}
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
    return [Cell(s, "fedprox", p, e, preset.tuning_seed, mu)
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
    """Run every cell not yet done, one after another in this process; returns {"ran": [...], "skipped": [...],
    "failed": [(name, error)]}. On a Ray cluster: ``fedsq_app.tools.bench.cluster.run_grid_on_ray``."""
    from tqdm.auto import tqdm

    if simulate_fn is None and preset.engine == "inprocess":
        from fedsq_app.harness.inprocess import simulate_in_process as simulate_fn
    elif simulate_fn is None:
        from fedsq_app.harness.simulation import simulate as simulate_fn
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
