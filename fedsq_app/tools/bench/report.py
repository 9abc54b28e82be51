"""The bench's tables: one row per finished cell, the summary over seeds, the paired comparisons and the
claims, written as CSV and Markdown next to the plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from fedsq_app.runtime.metrics import mean_std, last_k_std, rounds_to_best, rounds_to_within
from fedsq_app.runtime.strategies import CANDIDATES
from fedsq_app.tools.bench.grid import Cell, load_results, main_cells, partition_title, tuning_cells
from fedsq_app.tools.bench.plots import plot_paired, plot_robustness, plot_runs
from fedsq_app.tools.bench.presets import Preset
from fedsq_app.tools.bench.stats import (TAIL_PP, TTA_FRACTIONS, add_time_to_accuracy, claim_checks,
                                         paired_comparisons, power_analysis, robustness, still_improving)

PAPER_CLAIMS_NOTE = ("fedsq-adam, fedsq-m and fedsq-warmup are extensions beyond the paper: FedAdam's server step "
                     "on Q; FedAvgM's server momentum on Q; warm-up FedAvg rounds, then S frozen at that global model.")
CELL_COLUMNS = ("setup", "model", "dataset", "classes", "pretrained", "strategy", "partition", "epochs", "seed", "mu",
                "best_val_accuracy", "rounds_to_best",
                "rounds_to_within_0.5pp", "last_k_std", "test_accuracy", "round_time_s", "bytes_per_client",
                "final_gate_disagreement", "final_l2_from_pretrained", "rounds_run", "stopped_early",
                "still_improving", *(f"tta_{f:g}" for f in TTA_FRACTIONS))
ROBUSTNESS_COLUMNS = ("setup", "partition", "epochs", "strategy", "n", "mean", "median", "std", "iqr", "worst", "p10",
                      "below")
ROBUSTNESS_TEST_COLUMNS = ("setup", "partition", "epochs", "candidate", "baseline", "n", "wins", "losses", "ties",
                           "median_diff", "wilcoxon_p", "sign_p", "bf_stat", "bf_p", "seeds")
POWER_COLUMNS = ("setup", "partition", "epochs", "candidate", "baseline", "n", "sd", "sd_low", "sd_high", "effect",
                 "power", "power_now", "seeds_needed", "seeds_needed_sd_low", "seeds_needed_sd_high")
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
    tails, tests = robustness(rows)
    power = power_analysis(comparisons)
    written = {"cells": len(rows)}

    _write_csv(out / "cells.csv", [{k: r.get(k, "") for k in CELL_COLUMNS} for r in rows + tuning_rows], CELL_COLUMNS)
    columns = list(summary[0]) if summary else ["setup"]
    _write_csv(out / "summary.csv", summary, columns)
    _write_csv(out / "paired.csv", comparisons, PAIRED_COLUMNS)
    _write_csv(out / "robustness.csv", tails, ROBUSTNESS_COLUMNS)
    _write_csv(out / "robustness_tests.csv", tests, ROBUSTNESS_TEST_COLUMNS)
    _write_csv(out / "power.csv", power, POWER_COLUMNS)
    written["pngs"] = plot_runs(preset, rows, out) + plot_paired(comparisons, out) + plot_robustness(preset, rows, out)
    (out / "summary.md").write_text(_markdown(preset, summary, tuning_rows, comparisons, written["pngs"],
                                              command, wall_time_s, tails, tests, power))
    written["files"] = ["cells.csv", "summary.csv", "paired.csv", "robustness.csv", "robustness_tests.csv",
                        "power.csv", "summary.md", *written["pngs"]]
    return written


def _write_csv(path: Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _ci(test: dict, digits: int = 2) -> str:
    if math.isnan(test["mean"]):
        return "–"
    if math.isnan(test["low"]):
        return f"{test['mean']:+.{digits}f} (n={test['n']})"
    return f"{test['mean']:+.{digits}f} [{test['low']:+.{digits}f}, {test['high']:+.{digits}f}]"


def _markdown(preset: Preset, summary: list[dict], tuning_rows: list[dict], comparisons: list[dict],
              pngs: list[str], command: str, wall_time_s: float | None, tails: list[dict] = (),
              tests: list[dict] = (), power: list[dict] = ()) -> str:
    k = preset.last_k
    lines = ["# fedsq-bench summary", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if wall_time_s is not None:
        lines += [f"Wall time of this invocation: {wall_time_s / 60:.1f} min", ""]
    base = ", ".join(f"{key}={value}" for key, value in sorted(preset.base.items()))
    lines += [f"Setups: {'; '.join(f'{s.name} {s.overrides}' if s.overrides else s.name for s in preset.setups)}; "
              f"{preset.num_clients} clients; seeds {list(preset.seeds)}; {base}; engine {preset.engine}; "
              f"server defences {'off (a plain weighted mean)' if preset.defences == 'off' else 'the defaults'}"
              + "".join(f"; {strategy}: " + ", ".join(f"{k}={v}" for k, v in sorted(keys.items()))
                        for strategy, keys in preset.strategy_overrides.items() if keys)
              + ". The "
              "dataset, classes and backbone each cell actually used are in cells.csv.",
              f"Mean ± std over seeds. BVA = best validation accuracy; rounds-to-best = first round reaching BVA; "
              f"≤0.5 pp = first round within 0.5 pp of BVA; last-{k} std = std of validation accuracy over the "
              f"last {k} rounds (pp); test accuracy of the best round's model; s/round excludes round 1; "
              "rounds run (a patience rule may stop a run early); still improving = runs whose best came too late "
              "for the patience rule to end them (censored rounds-to-best); →95 % / →99 % = rounds to reach that "
              "fraction of the same seed's FedAvg BVA (a run that never does counts as its rounds + 1).", ""]
    if any(s in preset.strategies for s in CANDIDATES if s != "fedsq"):  # the variants beyond the paper
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
        lines += ["", f"FedProx μ tuning (seed {preset.tuning_seed}, BVA %):", "",
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
    lines += _robustness_markdown(preset, tails, tests, power)
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


def _p(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _robustness_markdown(preset: Preset, tails: list[dict], tests: list[dict], power: list[dict]) -> list[str]:
    """The spread and lower tail of per-seed BVA per strategy, the rank tests on it, and the power analysis."""
    lines = []
    if tails:
        order = {s: i for i, s in enumerate(preset.strategies)}
        lines += ["", f"Robustness: per-seed BVA (%) per strategy. worst = the worst seed; p10 = 10th percentile "
                  f"(linear); below = seeds more than {TAIL_PP:g} pp below the strategy's own median "
                  "(robustness.csv).", "",
                  "| setup | partition | E | strategy | seeds | median | mean | std | IQR | worst | p10 | below |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in sorted(tails, key=lambda t: (t["setup"], t["epochs"], t["partition"], order.get(t["strategy"], 99))):
            lines.append(f"| {t['setup']} | {partition_title(t['partition'])} | {t['epochs']} | {t['strategy']} | "
                         f"{t['n']} | {t['median']:.2f} | {t['mean']:.2f} | {t['std']:.2f} | {t['iqr']:.2f} | "
                         f"{t['worst']:.2f} | {t['p10']:.2f} | {t['below']}/{t['n']} |")
    if tests:
        lines += ["", "Robustness tests on per-seed BVA, candidate vs baseline on the same seeds: wins/losses/ties; "
                  "median difference (pp); paired Wilcoxon signed-rank and sign test (two-sided, ties dropped); "
                  "Brown–Forsythe (Levene, median-centred) for a different spread over seeds "
                  "(robustness_tests.csv).", "",
                  "| setup | partition | E | candidate | baseline | n | W/L/T | median diff (pp) | Wilcoxon p | "
                  "sign p | Brown–Forsythe p |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in tests:
            lines.append(f"| {t['setup']} | {partition_title(t['partition'])} | {t['epochs']} | {t['candidate']} | "
                         f"{t['baseline']} | {t['n']} | {t['wins']}/{t['losses']}/{t['ties']} | "
                         f"{t['median_diff']:+.2f} | {_p(t['wilcoxon_p'])} | {_p(t['sign_p'])} | {_p(t['bf_p'])} |")
    if power:
        first = power[0]
        lines += ["", f"Power analysis (power.csv): seeds a two-sided paired t-test (α = 0.05) needs to detect a "
                  f"{first['effect']:g} pp BVA difference with {100 * first['power']:g} % power, given the std of "
                  "the per-seed differences seen here (noncentral t); in brackets the same for the ends of that "
                  "std's 95 % CI.", "",
                  "| setup | partition | E | candidate | baseline | n | std of diffs (pp) [95 % CI] | power now | "
                  "seeds needed |", "|---|---|---|---|---|---|---|---|---|"]
        for p in power:
            lines.append(f"| {p['setup']} | {partition_title(p['partition'])} | {p['epochs']} | {p['candidate']} | "
                         f"{p['baseline']} | {p['n']} | {p['sd']:.2f} [{p['sd_low']:.2f}, {p['sd_high']:.2f}] | "
                         f"{p['power_now']:.2f} | {p['seeds_needed']} [{p['seeds_needed_sd_low']}, "
                         f"{p['seeds_needed_sd_high']}] |")
    return lines
