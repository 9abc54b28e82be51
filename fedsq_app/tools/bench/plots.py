"""The bench's plots: validation curves, rounds-to-best bars, gate drift, and the paired differences."""

from __future__ import annotations

import math
from pathlib import Path

from fedsq_app.runtime.metrics import mean_std
from fedsq_app.runtime.strategies import STRATEGIES
from fedsq_app.tools.bench.grid import partition_label, partition_title
from fedsq_app.tools.bench.presets import Preset
from fedsq_app.tools.bench.stats import PAIRED_METRICS, verdict


def plot_runs(preset: Preset, rows: list[dict], out: Path) -> list[str]:
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
            names.append(_save(fig, out, f"curves_{setup.name}_e{epochs}.png"))

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
            names.append(_save(fig, out, f"gates_{setup.name}_e{epochs}.png"))

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
        names.append(_save(fig, out, f"rounds_to_best_{setup.name}.png"))
    return names


def plot_paired(comparisons: list[dict], out: Path) -> list[str]:
    """Mean paired difference with its 95 % CI, candidate − baseline, for BVA and rounds-to-best."""
    shown = [c for c in comparisons if c["metric"] in ("best_val_accuracy", "rounds_to_best", "tta_0.99")
             and c["baseline"] in ("fedavg", "fedprox", "fedadam") and not math.isnan(c["low"])]
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
    return [_save(fig, out, "paired_differences.png")]


def plot_robustness(preset: Preset, rows: list[dict], out: Path, tail_pp: float = 5.0) -> list[str]:
    """Per-seed BVA per strategy (one dot per seed, seeds joined across strategies by a faint line), with each
    strategy's median, 10th percentile and the median − ``tail_pp`` line below which a seed counts as a
    collapse. One panel per setting."""
    settings = sorted({(r["setup"], r["partition"], r["epochs"]) for r in rows}, key=str)
    if not settings:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {s: f"C{i}" for i, s in enumerate(STRATEGIES)}
    fig, axes = plt.subplots(1, len(settings), figsize=(max(5.0, 1.3 * len(preset.strategies)) * len(settings), 3.8),
                             squeeze=False)
    for ax, (setup, partition, epochs) in zip(axes[0], settings):
        strategies = [s for s in preset.strategies if any((r["setup"], r["partition"], r["epochs"], r["strategy"])
                                                          == (setup, partition, epochs, s) for r in rows)]
        by = {(r["strategy"], r["seed"]): 100 * r["best_val_accuracy"] for r in rows
              if (r["setup"], r["partition"], r["epochs"]) == (setup, partition, epochs)}
        seeds = sorted({seed for _, seed in by})
        for seed in seeds:  # the pairing: one faint line per seed
            xs = [i for i, s in enumerate(strategies) if (s, seed) in by]
            ax.plot(xs, [by[(strategies[i], seed)] for i in xs], color="0.8", lw=0.6, zorder=1)
        for i, strategy in enumerate(strategies):
            values = np.asarray([by[(strategy, seed)] for seed in seeds if (strategy, seed) in by])
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
            ax.scatter(i + jitter, values, s=14, color=colors[strategy], zorder=3)
            median, p10 = np.median(values), np.percentile(values, 10)
            ax.hlines(median, i - 0.3, i + 0.3, color="k", lw=1.5, zorder=4)
            ax.hlines(p10, i - 0.3, i + 0.3, color="C3", lw=1.2, ls="--", zorder=4)
            ax.hlines(median - tail_pp, i - 0.3, i + 0.3, color="C3", lw=0.8, ls=":", zorder=4)
        ax.set_xticks(range(len(strategies)), strategies, fontsize=8)
        ax.set_title(f"{setup}, {partition_title(partition)}, E={epochs}: {len(seeds)} seeds", fontsize=9)
        ax.set_ylabel("best validation accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"per-seed BVA: black = median, dashed red = 10th percentile, dotted red = median − {tail_pp:g} pp",
                 fontsize=8)
    return [_save(fig, out, "robustness_bva.png")]


def _save(fig, out: Path, name: str) -> str:
    """Lay out, write ``out/name`` and free the figure; returns the file name for the report."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _legend(axes, **kwargs) -> None:
    """One legend (on the first panel) with every strategy drawn in any panel of the row."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        axes[0].legend(list(handles.values()), list(handles), **kwargs)
