"""``fedsq-perf``: what FedSQ costs per training step, and what Flower costs per round. Prints figures.

    fedsq-perf steps    [--models ...] [--rounds 15] [--threads N] [--variants ...]
    fedsq-perf overhead [--clients 4] [--rounds 3] [--samples 2000]
    fedsq-perf scale    [--clients 20 100] [--rounds 3]
    fedsq-perf compat   [--models ...] [--batch 32] [--size 64]  (fedsq_app/compat.py; docs/LIBRARY.md)
    fedsq-perf coldstart [--app DIR ...] [--runs 4]      (fedsq_app/perf_cold.py)
    fedsq-perf deploy    [--app DIR ...] [--rounds 5] [--threads-per-node 1] [--trace FILE] [--flower-floor]
                                                         (fedsq_app/perf_cold.py)

``steps`` times one full training step (forward, loss, backward, SGD step; batch 32, fp32) of each
configuration, interleaved (one step of each configuration per round, rotating the order) and reports
medians and ratios to the plain FedAvg step, next to the floor ``1 + S_forward / plain_step``, where
S_forward is the plain network's no-grad eval forward: the one extra pass FedSQ cannot avoid.
Never a test: numbers depend on the machine; wrap runs in ``flock /tmp/fedsq-bench.lock``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedsq_app import maskcache
from fedsq_app.dualcopy import DualCopy
from fedsq_app.models import build_model
from fedsq_app.train import MomentumSGD

# name -> (architecture, build kwargs, input shape without batch)
MODELS = {
    "smallcnn28": ("smallcnn", {"in_channels": 1}, (1, 28, 28)),
    "smallcnn32": ("smallcnn", {"in_channels": 3}, (3, 32, 32)),
    "resnet18-32": ("resnet18", {"small_stem": True}, (3, 32, 32)),
    "alexnet-64": ("alexnet", {}, (3, 64, 64)),
}
VARIANTS = ("plain", "s-forward", "ref", "fast", "fold", "cache", "mul-gate", "with-grad", "channels-last")
DEFAULT_VARIANTS = ("plain", "s-forward", "ref", "fast", "fold", "cache")


def pretrained_like(name: str, seed: int = 0) -> nn.Module:
    """A model with non-trivial BN statistics (as a pretrained one has), so eval BN is not a no-op."""
    arch, kwargs, _ = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(arch, 10, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model


class _MulGate(nn.Module):
    """The unfused gate (before): build a float mask, then multiply. Equal values to threshold_backward."""

    def __init__(self, tape) -> None:
        super().__init__()
        self.tape = tape

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        return z_q * (self.tape.next_activation(z_q) > 0).to(z_q.dtype)


class _WithGradDualCopy(DualCopy):
    """The reference DualCopy with S's forward outside no_grad (before 'S under no_grad')."""

    def _structural_pass(self, x):
        self._tape.start()
        self.structural(x)
        activations = self._tape.activations
        self._tape.start()
        return activations


def _dualcopy(name: str, model: nn.Module) -> nn.Module:
    if name == "ref":
        return DualCopy(model, fast=False)
    if name == "fold":
        return DualCopy(model, fast=True, fold_bn=True)
    if name == "with-grad":
        return _WithGradDualCopy(model, fast=False)
    dual = DualCopy(model, fast=True)
    if name == "mul-gate":
        for parent in dual.quantitative.modules():
            for child_name, child in parent.named_children():
                if type(child).__name__ == "_GatedLinear":
                    setattr(parent, child_name, _MulGate(dual._tape))
    return dual


@dataclass
class Case:
    name: str
    step: Callable[[], None]


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward=None) -> Callable[[], None]:
    model.train()
    optimizer = MomentumSGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                            weight_decay=0.0)  # train_local's optimiser
    forward = forward or model

    def step() -> None:
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def build_cases(model_name: str, variants: tuple[str, ...], batch: int, seed: int = 0,
                device: str = "cpu") -> list[Case]:
    base = pretrained_like(model_name, seed).to(device)
    shape = MODELS[model_name][2]
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *shape, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    cases = []
    for variant in variants:
        model = copy.deepcopy(base)
        if variant == "plain":
            cases.append(Case(variant, _train_step(model, x, y)))
        elif variant == "s-forward":
            model.eval()

            def s_forward(model=model) -> None:
                with torch.no_grad():
                    model(x)

            cases.append(Case(variant, s_forward))
        elif variant == "channels-last":
            dual = DualCopy(model, fast=True).to(memory_format=torch.channels_last)
            cases.append(Case(variant, _train_step(dual, x.contiguous(memory_format=torch.channels_last), y)))
        elif variant == "cache":
            dual = DualCopy(model, fast=True)
            cache = maskcache.MaskCache(batch, max_bytes=2**40)
            indices = torch.arange(batch)  # CPU: the cache's bookkeeping lives there
            cache.gates(dual, x, indices)  # fill once, as the first epoch does
            cases.append(Case(variant, _train_step(dual, x, y, lambda x: maskcache.forward(dual, x, indices, cache))))
        else:
            cases.append(Case(variant, _train_step(_dualcopy(variant, model), x, y)))
    return cases


