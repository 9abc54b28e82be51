"""``fedsq-defenses``: what the trust model's defenses stop, and what they cost an honest federation.

Runs the real ServerApp and ClientApp in this process (``fedsq_app.harness.inprocess``: no Ray, so many
short runs fit on a small CPU machine). Three experiments:

1. **attacks**: ``--clients`` nodes, one or two of them hostile every round. For every round the grid
   also computes the damage D = ‖aggregate − honest-only aggregate‖ / median honest update norm (all
   floating arrays; the same screening and averaging the server uses, once with and once without the
   hostile replies), and the run records BVA. Under: no defenses, the defaults, and the defaults with
   the median or the trimmed mean.
2. **cost**: an honest federation (by default 20 silos, Dirichlet α = 0.05, 6,000 Fashion-MNIST images of
   the Debian package's ``train[9000:]``, S pretrained on its ``train[:6000]``), defaults vs no defenses on
   the same seeds: the paired BVA difference with its
   95 % CI, honest replies rejected, honest weights changed, and how often honest updates were clipped.

3. **liveness**: one node that fails every round (NaN replies; a wrong ``num-partitions``; another node's
   partition id) under the defaults, against the same federation without that node's replies: the
   others' accuracy, and how many of their replies were rejected.

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
from fedsq_app.config import DEFENCES_OFF, RunConfig
from fedsq_app.core.defenses import distance
from fedsq_app.data.partitions import DataKey, dataset_info
from fedsq_app.data.sources import DataError
from fedsq_app.harness.inprocess import FIRST_NODE_ID, InProcessGrid
from fedsq_app.runtime.strategies import make_strategy
from fedsq_app.runtime.weighting import weight_policy
from fedsq_app.task import build_start_model, global_arrays, trainable_model
from fedsq_app.tools.attacks import ABSENT, ATTACKS, LIVENESS, Attack, message_arrays, without
from fedsq_app.tools.defense_report import write
from fedsq_app.tools.bench.cli import parse_set

UNCHECKED = {"direction-check": 0.0}  # per-round rules alone, without the check across rounds
DEFENSES = {  # name -> run-config keys on top of the run's
    "none": DEFENCES_OFF,
    "defaults": {},
    "no direction check": UNCHECKED,
    "repeat rule": {"reply-judge": "repeat"},  # the check without the server's validation loss
    # Flower's rules after the same validation and per-round bounds, in place of the check across rounds.
    **{rule: {"aggregation": rule, **UNCHECKED} for rule in ("median", "trimmed-mean", "krum", "multi-krum",
                                                             "bulyan")},
    # The defaults split into their parts, and the influence bound in place of the deviation bound.
    "bound only": {"bn-clamp": False, **UNCHECKED},
    "BN clamp only": {"clip-multiplier": 0.0, "influence-bound": 0.0, "deviation-bound": 0.0, **UNCHECKED},
    "influence bound 0.3": {"influence-bound": 0.3, "deviation-bound": 0.0, **UNCHECKED},
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


def finished_before(results_file: Path, config: RunConfig) -> bool:
    """Whether ``results_file`` holds a finished run of ``config`` (its name and place aside): a run of other
    settings, such as the defaults of an older version, is never read back under today's name."""
    finished = json.loads(results_file.read_text()) if results_file.is_file() else {}
    # A run written before the direction check had a judge ran the repeat rule; with the check off it has none.
    ran = {"reply-judge": "repeat", **finished.get("config", {})}
    wanted = json.loads(json.dumps(server_app.config_json(config)))
    aside = {"run-name", "out-dir"} | ({"reply-judge"} if wanted.get("direction-check") == 0 else set())
    return "test_accuracy" in finished and all(ran.get(k) == v for k, v in wanted.items() if k not in aside)


def run_one(run_config: dict, num_clients: int, attack: Attack | None = None, hostile: int = 0,
            dropped: int = 0, absent: int = 0) -> dict:
    """One federation; returns the figures this benchmark compares."""
    config = RunConfig.from_mapping(run_config)
    grid = HostileGrid(run_config, num_clients, attack, hostile, dropped, absent)
    results_file = Path(config.out_dir).expanduser().resolve() / config.resolved_run_name() / "results.json"
    # An honest run that finished before with this very config (an interrupted benchmark) is read back; attack
    # runs always rerun, since D is measured while they run.
    if attack is not None or not finished_before(results_file, config):
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
            "quarantines": len(results.get("quarantined_nodes", [])),
            "honest_rejected": sum(not r["accepted"] for r in honest), "honest_replies": len(honest),
            "honest_clipped": sum(1 for r in honest if r["accepted"] and (r["clip_scale"] or 1) < 1),
            "honest_below_half": sum(1 for r in honest if r["accepted"] and (r["clip_scale"] or 1) < 0.5),
            # (server weight, scale, ‖Δ‖, distance from the median update) of each accepted honest reply
            "honest_scales": [(r["weight"], r["clip_scale"], r.get("update_norm"), r.get("deviation"))
                              for r in honest if r["accepted"]],
            # a reply rejected before it was weighed (malformed) has no silo size to be counted by
            "honest_rejected_weights": [r["weight"] for r in honest if not r["accepted"] and r["weight"] is not None],
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


def run_liveness(args: argparse.Namespace, out: Path) -> dict:
    """Each liveness case (``attacks.LIVENESS``) under the defaults, and the same federation without the
    culprit's replies, on the same seeds."""
    seeds = [int(s) for s in args.seeds.split(",")]
    base = base_config(args, out)
    cells = [(case, alone, seed) for case in LIVENESS for seed in seeds for alone in (False, True)]
    runs, started = [], time.time()
    for case, alone, seed in tqdm(cells, desc="fedsq-defenses liveness", unit="run"):
        rewrite, nodes, keys = LIVENESS[case]
        slug = "".join(c if c.isalnum() else "-" for c in case)[:40]
        run_config = {**base, **(keys if alone else {}), "seed": seed,
                      "run-name": f"{slug}-{'without' if alone else 'with'}-s{seed}"}
        figures = run_one(run_config, nodes, None if alone else rewrite, 0 if alone else 1, absent=int(alone))
        runs.append({"scenario": case, "defense": "without the culprit" if alone else "defaults", "seed": seed,
                     **figures})
    return {"experiment": "liveness", "sizes": {**base, "clients": args.clients, "seeds": seeds,
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsq-defenses", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["attacks", "cost", "liveness"])
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
                "liveness": dict(out="outputs/defenses-liveness", seeds="0,1,2", rounds=8, clients=6,
                                 dataset="embedded", alpha=0.3, max_train_samples=1200),
                "cost": dict(out="outputs/defenses-cost", seeds="0,1,2,3,4", rounds=8, clients=20,
                             dataset="idx:/usr/share/datasets/fashion-mnist", alpha=0.05, max_train_samples=6000,
                             train_split="train[9000:]", pretrained=COST_BACKBONE)}
    for key, value in defaults[args.experiment].items():
        if not getattr(args, key):
            setattr(args, key, value)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"attacks": run_attacks, "cost": run_cost, "liveness": run_liveness}[args.experiment](args, out)
    print(write(report, out))
    print(f"wrote {out / 'summary.md'} and {out / 'summary.json'}")


if __name__ == "__main__":
    main()
