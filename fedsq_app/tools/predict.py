"""``fedsq-predict``: a finished run's model on new images -> a CSV of predictions (and accuracy where labelled).

    fedsq-predict outputs/fedsq-smallcnn-embedded-s42 --out predictions.csv          # the run's own test split
    fedsq-predict RUN_DIR --dataset imagefolder:/data/new --split test --out new.csv
    fedsq-predict path/to/best_model.safetensors --backbone path/to/backbone.safetensors --out p.csv

The CSV has one row per image: its id (row index in the split, or its file path for image folders), the
predicted class, and the top-k classes with their probabilities. Where the data has labels, the label too, a
line ``accuracy: 0.8745`` on standard output, and a confusion matrix drawn next to the CSV.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedsq_app.data.partitions import DataKey, server_split
from fedsq_app.data.sources import DataError, parse_source, raw_splits
from fedsq_app.data.splits import load_dataset_split, normalise_columns, parse_split, slice_range
from fedsq_app.data.tensors import TensorData, decode
from fedsq_app.trained import Trained, TrainedModelError, load_trained
from fedsq_app.util import ConfigError, write_atomic


@dataclass
class Images:
    """Images to predict: uint8 (N, C, H, W), labels (or None), and an id per image."""

    images: torch.Tensor
    labels: torch.Tensor | None
    ids: list[str]
    where: str


def _file_paths(dataset) -> list[str] | None:
    """Each row's file path, when the image column keeps one (image folders)."""
    from datasets import Image

    try:
        raw = dataset.cast_column("image", Image(decode=False))["image"]
    except Exception:  # an array column: no files behind it
        return None
    paths = [row.get("path") if isinstance(row, dict) else None for row in raw]
    return paths if all(paths) else None


UNLABELLED = -1


def _local_split(spec: str, split: str | None):
    """A split of local files, whole and as stored (a folder of new images is one split, none held out), with
    or without labels."""
    source = parse_source(spec)
    splits = raw_splits(source)
    if split is None:
        if len(splits) != 1 and "test" not in splits:
            raise DataError(f"'{spec}' has splits {sorted(splits)}: choose one with --split")
        split = "test" if "test" in splits else next(iter(splits))
    name, start, stop = parse_split(split)
    if name not in splits:
        raise DataError(f"'{spec}' has splits {sorted(splits)}, not '{name}'")
    dataset = normalise_columns(splits[name], where=f"'{spec}' split '{name}'", unlabelled=UNLABELLED)
    if start or stop:
        dataset = dataset.select(slice_range(len(dataset), start, stop))
    return dataset, split


def read_images(trained: Trained, dataset: str | None, split: str | None) -> Images:
    """The images to predict: the run's own dataset and test split by default, as the server tested on."""
    config = trained.config
    if dataset is None or dataset == config.dataset:
        key = replace(DataKey.of(config), test_split=split or config.test_split)
        data = server_split(key, "test")  # the same decoding and class selection as the server's test
        ids = [str(i) for i in range(len(data))]
        return Images(data.images, data.labels, ids, f"'{config.dataset}' split '{key.test_split}'")
    if parse_source(dataset).kind in ("embedded", "hub"):
        split = split or "test"
        loaded = load_dataset_split(dataset, split)
    else:
        loaded, split = _local_split(dataset, split)
    decoded: TensorData = decode(loaded)
    ids = _file_paths(loaded) or [str(i) for i in range(len(decoded))]
    labels = None if (decoded.labels == UNLABELLED).all() else decoded.labels
    return Images(decoded.images, labels, ids, f"'{dataset}' split '{split}'")


