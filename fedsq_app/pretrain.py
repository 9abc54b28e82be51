"""Centralised pretraining of a structural backbone, and ``fedsq-prepare`` for the offline default.

    fedsq-prepare                       # embedded Fashion-MNIST subset + small-CNN backbone into the cache
    fedsq-pretrain --model resnet18     # any model, on the embedded 'pretrain' split (clients never see it)

The checkpoint is safetensors plus a JSON sidecar (architecture, classes, input normalisation, source
data, SHA-256). ``pretrained='auto'`` in the run config finds it in the cache.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from fedsq_app.config import RunConfig
from fedsq_app.data import (FASHION_MNIST_CLASSES, InputSpec, channel_stats, decode, install_embedded_data,
                            load_split)
from fedsq_app.dualcopy import state_dict_sha256
from fedsq_app.models import build_model, save_checkpoint
from fedsq_app.task import default_backbone_path
from fedsq_app.train import LocalSchedule, evaluate, pick_device, train_local


def pretrain(model_name: str, dataset: str = "embedded", split: str = "pretrain", *, epochs: int = 8,
             lr: float = 0.05, batch_size: int = 64, seed: int = 0, out: str | None = None,
             holdout_fraction: float = 0.1) -> str:
    """Train ``model_name`` on ``dataset``/``split`` and write the checkpoint; returns its path."""
    config = RunConfig(model=model_name, dataset=dataset)
    data = decode(load_split(config, split))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)
    cut = int(len(data) * (1 - holdout_fraction))
    train_data = type(data)(data.images[order[:cut]], data.labels[order[:cut]])
    holdout = type(data)(data.images[order[cut:]], data.labels[order[cut:]])

    channels, size = data.images.shape[1], data.images.shape[-1]
    in_channels = channels if model_name == "smallcnn" else 3
    mean, std = channel_stats(train_data)
    if in_channels != channels:  # grey images fed to a 3-channel network: same statistics per channel
        mean, std = mean * in_channels, std * in_channels
    spec = InputSpec(in_channels, 64 if model_name == "alexnet" and size < 64 else 0, mean, std)
    num_classes = int(data.labels.max()) + 1
    small_stem = model_name == "resnet18" and size <= 32
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes, in_channels=in_channels, small_stem=small_stem)
    device = pick_device()
    schedule = LocalSchedule(epochs=1, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=5e-4)
    started = time.time()
    progress = tqdm(range(epochs), desc=f"pretraining {model_name} on {dataset}/{split}", unit="epoch")
    for epoch in progress:
        result = train_local(model, train_data, spec, schedule, device=device, seed=seed * 1000 + epoch)
        loss, accuracy = evaluate(model, holdout, spec, device=device)
        progress.set_postfix(train_loss=f"{result.train_loss:.3f}", holdout_acc=f"{accuracy:.3f}")
    state_dict = {k: v.cpu() for k, v in model.state_dict().items()}
    path = out or str(default_backbone_path(model_name, dataset))
    metadata = {
        "model": model_name, "num_classes": num_classes, "small_stem": small_stem,
        "classes": list(FASHION_MNIST_CLASSES) if dataset == "embedded" else None,
        "input": {"channels": spec.channels, "size": spec.size, "mean": list(spec.mean), "std": list(spec.std)},
        "source_data": {"dataset": dataset, "split": split, "samples": len(train_data)},
        "training": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                     "holdout_accuracy": accuracy, "holdout_loss": loss, "wall_time_s": time.time() - started},
        "sha256": state_dict_sha256(state_dict),
    }
    save_checkpoint(path, state_dict, metadata)
    print(f"wrote {path} (holdout accuracy {accuracy:.4f}, sha256 {metadata['sha256'][:16]}…)")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsq-pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smallcnn", choices=("smallcnn", "resnet18", "alexnet"))
    parser.add_argument("--dataset", default="embedded")
    parser.add_argument("--split", default="pretrain", help="source split (the clients must never see it)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="checkpoint path (default: the cache, found by pretrained='auto')")
    args = parser.parse_args(argv)
    pretrain(args.model, args.dataset, args.split, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
             seed=args.seed, out=args.out)


def prepare_main(argv: list[str] | None = None) -> None:
    """Set up the offline default: copy the embedded data into the cache and pretrain the small CNN."""
    parser = argparse.ArgumentParser(prog="fedsq-prepare", description=prepare_main.__doc__)
    parser.add_argument("--force", action="store_true", help="pretrain again even if the backbone exists")
    args = parser.parse_args(argv)
    print(f"embedded Fashion-MNIST subset -> {install_embedded_data()}")
    path = default_backbone_path("smallcnn", "embedded")
    if path.is_file() and not args.force:
        print(f"pretrained backbone already there: {path} (use --force to rebuild)")
        return
    pretrain("smallcnn", "embedded", "pretrain")


if __name__ == "__main__":
    main()
