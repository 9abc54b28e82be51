"""What FedSQ costs per training step: the ``fedsq-perf steps`` micro-benchmark. Prints figures.

``steps`` times one full training step (forward, loss, backward, SGD step; batch 32, fp32) of each
configuration, interleaved (one step of each configuration per round, rotating the order) and reports
medians and ratios to the plain FedAvg step, next to the floor ``1 + S_forward / plain_step``, where
S_forward is the plain network's no-grad eval forward: the one extra pass FedSQ cannot avoid.

``steps --compile`` adds, next to each of the variants plain, fast and cache, the same step with its forward
and loss under ``torch.compile(fullgraph=True)`` (backward and the SGD step stay eager; the mask cache's lookup
runs before the compiled region), and reports compiled against eager images/s and the compile time.
Never a test: numbers depend on the machine; wrap runs in ``flock /tmp/fedsq-bench.lock``.
"""

from __future__ import annotations

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

from fedsq_app.core.dualcopy import DualCopy
from fedsq_app.runtime import maskcache
from fedsq_app.runtime.models import build_model
from fedsq_app.runtime.train import MomentumSGD

# name -> (architecture, build kwargs, input shape without batch)
MODELS = {
    "smallcnn28": ("smallcnn", {"in_channels": 1}, (1, 28, 28)),
    "smallcnn32": ("smallcnn", {"in_channels": 3}, (3, 32, 32)),
    "resnet18-32": ("resnet18", {"small_stem": True}, (3, 32, 32)),
    "alexnet-64": ("alexnet", {}, (3, 64, 64)),
}
VARIANTS = ("plain", "s-forward", "ref", "fast", "fold", "cache", "mul-gate", "with-grad", "channels-last")
DEFAULT_VARIANTS = ("plain", "s-forward", "ref", "fast", "fold", "cache")
COMPILABLE = ("plain", "fast", "cache")  # --compile: each gets a compiled twin named "<variant>+compiled"


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
    compile_s: float = 0.0  # a compiled case: its first step (tracing and compiling)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward=None, gates=None,
               backend: str | None = None) -> Callable[[], None]:
    """One SGD step of ``model`` on (x, y). ``gates``: called each step for the DualCopy's gates (the mask
    cache's lookup). ``backend``: compile forward and loss with ``torch.compile(fullgraph=True)``."""
    model.train()
    optimizer = MomentumSGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                            weight_decay=0.0)  # train_local's optimiser
    forward = forward or model

    def loss_of(x: torch.Tensor, y: torch.Tensor, gates: list[torch.Tensor] | None) -> torch.Tensor:
        return F.cross_entropy(forward(x) if gates is None else forward(x, gates=gates), y)

    if backend:
        loss_of = torch.compile(loss_of, fullgraph=True, backend=backend)

    def step() -> None:
        loss = loss_of(x, y, gates() if gates else None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def compiled_case(name: str, step: Callable[[], None], device: str) -> Case:
    """The compiled twin's case, its first step (the compile) already run and timed."""
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return Case(f"{name}+compiled", step, compile_s=round(time.perf_counter() - start, 1))


def build_cases(model_name: str, variants: tuple[str, ...], batch: int, seed: int = 0,
                device: str = "cpu", backend: str | None = None) -> list[Case]:
    """One case per variant; with ``backend``, also a compiled twin of each variant in ``COMPILABLE``."""
    base = pretrained_like(model_name, seed).to(device)
    shape = MODELS[model_name][2]
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *shape, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    cases = []
    for variant in variants:
        model = copy.deepcopy(base)
        if variant == "plain":
            cases.append(Case(variant, train_step(model, x, y)))
            if backend:
                compiled = copy.deepcopy(base)
                cases.append(compiled_case(variant, train_step(compiled, x, y, backend=backend), device))
        elif variant == "s-forward":
            model.eval()

            def s_forward(model=model) -> None:
                with torch.no_grad():
                    model(x)

            cases.append(Case(variant, s_forward))
        elif variant == "channels-last":
            dual = DualCopy(model, fast=True).to(memory_format=torch.channels_last)
            cases.append(Case(variant, train_step(dual, x.contiguous(memory_format=torch.channels_last), y)))
        elif variant == "cache":
            dual = DualCopy(model, fast=True)
            cache = maskcache.MaskCache(batch, max_bytes=2**40)
            indices = torch.arange(batch)  # CPU: the cache's bookkeeping lives there
            cache.gates(dual, x, indices)  # fill once, as the first epoch does
            cases.append(Case(variant, train_step(dual, x, y, lambda x: maskcache.forward(dual, x, indices, cache))))
            if backend:
                twin = copy.deepcopy(dual)
                step = train_step(twin, x, y, gates=lambda: cache.gates(twin, x, indices), backend=backend)
                cases.append(compiled_case(variant, step, device))
        else:
            cases.append(Case(variant, train_step(_dualcopy(variant, model), x, y)))
            if backend and variant in COMPILABLE:
                step = train_step(_dualcopy(variant, copy.deepcopy(base)), x, y, backend=backend)
                cases.append(compiled_case(variant, step, device))
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


def step_table(model_names, variants, rounds: int, batch: int, device: str = "cpu",
               backend: str | None = None) -> list[dict]:
    rows = []
    for name in model_names:
        cases = build_cases(name, variants, batch, device=device, backend=backend)
        times = time_cases(cases, rounds, device=device)
        if backend:
            torch._dynamo.reset()  # each model's compiled steps are its own; keeps under dynamo's recompile limit
        med = {k: statistics.median(v) for k, v in times.items()}
        plain = med.get("plain")
        row = {"model": name, "batch": batch, "rounds": rounds, "ms": {k: round(v * 1e3, 2) for k, v in med.items()}}
        if plain:
            row["images_per_s"] = {k: round(batch / v, 1) for k, v in med.items() if k != "s-forward"}
            row["ratio"] = {k: round(v / plain, 3) for k, v in med.items() if k != "plain"}
            if "s-forward" in med:
                row["floor"] = round(1 + med["s-forward"] / plain, 3)
        compiled = {c.name.removesuffix("+compiled"): c for c in cases if c.compile_s}
        if compiled:
            row["backend"] = backend
            row["compile_s"] = {k: c.compile_s for k, c in compiled.items()}
            row["speedup"] = {k: round(med[k] / med[c.name], 3) for k, c in compiled.items()}
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


def print_compile_markdown(rows: list[dict]) -> None:
    """Compiled against eager, per model and variant: images/s, their ratio, and the compile time."""
    print(f"\n| model | variant | eager images/s | compiled images/s ({rows[0].get('backend', '')}) "
          "| compiled/eager | compile s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for variant, speedup in r.get("speedup", {}).items():
            eager, compiled = (round(r["batch"] * 1e3 / r["ms"][k], 1) for k in (variant, f"{variant}+compiled"))
            print(f"| {r['model']} | {variant} | {eager} | {compiled} | {speedup} | {r['compile_s'][variant]} |")


def print_step_markdown(rows: list[dict]) -> None:
    variants = [v for v in VARIANTS if any(v in r["ms"] for r in rows)]
    print("\n| model | " + " | ".join(f"{v} ms" for v in variants) + " | floor | "
          + " | ".join(f"{v} ratio" for v in variants if v not in ("plain", "s-forward")) + " |")
    print("|" + "---|" * (2 + len(variants) + len([v for v in variants if v not in ("plain", "s-forward")])))
    for r in rows:
        ms = " | ".join(str(r["ms"].get(v, "")) for v in variants)
        ratios = " | ".join(str(r.get("ratio", {}).get(v, "")) for v in variants if v not in ("plain", "s-forward"))
        print(f"| {r['model']} | {ms} | {r.get('floor', '')} | {ratios} |")
