"""Where data comes from: the run config's ``dataset`` or a silo's node config ``data-path``, loaded as
``datasets.Dataset`` splits.

    embedded                      the Fashion-MNIST subset shipped with the package (offline default)
    uoft-cs/cifar10               a Hugging Face Hub id, loaded through flwr-datasets' FederatedDataset
    imagefolder:/data/imgs        <dir>/<class>/*.png, or <dir>/{train,test}/<class>/*.png
    parquet:/data/pq              a directory of *.parquet files (split from file names) or a glob
    idx:/usr/share/datasets/fashion-mnist   MNIST-style (gzip) IDX files: train-*, t10k-* or test-*
    /data/anything                a bare path: the kind is detected from the files in it

Columns, slices and label subsets: ``splits.py``; decoding: ``tensors.py``; the run's splits and
partitions: ``partitions.py``.
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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

from fedsq_app.util import ConfigError, cache_dir

if TYPE_CHECKING:  # datasets and pyarrow cost seconds to import: a ClientApp whose partition is in its
    # on-disk cache (fedsq_app.data.cache) never imports them.
    from datasets import Dataset

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
EMBEDDED_SPLITS = ("pretrain", "train", "test")
LOCAL_KINDS = ("imagefolder", "parquet", "idx")
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


def load_hub_split(repo_id: str, split: str) -> Dataset:
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
def raw_splits(source: Source) -> dict[str, Dataset]:
    """The source's own splits (not for Hub ids, which load one split at a time)."""
    if source.kind == "idx":
        return _load_idx_dir(Path(source.location))
    if source.kind == "parquet":
        return _load_parquet(source.location)
    if source.kind == "imagefolder":
        return _load_imagefolder(source.location)
    raise AssertionError(source.kind)
