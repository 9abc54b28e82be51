"""Datasets, flwr-datasets partitioning, and a decode-once tensor cache.

Every process (the ServerApp and each ClientApp) derives the same splits from the same seed:

    train split ──► held-out validation (server only, ``val-fraction``, stratified)
                └─► federated pool ──► partitioner (iid | dirichlet) ──► one partition per node
    test split  ──► touched once, by the server, at the end

Partitions are decoded once per process into uint8 tensors; per-batch preprocessing is a tensor op.
"""

from __future__ import annotations

import functools
import gzip
import shutil
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Array2D, ClassLabel, Dataset, Features
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedsq_app.config import ConfigError, RunConfig, cache_dir

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
EMBEDDED_SPLITS = ("pretrain", "train", "test")


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
    height, width = images.shape[1:3]
    features = Features({"image": Array2D((height, width), "uint8"), "label": ClassLabel(names=list(class_names))})
    return Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=features)


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
        raise ValueError(f"the embedded dataset has splits {EMBEDDED_SPLITS}, not '{split}'")
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


def load_split(config: RunConfig, split: str) -> Dataset:
    if config.dataset == "embedded":
        return load_embedded_split(split)
    raise ConfigError(f"unknown dataset '{config.dataset}'; this build knows 'embedded'")


# ---------------------------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorData:
    """A decoded split: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def decode(dataset: Dataset) -> TensorData:
    """Decode a whole split once: no PIL decode per epoch, no reload per round."""
    columns = dataset.with_format("numpy")
    images = np.asarray(columns["image"])
    if images.ndim == 3:  # grey H×W → 1×H×W
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # H×W×C → C×H×W
        images = images.transpose(0, 3, 1, 2)
    return TensorData(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                      torch.from_numpy(np.asarray(columns["label"], dtype=np.int64)))


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

    @classmethod
    def of(cls, config: RunConfig) -> DataKey:
        return cls(config.dataset, config.partitioner, config.alpha, config.min_partition_size, config.seed,
                   config.val_fraction, config.max_train_samples)


def _config_of(key: DataKey) -> RunConfig:
    return RunConfig(dataset=key.dataset, partitioner=key.partitioner, alpha=key.alpha,
                     min_partition_size=key.min_partition_size, seed=key.seed,
                     val_fraction=key.val_fraction, max_train_samples=key.max_train_samples)


@functools.lru_cache(maxsize=4)
def pool_and_validation(key: DataKey) -> tuple[Dataset, Dataset]:
    """Split the train split into the federated pool and the server's validation set (disjoint)."""
    train = load_split(_config_of(key), "train")
    if key.max_train_samples and key.max_train_samples < len(train):
        train = train.shuffle(seed=key.seed).select(range(key.max_train_samples))
    stratify = "label" if isinstance(train.features["label"], ClassLabel) else None
    try:
        parts = train.train_test_split(test_size=key.val_fraction, seed=key.seed, stratify_by_column=stratify)
    except ValueError:  # too few samples of some class to stratify: fall back to a plain random split
        parts = train.train_test_split(test_size=key.val_fraction, seed=key.seed)
    return parts["train"], parts["test"]


def make_partitioner(key: DataKey, num_partitions: int) -> Partitioner:
    if key.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=key.alpha,
                                min_partition_size=key.min_partition_size, self_balancing=False,
                                shuffle=True, seed=key.seed)


@functools.lru_cache(maxsize=4)
def partitioned_pool(key: DataKey, num_partitions: int) -> Partitioner:
    pool, _ = pool_and_validation(key)
    if num_partitions > len(pool):
        raise ConfigError(f"num-partitions={num_partitions} exceeds the {len(pool)} samples in the federated pool")
    partitioner = make_partitioner(key, num_partitions)
    # IidPartitioner shards contiguously: shuffle first, or a label-sorted source gives non-IID shards.
    partitioner.dataset = pool.shuffle(seed=key.seed)
    return partitioner


@functools.lru_cache(maxsize=4)
def client_partition(key: DataKey, partition_id: int, num_partitions: int) -> TensorData:
    """This node's training data, decoded once per process."""
    return decode(partitioned_pool(key, num_partitions).load_partition(partition_id))


@functools.lru_cache(maxsize=2)
def server_split(key: DataKey, split: str) -> TensorData:
    """The server's ``validation`` (held out from train) or ``test`` split, decoded once."""
    if split == "validation":
        return decode(pool_and_validation(key)[1])
    return decode(load_split(_config_of(key), split))


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int
    image_size: int


def dataset_info(key: DataKey) -> DatasetInfo:
    """Number of classes, image channels and (square) image size, from the federated pool."""
    pool, _ = pool_and_validation(key)
    label = pool.features["label"]
    num_classes = label.num_classes if isinstance(label, ClassLabel) else int(max(pool["label"])) + 1
    sample = decode(pool.select(range(1)))
    return DatasetInfo(num_classes, sample.images.shape[1], sample.images.shape[-1])
