"""``fedsq-defenses``: what the trust model's defenses stop, and what they cost an honest federation.

Runs the real ServerApp and ClientApp in this process (``fedsq_app.harness.inprocess``: no Ray, so many
short runs fit on a small CPU machine). Two experiments:

1. **attacks**: ``--clients`` nodes, one or two of them hostile every round. For every round the grid
   also computes the damage D = ‖aggregate − honest-only aggregate‖ / median honest update norm (all
   floating arrays; the same screening and averaging the server uses, once with and once without the
   hostile replies), and the run records BVA. Under: no defenses, the defaults, and the defaults with
   the median or the trimmed mean.
2. **cost**: an honest federation (by default 20 silos, Dirichlet α = 0.05, 6,000 Fashion-MNIST images of
   the Debian package's ``train[9000:]``, S pretrained on its ``train[:6000]``), defaults vs no defenses on
   the same seeds: the paired BVA difference with its
   95 % CI, honest replies rejected, honest weights changed, and how often honest updates were clipped.

    fedsq-defenses attacks --out outputs/defenses
    fedsq-pretrain --dataset idx:/usr/share/datasets/fashion-mnist --split "train[:6000]" --epochs 8 \
        --out outputs/bench/smallcnn-fmnist-idx-train0-6000.safetensors
    fedsq-defenses cost

Prints the tables and writes ``summary.md``, ``summary.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import cached_property
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from tqdm import tqdm

from fedsq_app import server_app
from fedsq_app.config import RunConfig
from fedsq_app.core.defenses import distance
from fedsq_app.data.partitions import DataKey, dataset_info
from fedsq_app.data.sources import DataError
from fedsq_app.harness.inprocess import FIRST_NODE_ID, InProcessGrid
from fedsq_app.runtime.metrics import mean_std
from fedsq_app.runtime.strategies import make_strategy
from fedsq_app.runtime.weighting import weight_policy
from fedsq_app.task import build_start_model, global_arrays, trainable_model
from fedsq_app.tools.attacks import ATTACKS, Attack, message_arrays
from fedsq_app.tools.bench.cli import parse_set
from fedsq_app.tools.bench.stats import paired_test

NONE = {"clip-multiplier": 0.0, "influence-bound": 0.0, "bn-clamp": False, "min-valid-replies": 1}
DEFENSES = {  # name -> run-config keys on top of the run's
    "none": NONE,
    "defaults": {},
    "median": {"aggregation": "median"},
    "trimmed-mean": {"aggregation": "trimmed-mean"},
    "krum": {"aggregation": "krum"},  # Flower's selection rules, after the same validation and bounds
    "multi-krum": {"aggregation": "multi-krum"},
    "bulyan": {"aggregation": "bulyan"},
    # The cost experiment's split of the defaults into their parts, and the two bounds side by side.
    "influence bound only": {"bn-clamp": False},
    "BN clamp only": {"clip-multiplier": 0.0, "influence-bound": 0.0, "deviation-bound": 0.0},
    "influence bound 0.3": {"influence-bound": 0.3, "deviation-bound": 0.0},
    "deviation bound 3": {"influence-bound": 0.0, "deviation-bound": 3.0},
}
TWO_SILO = {"min-valid-replies": 2}
# S for the cost experiment, pretrained on train[:6000]; the federation reads train[9000:] (docs/RELIABILITY.md).
COST_BACKBONE = "outputs/bench/smallcnn-fmnist-idx-train0-6000.safetensors"


def _floating(arrays: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items() if v.dtype.kind == "f"]


class HostileGrid(InProcessGrid):
    """In-process grid whose first ``hostile`` nodes run ``attack`` on their replies; ``dropped`` honest
    replies are lost every round, and the first ``absent`` nodes' replies too (the federation without its
    attackers, which every attack is read against). Measures D each round with the run's own screening and
    averaging."""

    def __init__(self, run_config: dict, num_nodes: int, attack: Attack | None, hostile: int, dropped: int,
                 absent: int = 0) -> None:
        super().__init__(run_config, num_nodes)
        self.attack, self.hostile_ids = attack, set(range(FIRST_NODE_ID, FIRST_NODE_ID + hostile))
        self.dropped = set(range(FIRST_NODE_ID + num_nodes - dropped, FIRST_NODE_ID + num_nodes))
        self.dropped |= set(range(FIRST_NODE_ID, FIRST_NODE_ID + absent))
        self.config = RunConfig.from_mapping(run_config)
        self.damages: list[float] = []

    @cached_property
    def template(self) -> dict[str, np.ndarray]:
        """The travelling arrays' keys, shapes and dtypes, to read the packed messages by."""
        model = trainable_model(self.config, build_start_model(self.config, dataset_info(DataKey.of(self.config))))
        return {k: a.numpy() for k, a in global_arrays(model).items()}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = [r for r in super().send_and_receive(messages, timeout=timeout)
                   if r.metadata.src_node_id not in self.dropped]
        if self.attack is None or not messages:
            return replies
        start = message_arrays(messages[0], self.template)
        hostile = [r for r in replies if r.metadata.src_node_id in self.hostile_ids and not r.has_error()]
        honest = [r for r in replies if r.metadata.src_node_id not in self.hostile_ids]
        self.attack(start, hostile, [message_arrays(r, start) for r in honest if not r.has_error()])
        self.damages.append(self.damage(start, replies, honest))
        return replies

    def aggregate(self, start: dict, replies: list[Message]) -> dict:
        """What the server makes of ``replies``: the run's own strategy and weight policy, fed the same
        replies (the start model where it keeps it)."""
        strategy = make_strategy(self.config, "", weigh=weight_policy(self.config, DataKey.of(self.config), self))
        strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
        arrays, _ = strategy.aggregate_train(0, replies)
        return start if arrays is None else {k: a.numpy() for k, a in arrays.items()}

    def damage(self, start: dict, replies: list[Message], honest: list[Message]) -> float:
        keys = _floating(start)
        mixed, alone = self.aggregate(start, replies), self.aggregate(start, honest)
        norms = [distance(message_arrays(r, start), start, keys) for r in honest if not r.has_error()]
        return distance(mixed, alone, keys) / max(float(np.median(norms)), 1e-12) if norms else math.nan


