"""Centralised pretraining of a structural backbone, its calibration, and ``fedsq-prepare``.

    fedsq-prepare                       # embedded Fashion-MNIST subset + small-CNN backbone into the cache
    fedsq-pretrain --model resnet18     # any model, on the embedded 'pretrain' split (clients never see it)
    fedsq-pretrain --model resnet18 --dataset idx:/usr/share/datasets/fashion-mnist --split "train[:6000]" \\
        --epochs 2 --calibrate --proxy-split "train[6000:9000]" --run-config-out calibrated.toml
                                        # then federate on train[9000:]: flwr run . --run-config calibrated.toml

The checkpoint is safetensors plus a JSON sidecar (architecture, classes, input normalisation, source
data, SHA-256). ``pretrained='auto'`` in the run config finds it in the cache.

``--calibrate`` is the paper's "centralised calibration step": starting from the backbone with a new seeded
head, it fine-tunes the plain network centrally on a proxy split for each local learning rate (and up to
``--calibrate-epochs`` epochs), picks the best proxy-validation accuracy, and writes that schedule as a
run-config TOML that FedSQ and every baseline then share.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import ClassLabel
from tqdm import tqdm

from fedsq_app.config import RunConfig
from fedsq_app.core.dualcopy import state_dict_sha256
from fedsq_app.data import digests
from fedsq_app.data.leakage import overlaps
from fedsq_app.data.partitions import DatasetInfo
from fedsq_app.data.sources import install_embedded_data
from fedsq_app.data.splits import load_dataset_split, select_classes
from fedsq_app.data.tensors import InputSpec, TensorData, channel_stats, decode
from fedsq_app.runtime.models import MODELS, build_model, model_entry, save_checkpoint
from fedsq_app.runtime.train import LocalSchedule, evaluate, pick_device, train_local
from fedsq_app.task import build_start_model, default_backbone_path
from fedsq_app.util import write_atomic

STEMS = ("auto", "small", "standard")


def split_holdout(data: TensorData, fraction: float, seed: int) -> tuple[TensorData, TensorData]:
    """A seeded random (train, holdout) split of decoded data."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(len(data) * (1 - fraction)))
    return (TensorData(data.images[order[:cut]], data.labels[order[:cut]]),
            TensorData(data.images[order[cut:]], data.labels[order[cut:]]))


def _load(dataset: str, split: str, max_samples: int, seed: int, image_column: str, label_column: str,
          classes: str = ""):
    source = select_classes(load_dataset_split(dataset, split, image_column=image_column,
                                               label_column=label_column), classes)
    if max_samples and max_samples < len(source):
        source = source.shuffle(seed=seed).select(range(max_samples))
    label = source.features["label"]
    classes = list(label.names) if isinstance(label, ClassLabel) else None
    return source, classes


