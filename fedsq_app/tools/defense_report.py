"""The tables and plots of ``fedsq-defenses`` (``fedsq_app.tools.defenses``): markdown summaries of the
attack and honest-cost experiments, the damage plot and the cost plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedsq_app.runtime.metrics import mean_std
from fedsq_app.tools.attacks import ABSENT, ATTACKS, without
from fedsq_app.tools.bench.stats import paired_test


def _pct(values: list[float]) -> str:
    mean, std = mean_std(values)
    return "–" if not values or math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _ci(test: dict) -> str:
    if not test["n"] or math.isnan(test["mean"]):
        return "–"
    if math.isnan(test["low"]):
        return f"{100 * test['mean']:+.2f} (n={test['n']})"
    return f"{100 * test['mean']:+.2f} [{100 * test['low']:+.2f}, {100 * test['high']:+.2f}]"


def _count(runs: list[dict], key: str, total: str) -> str:
    return f"{sum(r[key] for r in runs)} of {sum(r[total] for r in runs)}"


SIZE_GROUPS = ("smallest third", "middle third", "largest third")


def scales_by_size(runs: list[dict]) -> dict[str, tuple[int, int, int, int]]:
    """Honest replies by their silo's weight (thirds of each run's silos by server weight): (replies, accepted
    and scaled below 1, accepted and scaled below 0.5, rejected) per third."""
    counts = {group: [0, 0, 0, 0] for group in SIZE_GROUPS}
    for run in runs:
        accepted, rejected = run.get("honest_scales", []), run.get("honest_rejected_weights", [])
        weights = sorted({w for w, *_ in accepted} | set(rejected))

        def third(weight) -> list[int]:
            return counts[SIZE_GROUPS[min(2, 3 * weights.index(weight) // max(len(weights), 1))]]

        for weight, scale, *_ in accepted:
            scale = 1.0 if scale is None else scale
            row = third(weight)
            row[0] += 1
            row[1] += scale < 1
            row[2] += scale < 0.5
        for weight in rejected:
            row = third(weight)
            row[0] += 1
            row[3] += 1
    return {group: tuple(c) for group, c in counts.items()}


def liveness_table(runs: list[dict]) -> list[str]:
    """One row per case: the run with its culprit against the same federation without it, paired by seed."""
    lines = ["| case | BVA with the node (%) | BVA without it (%) | final accuracy, with − without (pp) | "
             "others' replies rejected | the node's replies rejected | rounds that kept the model | quarantines |",
             "|---|---|---|---|---|---|---|---|"]
    for case in dict.fromkeys(r["scenario"] for r in runs):
        with_node = {r["seed"]: r for r in runs if r["scenario"] == case and r["defense"] == "defaults"}
        alone = {r["seed"]: r for r in runs if r["scenario"] == case and r["defense"] != "defaults"}
        paired = paired_test([with_node[s]["final_val"] - alone[s]["final_val"] for s in with_node if s in alone])
        cells = list(with_node.values())
        lines.append(f"| {case} | {_pct([r['bva'] for r in cells])} | {_pct([r['bva'] for r in alone.values()])} | "
                     f"{_ci(paired)} | {_count(cells, 'honest_rejected', 'honest_replies')} | "
                     f"{_count(cells, 'hostile_rejected', 'hostile_replies')} | "
                     f"{sum(r['rounds_kept'] for r in cells)} | {sum(r.get('quarantines', 0) for r in cells)} |")
    return lines


def markdown(report: dict) -> str:
    sizes, runs = report["sizes"], report["runs"]
    head = (f"Sizes: {sizes['clients']} clients, {sizes['num-server-rounds']} rounds, dataset {sizes['dataset']}, "
            f"max-train-samples {sizes['max-train-samples']}, Dirichlet α = {sizes['alpha']}, seeds {sizes['seeds']}; "
            f"strategy {sizes.get('strategy', 'fedsq')}, model {sizes.get('model', 'smallcnn')}, everything else "
            f"the default run config{' but ' + str(sizes['set']) if sizes.get('set') else ''}. {len(runs)} runs in "
            f"{sizes['wall_time_s'] / 60:.1f} min.")
    if report["experiment"] == "liveness":
        return "\n".join([head, "", *liveness_table(runs), ""])
    if report["experiment"] == "cost":
        off = {r["seed"]: r for r in runs if r["defense"] == "none"}
        arms = [d for d in dict.fromkeys(r["defense"] for r in runs) if d != "none"]
        rows, costs, by_size = [], [], []
        for arm in arms:
            on = {r["seed"]: r for r in runs if r["defense"] == arm}
            paired = paired_test([on[s]["bva"] - off[s]["bva"] for s in on if s in off])
            cells = list(on.values())
            rows.append(f"| {arm} | {_pct([r['bva'] for r in cells])} | "
                        f"{_count(cells, 'honest_rejected', 'honest_replies')} | "
                        f"{_count(cells, 'honest_weight_changed', 'honest_replies')} | "
                        f"{_count(cells, 'honest_clipped', 'honest_replies')} | "
                        f"{sum(r.get('honest_below_half', 0) for r in cells)} | "
                        f"{_count(cells, 'honest_bn_clamped', 'honest_replies')} |")
            costs.append(f"Honest cost, {arm} − none (paired over {paired['n']} seeds, pp): {_ci(paired)}")
            by_size.append(f"| {arm} | " + " | ".join(
                f"{below} / {half} / {rejected} of {total}"
                for total, below, half, rejected in scales_by_size(cells).values()) + " |")
        return "\n".join([head, "", "| defenses | BVA (%) | honest replies rejected | honest weights changed | "
                          "honest updates bounded | of them scaled below 0.5 | honest replies with BN coordinates "
                          "clamped |", "|---|---|---|---|---|---|---|", *rows,
                          f"| none | {_pct([r['bva'] for r in off.values()])} | – | – | – | – | – |", "", *costs, "",
                          "Honest replies bounded / scaled below 0.5 / rejected, by silo size (thirds of each run's "
                          "silos by server weight):", "", "| defenses | " + " | ".join(SIZE_GROUPS) + " |",
                          "|---|---|---|---|", *by_size, "",
                          f"Seeds the partitioner could not split (skipped): {sorted(report['unsplittable']) or 'none'}",
                          ""])
    lines = [head, "", "D = ‖aggregate − honest-only aggregate‖ / median honest update norm, per round (mean over "
             "rounds, and the worst round); BVA in %, mean ± std over seeds.", "",
             "| attack | defense | accepted (hostile replies) | D mean | D max | BVA | rounds that kept the model | "
             "final accuracy − without the attackers (pp) |",
             "|---|---|---|---|---|---|---|---|"]
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        for defense in dict.fromkeys(r["defense"] for r in runs if r["scenario"] == scenario):
            cell = [r for r in runs if (r["scenario"], r["defense"]) == (scenario, defense)]
            accepted = sum(r["hostile_replies"] - r["hostile_rejected"] for r in cell)
            clipped = sum(r["hostile_clipped"] for r in cell)
            # A round whose honest replies all failed (the model already destroyed) has no D: left out.
            damages = [r["damage_mean"] for r in cell if r["damage_mean"] is not None and not math.isnan(r["damage_mean"])]
            worst = [r["damage_max"] for r in cell if r["damage_max"] is not None and not math.isnan(r["damage_max"])]
            shown = "–" if scenario == "honest" or scenario in ABSENT else \
                f"{accepted} of {sum(r['hostile_replies'] for r in cell)} ({clipped} clipped)"
            lines.append(f"| {scenario} | {defense} | {shown} | "
                         f"{np.mean(damages):.2f} | {max(worst):.2f} | " if damages else
                         f"| {scenario} | {defense} | {shown} | – | – | ")
            lines[-1] += f"{_pct([r['bva'] for r in cell])} | {sum(r['rounds_kept'] for r in cell)} | "
            paired = against_absence(runs, scenario, defense)
            lines[-1] += f"{_ci(paired)} |" if paired else "– |"
    return "\n".join(lines + ["", *attack_grid(runs)]) + "\n"


def against_absence(runs: list[dict], scenario: str, defense: str) -> dict | None:
    """The attack's final accuracy less the same federation's without its attackers, same defence, paired by
    seed (None for a scenario without attackers)."""
    hostile = ATTACKS.get(scenario, (None, 0))[1]
    if not hostile:
        return None
    alone = {r["seed"]: r for r in runs if (r["scenario"], r["defense"]) == (without(hostile), defense)}
    return paired_test([r["final_val"] - alone[r["seed"]]["final_val"] for r in runs
                        if (r["scenario"], r["defense"]) == (scenario, defense) and r["seed"] in alone
                        and r.get("final_val") is not None and alone[r["seed"]].get("final_val") is not None])


def attack_grid(runs: list[dict]) -> list[str]:
    """One row per attack, one column per defence: the paired difference from the federation without the
    attackers (pp, mean [95 % CI]); "–" where that defence did not run it."""
    attacks = [s for s in dict.fromkeys(r["scenario"] for r in runs) if ATTACKS.get(s, (None, 0))[1]]
    defenses = list(dict.fromkeys(r["defense"] for r in runs if r["scenario"] in attacks))
    lines = ["Final accuracy − the same federation without the attackers, same defence (pp, paired by seed):", "",
             "| attack | " + " | ".join(defenses) + " |", "|---|" + "---|" * len(defenses)]
    for scenario in attacks:
        cells = [against_absence(runs, scenario, d) for d in defenses]
        lines.append(f"| {scenario} | " + " | ".join(_ci(c) if c and c["n"] else "–" for c in cells) + " |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r["damage_mean"] is not None]
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    defenses = list(dict.fromkeys(r["defense"] for r in runs))
    figure, axis = plt.subplots(figsize=(2 + 1.6 * len(scenarios), 4))
    width = 0.8 / max(len(defenses), 1)
    for j, defense in enumerate(defenses):
        values = [np.mean([r["damage_mean"] for r in runs if (r["scenario"], r["defense"]) == (s, defense)] or
                          [math.nan]) for s in scenarios]
        axis.bar(np.arange(len(scenarios)) + (j - (len(defenses) - 1) / 2) * width, values, width, label=defense)
    axis.set_yscale("symlog", linthresh=1.0)
    axis.axhline(0.5, color="grey", lw=0.8, ls="--")
    axis.axhline(1.0, color="grey", lw=0.8, ls=":")
    axis.set_xticks(np.arange(len(scenarios)), [s.replace(" (", "\n(") for s in scenarios], fontsize=7)
    axis.set_ylabel("damage D (mean over rounds)")
    axis.legend(title="defense", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_cost(report: dict, path: Path) -> None:
    """Left: each arm's paired BVA difference against no defences (mean, 95 % CI). Right: the share of
    honest updates each arm scaled below 0.5, by silo size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    off = {r["seed"]: r for r in runs if r["defense"] == "none"}
    arms = [d for d in dict.fromkeys(r["defense"] for r in runs) if d != "none"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(arms):
        on = {r["seed"]: r for r in runs if r["defense"] == arm}
        test = paired_test([on[s]["bva"] - off[s]["bva"] for s in on if s in off])
        low, high = (test["low"], test["high"]) if not math.isnan(test["low"]) else (test["mean"], test["mean"])
        left.errorbar(i, 100 * test["mean"], yerr=[[100 * (test["mean"] - low)], [100 * (high - test["mean"])]],
                      fmt="o", capsize=4)
        groups = scales_by_size([r for r in runs if r["defense"] == arm])
        shares = [100 * (half + rejected) / total if total else 0 for total, _, half, rejected in groups.values()]
        right.bar(np.arange(3) + (i - (len(arms) - 1) / 2) * 0.8 / len(arms), shares, 0.8 / len(arms), label=arm)
    left.axhline(0, color="grey", lw=0.8)
    for limit in (-0.5, 0.5):
        left.axhline(limit, color="grey", lw=0.6, ls=":")
    left.set_xticks(range(len(arms)), arms, fontsize=7, rotation=15)
    left.set_ylabel("BVA − BVA without defences (pp), 95 % CI")
    right.set_xticks(range(3), SIZE_GROUPS, fontsize=8)
    right.axhline(5, color="grey", lw=0.6, ls=":")
    right.set_ylabel("honest replies scaled below 0.5 or rejected (%)")
    right.legend(fontsize=7)
    sizes = report["sizes"]
    figure.suptitle(f"Honest cost: {sizes['clients']} silos, Dirichlet α = {sizes['alpha']}, "
                    f"{sizes['num-server-rounds']} rounds, {len(off)} paired seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def merge(reports: list[dict]) -> dict:
    """One report of several runs of the same experiment and sizes (say, the same attacks under further
    arms): their runs together, a later report's cell (scenario, defence, seed) replacing an earlier one's."""
    kinds = {(r["experiment"], r["sizes"].get("num-server-rounds"), r["sizes"].get("alpha")) for r in reports}
    if len(kinds) != 1:
        raise ValueError(f"these reports are of different experiments or sizes, not one table: {sorted(kinds)}")
    cells = {}
    for report in reports:
        cells.update({(r["scenario"], r["defense"], r["seed"]): r for r in report["runs"]})
    sizes = {**reports[-1]["sizes"], "wall_time_s": sum(r["sizes"].get("wall_time_s", 0.0) for r in reports),
             "seeds": sorted({s for r in reports for s in r["sizes"].get("seeds", [])})}
    return {**reports[-1], "sizes": sizes, "runs": list(cells.values()), "merged_from": len(reports)}


def main(argv: list[str] | None = None) -> None:
    """``python -m fedsq_app.tools.defense_report --out DIR SUMMARY.json ...``: one table and plot of several
    ``fedsq-defenses`` summaries of one experiment."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m fedsq_app.tools.defense_report", description=main.__doc__)
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(write(merge([json.loads(path.read_text()) for path in args.summaries]), args.out))


def write(report: dict, out: Path) -> str:
    """``summary.md``, ``summary.json`` and the experiment's plot in ``out``; returns the markdown."""
    import json

    table = markdown(report)
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    if report["experiment"] == "attacks":
        plot(report, out / "damage.png")
    elif report["experiment"] == "cost" and any(r["defense"] == "none" for r in report["runs"]):
        plot_cost(report, out / "cost.png")
    return table


if __name__ == "__main__":
    main()
