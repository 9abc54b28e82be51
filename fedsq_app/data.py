"""Datasets (embedded, Hugging Face Hub, local files), flwr-datasets partitioning, a decode-once tensor cache.

Where data comes from (run config ``dataset``, or node config ``data-path`` for a silo's own data):

    embedded                      the Fashion-MNIST subset shipped with the package (offline default)
    uoft-cs/cifar10               a Hugging Face Hub id, loaded through flwr-datasets' FederatedDataset
    imagefolder:/data/imgs        <dir>/<class>/*.png, or <dir>/{train,test}/<class>/*.png
    parquet:/data/pq              a directory of *.parquet files (split from file names) or a glob
    idx:/usr/share/datasets/fashion-mnist   MNIST-style (gzip) IDX files: train-*, t10k-* or test-*
    /data/anything                a bare path: the kind is detected from the files in it

Every process (the ServerApp and each ClientApp) derives the same splits from the same seed:

    train split ──► held-out validation (server only, ``val-fraction``, stratified)
                └─► federated pool ──► partitioner (iid | dirichlet | pathological) ──► one partition per node
    test split  ──► touched once, by the server, at the end

A silo (node config ``data-path``) trains on its own data as is: the silo *is* the partition.
Partitions are decoded once per process into uint8 tensors; per-batch preprocessing is a tensor op.
"""

from __future__ import annotations

import functools
import glob
import gzip
import os
import re
import shutil
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fedsq_app.config import ConfigError, NodeConfig, RunConfig, cache_dir, parse_classes

if TYPE_CHECKING:  # datasets, pyarrow and flwr_datasets (with pandas, matplotlib) cost seconds to import: a
    # ClientApp whose partition is in its on-disk cache (fedsq_app/partcache.py) never imports them.
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
EMBEDDED_SPLITS = ("pretrain", "train", "test")
LOCAL_KINDS = ("imagefolder", "parquet", "idx")
IMAGE_COLUMNS = ("image", "img", "pixel_values", "images")  # tried in order when image-column is ""
LABEL_COLUMNS = ("label", "fine_label", "labels", "target", "class")  # CIFAR-100: fine_label before coarse
DERIVED_TEST_FRACTION = 0.2  # a local source with a single split gets this fixed, seed-0 test split
DATA_FORMS = ("'embedded', a Hub id such as 'uoft-cs/cifar10', 'imagefolder:<dir>', 'parquet:<dir or glob>', "
              "'idx:<dir>' (e.g. idx:/usr/share/datasets/fashion-mnist), or an existing directory")


class DataError(ConfigError):
    """A dataset cannot be found, read, or split as configured. Raised before any training."""