def run_one(run_config: dict, num_clients: int, attack: Attack | None = None, hostile: int = 0,
            dropped: int = 0, absent: int = 0) -> dict:
    """One federation; returns the figures this benchmark compares."""
    config = RunConfig.from_mapping(run_config)
    grid = HostileGrid(run_config, num_clients, attack, hostile, dropped, absent)
    results_file = Path(config.out_dir).expanduser().resolve() / config.resolved_run_name() / "results.json"
    finished = json.loads(results_file.read_text()) if results_file.is_file() else {}
    # An honest run that finished before (an interrupted benchmark) is read back; attack runs always rerun,
    # since D is measured while they run.
    if attack is not None or "test_accuracy" not in finished:
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                      run_config=dict(run_config)))
    results = json.loads(results_file.read_text())
    replies = [r for rnd in results["rounds"] for r in rnd.get("replies", [])]
    honest = [r for r in replies if r["node_id"] not in grid.hostile_ids]
    hostile = [r for r in replies if r["node_id"] in grid.hostile_ids]
    return {"bva": results["best_val_accuracy"], "best_round": results["best_round"],
            "final_val": results["rounds"][-1]["val_accuracy"] if results["rounds"] else None,
            "test": results["test_accuracy"], "initial_val": results["initial"]["val_accuracy"],
            "damage_max": float(np.nanmax(grid.damages)) if grid.damages else None,
            "damage_mean": float(np.nanmean(grid.damages)) if grid.damages else None,
            "rounds_kept": sum(not r["aggregated"] for r in results["rounds"]),
            "honest_rejected": sum(not r["accepted"] for r in honest), "honest_replies": len(honest),
            "honest_clipped": sum(1 for r in honest if r["accepted"] and (r["clip_scale"] or 1) < 1),
            "honest_below_half": sum(1 for r in honest if r["accepted"] and (r["clip_scale"] or 1) < 0.5),
            # (server weight, scale, ‖Δ‖, distance from the median update) of each accepted honest reply
            "honest_scales": [(r["weight"], r["clip_scale"], r.get("update_norm"), r.get("deviation"))
                              for r in honest if r["accepted"]],
            "honest_bn_clamped": sum(1 for r in honest if r["accepted"] and r["bn_clamped"]),
            "honest_weight_changed": sum(1 for r in honest if r["accepted"] and r["weight"] != r["num_examples"]),
            "hostile_rejected": sum(not r["accepted"] for r in hostile), "hostile_replies": len(hostile),
            "hostile_clipped": sum(1 for r in hostile if r["accepted"] and (r["clip_scale"] or 1) < 1)}


def base_config(args: argparse.Namespace, out: Path) -> dict:
    config = {"num-server-rounds": args.rounds, "max-train-samples": args.max_train_samples,
              "val-fraction": args.val_fraction, "test-split": args.test_split, "device": "cpu", "probe-size": 0,
              "out-dir": str(out / "runs"), "dataset": args.dataset, "alpha": args.alpha,
              "min-partition-size": args.min_partition_size}
    if args.pretrained:
        config["pretrained"] = args.pretrained
    if args.train_split:
        config["train-split"] = args.train_split
    return {**config, **parse_set(args.set)}