def predict(trained: Trained, images: torch.Tensor, *, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Probabilities (N, num_classes), batch by batch, with a progress bar."""
    from tqdm import tqdm

    trained.check_images(images[:1])
    batches = range(0, len(images), batch_size)
    out = [trained.predict_proba(images[start: start + batch_size]).cpu()
           for start in tqdm(batches, desc="predicting", unit="batch", disable=not progress, file=sys.stderr)]
    return torch.cat(out) if out else torch.empty(0, trained.num_classes)


def write_csv(path: Path, ids: list[str], probabilities: torch.Tensor, labels: torch.Tensor | None, top_k: int,
              names: list[str]) -> None:
    """One row per image: id, predicted class (and its name, where the run's dataset names its classes), the
    label where there is one, then the top-k classes with their probabilities."""
    k = min(top_k, probabilities.shape[1])
    top_p, top_c = probabilities.topk(k, dim=1)
    header = ["id", "predicted"] + (["predicted_name"] if names else []) + (["label"] if labels is not None else [])
    header += [f"{what}_{rank}" for rank in range(1, k + 1) for what in ("class", "probability")]

    def rows():
        for i, sample in enumerate(ids):
            row = [sample, int(top_c[i, 0])] + ([names[int(top_c[i, 0])]] if names else [])
            row += [int(labels[i])] if labels is not None else []
            for rank in range(k):
                row += [int(top_c[i, rank]), f"{float(top_p[i, rank]):.6f}"]
            yield row

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows())

    write_atomic(path, write)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def plot_confusion(path: Path, matrix: np.ndarray, title: str, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(matrix) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    if len(matrix) <= 20:
        for (row, col), count in np.ndenumerate(matrix):
            axes.text(col, row, str(count), ha="center", va="center", fontsize=8,
                      color="white" if count > matrix.max() / 2 else "black")
    axes.set(xlabel="predicted class", ylabel="true class", title=title,
             xticks=range(len(matrix)), yticks=range(len(matrix)))
    if names:
        axes.set_xticklabels(names, rotation=45, ha="right")
        axes.set_yticklabels(names)
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedsq-predict", description="Predict with a finished run's model: a CSV of predictions, and "
        "accuracy plus a confusion matrix where the data has labels.")
    parser.add_argument("model", help="the run's output directory, or a best_model.safetensors (with its .json)")
    parser.add_argument("--dataset", help="data to predict, in any form docs/DATA.md lists (embedded, idx:<dir>, "
                        "imagefolder:<dir>, parquet:<dir>, a Hub id); default: the run's own dataset")
    parser.add_argument("--split", help="the split (slices allowed: test[:500]); default: the run's test split")
    parser.add_argument("--out", required=True, type=Path, help="the CSV to write")
    parser.add_argument("--backbone", help="S's pretrained weights, if not where the run found them")
    parser.add_argument("--top-k", type=int, default=3, help="classes and probabilities per row (default 3)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.top_k < 1:
        parser.error("--batch-size and --top-k must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    trained = load_trained(args.model, backbone=args.backbone, device=args.device)
    data = read_images(trained, args.dataset, args.split)
    if data.labels is not None and len(data.labels) and int(data.labels.max()) >= trained.num_classes:
        raise TrainedModelError(f"{data.where} has labels up to {int(data.labels.max())}, but the model predicts "
                                f"{trained.num_classes} classes: another class set than the run trained on")
    probabilities = predict(trained, data.images, batch_size=args.batch_size, progress=not args.no_progress)
    write_csv(args.out, data.ids, probabilities, data.labels, args.top_k, trained.class_names)
    summary = {"images": len(data.ids), "csv": str(args.out)}
    print(f"predictions: {len(data.ids)} images of {data.where} -> {args.out}")
    if data.labels is not None and len(data.labels):
        predicted = probabilities.argmax(dim=1).numpy()
        accuracy = float((predicted == data.labels.numpy()).mean())
        png = args.out.with_suffix(".confusion.png")
        plot_confusion(png, confusion_matrix(data.labels.numpy(), predicted, trained.num_classes),
                       f"{data.where}: accuracy {accuracy:.4f}", trained.class_names)
        print(f"accuracy: {accuracy:.4f}")
        print(f"confusion matrix: {png}")
        summary.update(accuracy=accuracy, confusion_png=str(png))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (TrainedModelError, DataError, ConfigError, FileNotFoundError) as error:
        print(f"fedsq-predict: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