# ---------------------------------------------------------------------------------------------- IDX files
def read_idx(path: str | Path) -> np.ndarray:
    """Read an (optionally gzipped) IDX file of unsigned bytes, as MNIST and Fashion-MNIST ship them."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported (type code {dtype_code:#x})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as handle:  # mtime=0: byte-identical rebuilds
        handle.write(header + array.tobytes())


# ---------------------------------------------------------------------------------------------- datasets
def images_to_dataset(images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> Dataset:
    """A ``datasets.Dataset`` with an ``image`` (H×W uint8) and a ClassLabel ``label`` column."""
    import pyarrow as pa
    from datasets import Array2D, ClassLabel, Dataset, Features
    from datasets import DatasetInfo as DatasetInfoHF
    from datasets.features.features import Array2DExtensionType

    _, height, width = images.shape
    features = Features({"image": Array2D((height, width), "uint8"), "label": ClassLabel(names=list(class_names))})
    # Straight into Arrow (about 10x faster than Dataset.from_dict, which walks every row in Python).
    rows = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(images).reshape(-1)), width)
    grid = pa.FixedSizeListArray.from_arrays(rows, height)
    image_type = Array2DExtensionType((height, width), "uint8")
    table = pa.table({"image": pa.ExtensionArray.from_storage(image_type, grid.cast(image_type.storage_dtype)),
                      "label": pa.array(labels.astype(np.int64))})
    return Dataset(table, info=DatasetInfoHF(features=features))


def embedded_dir() -> Path:
    """The prepared copy of the embedded Fashion-MNIST subset (``fedsq-prepare`` fills it)."""
    return cache_dir() / "data" / "fashion-mnist-subset"


def install_embedded_data() -> Path:
    """Copy the subset shipped inside the package into the cache, where every node can read it.

    ``flwr run`` ships the app as a FAB, which carries only source files: data must come from a path.
    """
    target = embedded_dir()
    target.mkdir(parents=True, exist_ok=True)
    shipped = resources.files("fedsq_app") / "embedded"
    for entry in shipped.iterdir():
        if entry.name.endswith(".gz") or entry.name.startswith("LICENSE"):
            with resources.as_file(entry) as source:
                shutil.copyfile(source, target / entry.name)
    return target


def load_embedded_split(split: str) -> Dataset:
    if split not in EMBEDDED_SPLITS:
        raise DataError(f"the embedded dataset has splits {EMBEDDED_SPLITS}, not '{split}'")
    folder = embedded_dir()
    images_file = folder / f"{split}-images-idx3-ubyte.gz"
    if not images_file.is_file():
        raise FileNotFoundError(
            f"embedded dataset not prepared: {images_file} is missing. Run `fedsq-prepare` once "
            "(it copies the shipped Fashion-MNIST subset into the cache and pretrains the default backbone); "
            "set FEDSQ_CACHE_DIR to use another cache directory"
        )
    images = read_idx(images_file)
    labels = read_idx(folder / f"{split}-labels-idx1-ubyte.gz")
    return images_to_dataset(images, labels, FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """Where a dataset lives: ``kind`` is embedded | hub | imagefolder | parquet | idx."""

    kind: str
    location: str  # Hub id or absolute path (or glob, for parquet)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_source(spec: str, key: str = "dataset") -> Source:
    """Turn a ``dataset`` / ``data-path`` value into a Source; missing local paths fail here, by name."""
    spec = spec.strip()
    if spec == "embedded":
        return Source("embedded", "")
    kind, sep, rest = spec.partition(":")
    if sep and kind in LOCAL_KINDS:
        expanded = str(Path(rest).expanduser())
        if kind == "parquet" and glob.has_magic(expanded):
            if not glob.glob(expanded):
                raise DataError(f"{key}='{spec}': no file matches the glob {rest}")
            return Source(kind, expanded)
        path = Path(expanded).resolve()
        if not path.exists():
            raise DataError(f"{key}='{spec}': path {path} does not exist")
        return Source(kind, str(path))
    looks_like_path = spec.startswith(("/", ".", "~")) or Path(spec).exists()
    if looks_like_path:
        path = Path(spec).expanduser().resolve()
        if not path.exists():
            raise DataError(f"{key}='{spec}': path {path} does not exist; {key} may be {DATA_FORMS}")
        return Source(_detect_kind(path), str(path))
    if _HUB_ID.match(spec):
        return Source("hub", spec)
    raise DataError(f"unknown {key} '{spec}': use {DATA_FORMS}")


def _detect_kind(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        raise DataError(f"{path} is a file; point at a directory (imagefolder, parquet or IDX files)")
    names = [p.name for p in path.rglob("*") if p.is_file()]
    if any("idx3-ubyte" in n for n in names):
        return "idx"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    return "imagefolder"


def source_slug(spec: str) -> str:
    """A file-name-safe name for a dataset value (used for cached backbones)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", spec).strip("_") or "data"


def _split_of_file(name: str) -> str:
    name = name.lower()
    if "t10k" in name or "test" in name:
        return "test"
    if "val" in name:
        return "validation"
    return "train"