ABSENT: dict[str, int] = {}  # scenario name -> how many of the first nodes' replies are dropped


def without(hostile: int) -> str:
    """The scenario of the federation without its ``hostile`` attackers (their replies dropped)."""
    name = f"without the {hostile} attacker(s) (their replies dropped)"
    ABSENT[name] = hostile
    return name


def run_attacks(args: argparse.Namespace, out: Path) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    base = base_config(args, out)
    arms = args.arms.split(",") if args.arms else ["none", "defaults", "median", "trimmed-mean"]
    cells = [("honest", "none", seed) for seed in seeds] + [("honest", "defaults", seed) for seed in seeds]
    for name, (_, hostile, nodes, _) in ATTACKS.items():
        if args.only and not any(part.strip() in name for part in args.only.split(",")):
            continue
        defenses = ["none", "defaults", "two-silo mode"] if nodes == 3 else arms
        cells += [(name, defense, seed) for defense in defenses for seed in seeds]
        if nodes is None:  # the same federation without its attackers, under each defence
            cells += [(without(hostile), defense, seed) for defense in defenses for seed in seeds]
    runs, started = [], time.time()
    for scenario, defense, seed in tqdm(list(dict.fromkeys(cells)), desc="fedsq-defenses attacks", unit="run"):
        attack, hostile, nodes, dropped = ATTACKS.get(scenario, (None, 0, None, 0))
        absent = ABSENT.get(scenario, 0)
        keys = TWO_SILO if defense == "two-silo mode" else DEFENSES[defense]
        slug = "".join(c if c.isalnum() else "-" for c in scenario)[:40]
        run_config = {**base, **keys, "seed": seed, "run-name": f"{slug}-{defense.replace(' ', '-')}-s{seed}"}
        runs.append({"scenario": scenario, "defense": defense, "seed": seed,
                     **run_one(run_config, nodes or args.clients, attack, hostile, dropped, absent)})
    return {"experiment": "attacks", "sizes": {**base, "clients": args.clients, "seeds": seeds,
                                               "wall_time_s": time.time() - started}, "runs": runs}


def run_cost(args: argparse.Namespace, out: Path) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    base = base_config(args, out)
    runs, unsplittable, started = [], {}, time.time()
    cells = [(defense, seed) for seed in seeds for defense in (args.arms or "defaults,none").split(",")]
    for defense, seed in tqdm(cells, desc="fedsq-defenses cost", unit="run"):
        if seed in unsplittable:
            continue
        run_config = {**base, **DEFENSES[defense], "seed": seed, "run-name": f"cost-{defense}-s{seed}"}
        try:
            runs.append({"scenario": "honest", "defense": defense, "seed": seed, **run_one(run_config, args.clients)})
        except DataError as error:  # e.g. no Dirichlet split with min-partition-size for this seed: next seed
            unsplittable[seed] = str(error)
            tqdm.write(f"seed {seed} skipped: {error}")
    sizes = {**base, "clients": args.clients, "seeds": seeds, "wall_time_s": time.time() - started,
             "set": parse_set(args.set)}
    return {"experiment": "cost", "sizes": sizes, "unsplittable": unsplittable, "runs": runs}


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


