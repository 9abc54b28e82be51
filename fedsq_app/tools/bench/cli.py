"""``fedsq-bench``'s command line: a preset (``conf/*.toml``) with the command line applied, checked once,
then the grid and the report."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

from fedsq_app.config import ConfigError, RunConfig
from fedsq_app.data.partitions import DataKey, dataset_info
from fedsq_app.runtime.strategies import STRATEGIES
from fedsq_app.tools.bench.cluster import run_grid_on_ray
from fedsq_app.tools.bench.grid import Cell, run_grid
from fedsq_app.tools.bench.presets import DEFENCE_MODES, PRESETS, Preset, Setup
from fedsq_app.tools.bench.report import write_report

DESCRIPTION = "fedsq-bench: the grid that tests the paper's claims, with tables and plots (presets: conf/*.toml)."

# Keys every cell sets itself: --set cannot change them (the grid's own flags do).
CELL_KEYS = {"strategy": "--strategies", "local-epochs": "--epochs", "seed": "--seeds", "partitioner": "--partitions",
             "alpha": "--partitions", "proximal-mu": "--mu-grid", "out-dir": "--out", "run-name": "--out"}


def parse_set(items: list[str]) -> dict:
    """``--set KEY=VALUE`` the way ``flwr run --run-config`` reads values (TOML: 0.1, 5, true, 'a string'),
    and bare strings too (``pretrained=/path``). A string-typed key keeps its text as written, unquoted."""
    import tomllib

    types = {f.name.replace("_", "-"): f.type for f in dataclasses.fields(RunConfig)}
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(f"--set '{item}': expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare string: pretrained=/data/backbone.safetensors, classes=5-9
        if types.get(key) == "str" and not isinstance(value, str):
            value = text  # classes=5 is the string "5"
        values[key] = value
    return values


def build_preset(args: argparse.Namespace) -> Preset:
    """The preset with the command line applied; every setup's run config is checked here, once."""
    preset = PRESETS[args.preset]
    changes = {}
    for key in ("strategies", "partitions", "epochs", "seeds", "mu_grid"):
        value = getattr(args, key)
        if value:
            changes[key] = tuple(value)
    if args.seeds and preset.tune_seed is None:  # μ stays tuned on the grid's seed, however its seeds are split
        changes["tune_seed"] = preset.seeds[0]
    if args.clients:
        changes["num_clients"] = args.clients
    if args.tune_on:
        changes["tune_on"] = tuple((p, int(e)) for p, _, e in (item.partition(":") for item in args.tune_on))
    try:
        forced = parse_set(args.set or [])
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    for key, flag in CELL_KEYS.items():
        if key in forced:
            raise SystemExit(f"--set {key}=...: every cell sets {key} itself; use {flag}")
    if args.model:
        forced["model"] = args.model
    if args.dataset:
        forced["dataset"] = args.dataset
    if args.rounds:
        forced["num-server-rounds"] = args.rounds
    if args.max_train_samples is not None:
        forced["max-train-samples"] = args.max_train_samples
    # --set wins over the preset, its setups included: model and dataset replace each setup's own (setups
    # that become equal merge), and a setup's override of a --set key is dropped.
    setups = []
    for setup in preset.setups:
        setup = Setup(forced.get("model", setup.model), forced.get("dataset", setup.dataset),
                      {k: v for k, v in setup.overrides.items() if k not in forced})
        if setup not in setups:
            setups.append(setup)
    changes["setups"] = tuple(setups)
    changes["strategy_overrides"] = {strategy: {k: v for k, v in keys.items() if k not in forced}
                                     for strategy, keys in preset.strategy_overrides.items()}
    changes["base"] = {**preset.base, **{k: v for k, v in forced.items() if k not in ("model", "dataset")}}
    if args.defences:
        changes["defences"] = args.defences
    if args.num_cpus:
        changes["num_cpus"] = args.num_cpus
    if args.gpus_per_client is not None:
        changes["gpus_per_client"] = args.gpus_per_client
    if args.engine:
        changes["engine"] = args.engine
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
    if not args.report_only:
        preflight(preset, Path(args.out) / "cells")
    return preset


