"""Power analysis from a finished grid's ``cells.csv``: how many paired seeds a two-sided paired t-test needs
to detect a given BVA difference at a given power, from the std of the per-seed differences that grid saw.

    python -m fedsq_app.tools.bench.power --cells docs/results/cross-domain/cells.csv --effect 5 --power 0.8
"""

from __future__ import annotations

import argparse
import csv
import math

from fedsq_app.tools.bench.stats import paired_comparisons, power_analysis

FLOAT_COLUMNS = ("best_val_accuracy", "rounds_to_best", "test_accuracy", "last_k_std")


def read_cells(path: str) -> list[dict]:
    """The reported cells of a ``cells.csv`` (a FedProx μ-tuning row that repeats a reported cell is dropped)."""
    rows, seen = [], set()
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            key = (row["setup"], row["strategy"], row["partition"], row["epochs"], row["seed"])
            if key in seen:
                continue
            seen.add(key)
            entry = {"setup": row["setup"], "strategy": row["strategy"], "partition": row["partition"],
                     "epochs": int(row["epochs"]), "seed": int(row["seed"])}
            for column in FLOAT_COLUMNS:
                entry[column] = float(row[column]) if row.get(column) not in (None, "") else math.nan
            rows.append(entry)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", required=True, help="a grid's cells.csv")
    parser.add_argument("--effect", type=float, default=5.0, help="BVA difference to detect, pp")
    parser.add_argument("--power", type=float, default=0.8)
    parser.add_argument("--baseline", default="fedavg", help="only comparisons against this baseline ('' = all)")
    args = parser.parse_args(argv)
    comparisons = [c for c in paired_comparisons(read_cells(args.cells))
                   if not args.baseline or c["baseline"] == args.baseline]
    print(f"seeds for a two-sided paired t-test (α = 0.05) to detect {args.effect:g} pp BVA with "
          f"{100 * args.power:g} % power, from {args.cells}:")
    print("| candidate | baseline | n | mean diff (pp) | std of diffs (pp) [95 % CI] | power now | seeds needed "
          "[at the std's CI ends] |")
    print("|---|---|---|---|---|---|---|")
    means = {(c["candidate"], c["baseline"]): c["mean"] for c in comparisons if c["metric"] == "best_val_accuracy"}
    for p in power_analysis(comparisons, args.effect, args.power):
        print(f"| {p['candidate']} | {p['baseline']} | {p['n']} | {means[(p['candidate'], p['baseline'])]:+.2f} | "
              f"{p['sd']:.2f} [{p['sd_low']:.2f}, {p['sd_high']:.2f}] | {p['power_now']:.2f} | "
              f"{p['seeds_needed']} [{p['seeds_needed_sd_low']}, {p['seeds_needed_sd_high']}] |")


if __name__ == "__main__":
    main()