def _load_idx_dir(path: Path) -> dict[str, Dataset]:
    """``<split>-images-idx3-ubyte[.gz]`` + ``<split>-labels-idx1-ubyte[.gz]`` pairs (``t10k`` = test)."""
    splits = {}
    for images_file in sorted(path.glob("*-images-idx3-ubyte*")):
        prefix = images_file.name.split("-images-")[0]
        suffix = images_file.name.split("idx3-ubyte")[1]
        labels_file = path / f"{prefix}-labels-idx1-ubyte{suffix}"
        if not labels_file.is_file():
            raise DataError(f"{images_file} has no labels file {labels_file.name} next to it")
        images, labels = read_idx(images_file), read_idx(labels_file)
        if len(images) != len(labels):
            raise DataError(f"{images_file}: {len(images)} images but {len(labels)} labels")
        num_classes = int(labels.max()) + 1
        names = FASHION_MNIST_CLASSES if "fashion" in str(path).lower() and num_classes == 10 else \
            tuple(str(i) for i in range(num_classes))
        splits[_split_of_file(prefix)] = images_to_dataset(images, labels, names)
    if not splits:
        raise DataError(f"no IDX files (*-images-idx3-ubyte[.gz]) in {path}")
    return splits


def _load_parquet(location: str) -> dict[str, Dataset]:
    from datasets import load_dataset

    path = Path(location)
    files = sorted(glob.glob(location)) if glob.has_magic(location) else \
        sorted(str(p) for p in (path.rglob("*.parquet") if path.is_dir() else [path]))
    if not files:
        raise DataError(f"no *.parquet files in {location}")
    data_files: dict[str, list[str]] = {}
    for file in files:
        data_files.setdefault(_split_of_file(Path(file).name), []).append(file)
    return dict(load_dataset("parquet", data_files=data_files))


def _load_imagefolder(location: str) -> dict[str, Dataset]:
    from datasets import load_dataset

    try:
        return dict(load_dataset("imagefolder", data_dir=location))
    except Exception as error:  # empty folder, no images, unreadable files
        raise DataError(f"cannot read the imagefolder {location} ({type(error).__name__}: {error}); expected "
                        "<dir>/<class>/*.png or <dir>/{train,test}/<class>/*.png") from error


@functools.lru_cache(maxsize=4)
def _hub_dataset(repo_id: str):
    from flwr_datasets import FederatedDataset

    # FederatedDataset loads lazily; shuffle=False keeps the Hub's order so every process sees the same rows.
    return FederatedDataset(dataset=repo_id, partitioners={"train": 1}, shuffle=False)


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub_split(repo_id: str, split: str) -> Dataset:
    import datasets
    import huggingface_hub

    offline = " (offline mode is on: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)" if datasets.config.HF_HUB_OFFLINE else ""
    if not offline and not _hub_reachable():
        # No route to the Hub: go offline in this process, so a cached copy loads at once instead of
        # after a minute of retries (the same as HF_DATASETS_OFFLINE=1).
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
        offline = " (the Hub is unreachable from here, and the dataset is not in the local cache)"
    try:
        return _hub_dataset(repo_id).load_split(split)
    except ValueError as error:
        if "split" in str(error).lower():
            raise DataError(f"dataset '{repo_id}' has no '{split}' split ({error})") from error
        raise
    except Exception as error:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, timeouts
        _hub_dataset.cache_clear()
        raise DataError(
            f"could not load '{repo_id}' from the Hugging Face Hub{offline}: {type(error).__name__}: {error}. "
            "Without the internet, use local data instead: dataset='idx:/usr/share/datasets/fashion-mnist' "
            "(apt-get install dataset-fashion-mnist), 'imagefolder:<dir>' or 'parquet:<dir>'; or download the "
            "dataset once while online (it stays in $HF_HOME) and run with HF_DATASETS_OFFLINE=1"
        ) from error


@functools.lru_cache(maxsize=4)
def _raw_splits(source: Source) -> dict[str, Dataset]:
    """The source's own splits (not for Hub ids, which load one split at a time)."""
    if source.kind == "idx":
        return _load_idx_dir(Path(source.location))
    if source.kind == "parquet":
        return _load_parquet(source.location)
    if source.kind == "imagefolder":
        return _load_imagefolder(source.location)
    raise AssertionError(source.kind)


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
                      where: str = "the dataset") -> Dataset:
    """Keep just an ``image`` and an integer/ClassLabel ``label`` column, whatever the source called them."""
    from datasets import Array2D, Array3D, ClassLabel, Image, Value

    image = _detect_column(dataset, image_column, IMAGE_COLUMNS, "image", "image-column", where,
                           (Image, Array2D, Array3D))
    label = _detect_column(dataset, label_column, LABEL_COLUMNS, "label", "label-column", where, (ClassLabel,))
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
        dataset = normalise_columns(_load_hub_split(source.location, name), image_column, label_column,
                                    where=f"'{spec}' split '{name}'")
    else:
        dataset = _local_split(source, name, image_column, label_column, spec)
    return _slice(dataset, start, stop) if (start or stop) else dataset


