"""``fedsq-perf``: what FedSQ costs per training step, and what Flower costs per round. Prints figures.

    fedsq-perf steps    [--models ...] [--rounds 15] [--threads N] [--variants ...]   (tools/perf/micro.py)
                        [--compile [--backend inductor]]   (compiled against eager steps)
    fedsq-perf overhead [--clients 4] [--rounds 3] [--samples 2000]                    (tools/perf/sim.py)
    fedsq-perf scale    [--clients 20 100] [--rounds 3]                                (tools/perf/sim.py)
    fedsq-perf compat   [--models ...] [--batch 32] [--size 64]  (tools/perf/compat.py; docs/LIBRARY.md)
    fedsq-perf screen   [--model resnet18] [--replies 20] [--repeats 3]           (tools/perf/screen.py)
    fedsq-perf coldstart [--app DIR ...] [--runs 4]      (tools/perf/cold.py)
    fedsq-perf deploy    [--app DIR ...] [--rounds 5] [--threads-per-node 1] [--trace FILE] [--flower-floor] [--executor standard warm]
                         [--floor-arrays 22 1] [--only-floor]   (tools/perf/deploy.py, floor.py)

Never a test: numbers depend on the machine; wrap runs in ``flock /tmp/fedsq-bench.lock``.
"""

from __future__ import annotations

import argparse

import torch

from fedsq_app.tools.perf import compat
from fedsq_app.tools.perf import cold, screen, sim
from fedsq_app.tools.perf.micro import (COMPILABLE, DEFAULT_VARIANTS, MODELS, VARIANTS, machine,
                                        mask_bytes_per_sample, print_compile_markdown, print_step_markdown,
                                        step_table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsq-perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    steps = sub.add_parser("steps", help="step ratio FedSQ/FedAvg per model and optimisation")
    steps.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    steps.add_argument("--variants", nargs="+", choices=VARIANTS,
                       help=f"default: {' '.join(DEFAULT_VARIANTS)}; with --compile: {' '.join(COMPILABLE)}")
    steps.add_argument("--rounds", type=int, default=15)
    steps.add_argument("--batch", type=int, default=32)
    steps.add_argument("--device", default="cpu", help="cpu | cuda (a GPU: images/s under 'images_per_s')")
    steps.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    steps.add_argument("--compile", action="store_true",
                       help=f"also time {', '.join(COMPILABLE)} with forward and loss under "
                            "torch.compile(fullgraph=True): compiled/eager images/s and compile seconds")
    steps.add_argument("--backend", default="inductor",
                       help="torch.compile backend for --compile (aot_eager: tracing without code generation)")
    for name in ("overhead", "scale"):
        p = sub.add_parser(name)
        p.add_argument("--clients", type=int, nargs="+", default=[4] if name == "overhead" else [20, 100])
        p.add_argument("--sampled", type=int, default=10)
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--samples", type=int, default=2000, help="overhead: training samples over all clients")
        p.add_argument("--actors", type=int, default=1 if name == "overhead" else 2,
                       help="Ray CPUs = clients training at once (1 thread each)")
        p.add_argument("--per-client", type=int, default=60, help="scale: training samples per client")
        p.add_argument("--strategy", default="fedsq")
        p.add_argument("--mask-cache", default="auto", choices=("auto", "off", "on"))
    for name in ("coldstart", "deploy"):  # tools/perf/cold.py
        p = sub.add_parser(name, help="ClientApp/ServerApp start per stage" if name == "coldstart" else
                           "deployment vs simulation steady rounds, same config")
        p.add_argument("--app", action="append", default=[],
                       help="app directory (repeat to compare, e.g. a checkout of an older commit); default: this repo")
        p.add_argument("--cache", default="", help="a prepared FEDSQ_CACHE_DIR (default: this one); copied per node")
        p.add_argument("--nodes", type=int, default=3)
        p.add_argument("--run-config", default="max-train-samples=3000 device='cpu'" if name == "deploy" else "",
                       help="run-config overrides, as for flwr run")
        if name == "coldstart":
            p.add_argument("--runs", type=int, default=4, help="processes per app (the first fills the caches)")
            p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the processes (0: unset)")
        else:
            p.add_argument("--rounds", type=int, default=5)
            p.add_argument("--superexec-poll", type=float, nargs="+", default=[0.1],
                           help="FLWR_SUPEREXEC_TASK_POLL_INTERVAL on the SuperNodes, one per --app or one for "
                                "all (Flower's default: 1.0)")
            p.add_argument("--threads-per-node", type=int, nargs="+", default=[1],
                           help="OMP_NUM_THREADS of each SuperNode (its ClientApps inherit it), one per --app or one "
                                "for all; default 1, what a simulated client gets (client-resources-num-cpus=1, "
                                "for which Ray sets OMP_NUM_THREADS=1); 0: unset (torch takes every core)")
            p.add_argument("--executor", nargs="+", default=["standard", "warm"],
                           choices=("standard", "warm", "warm-short-poll"),
                           help="the ClientApp SuperExec of each deployment, one deployment each: standard (Flower's: "
                                "a new flwr-clientapp per message), warm (fedsq-superexec: a fork per message) and/or "
                                "warm-short-poll (the warm one under fedsq-supernode: 0.5 s idle poll, not 3 s)")
            p.add_argument("--limit", type=float, default=900.0, help="seconds allowed per run")
            p.add_argument("--flower-floor", action="store_true",
                           help="also run tools/perf/floor.py, a ClientApp that echoes arrays shaped like the "
                                "small CNN's: what Flower alone costs per round, simulated and deployed")
            p.add_argument("--floor-arrays", type=int, nargs="+", default=[22], metavar="N",
                           help="the no-op app once per N, each message the same bytes as N arrays: 22 = the small "
                                "CNN's own arrays, any other N = N flat float32 arrays; Flower moves ~2 objects "
                                "per array, one RPC each, so this shows what fewer, larger transfers save")
            p.add_argument("--only-floor", action="store_true",
                           help="only the no-op app's deployments (implies --flower-floor): no FedSQ app, "
                                "no simulation")
            p.add_argument("--trace", default="", help="write the deployment's process and Flower log events to "
                           "TRACE.<i> (one per --app) and print each deployed round stage by stage")
    compat.add_parser(sub)
    screening = sub.add_parser("screen", help="the server's screening of one round's replies, seconds")
    screening.add_argument("--model", default="resnet18", choices=("smallcnn", "resnet18", "alexnet"))
    screening.add_argument("--replies", type=int, default=20)
    screening.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "screen":
        screen.main(args)
        return
    if args.command in ("coldstart", "deploy"):
        cold.main(args)
        return
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    print(f"# machine: {machine()}", flush=True)
    if args.command == "steps":
        args.variants = args.variants or list(COMPILABLE if args.compile else DEFAULT_VARIANTS)
        if "plain" not in args.variants:
            args.variants.insert(0, "plain")
        rows = step_table(args.models, tuple(args.variants), args.rounds, args.batch, args.device,
                          backend=args.backend if args.compile else None)
        print_step_markdown(rows)
        if args.compile:
            print_compile_markdown(rows)
        for name in args.models:
            print(f"mask cache bytes/sample {name}: {mask_bytes_per_sample(name)} "
                  f"({mask_bytes_per_sample(name) / 1024:.1f} KiB)")
    elif args.command == "compat":
        compat.main(args)
    else:
        sim.main(args)


if __name__ == "__main__":
    main()
