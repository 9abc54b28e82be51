"""One split of a dataset with ``image`` and ``label`` columns: column detection, split slices such as
``train[:6000]``, label subsets (``classes``) and held-out splits."""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

import numpy as np

from fedsq_app.data.sources import (DataError, Source, load_hub_split, raw_splits, load_embedded_split,
                                    parse_source)
from fedsq_app.util import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset

IMAGE_COLUMNS = ("image", "img", "pixel_values", "images")  # tried in order when image-column is ""
LABEL_COLUMNS = ("label", "fine_label", "labels", "target", "class")  # CIFAR-100: fine_label before coarse
DERIVED_TEST_FRACTION = 0.2  # a local source with a single split gets this fixed, seed-0 test split


def _detect_column(dataset: Dataset, wanted: str, candidates: tuple[str, ...], what: str, config_key: str,
                   where: str, feature_types: tuple[type, ...]) -> str:
    columns = list(dataset.column_names)
    if wanted:
        if wanted not in columns:
            raise DataError(f"{config_key}='{wanted}' is not a column of {where}: columns are {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    for name, feature in dataset.features.items():
        if isinstance(feature, feature_types):
            return name
    raise DataError(f"no {what} column in {where}: columns are {columns}; set run config {config_key}='<column>'")


def normalise_columns(dataset: Dataset, image_column: str = "", label_column: str = "",
                      where: str = "the dataset", *, unlabelled: int | None = None) -> Dataset:
    """Keep just an ``image`` and an integer/ClassLabel ``label`` column, whatever the source called them.
    ``unlabelled``: data without a label column is fine, its ``label`` column holds this value (prediction)."""
    from datasets import Array2D, Array3D, ClassLabel, Image, Value

    image = _detect_column(dataset, image_column, IMAGE_COLUMNS, "image", "image-column", where,
                           (Image, Array2D, Array3D))
    try:
        label = _detect_column(dataset, label_column, LABEL_COLUMNS, "label", "label-column", where, (ClassLabel,))
    except DataError:
        if unlabelled is None or label_column:
            raise
        dataset = dataset.select_columns([image]).rename_columns({image: "image"} if image != "image" else {})
        return dataset.add_column("label", [unlabelled] * len(dataset))
    if image == label:
        raise DataError(f"image-column and label-column are both '{image}' in {where}")
    dataset = dataset.select_columns([image, label])
    # Rename through temporary names so that swapped names (e.g. a column called 'label' holding images) work.
    dataset = dataset.rename_columns({image: "__image", label: "__label"})
    dataset = dataset.rename_columns({"__image": "image", "__label": "label"})
    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        return dataset
    if isinstance(feature, Value) and feature.dtype == "string":
        return dataset.class_encode_column("label")  # sorted class names -> 0..C-1
    if isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        if len(dataset) and min(dataset["label"]) < 0:
            raise DataError(f"label column '{label}' of {where} holds negative labels")
        return dataset
    raise DataError(f"label column '{label}' of {where} has type {feature}, expected integers or class names")


_SPLIT = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$")


def parse_split(split: str) -> tuple[str, str, str]:
    """``train``, ``train[:4000]``, ``train[4000:]``, ``train[10%:]`` -> (name, start, stop)."""
    match = _SPLIT.match(split.replace(" ", ""))
    if not match:
        raise DataError(f"bad split '{split}': use a name with an optional slice, e.g. 'train' or 'train[:5000]'")
    return match["name"], match["start"] or "", match["stop"] or ""


def slice_range(length: int, start: str, stop: str) -> range:
    """The rows a split slice such as ``[10%:]`` or ``[:-500]`` selects from a split of ``length`` rows."""
    def index(text: str, default: int) -> int:
        if not text:
            return default
        return int(length * int(text[:-1]) / 100) if text.endswith("%") else int(text)

    return range(*slice(index(start, 0), index(stop, length)).indices(length))


def _slice(dataset: Dataset, start: str, stop: str) -> Dataset:
    return dataset.select(slice_range(len(dataset), start, stop))


def load_dataset_split(spec: str, split: str, *, image_column: str = "", label_column: str = "") -> Dataset:
    """One split of a dataset, with ``image`` and ``label`` columns. ``split`` may carry a slice."""
    return _load_dataset_split(spec, split, image_column, label_column)


@functools.lru_cache(maxsize=8)
def _load_dataset_split(spec: str, split: str, image_column: str, label_column: str) -> Dataset:
    source = parse_source(spec)
    name, start, stop = parse_split(split)
    if source.kind == "embedded":
        dataset = load_embedded_split(name)
    elif source.kind == "hub":
        dataset = normalise_columns(load_hub_split(source.location, name), image_column, label_column,
                                    where=f"'{spec}' split '{name}'")
    else:
        dataset = _local_split(source, name, image_column, label_column, spec)
    return _slice(dataset, start, stop) if (start or stop) else dataset


def _local_split(source: Source, name: str, image_column: str, label_column: str, spec: str) -> Dataset:
    splits = raw_splits(source)
    if "test" not in splits and name in ("train", "test") and len(splits) == 1:
        # One split only (e.g. <dir>/<class>/*.png): carve a fixed test split so that test stays untouched.
        only = normalise_columns(next(iter(splits.values())), image_column, label_column, where=f"'{spec}'")
        parts = split_dataset(only, DERIVED_TEST_FRACTION, seed=0)
        return parts[0] if name == "train" else parts[1]
    if name not in splits:
        raise DataError(f"'{spec}' has splits {sorted(splits)}, not '{name}'")
    return normalise_columns(splits[name], image_column, label_column, where=f"'{spec}' split '{name}'")


def load_split(config, split: str) -> Dataset:
    """``split`` ('train' / 'test' map to ``train-split`` / ``test-split``) of ``dataset``, restricted to
    ``classes``; ``config`` is a RunConfig or a DataKey (both carry these fields)."""
    split = {"train": config.train_split, "test": config.test_split}.get(split, split)
    dataset = load_dataset_split(config.dataset, split, image_column=config.image_column,
                                 label_column=config.label_column)
    return select_classes(dataset, config.classes)


def select_classes(dataset: Dataset, classes: str) -> Dataset:
    """Keep only the labels named by ``classes`` ("5-9", "5,6,7"; "" = all) and renumber them 0..k-1 in
    sorted order: a task on a disjoint part of the label space gets its own, smaller head."""
    from datasets import ClassLabel

    wanted = parse_classes(classes)
    if not wanted:
        return dataset
    labels = np.asarray(dataset.with_format("numpy")["label"], dtype=np.int64)
    missing = sorted(set(wanted) - set(labels.tolist()))
    if missing:
        raise DataError(f"classes='{classes}': labels {missing} do not occur in this split "
                        f"(it has {sorted(set(labels.tolist()))})")
    feature = dataset.features["label"]
    names = [feature.names[c] if isinstance(feature, ClassLabel) else str(c) for c in wanted]
    remap = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    remap[list(wanted)] = np.arange(len(wanted))
    kept = dataset.select(np.flatnonzero(remap[labels] >= 0))
    features = kept.features.copy()
    features["label"] = ClassLabel(names=names)
    return kept.map(lambda batch: {"label": remap[np.asarray(batch["label"])]}, batched=True,
                    features=features, load_from_cache_file=False, keep_in_memory=True)


def split_dataset(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Stratified when possible (ClassLabel with enough samples per class), else a plain random split."""
    from datasets import ClassLabel

    if len(dataset) < 2:
        raise DataError(f"cannot hold out a split from {len(dataset)} sample(s)")
    stratify = "label" if isinstance(dataset.features["label"], ClassLabel) else None
    try:
        parts = dataset.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    except ValueError:  # too few samples of some class to stratify
        parts = dataset.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def parse_classes(text: str) -> tuple[int, ...]:
    """``classes``: "" (all), "5-9", "5,6,7,8,9" or a mix ("0-2,7"); sorted labels, each once."""
    labels: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        low, dash, high = item.partition("-")
        try:
            values = range(int(low), int(high) + 1) if dash else [int(item)]
        except ValueError:
            raise ConfigError(f"classes='{text}': '{item}' is not a label or a range like 5-9") from None
        if not values or min(values) < 0:
            raise ConfigError(f"classes='{text}': '{item}' is an empty range or a negative label")
        labels.update(values)
    return tuple(sorted(labels))