def _local_split(source: Source, name: str, image_column: str, label_column: str, spec: str) -> Dataset:
    splits = _raw_splits(source)
    if "test" not in splits and name in ("train", "test") and len(splits) == 1:
        # One split only (e.g. <dir>/<class>/*.png): carve a fixed test split so that test stays untouched.
        only = normalise_columns(next(iter(splits.values())), image_column, label_column, where=f"'{spec}'")
        parts = _split_dataset(only, DERIVED_TEST_FRACTION, seed=0)
        return parts[0] if name == "train" else parts[1]
    if name not in splits:
        raise DataError(f"'{spec}' has splits {sorted(splits)}, not '{name}'")
    return normalise_columns(splits[name], image_column, label_column, where=f"'{spec}' split '{name}'")


def load_split(config: RunConfig, split: str) -> Dataset:
    """``split`` ('train' / 'test' map to the run config's ``train-split`` / ``test-split``) of ``dataset``,
    restricted to the run config's ``classes``."""
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


def _split_dataset(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
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


# ---------------------------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorData:
    """A decoded split: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _pil_images(images: list) -> np.ndarray:
    """Decode PIL images to one uint8 array: grey stays 1 channel, anything else becomes RGB; sizes unified."""
    mode = "L" if all(im.mode in ("L", "1") for im in images) else "RGB"
    size = Counter(im.size for im in images).most_common(1)[0][0]  # the odd one out is resized
    arrays = [np.asarray(im.convert(mode) if im.size == size else im.convert(mode).resize(size)) for im in images]
    return np.stack(arrays)


def decode(dataset: Dataset) -> TensorData:
    """Decode a whole split once: no PIL decode per epoch, no reload per round."""
    from datasets import Image

    if len(dataset) == 0:
        raise DataError("cannot decode an empty dataset")
    if isinstance(dataset.features["image"], Image):
        images = _pil_images(list(dataset["image"]))
    else:
        images = np.asarray(dataset.with_format("numpy")["image"])
    if images.ndim == 3:  # grey H×W → 1×H×W
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # H×W×C → C×H×W
        images = images.transpose(0, 3, 1, 2)
    labels = np.asarray(dataset.with_format("numpy")["label"], dtype=np.int64)
    return TensorData(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)), torch.from_numpy(labels))


@dataclass(frozen=True)
class InputSpec:
    """How raw uint8 images become model input: channels, size, normalisation of the pretrained weights."""

    channels: int
    size: int  # 0 = native resolution
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        if x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ValueError(f"cannot turn {x.shape[1]}-channel images into {self.channels} channels")
            x = x.expand(-1, self.channels, -1, -1)
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def channel_stats(data: TensorData) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = data.images.float().div(255.0)
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


# ---------------------------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class DataKey:
    """Everything that decides which samples land where; the cache key of the split functions."""

    dataset: str
    partitioner: str
    alpha: float
    min_partition_size: int
    seed: int
    val_fraction: float
    max_train_samples: int
    classes_per_client: int = 2
    image_column: str = ""
    label_column: str = ""
    train_split: str = "train"
    test_split: str = "test"
    val_seed: int = -1  # -1 = seed
    classes: str = ""

    @classmethod
    def of(cls, config: RunConfig) -> DataKey:
        return cls(config.dataset, config.partitioner, config.alpha, config.min_partition_size, config.seed,
                   config.val_fraction, config.max_train_samples, config.classes_per_client,
                   config.image_column, config.label_column, config.train_split, config.test_split,
                   config.val_seed, config.classes)

    @property
    def split_seed(self) -> int:
        """Seeds the max-train-samples subset and the validation split: fixed across seeds if val-seed >= 0."""
        return self.seed if self.val_seed < 0 else self.val_seed


def _config_of(key: DataKey) -> RunConfig:
    return RunConfig(dataset=key.dataset, partitioner=key.partitioner, alpha=key.alpha,
                     min_partition_size=key.min_partition_size, seed=key.seed,
                     val_fraction=key.val_fraction, max_train_samples=key.max_train_samples,
                     classes_per_client=key.classes_per_client, image_column=key.image_column,
                     label_column=key.label_column, train_split=key.train_split, test_split=key.test_split,
                     val_seed=key.val_seed, classes=key.classes)


@functools.lru_cache(maxsize=4)
def pool_and_validation(key: DataKey) -> tuple[Dataset, Dataset]:
    """Split the train split into the federated pool and the server's validation set (disjoint)."""
    train = load_split(_config_of(key), "train")
    if key.max_train_samples and key.max_train_samples < len(train):
        train = train.shuffle(seed=key.split_seed).select(range(key.max_train_samples))
    return _split_dataset(train, key.val_fraction, key.split_seed)


def make_partitioner(key: DataKey, num_partitions: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if key.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if key.partitioner == "pathological":
        return PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                       num_classes_per_partition=key.classes_per_client,
                                       class_assignment_mode="first-deterministic", shuffle=True, seed=key.seed)
    if key.alpha <= 0:
        raise ConfigError(f"alpha must be > 0 for the Dirichlet partitioner, got {key.alpha}")
    return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=key.alpha,
                                min_partition_size=key.min_partition_size, self_balancing=False,
                                shuffle=True, seed=key.seed)


