"""``fedsq-export``: a finished run's model as one file that runs without fedsq: ONNX or TorchScript.

    fedsq-export outputs/fedsq-smallcnn-embedded-s42 --format onnx --out model.onnx
    fedsq-export RUN_DIR --format torchscript --out model.pt

The exported graph holds S and Q: S's ReLUs decide the gates inside the graph, Q's values pass through them,
so a FedSQ model costs about two forwards of the plain network (S up to its last ReLU, then Q). Its input is
a float32 batch ``(N, C, H, W)`` of images scaled to [0, 1], at the size and channel count the run trained on;
the graph widens grey to the backbone's channels, resizes and normalises as training did, and returns logits.
A JSON sidecar (``<out>.json``) records that input, the class count and where the model came from.
``--time`` prints the inference cost per image: the exported file, the eager model, and the plain network.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsq_app.core.dualcopy import DualCopy
from fedsq_app.trained import Trained, TrainedModelError, load_trained
from fedsq_app.util import write_atomic

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18


class Standalone(nn.Module):
    """Pixels in [0, 1] -> logits: the run's preprocessing (``InputSpec.normalise``), then the model (for
    FedSQ, S gating Q)."""

    def __init__(self, trained: Trained) -> None:
        super().__init__()
        self.model, self.spec = trained.model, trained.spec

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.spec.normalise(pixels))


def example_input(trained: Trained, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, *trained.image_shape, generator=torch.Generator().manual_seed(0))


def export_torchscript(module: Standalone, example: torch.Tensor, out: Path) -> None:
    # torch 2.14 calls TorchScript deprecated in favour of torch.export; it is still what libtorch (C++) and
    # torch.jit.load read, so it is offered, without the warning on every call.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # The traced Python values are fixed by the architecture and the run (shapes, the normalisation's
        # mean and std): constants indeed, which the tests check against eager on the whole test split.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False)
        write_atomic(out, lambda tmp: torch.jit.save(traced, str(tmp)))


def export_onnx(module: Standalone, example: torch.Tensor, out: Path) -> None:
    """Through torch.export (the dynamo exporter), with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=65536)

    def write(tmp: Path) -> None:
        program = torch.onnx.export(module, (example,), input_names=["pixels"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), dynamo=True, opset_version=ONNX_OPSET,
                                    verbose=False)
        program.save(str(tmp))

    write_atomic(out, write)


def sidecar(trained: Trained, fmt: str) -> dict:
    channels, height, width = trained.image_shape
    meta = trained.metadata
    return {"format": fmt, "input": {"name": "pixels", "shape": ["N", channels, height, width],
                                     "dtype": "float32", "range": [0.0, 1.0]},
            "output": {"name": "logits", "shape": ["N", trained.num_classes]},
            "num_classes": trained.num_classes, "gated": isinstance(trained.model, DualCopy),
            "model": meta.get("model"), "strategy": meta.get("strategy"), "round": meta.get("round"),
            "val_accuracy": meta.get("val_accuracy"), "test_accuracy": meta.get("test_accuracy"),
            "structural_sha256": meta.get("structural_sha256"), "dataset": trained.config.dataset}


def export(trained: Trained, fmt: str, out: Path) -> Path:
    """Write ``out`` (and ``<out>.json``); returns ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    trained.model.cpu().eval()
    module = Standalone(trained).eval()
    (export_onnx if fmt == "onnx" else export_torchscript)(module, example_input(trained), out)
    write_atomic(f"{out}.json", json.dumps(sidecar(trained, fmt), indent=2))
    return out


def load_exported(path: Path):
    """A callable ``pixels (numpy float32) -> logits (numpy)`` for an exported file, fedsq not needed."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda pixels: session.run(None, {"pixels": pixels})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    return lambda pixels: scripted(torch.from_numpy(pixels)).detach().numpy()


def _ms_per_image(run, pixels, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        run(pixels)
    return 1000 * (time.perf_counter() - start) / (repeats * len(pixels))


def inference_cost(trained: Trained, path: Path, *, batch: int = 64, repeats: int = 5,
                   rounds: int = 7) -> dict[str, float]:
    """ms per image, median over ``rounds`` interleaved rounds (so a noisy neighbour hits all three alike):
    the exported file, the eager model, and the plain network (the same architecture with ordinary ReLUs:
    one forward without gating)."""
    pixels = example_input(trained, batch)
    plain = Standalone(trained).eval()
    plain.model = trained.plain
    runners = {f"exported ({path.suffix.lstrip('.')})": (load_exported(path), pixels.numpy()),
               "eager model": (Standalone(trained).eval(), pixels), "plain network": (plain, pixels)}
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for run, x in runners.values():
            run(x)  # warm-up: lazy initialisation, allocator
        for _ in range(rounds):
            for name, (run, x) in runners.items():
                times[name].append(_ms_per_image(run, x, repeats))
    return {name: float(np.median(values)) for name, values in times.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedsq-export", description="Export a finished run's model (S and Q in "
                                     "one graph, gates computed inside) as ONNX or TorchScript.")
    parser.add_argument("model", help="the run's output directory, or a best_model.safetensors (with its .json)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path, help="the file to write (.onnx / .pt)")
    parser.add_argument("--backbone", help="S's pretrained weights, if not where the run found them")
    parser.add_argument("--time", action="store_true", help="also print ms/image: exported, eager, plain network")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        trained = load_trained(args.model, backbone=args.backbone)
    except TrainedModelError as error:
        print(f"fedsq-export: {error}", file=sys.stderr)
        return 2
    export(trained, args.format, args.out)
    channels, height, width = trained.image_shape
    print(f"exported: {args.out} ({args.format}; input 'pixels' float32 N x {channels} x {height} x {width} in "
          f"[0, 1], output 'logits' N x {trained.num_classes}); description: {args.out}.json")
    if args.time:
        costs = inference_cost(trained, args.out)
        plain = costs["plain network"]
        for name, ms in costs.items():
            print(f"{name:>22}: {ms:.3f} ms/image, {ms / plain:.2f}x the plain network "
                  f"(batch 64, {torch.get_num_threads()} threads, median of 7)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
