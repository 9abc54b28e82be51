"""Training throughput of a finished grid, from its cells' ``results.json``: images/s and, on a GPU, the share of
the card's dense bf16 peak that the arithmetic reached.

    python -m fedsq_app.tools.bench.throughput --out outputs/bench/gpu-cell --peak-tflops 989

Per cell, over rounds 2.. (round 1 pays start-up): images trained = Σ num_examples × local epochs of the
accepted replies; *train images/s* divides them by the time from each round's start to its last reply (the
clients' training, one after another in the in-process engine), *round images/s* by the rounds' wall time
(aggregation, validation and the probe included). FLOPs per image: the model's forward pass counted by
``torch.utils.flop_counter`` at the run's input size, × 3 for Q's forward and backward, + 1 forward of S for the
gated strategies (S runs once per image: with the mask cache on and E = 1 that is the cache filling).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense (no sparsity); the H200 has the same


def forward_flops(model: str, num_classes: int, in_channels: int, size: int, small_stem: bool) -> float:
    """FLOPs of one image's forward pass (a multiply-add counts 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fedsq_app.runtime.models import build_model

    net = build_model(model, num_classes, in_channels=in_channels, small_stem=small_stem).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, in_channels, size, size))
    return float(counter.get_total_flops())


def cell_throughput(results: dict) -> dict:
    config = results["config"]
    epochs = int(config.get("local-epochs", 1))
    images = train_s = wall_s = 0.0
    for entry in results["rounds"][1:] or results["rounds"]:
        accepted = [r for r in entry.get("replies", []) if r.get("accepted", True)]
        images += epochs * sum(r["num_examples"] for r in accepted)
        train_s += max((r.get("reply_time_s") or 0.0 for r in accepted), default=0.0)
        wall_s += entry["wall_time_s"]
    return {"images": images, "train_s": train_s, "wall_s": wall_s,
            "train_images_per_s": images / train_s if train_s else float("nan"),
            "round_images_per_s": images / wall_s if wall_s else float("nan")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a grid's output folder (its cells/)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the card's dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--size", type=int, default=0, help="input size for the FLOP count (0: the run's, else 28)")
    args = parser.parse_args(argv)
    from fedsq_app.runtime.strategies import STRATEGIES

    print("| cell | device | images (rounds 2..) | train images/s | round images/s | GFLOP/image (train) | "
          "TFLOP/s (train) | % of bf16 peak |")
    print("|---|---|---|---|---|---|---|---|")
    flops_cache: dict = {}
    for path in sorted(Path(args.out, "cells").glob("*/results.json")):
        results = json.loads(path.read_text())
        if "test_accuracy" not in results:
            continue
        config = results["config"]
        t = cell_throughput(results)
        size = args.size or int(config.get("input-size", 0) or 28)
        model, num_classes = config["model"], int(results.get("num_classes", 10))
        small = model == "resnet18" and size <= 32
        in_channels = 3 if model in ("resnet18", "alexnet") else 1
        key = (model, num_classes, in_channels, size, small)
        if key not in flops_cache:
            flops_cache[key] = forward_flops(*key)
        gated = STRATEGIES[config["strategy"]].gated
        per_image = flops_cache[key] * (4 if gated else 3)
        tflops = t["train_images_per_s"] * per_image / 1e12
        print(f"| {path.parent.name} | {config.get('device', 'auto')}, amp {config.get('amp', 'off')} | "
              f"{t['images']:.0f} | {t['train_images_per_s']:.0f} | {t['round_images_per_s']:.0f} | "
              f"{per_image / 1e9:.3f} | {tflops:.2f} | {100 * tflops / args.peak_tflops:.2f} % |")


if __name__ == "__main__":
    main()