@functools.lru_cache(maxsize=4)
def partitioned_pool(key: DataKey, num_partitions: int) -> Partitioner:
    """The federated pool split into ``num_partitions``, computed eagerly so bad settings fail here."""
    pool, _ = pool_and_validation(key)
    if num_partitions > len(pool):
        raise DataError(f"num-partitions={num_partitions} exceeds the {len(pool)} samples in the federated pool "
                        f"of '{key.dataset}' (raise max-train-samples or use fewer partitions)")
    if key.partitioner == "pathological":
        num_classes = len(set(pool["label"]))
        if key.classes_per_client > num_classes:
            raise DataError(f"classes-per-client={key.classes_per_client} exceeds the {num_classes} classes "
                            f"in '{key.dataset}'")
    partitioner = make_partitioner(key, num_partitions)
    # IidPartitioner shards contiguously: shuffle first, or a label-sorted source gives non-IID shards.
    partitioner.dataset = pool.shuffle(seed=key.seed)
    try:
        partitioner.load_partition(0)  # all partitions are computed on first use
    except ValueError as error:
        raise DataError(f"cannot split {len(pool)} samples of '{key.dataset}' into {num_partitions} "
                        f"{key.partitioner} partitions: {error} (try a lower min-partition-size, a larger alpha "
                        "or fewer partitions)") from error
    return partitioner


@functools.lru_cache(maxsize=4)
def client_partition(key: DataKey, partition_id: int, num_partitions: int) -> TensorData:
    """This node's training data, decoded once per process."""
    partition = partitioned_pool(key, num_partitions).load_partition(partition_id)
    if len(partition) == 0:
        raise DataError(f"partition {partition_id} of {num_partitions} is empty (raise min-partition-size)")
    return decode(partition)


@functools.lru_cache(maxsize=2)
def silo_dataset(data_path: str, image_column: str = "", label_column: str = "") -> Dataset:
    """A silo's own data (node config ``data-path``): its ``train`` split, or its only split. No partitioning."""
    source = parse_source(data_path, key="data-path")
    if source.kind in ("embedded", "hub"):
        raise DataError(f"data-path='{data_path}' must be local data on this node: {DATA_FORMS}")
    splits = _raw_splits(source)
    if "train" in splits:
        dataset = splits["train"]
    elif len(splits) == 1:
        dataset = next(iter(splits.values()))
    else:
        raise DataError(f"data-path='{data_path}' has splits {sorted(splits)}; the silo trains on 'train'")
    return normalise_columns(dataset, image_column, label_column, where=f"data-path '{data_path}'")


