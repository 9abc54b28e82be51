"""Two runs of one grid side by side (say the server's defaults and the defences off), paired by seed:
per strategy and partition, arm A − arm B in BVA, test accuracy, rounds to best and end-of-run std, with
the paired-t 95 % CI, and each arm's lower tail. Prints a Markdown table.

    python -m fedsq_app.tools.bench.arms --a outputs/bench/x-defaults/cells.csv \\
        --b outputs/bench/x-off/cells.csv --names defaults off
"""

from __future__ import annotations

import argparse
import math

from fedsq_app.tools.bench.power import read_cells
from fedsq_app.tools.bench.stats import lower_tail, paired_test

METRICS = (("best_val_accuracy", "BVA (pp)", 100.0), ("test_accuracy", "test (pp)", 100.0),
           ("rounds_to_best", "rounds to best", 1.0), ("last_k_std", "last-5 std (pp)", 100.0))


def compare_arms(a: list[dict], b: list[dict]) -> list[dict]:
    """One row per (setup, strategy, partition, epochs) that both arms ran: the paired differences A − B over
    the seeds both have, and each arm's lower tail (BVA in pp)."""
    def index(rows):
        return {(r["setup"], r["strategy"], r["partition"], r["epochs"], r["seed"]): r for r in rows}

    left, right = index(a), index(b)
    shared = left.keys() & right.keys()
    out = []
    for group in sorted({key[:4] for key in shared}):
        seeds = sorted(key[4] for key in shared if key[:4] == group)
        row = {"setup": group[0], "strategy": group[1], "partition": group[2], "epochs": group[3],
               "seeds": len(seeds),
               "identical": sum(left[(*group, s)]["best_val_accuracy"] == right[(*group, s)]["best_val_accuracy"]
                                for s in seeds)}
        for metric, _, scale in METRICS:
            row[metric] = paired_test([scale * (left[(*group, s)][metric] - right[(*group, s)][metric])
                                       for s in seeds])
        row["tail_a"] = lower_tail([100 * left[(*group, s)]["best_val_accuracy"] for s in seeds])
        row["tail_b"] = lower_tail([100 * right[(*group, s)]["best_val_accuracy"] for s in seeds])
        out.append(row)
    return out


def _ci(test: dict) -> str:
    if test["n"] < 2 or math.isnan(test["low"]):
        return f"{test['mean']:+.2f}"
    return f"{test['mean']:+.2f} [{test['low']:+.2f}, {test['high']:+.2f}]"


def markdown(rows: list[dict], names: tuple[str, str]) -> str:
    a, b = names
    head = (["strategy", "partition", "seeds"] + [f"{label}: {a} − {b}" for _, label, _ in METRICS]
            + [f"BVA {a} / {b}: mean", "worst", f"seeds > 5 pp below own median", "identical BVA"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ta, tb = r["tail_a"], r["tail_b"]
        cells = ([r["strategy"], r["partition"], str(r["seeds"])] + [_ci(r[m]) for m, _, _ in METRICS]
                 + [f"{ta['mean']:.2f} / {tb['mean']:.2f}", f"{ta['worst']:.1f} / {tb['worst']:.1f}",
                    f"{ta['below']} / {tb['below']}", str(r["identical"])])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="arm A's cells.csv")
    parser.add_argument("--b", required=True, help="arm B's cells.csv")
    parser.add_argument("--names", nargs=2, default=("A", "B"), metavar=("A", "B"))
    args = parser.parse_args(argv)
    rows = compare_arms(read_cells(args.a), read_cells(args.b))
    if not rows:
        raise SystemExit("the two grids share no (strategy, partition, seed) cell")
    print(markdown(rows, tuple(args.names)))


if __name__ == "__main__":
    main()