def pretrain(model_name: str, dataset: str = "embedded", split: str = "pretrain", *, epochs: int = 8,
             lr: float = 0.05, batch_size: int = 64, seed: int = 0, out: str | None = None,
             holdout_fraction: float = 0.1, max_samples: int = 0, image_column: str = "",
             label_column: str = "", classes: str = "", input_size: int = 0, stem: str = "auto") -> str:
    """Train ``model_name`` on ``dataset``/``split`` and write the checkpoint; returns its path.

    ``classes`` ("0-4", "0,1,2"): pretrain on these labels only, renumbered 0..k-1 as the run config's
    ``classes`` does; a run on a disjoint set of classes is then a cross-domain transfer with a new head.
    ``input_size``: resize images to this size (0: the data's own); the checkpoint records it, so runs
    from it are fed the same way. ``stem``: ``auto`` gives a model with a small-image stem (ResNet-18's
    3x3 conv, no max-pool) on inputs up to its limit; ``small`` and ``standard`` force one or the other
    (``standard``: torchvision's own network, 15 times cheaper at 32 px).
    """
    if model_name not in MODELS:
        raise ValueError(f"unknown model '{model_name}'; choose one of {', '.join(MODELS)}")
    if stem not in STEMS:
        raise ValueError(f"stem='{stem}': choose one of {', '.join(STEMS)}")
    if input_size < 0:
        raise ValueError(f"input_size={input_size}: a size in pixels, or 0 for the data's own")
    if classes and out is None:
        raise ValueError("a backbone pretrained on a subset of the classes needs its own --out path "
                         "(pretrained='auto' stands for the backbone of all classes)")
    source, class_names = _load(dataset, split, max_samples, seed, image_column, label_column, classes)
    data = decode(source)
    train_data, holdout = split_holdout(data, holdout_fraction, seed)

    channels, size = data.images.shape[1], input_size or data.images.shape[-1]
    entry = model_entry(model_name)
    if stem == "small" and size > entry.small_stem_max:
        raise ValueError(f"stem='small': {model_name} has no small-image stem for {size} px inputs")
    in_channels = channels if entry.any_channels else 3
    mean, std = channel_stats(train_data)
    if in_channels != channels:  # grey images fed to a 3-channel network: same statistics per channel
        mean, std = mean * in_channels, std * in_channels
    native = entry.native_size(size, imagenet_style=False) or size
    spec = InputSpec(in_channels, native if native != data.images.shape[-1] else 0, mean, std)
    num_classes = len(class_names) if class_names else int(data.labels.max()) + 1
    small_stem = stem == "small" or (stem == "auto" and size <= entry.small_stem_max)
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes, in_channels=in_channels, small_stem=small_stem)
    device = pick_device()
    schedule = LocalSchedule(epochs=1, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=5e-4)
    started = time.time()
    progress = tqdm(range(epochs), desc=f"pretraining {model_name} on {dataset}/{split}", unit="epoch")
    loss, accuracy = float("nan"), 0.0
    for epoch in progress:
        result = train_local(model, train_data, spec, schedule, device=device, seed=seed * 1000 + epoch)
        loss, accuracy = evaluate(model, holdout, spec, device=device)
        progress.set_postfix(train_loss=f"{result.train_loss:.3f}", holdout_acc=f"{accuracy:.3f}")
    state_dict = {k: v.cpu() for k, v in model.state_dict().items()}
    path = out or str(default_backbone_path(model_name, dataset))
    metadata = {
        "model": model_name, "num_classes": num_classes, "small_stem": small_stem, "classes": class_names,
        "input": {"channels": spec.channels, "size": spec.size, "mean": list(spec.mean), "std": list(spec.std)},
        "source_data": {"dataset": dataset, "split": split, "samples": len(train_data),
                        "holdout_samples": len(holdout), "max_samples": max_samples, "label_subset": classes},
        "training": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                     "holdout_accuracy": accuracy, "holdout_loss": loss, "wall_time_s": time.time() - started},
        "sha256": state_dict_sha256(state_dict),
        # Every image it saw (training and holdout), by content: a node refuses data that holds any of them.
        digests.FIELD: digests.sidecar_entry(data.images),
    }
    save_checkpoint(path, state_dict, metadata)
    print(f"wrote {path} (holdout accuracy {accuracy:.4f}, sha256 {metadata['sha256'][:16]}…)")
    return path