@functools.lru_cache(maxsize=2)
def silo_partition(data_path: str, image_column: str = "", label_column: str = "") -> TensorData:
    return decode(silo_dataset(data_path, image_column, label_column))


@functools.lru_cache(maxsize=2)
def server_split(key: DataKey, split: str) -> TensorData:
    """The server's ``validation`` (held out from train) or ``test`` split, decoded once."""
    if split == "validation":
        return decode(pool_and_validation(key)[1])
    return decode(load_split(_config_of(key), split))


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int  # 0 = unknown here (a silo): the run config or the backbone's metadata decides
    channels: int
    image_size: int


def _num_classes(dataset: Dataset) -> int:
    from datasets import ClassLabel

    label = dataset.features["label"]
    return label.num_classes if isinstance(label, ClassLabel) else int(max(dataset["label"])) + 1


def dataset_info(key: DataKey) -> DatasetInfo:
    """Number of classes, image channels and (square) image size, from the federated pool."""
    pool, _ = pool_and_validation(key)
    sample = decode(pool.select(range(1)))
    return DatasetInfo(_num_classes(pool), sample.images.shape[1], sample.images.shape[-1])


def silo_info(data_path: str, image_column: str = "", label_column: str = "") -> DatasetInfo:
    """Channels and image size of a silo's data; its class count is left to the run config / backbone."""
    sample = silo_partition(data_path, image_column, label_column)
    return DatasetInfo(0, sample.images.shape[1], sample.images.shape[-1])


# ---------------------------------------------------------------------------------------------- reports
def partition_report(key: DataKey, num_partitions: int, out_dir: str | Path) -> dict:
    """The server's record of how ``dataset`` is split over ``num_partitions`` nodes (for results.json).

    Partitioning errors (too many partitions, an impossible Dirichlet draw) propagate: they must stop the
    run before any training. A failing plot only logs: it must never end a run.
    """
    if num_partitions < 1:
        return {"skipped": "no nodes connected yet"}
    partitioned_pool(key, num_partitions)
    try:
        png, csv = save_partition_report(key, num_partitions, out_dir)
    except Exception as error:  # matplotlib trouble is not worth a failed run
        return {"num_partitions": num_partitions, "error": f"{type(error).__name__}: {error}"}
    return {"num_partitions": num_partitions, "png": str(png), "csv": str(csv)}


def save_partition_report(key: DataKey, num_partitions: int, out_dir: str | Path) -> tuple[Path, Path]:
    """Plot each partition's label counts (flwr-datasets) to PNG and write the counts as CSV."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt
    from flwr_datasets.visualization import plot_label_distributions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partitioner = partitioned_pool(key, num_partitions)
    figure, _, counts = plot_label_distributions(
        partitioner, label_name="label", plot_type="bar", size_unit="absolute", legend=True,
        legend_title="label", title=f"{key.dataset}: {key.partitioner} over {num_partitions} partitions")
    png, csv = out_dir / "label_distribution.png", out_dir / "label_distribution.csv"
    figure.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(figure)
    counts.to_csv(csv)
    return png, csv


# ---------------------------------------------------------------------------------------------- per node
def node_data(config: RunConfig, node: NodeConfig) -> TensorData:
    """A ClientApp's training data: its silo's own data (``data-path``), else its partition of ``dataset``.

    Read from the node's on-disk cache (fedsq_app/partcache.py) when it holds this exact partition: a fresh
    ClientApp process then never imports datasets.
    """
    from fedsq_app import partcache

    return partcache.node_partition(DataKey.of(config), node)


def node_info(config: RunConfig, node: NodeConfig) -> DatasetInfo:
    """What a ClientApp needs to build its model; a silo never reads the run's (server's) dataset."""
    from fedsq_app import partcache

    if node.data_path:  # channels and size of the silo's own images; classes from the run config or backbone
        images = node_data(config, node).images
        return DatasetInfo(0, images.shape[1], images.shape[-1])
    return partcache.pool_info(DataKey.of(config))