def preflight(preset: Preset, cells_dir: Path) -> None:
    """Refuse, once and before any cell runs, what would fail in every cell: an unknown or ill-typed key,
    a missing checkpoint, a dataset that cannot be found or read, a split or class list it cannot give."""
    for setup in preset.setups:
        for strategy in preset.strategies:
            cell = Cell(setup, strategy, preset.partitions[0], preset.epochs[0], preset.seeds[0])
            try:
                config = RunConfig.from_mapping(cell.run_config(preset, cells_dir))
                config.check_server_paths()
            except ConfigError as error:
                raise SystemExit(f"setup {setup.name}: {error}") from None
        try:
            dataset_info(DataKey.of(config))  # loads the train split, its slice and class filter, once
        except (ConfigError, FileNotFoundError, ValueError, IndexError) as error:
            raise SystemExit(f"setup {setup.name}: dataset='{config.dataset}' (train-split='{config.train_split}'"
                             f", classes='{config.classes}'): {type(error).__name__}: {error}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsq-bench", description=DESCRIPTION,
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
    parser.add_argument("--model", help="run every setup on this model (same as --set model=...)")
    parser.add_argument("--dataset", help="run every setup on this dataset (same as --set dataset=...)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="any run-config key for every cell, TOML values as flwr run --run-config takes them "
                             "(lr=0.01, pretrained='/path' or pretrained=/path); wins over the preset")
    parser.add_argument("--defences", choices=DEFENCE_MODES,
                        help="the server's defences (default: the preset's): defaults, what a user gets "
                             "(docs/RELIABILITY.md), or off, a plain weighted mean as the papers aggregate")
    parser.add_argument("--engine", choices=("inprocess", "ray"),
                        help="how a cell simulates its federation (not where cells run: see --ray-address). "
                             "inprocess: the apps called in this process, no Ray (CPU grids; the preset's "
                             "default except 'paper'); ray: Flower's simulation engine (GPUs, num-cpus)")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="run the cells on a Ray cluster, each cell a Ray task of --num-cpus CPUs (and "
                             "--gpus-per-cell GPUs) simulating in-process: 'auto' (the cluster `ray start` "
                             "made on this machine), 'host:port' or 'ray://host:port'. Resumes and gives the "
                             "figures a local run gives (same --threads); without a shared output folder each "
                             "cell's files come back to this driver (docs/RESULTS.md). Default: this process")
    parser.add_argument("--threads", type=int, help="torch threads in this process (1 on a shared CPU); with "
                                                    "--ray-address, in each cell's task too")
    parser.add_argument("--num-cpus", type=int, help="CPUs given to the simulation (with --ray-address: each "
                                                     "cell's Ray task reserves this many)")
    parser.add_argument("--gpus-per-client", type=float)
    parser.add_argument("--gpus-per-cell", type=float, default=0.0,
                        help="with --ray-address: GPUs each cell's Ray task reserves (default 0: CPU only)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's per-round logs")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ray_address and args.engine == "ray":
        raise SystemExit("--ray-address runs each cell as a Ray task with the in-process engine; "
                         "Flower's Ray engine (--engine ray) cannot run nested inside it")
    if args.ray_address and not args.engine and PRESETS[args.preset].engine != "inprocess":
        print(f"--ray-address: the cells simulate in-process (preset '{args.preset}' uses engine "
              f"'{PRESETS[args.preset].engine}' locally)")
        args.engine = "inprocess"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    preset = build_preset(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "fedsq-bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.time()
    if not args.report_only:
        if args.ray_address:
            log = run_grid_on_ray(preset, out, args.ray_address, verbose=args.verbose,
                                  gpus_per_cell=args.gpus_per_cell)
        else:
            log = run_grid(preset, out, verbose=args.verbose)
        print(f"ran {len(log['ran'])} cells, skipped {len(log['skipped'])} finished ones, "
              f"{len(log['failed'])} failed")
        for name, error in log["failed"]:
            print(f"  FAILED {name}: {error}")
    written = write_report(preset, out, command, None if args.report_only else time.time() - start)
    print(f"{written['cells']} cells reported: " + ", ".join(str(out / f) for f in written["files"]))


if __name__ == "__main__":
    main()
