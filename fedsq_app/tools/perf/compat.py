"""``fedsq-perf compat``: which torchvision classification models DualCopy accepts, and what gating costs.

    fedsq-perf compat [--models resnet18 vgg11 ...] [--batch 32] [--rounds 9] [--size 64] [--threads N]

Every model is built with random weights (no download) and BN statistics randomised as a pretrained
model's are (so eval BN is not a no-op). For each: DualCopy's verdict, and the exact
``UnsupportedActivationError`` message when it refuses; if it accepts, identity at init (max |logit
difference| between ``DualCopy(model)`` and ``model``, both in eval mode, fp32), the number of gates (ReLU
calls per forward), the mask bits per sample (1 per ReLU unit, 2 per ReLU6 unit), and the step ratio: a
full training step (forward, loss, backward, SGD) of DualCopy over the plain model's, medians of steps
timed interleaved (``fedsq-perf steps``'s timer; the median of the per-round ratios), on a batch of ``--size`` px images. Prints figures; the
table in docs/LIBRARY.md comes from this command. Never a test: ratios depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from torch import nn
from torchvision import models as tv_models

from fedsq_app.core.dualcopy import DualCopy, UnsupportedActivationError
from fedsq_app.tools.perf.micro import Case, time_cases, train_step

# name -> build kwargs. ViT's default image_size is 224 (its position embedding fixes the input size):
# built for the benchmark's input size instead. GoogLeNet: no auxiliary heads, no scipy-based init.
ARCHITECTURES = {
    "resnet18": {}, "resnet50": {}, "vgg11": {}, "vgg11_bn": {}, "alexnet": {}, "densenet121": {},
    "googlenet": {"aux_logits": False, "init_weights": False}, "mobilenet_v2": {}, "mobilenet_v3_small": {},
    "efficientnet_b0": {}, "shufflenet_v2_x0_5": {}, "squeezenet1_0": {}, "mnasnet0_5": {},
    "regnet_x_400mf": {}, "regnet_y_400mf": {}, "convnext_tiny": {}, "vit_b_16": {"image_size": None},
}


def build(name: str, size: int, seed: int = 0) -> nn.Module:
    """torchvision's ``name`` with 10 classes, random weights and pretrained-like BN statistics, in eval mode."""
    kwargs = {k: (size if v is None else v) for k, v in ARCHITECTURES[name].items()}
    torch.manual_seed(seed)
    model = getattr(tv_models, name)(num_classes=10, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


def compat_row(name: str, *, size: int, batch: int, rounds: int) -> dict:
    model = build(name, size)
    row = {"model": name, "input": f"{size} px" + (" (image_size=%d)" % size if "image_size" in ARCHITECTURES[name]
                                                     else "")}
    try:
        dual = DualCopy(model)
    except UnsupportedActivationError as error:
        return {**row, "accepted": False, "message": str(error)}
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    with torch.no_grad():
        plain_logits, gated_logits = model(x), dual.eval()(x)
    row.update(accepted=True, identity_max_abs=float((plain_logits - gated_logits).abs().max()),
               logit_scale=float(plain_logits.abs().max()), gates=len(dual.structural_activations(x[:1])),
               mask_bits_per_sample=dual.mask_bits_per_sample(x))
    cases = [Case("plain", train_step(copy.deepcopy(model), x, y)), Case("fedsq", train_step(dual, x, y))]
    times = time_cases(cases, rounds)
    plain, fedsq = statistics.median(times["plain"]), statistics.median(times["fedsq"])
    # Median of per-round ratios: the two steps of a round run back to back, so load changes cancel.
    paired = statistics.median(f / p for f, p in zip(times["fedsq"], times["plain"]))
    row.update(plain_ms=round(plain * 1e3, 1), fedsq_ms=round(fedsq * 1e3, 1), step_ratio=round(paired, 3))
    return row


def markdown(rows: list[dict], batch: int) -> str:
    lines = ["| model | input | DualCopy | max \\|logit diff\\| at init | gates | mask bits/sample | "
             f"step ratio (batch {batch}; plain → FedSQ ms) | message when refused |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["accepted"]:
            lines.append(f"| {r['model']} | {r['input']} | accepted | {r['identity_max_abs']:.2g} | {r['gates']} | "
                         f"{r['mask_bits_per_sample']:,} | {r['step_ratio']:.2f} ({r['plain_ms']:g} → "
                         f"{r['fedsq_ms']:g} ms) | |")
        else:
            lines.append(f"| {r['model']} | {r['input']} | **refused** | | | | | {r['message'].replace('|', '/')} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    """``fedsq-perf compat`` (arguments parsed in fedsq_app/tools/perf/cli.py)."""
    from tqdm import tqdm

    rows = []
    for name in (progress := tqdm(args.models, desc="compat", unit="model")):
        progress.set_postfix_str(name)
        rows.append(compat_row(name, size=args.size, batch=args.batch, rounds=args.rounds))
        tqdm.write(json.dumps(rows[-1]))
    print(f"\n`fedsq-perf compat --batch {args.batch} --rounds {args.rounds} --size {args.size} "
          f"--threads {args.threads}`\n")
    print(markdown(rows, args.batch))


def add_parser(sub) -> None:
    p = sub.add_parser("compat", help="torchvision models: accepted by DualCopy or refused (why), and the cost")
    p.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    p.add_argument("--size", type=int, default=64, help="input size in px")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=9, help="timed steps per model and variant (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