def scales_by_size(runs: list[dict]) -> dict[str, tuple[int, int, int]]:
    """Honest accepted replies by their silo's weight (thirds of each run's silos by server weight): (replies,
    scaled below 1, scaled below 0.5) per third."""
    counts = {group: [0, 0, 0] for group in SIZE_GROUPS}
    for run in runs:
        weights = sorted({w for w, *_ in run.get("honest_scales", [])})
        for weight, scale, *_ in run.get("honest_scales", []):
            group = SIZE_GROUPS[min(2, 3 * weights.index(weight) // max(len(weights), 1))]
            scale = 1.0 if scale is None else scale
            counts[group][0] += 1
            counts[group][1] += scale < 1
            counts[group][2] += scale < 0.5
    return {group: tuple(c) for group, c in counts.items()}


def markdown(report: dict) -> str:
    sizes, runs = report["sizes"], report["runs"]
    head = (f"Sizes: {sizes['clients']} clients, {sizes['num-server-rounds']} rounds, dataset {sizes['dataset']}, "
            f"max-train-samples {sizes['max-train-samples']}, Dirichlet α = {sizes['alpha']}, seeds {sizes['seeds']}; "
            f"strategy {sizes.get('strategy', 'fedsq')}, model {sizes.get('model', 'smallcnn')}, everything else "
            f"the default run config{' but ' + str(sizes['set']) if sizes.get('set') else ''}. {len(runs)} runs in "
            f"{sizes['wall_time_s'] / 60:.1f} min.")
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
                f"{below} / {half} of {total}" for total, below, half in scales_by_size(cells).values()) + " |")
        return "\n".join([head, "", "| defenses | BVA (%) | honest replies rejected | honest weights changed | "
                          "honest updates bounded | of them scaled below 0.5 | honest replies with BN coordinates "
                          "clamped |", "|---|---|---|---|---|---|---|", *rows,
                          f"| none | {_pct([r['bva'] for r in off.values()])} | – | – | – | – | – |", "", *costs, "",
                          "Honest updates bounded / scaled below 0.5, by silo size (thirds of each run's silos by "
                          "server weight):", "", "| defenses | " + " | ".join(SIZE_GROUPS) + " |",
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
            hostile = ATTACKS.get(scenario, (None, 0))[1]
            alone = {r["seed"]: r for r in runs if (r["scenario"], r["defense"]) == (without(hostile), defense)}
            paired = paired_test([r["final_val"] - alone[r["seed"]]["final_val"] for r in cell
                                  if r["seed"] in alone and r.get("final_val") is not None
                                  and alone[r["seed"]].get("final_val") is not None]) if hostile else None
            lines[-1] += f"{_ci(paired)} |" if paired else "– |"
    return "\n".join(lines) + "\n"


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
        shares = [100 * half / total if total else 0 for total, _, half in groups.values()]
        right.bar(np.arange(3) + (i - (len(arms) - 1) / 2) * 0.8 / len(arms), shares, 0.8 / len(arms), label=arm)
    left.axhline(0, color="grey", lw=0.8)
    for limit in (-0.5, 0.5):
        left.axhline(limit, color="grey", lw=0.6, ls=":")
    left.set_xticks(range(len(arms)), arms, fontsize=7, rotation=15)
    left.set_ylabel("BVA − BVA without defences (pp), 95 % CI")
    right.set_xticks(range(3), SIZE_GROUPS, fontsize=8)
    right.axhline(5, color="grey", lw=0.6, ls=":")
    right.set_ylabel("honest updates scaled below 0.5 (%)")
    right.legend(fontsize=7)
    sizes = report["sizes"]
    figure.suptitle(f"Honest cost: {sizes['clients']} silos, Dirichlet α = {sizes['alpha']}, "
                    f"{sizes['num-server-rounds']} rounds, {len(off)} paired seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsq-defenses", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["attacks", "cost"])
    for flag, kind in (("--out", str), ("--seeds", str), ("--rounds", int), ("--clients", int), ("--dataset", str),
                       ("--alpha", float), ("--max-train-samples", int)):
        parser.add_argument(flag, type=kind, default=kind())  # "" or 0: the experiment's default (below)
    parser.add_argument("--min-partition-size", type=int, default=5)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--pretrained", default="", help="run-config pretrained (attacks: 'auto'; cost: COST_BACKBONE)")
    parser.add_argument("--test-split", default="test[:1000]", help="test rows (touched once per run)")
    parser.add_argument("--only", default="", help="attacks: only those whose name contains one of these (a,b)")
    parser.add_argument("--arms", default="", help=f"cost: paired with 'none' (default: defaults,none); attacks: "
                        f"the defences (default: none,defaults,median,trimmed-mean); of {', '.join(DEFENSES)}")
    parser.add_argument("--train-split", default="", help="run-config train-split: rows the backbone never saw")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config key for every arm, under the arm's own keys (influence-bound=0.35 "
                             "changes the defaults, not 'none')")
    args = parser.parse_args(argv)
    defaults = {"attacks": dict(out="outputs/defenses", seeds="0,1,2", rounds=4, clients=6, dataset="embedded",
                                alpha=0.3, max_train_samples=1200),
                "cost": dict(out="outputs/defenses-cost", seeds="0,1,2,3,4", rounds=8, clients=20,
                             dataset="idx:/usr/share/datasets/fashion-mnist", alpha=0.05, max_train_samples=6000,
                             train_split="train[9000:]", pretrained=COST_BACKBONE)}
    for key, value in defaults[args.experiment].items():
        if not getattr(args, key):
            setattr(args, key, value)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = run_attacks(args, out) if args.experiment == "attacks" else run_cost(args, out)
    table = markdown(report)
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    if report["experiment"] == "attacks":
        plot(report, out / "damage.png")
    elif any(r["defense"] == "none" for r in report["runs"]):
        plot_cost(report, out / "cost.png")
    print(table)
    print(f"wrote {out / 'summary.md'} and {out / 'summary.json'}")


if __name__ == "__main__":
    main()