def time_cases(cases: list[Case], rounds: int, warmup: int = 2, device: str = "cpu") -> dict[str, list[float]]:
    """Interleaved timing: each round runs one step of every case, in a rotated order."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for case in cases:
        for _ in range(warmup):
            case.step()
    times = {case.name: [] for case in cases}
    for r in range(rounds):
        order = cases[r % len(cases):] + cases[: r % len(cases)]
        for case in order:
            sync()
            start = time.perf_counter()
            case.step()
            sync()
            times[case.name].append(time.perf_counter() - start)
    return times


def step_table(model_names, variants, rounds: int, batch: int, device: str = "cpu") -> list[dict]:
    rows = []
    for name in model_names:
        times = time_cases(build_cases(name, variants, batch, device=device), rounds, device=device)
        med = {k: statistics.median(v) for k, v in times.items()}
        plain = med.get("plain")
        row = {"model": name, "batch": batch, "rounds": rounds, "ms": {k: round(v * 1e3, 2) for k, v in med.items()}}
        if plain:
            row["images_per_s"] = {k: round(batch / v, 1) for k, v in med.items() if k != "s-forward"}
            row["ratio"] = {k: round(v / plain, 3) for k, v in med.items() if k != "plain"}
            if "s-forward" in med:
                row["floor"] = round(1 + med["s-forward"] / plain, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def mask_bytes_per_sample(model_name: str) -> int:
    arch, kwargs, shape = MODELS[model_name]
    dual = DualCopy(build_model(arch, 10, **kwargs))
    return maskcache.bytes_per_sample([a.shape[1:] for a in dual.structural_activations(torch.zeros(1, *shape))])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; python {platform.python_version()}")


def print_step_markdown(rows: list[dict]) -> None:
    variants = [v for v in VARIANTS if any(v in r["ms"] for r in rows)]
    print("\n| model | " + " | ".join(f"{v} ms" for v in variants) + " | floor | "
          + " | ".join(f"{v} ratio" for v in variants if v not in ("plain", "s-forward")) + " |")
    print("|" + "---|" * (2 + len(variants) + len([v for v in variants if v not in ("plain", "s-forward")])))
    for r in rows:
        ms = " | ".join(str(r["ms"].get(v, "")) for v in variants)
        ratios = " | ".join(str(r.get("ratio", {}).get(v, "")) for v in variants if v not in ("plain", "s-forward"))
        print(f"| {r['model']} | {ms} | {r.get('floor', '')} | {ratios} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsq-perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    steps = sub.add_parser("steps", help="step ratio FedSQ/FedAvg per model and optimisation")
    steps.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    steps.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    steps.add_argument("--rounds", type=int, default=15)
    steps.add_argument("--batch", type=int, default=32)
    steps.add_argument("--device", default="cpu", help="cpu | cuda (a GPU: images/s under 'images_per_s')")
    steps.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
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
    for name in ("coldstart", "deploy"):  # fedsq_app/perf_cold.py
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
            p.add_argument("--limit", type=float, default=900.0, help="seconds allowed per run")
            p.add_argument("--flower-floor", action="store_true",
                           help="also run fedsq_app/flower_floor.py, a ClientApp that echoes arrays shaped like the "
                                "small CNN's: what Flower alone costs per round, simulated and deployed")
            p.add_argument("--trace", default="", help="write the deployment's process and Flower log events to "
                           "TRACE.<i> (one per --app) and print each deployed round stage by stage")
    from fedsq_app import compat

    compat.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("coldstart", "deploy"):
        from fedsq_app import perf_cold

        perf_cold.main(args)
        return
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    print(f"# machine: {machine()}", flush=True)
    if args.command == "steps":
        if "plain" not in args.variants:
            args.variants.insert(0, "plain")
        rows = step_table(args.models, tuple(args.variants), args.rounds, args.batch, args.device)
        print_step_markdown(rows)
        for name in args.models:
            print(f"mask cache bytes/sample {name}: {mask_bytes_per_sample(name)} "
                  f"({mask_bytes_per_sample(name) / 1024:.1f} KiB)")
    elif args.command == "compat":
        compat.main(args)
    else:
        from fedsq_app import perf_sim

        perf_sim.main(args)


if __name__ == "__main__":
    main()