def calibrate(model_name: str, pretrained: str, dataset: str, proxy_split: str, *,
              lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1), max_epochs: int = 2, batch_size: int = 32,
              momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0, max_samples: int = 0,
              val_fraction: float = 0.2, image_column: str = "", label_column: str = "",
              out: str | Path = "calibrated.toml") -> dict:
    """Sweep the local learning rate (and epochs) centrally on a proxy split; write the best as run config.

    Every trial starts from the same pretrained backbone and the same seeded head and trains the plain
    network (the same transfer-learning step for every strategy), evaluating after each epoch. A learning
    rate whose loss stops being finite loses (``val_accuracy`` None); if every one does, nothing is written.
    """
    leaks = overlaps(pretrained, dataset, {"proxy split": proxy_split}, image_column=image_column,
                     label_column=label_column)
    if leaks:  # calibrating on data the backbone was trained on would pick the schedule on seen samples
        raise ValueError(f"calibration on {dataset}: {'; '.join(leaks)} of {pretrained}: choose a proxy split "
                         "disjoint from the pretraining split")
    source, classes = _load(dataset, proxy_split, max_samples, seed, image_column, label_column)
    data = decode(source)
    proxy_train, proxy_val = split_holdout(data, val_fraction, seed)
    info = DatasetInfo(0, data.images.shape[1], data.images.shape[-1])
    num_classes = len(classes) if classes else int(data.labels.max()) + 1
    config = RunConfig(model=model_name, pretrained=pretrained, strategy="fedavg", seed=seed,
                       num_classes=num_classes)
    device = pick_device()
    trials = []
    started = time.time()
    for lr in lrs:
        start = build_start_model(config, info)  # fresh: same backbone, same seeded head
        schedule = LocalSchedule(1, batch_size, lr, momentum, weight_decay)
        for epoch in range(1, max_epochs + 1):
            try:
                train_local(start.model, proxy_train, start.spec, schedule, device=device,
                            seed=seed * 1000 + epoch)
            except FloatingPointError:  # a learning rate too high for this network: a losing candidate
                trials.append({"lr": lr, "local-epochs": epoch, "val_accuracy": None, "val_loss": None})
                print(f"calibrate: lr={lr:g} epochs={epoch}: diverged (loss not finite)")
                break
            loss, accuracy = evaluate(start.model, proxy_val, start.spec, device=device)
            trials.append({"lr": lr, "local-epochs": epoch, "val_accuracy": accuracy, "val_loss": loss})
            print(f"calibrate: lr={lr:g} epochs={epoch}: proxy val accuracy {accuracy:.4f}, loss {loss:.4f}")
    finished = [t for t in trials if t["val_accuracy"] is not None]
    if not finished:
        raise FloatingPointError(f"calibration: every learning rate diverged ({', '.join(f'{lr:g}' for lr in lrs)}); "
                                 "try smaller ones with --lrs")
    # Best accuracy; ties go to fewer epochs (cheaper rounds), then to the smaller learning rate.
    best = max(finished, key=lambda t: (t["val_accuracy"], -t["local-epochs"], -t["lr"]))
    schedule = {"model": model_name, "pretrained": str(Path(pretrained).resolve()) if Path(pretrained).is_file()
                else pretrained, "lr": best["lr"], "local-epochs": best["local-epochs"], "batch-size": batch_size,
                "momentum": momentum, "weight-decay": weight_decay}
    lines = [f"# Written by fedsq-pretrain --calibrate: centralised calibration on {dataset} split {proxy_split}",
             f"# ({len(proxy_train)} proxy-train / {len(proxy_val)} proxy-val samples, {time.time() - started:.0f} s).",
             "# One schedule for FedSQ and every baseline:  flwr run . --run-config <this file>",
             "# (flwr takes a TOML file alone: add the run's other keys, e.g. dataset, below.)",
             "# Sweep (lr, local-epochs -> proxy val accuracy):"]
    lines += [f"#   {t['lr']:g}, {t['local-epochs']} -> "
              + ("diverged" if t["val_accuracy"] is None else f"{t['val_accuracy']:.4f}") for t in trials]
    lines += [f"{key} = {json.dumps(value)}" for key, value in schedule.items()]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}: lr={best['lr']:g}, local-epochs={best['local-epochs']} "
          f"(proxy val accuracy {best['val_accuracy']:.4f})")
    return {"schedule": schedule, "trials": trials, "best": best, "path": str(out)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsq-pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smallcnn", choices=list(MODELS))
    parser.add_argument("--dataset", default="embedded",
                        help="embedded | Hub id | imagefolder:<dir> | parquet:<dir> | idx:<dir> (as run config)")
    parser.add_argument("--split", default="pretrain",
                        help="source split, may be sliced: 'train[:6000]' (the clients must never see it)")
    parser.add_argument("--max-samples", type=int, default=0, help="random subset of the split (0 = all)")
    parser.add_argument("--image-column", default="")
    parser.add_argument("--label-column", default="")
    parser.add_argument("--classes", default="",
                        help="pretrain on these labels only, e.g. 0-4 (renumbered 0..k-1, as run config classes)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-size", type=int, default=0,
                        help="resize images to this many pixels (0: the data's own); runs from it do the same")
    parser.add_argument("--stem", default="auto", choices=STEMS,
                        help="auto: a small-image stem where the model has one and the input fits it; "
                             "standard: torchvision's own stem (ResNet-18 at 32 px: 15 times fewer FLOPs)")
    parser.add_argument("--out", default=None, help="checkpoint path (default: the cache, found by pretrained='auto')")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calibrate", action="store_true", help="sweep the local lr/epochs and write a run config")
    calib.add_argument("--backbone", default=None,
                       help="calibrate this checkpoint (or 'imagenet') instead of pretraining one")
    calib.add_argument("--proxy-split", default=None,
                       help="calibration data, disjoint from the pretraining split (required with --calibrate)")
    calib.add_argument("--proxy-max-samples", type=int, default=2000)
    calib.add_argument("--lrs", default="0.003,0.01,0.03,0.1", help="comma-separated local learning rates")
    calib.add_argument("--calibrate-epochs", type=int, default=2, help="try 1..N local epochs")
    calib.add_argument("--calibrate-batch-size", type=int, default=32, help="the run's batch-size")
    calib.add_argument("--run-config-out", default="calibrated.toml")
    args = parser.parse_args(argv)
    if args.calibrate and not args.proxy_split:
        parser.error("--calibrate needs --proxy-split: calibration data disjoint from the pretraining split "
                     f"(--split '{args.split}'), e.g. --split 'train[:3000]' --proxy-split 'train[3000:6000]'")
    columns = dict(image_column=args.image_column, label_column=args.label_column)
    backbone = args.backbone
    if backbone is None:
        backbone = pretrain(args.model, args.dataset, args.split, epochs=args.epochs, lr=args.lr,
                            batch_size=args.batch_size, seed=args.seed, out=args.out, max_samples=args.max_samples,
                            classes=args.classes, input_size=args.input_size, stem=args.stem, **columns)
    elif not args.calibrate:
        parser.error("--backbone only makes sense with --calibrate")
    if args.calibrate:
        calibrate(args.model, backbone, args.dataset, args.proxy_split,
                  lrs=tuple(float(x) for x in args.lrs.split(",")), max_epochs=args.calibrate_epochs,
                  batch_size=args.calibrate_batch_size, seed=args.seed, max_samples=args.proxy_max_samples,
                  out=args.run_config_out, **columns)


def add_missing_digests(path: Path) -> None:
    """An older default backbone's sidecar lacks the digests of its pretraining images: add them (the
    embedded 'pretrain' split, all of it, as ``fedsq-prepare`` pretrained it), without retraining."""
    sidecar = Path(f"{path}.json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    source = meta.get("source_data", {})
    if digests.FIELD in meta or (source.get("dataset"), source.get("split"), source.get("max_samples") or 0,
                                 source.get("label_subset") or "") != ("embedded", "pretrain", 0, ""):
        return
    data = decode(load_dataset_split("embedded", "pretrain"))
    meta[digests.FIELD] = digests.sidecar_entry(data.images)
    write_atomic(sidecar, json.dumps(meta, indent=2, sort_keys=True))
    print(f"added the digests of its {len(data)} pretraining images to {sidecar}")


def prepare_main(argv: list[str] | None = None) -> None:
    """Set up the offline default: copy the embedded data into the cache and pretrain the small CNN."""
    parser = argparse.ArgumentParser(prog="fedsq-prepare", description=prepare_main.__doc__)
    parser.add_argument("--force", action="store_true", help="pretrain again even if the backbone exists")
    parser.add_argument("--epochs", type=int, default=8,
                        help="pretraining epochs (the default backbone: 8; fewer only for a quick smoke test)")
    args = parser.parse_args(argv)
    print(f"embedded Fashion-MNIST subset -> {install_embedded_data()}")
    path = default_backbone_path("smallcnn", "embedded")
    if path.is_file() and not args.force:
        print(f"pretrained backbone already there: {path} (use --force to rebuild)")
        add_missing_digests(path)
        return
    pretrain("smallcnn", "embedded", "pretrain", epochs=args.epochs)


if __name__ == "__main__":
    main()
