"""``fedsq-defenses``: what the default server defenses cost, and what they and the robust aggregators stop.

Two experiments on the real ServerApp and ClientApp, run in this process (``fedsq_app.harness.inprocess``: no Ray,
so many short runs fit on a small CPU machine):

1. **Cost.** Honest federations with the defaults (distance guard, num-examples clip) and with them off,
   on the same seeds: the paired per-seed difference in best validation accuracy (BVA), which should be ≈ 0,
   and how many honest replies the defaults rejected.
2. **Benefit.** One of ``--clients`` clients (partition 0) is hostile every round: it trains honestly, then
   sends global + factor × (its update) on the trainable parameters (BN statistics left honest, so that
   plain validation does not catch it), e.g. ×10 (boosted) or ×−1 (sign-flipped). BVA with no defense,
   the defaults, coordinate-wise median and trimmed mean (those two with the defaults off, to see each
   mechanism alone).

    fedsq-defenses --out outputs/defenses                    # the sizes in docs/RELIABILITY.md
    fedsq-defenses --seeds 0,1,2,3,4 --rounds 10 --max-train-samples 3000 --test-split test --out outputs/defenses-big

BVA counts round 0 (the pretrained start with its new head): a run that training only hurt has BVA =
round 0's accuracy. Everything else is the default run config (FedSQ, small CNN, embedded Fashion-MNIST,
Dirichlet α = 0.3). Prints the tables, writes ``summary.md``, ``summary.json`` and ``defenses.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message, RecordDict
from tqdm import tqdm

from fedsq_app import server_app
from fedsq_app.config import RunConfig
from fedsq_app.core import wire
from fedsq_app.core.strategy import parameter_keys
from fedsq_app.harness.inprocess import FIRST_NODE_ID, InProcessGrid
from fedsq_app.runtime.metrics import mean_std
from fedsq_app.tools.bench.stats import paired_test

OFF = {"max-update-norm-ratio": 0.0, "max-num-examples-ratio": 0.0}
DEFENSES = {  # name -> run-config keys on top of the run's
    "none": OFF,
    "defaults": {},
    "median": {**OFF, "aggregation": "median"},
    "trimmed-mean": {**OFF, "aggregation": "trimmed-mean"},
}
ATTACKER = FIRST_NODE_ID  # partition 0


class HostileGrid(InProcessGrid):
    """In-process grid whose node ``ATTACKER`` replaces its trained parameters w by g + factor × (w − g)."""

    def __init__(self, run_config: dict, num_nodes: int, factor: float | None) -> None:
        super().__init__(run_config, num_nodes)
        self.factor = factor

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if self.factor is None:
            return replies
        sent = {m.metadata.dst_node_id: m.content[wire.ARRAYS] for m in messages}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if node_id == ATTACKER and node_id in sent and not reply.has_error():
                arrays = reply.content[wire.ARRAYS]
                start = {k: a.numpy() for k, a in sent[node_id].items()}
                for key in parameter_keys(start):
                    trained = arrays[key].numpy()
                    arrays[key] = Array(np.ascontiguousarray(
                        (start[key] + self.factor * (trained - start[key])).astype(trained.dtype)))
        return replies


def run_one(run_config: dict, num_clients: int, factor: float | None) -> dict:
    """One federation; returns the figures this benchmark compares."""
    config = RunConfig.from_mapping(run_config)
    results_file = Path(config.out_dir).expanduser().resolve() / config.resolved_run_name() / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    reused = "test_accuracy" in results
    if not reused:  # not finished before (an interrupted benchmark continues here)
        grid = HostileGrid(run_config, num_clients, factor)
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                      run_config=dict(run_config)))
        results = json.loads(results_file.read_text())
    replies = [r for rnd in results["rounds"] for r in rnd.get("replies", [])]
    honest = [r for r in replies if factor is None or r["node_id"] != ATTACKER]
    hostile = [r for r in replies if factor is not None and r["node_id"] == ATTACKER]
    return {"bva": results["best_val_accuracy"], "best_round": results["best_round"],
            "final_val": results["rounds"][-1]["val_accuracy"], "test": results["test_accuracy"],
            "initial_val": results["initial"]["val_accuracy"],
            "honest_rejected": sum(not r["accepted"] for r in honest), "honest_replies": len(honest),
            "hostile_rejected": sum(not r["accepted"] for r in hostile), "hostile_replies": len(hostile),
            "reused": reused}


def plan(attacks: dict[str, float], seeds: list[int]) -> list[tuple[str, str, float | None, int]]:
    """(scenario, defense, factor, seed) for every run: honest with and without the defaults, each attack,
    then honest with the robust aggregators (what they cost without any attacker)."""
    cells = [("honest", defense, None, seed) for defense in ("defaults", "none") for seed in seeds]
    cells += [(attack, defense, factor, seed) for attack, factor in attacks.items() for defense in DEFENSES
              for seed in seeds]
    cells += [("honest", defense, None, seed) for defense in ("median", "trimmed-mean") for seed in seeds]
    return cells


def run_all(args: argparse.Namespace) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    attacks = {name: float(factor) for name, factor in (item.split("=") for item in args.attacks.split(","))}
    out = Path(args.out).resolve()
    base = {"num-server-rounds": args.rounds, "max-train-samples": args.max_train_samples,
            "val-fraction": args.val_fraction, "test-split": args.test_split, "device": "cpu", "probe-size": 0,
            "out-dir": str(out / "runs")}
    runs = []
    started = time.time()
    for scenario, defense, factor, seed in tqdm(plan(attacks, seeds), desc="fedsq-defenses", unit="run"):
        run_config = {**base, **DEFENSES[defense], "seed": seed, "run-name": f"{scenario}-{defense}-s{seed}"}
        runs.append({"scenario": scenario, "defense": defense, "factor": factor, "seed": seed,
                     **run_one(run_config, args.clients, factor)})
    sizes = {"clients": args.clients, "hostile": 1, "rounds": args.rounds, "max_train_samples": args.max_train_samples,
             "val_fraction": args.val_fraction, "test_split": args.test_split, "seeds": seeds, "attacks": attacks,
             "wall_time_s": time.time() - started}
    return {"sizes": sizes, "runs": runs}


def summarise(report: dict) -> dict:
    runs, seeds = report["runs"], report["sizes"]["seeds"]

    def bva(scenario: str, defense: str) -> dict[int, float]:
        return {r["seed"]: r["bva"] for r in runs if (r["scenario"], r["defense"]) == (scenario, defense)}

    on, off = bva("honest", "defaults"), bva("honest", "none")
    honest = [r for r in runs if r["scenario"] == "honest" and r["defense"] == "defaults"]
    cost = {"paired": paired_test([on[s] - off[s] for s in seeds if s in on and s in off]),
            "defaults": mean_std(list(on.values())), "none": mean_std(list(off.values())),
            "honest_rejected": sum(r["honest_rejected"] for r in honest),
            "honest_replies": sum(r["honest_replies"] for r in honest)}
    rows = []
    for attack, factor in report["sizes"]["attacks"].items():
        for defense in DEFENSES:
            cell = [r for r in runs if (r["scenario"], r["defense"]) == (attack, defense)]
            if not cell:
                continue
            same = bva("honest", defense)  # the same aggregation without an attacker
            rows.append({"attack": attack, "factor": factor, "defense": defense,
                         "bva": mean_std([r["bva"] for r in cell]),
                         "vs_honest": paired_test([r["bva"] - off[r["seed"]] for r in cell if r["seed"] in off]),
                         "vs_same_honest": paired_test([r["bva"] - same[r["seed"]] for r in cell if r["seed"] in same]),
                         "hostile_rejected": sum(r["hostile_rejected"] for r in cell),
                         "hostile_replies": sum(r["hostile_replies"] for r in cell),
                         "honest_rejected": sum(r["honest_rejected"] for r in cell),
                         "honest_replies": sum(r["honest_replies"] for r in cell)})
    robust = {defense: {"bva": mean_std(list(bva("honest", defense).values())),
                        "vs_none": paired_test([v - off[s] for s, v in bva("honest", defense).items() if s in off])}
              for defense in ("median", "trimmed-mean") if bva("honest", defense)}
    return {"cost": cost, "robust_cost": robust, "attacks": rows}


def _pct(pair: tuple[float, float]) -> str:
    mean, std = pair
    return "–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _ci(test: dict) -> str:
    if not test["n"] or math.isnan(test["mean"]):
        return "–"
    if math.isnan(test["low"]):
        return f"{100 * test['mean']:+.1f} (n={test['n']})"
    return f"{100 * test['mean']:+.1f} [{100 * test['low']:+.1f}, {100 * test['high']:+.1f}]"


def markdown(report: dict, summary: dict) -> str:
    sizes, cost = report["sizes"], summary["cost"]
    lines = [f"Sizes: {sizes['clients']} clients (1 hostile in the attack runs), {sizes['rounds']} rounds, "
             f"max-train-samples={sizes['max_train_samples']} (val-fraction {sizes['val_fraction']}), "
             f"test-split {sizes['test_split']}, seeds "
             f"{sizes['seeds']}; FedSQ, small CNN, embedded Fashion-MNIST, Dirichlet α=0.3, everything else the "
             f"default run config. {len(report['runs'])} runs ({sum(not r['reused'] for r in report['runs'])} new ones "
             f"in {sizes['wall_time_s'] / 60:.1f} min). BVA in %, "
             "mean ± std over seeds; differences in percentage points with the paired 95% CI over seeds.", "",
             "**Cost (honest federation)**", "",
             "| defaults | BVA | honest replies rejected |", "|---|---|---|",
             f"| on | {_pct(cost['defaults'])} | {cost['honest_rejected']} of {cost['honest_replies']} |",
             f"| off | {_pct(cost['none'])} | – |",
             f"| on − off (paired) | {_ci(cost['paired'])} pp | |", ""]
    if summary.get("robust_cost"):
        lines += ["| honest, aggregation | BVA | − mean without defenses (paired, pp) |", "|---|---|---|"]
        lines += [f"| {name} | {_pct(row['bva'])} | {_ci(row['vs_none'])} |"
                  for name, row in summary["robust_cost"].items()]
        lines.append("")
    lines += ["**Benefit (1 of the clients hostile every round)**", "",
              "| attack | defense | BVA | vs honest, no defenses (pp) | vs honest, same defense (pp) | "
              "hostile replies rejected | honest replies rejected |", "|---|---|---|---|---|---|---|"]
    for row in summary["attacks"]:
        lines.append(f"| {row['attack']} (×{row['factor']:g}) | {row['defense']} | {_pct(row['bva'])} | "
                     f"{_ci(row['vs_honest'])} | {_ci(row['vs_same_honest'])} | "
                     f"{row['hostile_rejected']} of {row['hostile_replies']} | "
                     f"{row['honest_rejected']} of {row['honest_replies']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(report["sizes"]["attacks"])
    groups = ["honest"] + attacks
    figure, axis = plt.subplots(figsize=(1.6 + 2.2 * len(groups), 3.6))
    width = 0.8 / len(DEFENSES)
    for j, defense in enumerate(DEFENSES):
        means, stds = [], []
        for group in groups:
            values = [r["bva"] for r in report["runs"] if (r["scenario"], r["defense"]) == (group, defense)]
            mean, std = mean_std(values)
            means.append(100 * mean if values else math.nan)
            stds.append(100 * std if values else 0.0)
        axis.bar(np.arange(len(groups)) + (j - (len(DEFENSES) - 1) / 2) * width, means, width, yerr=stds,
                 capsize=2, label=defense, color=f"C{j}")
    axis.set_xticks(np.arange(len(groups)),
                    ["honest"] + [f"{a} (×{report['sizes']['attacks'][a]:g})" for a in attacks])
    axis.set_ylabel("best validation accuracy (%)")
    sizes = report["sizes"]
    axis.set_title(f"{sizes['clients']} clients (1 hostile in the attacks), {sizes['rounds']} rounds, "
                   f"{len(sizes['seeds'])} seeds (mean ± std)", fontsize=9)
    axis.legend(title="defense", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsq-defenses", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/defenses")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--max-train-samples", type=int, default=600)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--test-split", default="test[:500]", help="test rows (touched once per run)")
    parser.add_argument("--attacks", default="sign-flip=-10,scaled=10",
                        help="name=factor,...: the hostile client sends global + factor x its update")
    args = parser.parse_args(argv)
    report = run_all(args)
    summary = summarise(report)
    out = Path(args.out).resolve()
    table = markdown(report, summary)
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps({**report, "summary": summary}, indent=2))
    plot(report, summary, out / "defenses.png")
    print(table)
    print(f"wrote {out / 'summary.md'}, {out / 'summary.json'} and {out / 'defenses.png'}")


if __name__ == "__main__":
    main()
