"""A node's decoded training data on its own disk, so a fresh ClientApp process skips datasets entirely.

In deployment Flower starts a new ClientApp process for every message. Without this cache each one would
import ``datasets``/``flwr_datasets`` (seconds) and load, split and partition the whole dataset again, only to
arrive at the same few thousand uint8 images. The first process on a node does that once and writes the
result to ``$FEDSQ_CACHE_DIR/partitions/<source>-<partition>-<key hash>.safetensors`` (uint8 images, int64
labels) and the dataset facts the model is built from (classes, channels, size) to ``...-info-<hash>.json``;
later processes read those files (milliseconds).

The key holds everything that decides the partition: every ``DataKey`` field (dataset, partitioner, alpha,
seed, splits, columns, ...), the partition id and count (or the silo's ``data-path`` and columns), a
fingerprint of the source files (names, sizes, modification times), the versions of datasets/flwr-datasets
and a digest of the code that splits (the ``fedsq_app.data`` modules). The file name carries the key's hash and the file
repeats the key in its metadata: a different key never reads another key's file, and a file whose stored key
differs (or that cannot be read) is rebuilt. Writes go to a temporary file in the same directory, then
``os.replace`` (``write_atomic``): two processes building at once each write their own temporary file and the rename is atomic,
so a reader sees a whole file or none. Hub datasets are keyed by their id (the Hub copy in ``$HF_HOME`` is
not fingerprinted). safetensors only: no pickle.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedsq_app.data import partitions, sources, splits, tensors
from fedsq_app.data.partitions import (DataKey, DatasetInfo, client_partition, dataset_info, silo_partition,
                                       silo_validation)
from fedsq_app.data.sources import embedded_dir, parse_source, source_slug
from fedsq_app.data.tensors import TensorData, stratified_holdout
from fedsq_app.util import cache_dir, source_digest, write_atomic

log = logging.getLogger(__name__)
FORMAT = 1


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """Digest of the code that loads, filters, splits and partitions (by module, wherever its files are)."""
    return source_digest(sources, splits, partitions, tensors)


def source_files(spec: str, config_key: str = "dataset") -> list[Path]:
    """The files a local source reads (empty for a Hub id, whose copy lives in $HF_HOME). ``config_key``
    names the setting in errors (``dataset`` or a silo's ``data-path``)."""
    source = parse_source(spec, key=config_key)
    if source.kind == "hub":
        return []
    if source.kind == "parquet" and glob.has_magic(source.location):
        return sorted(Path(p) for p in glob.glob(source.location))
    root = embedded_dir() if source.kind == "embedded" else Path(source.location)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def source_fingerprint(spec: str, config_key: str = "dataset") -> list:
    """(path, size, mtime_ns) of every file of a local source: replaced or edited data changes the key."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in source_files(spec, config_key)]


def entry_key(what: dict, spec: str, config_key: str = "dataset") -> dict:
    """``what`` (the settings that select the data) plus the source's files, the code and the libraries."""
    return {"format": FORMAT, **what, "source": source_fingerprint(spec, config_key), "code": code_hash(),
            "versions": {p: _version(p) for p in ("datasets", "flwr-datasets", "numpy")}}


def partition_key(key: DataKey, node) -> dict:
    """Everything that decides this node's training data (JSON-able)."""
    if node.data_path:
        return entry_key({"data-path": node.data_path, "image-column": key.image_column,
                          "label-column": key.label_column}, node.data_path, "data-path")
    return entry_key({"data-key": dataclasses.asdict(key), "partition-id": node.partition_id,
                      "num-partitions": node.num_partitions}, key.dataset)


def cache_path(key: dict, suffix: str = ".safetensors") -> Path:
    """``partitions/<source>-<which>-<hash of the whole key>``: a new key never finds an old file."""
    text = json.dumps(key, sort_keys=True)
    name = key.get("data-path") or key["data-key"]["dataset"]
    which = "silo" if "data-path" in key else \
        f"p{key['partition-id']}of{key['num-partitions']}" if "partition-id" in key else "info"
    return cache_dir() / "partitions" / \
        f"{source_slug(name)[:40]}-{which}-{hashlib.sha256(text.encode()).hexdigest()[:16]}{suffix}"


def read(path: Path, key: dict) -> TensorData | None:
    """The cached tensors if ``path`` holds them for exactly ``key``, else None."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            if json.loads((handle.metadata() or {}).get("key", "null")) != key:
                return None
            return TensorData(handle.get_tensor("images"), handle.get_tensor("labels"))
    except Exception:  # missing, truncated or foreign file: rebuild
        return None


def write_tensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Atomically (``write_atomic``): a reader sees the whole file or none."""
    write_atomic(path, lambda tmp: save_file({name: tensor.contiguous() for name, tensor in tensors.items()},
                                             str(tmp), metadata=metadata))


def write(path: Path, key: dict, part: TensorData) -> None:
    write_tensors(path, {"images": part.images, "labels": part.labels}, {"key": json.dumps(key)})


def _store(path: Path, what: str, value, save):
    """``save()`` it (a failure only logs: a read-only cache still trains, only slower next time); ``value``."""
    try:
        save()
        log.info("partition cache: wrote %s (%s)", path, what)
    except OSError as error:
        log.warning("partition cache: cannot write %s (%s)", path, error)
    return value


@functools.lru_cache(maxsize=4)
def node_partition(key: DataKey, node) -> TensorData:
    """This node's training data: from its on-disk cache, else built (``partitions``) and cached."""
    entry = partition_key(key, node)
    path = cache_path(entry)
    cached = read(path, entry)
    if cached is not None:
        return cached
    if node.data_path:
        part = silo_partition(node.data_path, key.image_column, key.label_column)
    else:
        part = client_partition(key, node.partition_id, node.num_partitions)
    return _store(path, f"{len(part)} samples", part, lambda: write(path, entry, part))


@functools.lru_cache(maxsize=4)
def silo_validation_files(key: DataKey, node) -> TensorData | None:
    """A silo's own validation files, through the same on-disk cache (an empty entry records "none")."""
    entry = {**partition_key(key, node), "split": "validation"}
    path = cache_path(entry)
    cached = read(path, entry)
    if cached is not None:
        return cached if len(cached) else None
    part = silo_validation(node.data_path, key.image_column, key.label_column)
    stored = part if part is not None else TensorData(torch.zeros((0, 1, 1, 1), dtype=torch.uint8),
                                                      torch.zeros(0, dtype=torch.int64))
    return _store(path, f"{len(stored)} validation samples", part, lambda: write(path, entry, stored))


@functools.lru_cache(maxsize=4)
def node_splits(config, node) -> tuple[TensorData, TensorData | None]:
    """(what the node trains on, what it validates on) for ``config`` (RunConfig) and ``node`` (NodeConfig).

    Without federated evaluation (``fraction-evaluate`` = 0) a node trains on all its data, exactly as
    before. With it, a silo's own validation files are used if it has them (it then trains on all of its
    ``train``); otherwise the node holds out ``val-fraction`` (node config; default the run config's
    ``local-val-fraction``) of its data, stratified and seeded, and trains on the rest: a node never
    validates on what it trains on."""
    data = node_data(config, node)
    if config.fraction_evaluate <= 0:
        return data, None
    key = DataKey.of(config)
    own = silo_validation_files(key, node) if node.data_path else None
    if own is not None:
        return data, own
    fraction = node.val_fraction if node.val_fraction > 0 else config.local_val_fraction
    return stratified_holdout(data, fraction, seed=key.split_seed * 1_000_003 + node.partition_id)


@functools.lru_cache(maxsize=4)
def pool_info(key: DataKey) -> DatasetInfo:
    """Classes, channels and image size of the run's dataset (what a ClientApp builds its model from)."""
    entry = entry_key({"data-key": dataclasses.asdict(key)}, key.dataset)
    path = cache_path(entry, ".json")
    try:
        stored = json.loads(path.read_text())
        if stored["key"] == entry:
            return DatasetInfo(**stored["info"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    info = dataset_info(key)

    return _store(path, "dataset facts", info,
                  lambda: write_atomic(path, json.dumps({"key": entry, "info": dataclasses.asdict(info)})))


def node_data(config, node) -> TensorData:
    """A ClientApp's training data (``config``: its RunConfig; ``node``: its NodeConfig): its silo's own data
    (``data-path``), else its partition of ``dataset``. Read from the node's on-disk cache when it holds this
    exact partition: a fresh ClientApp process then never imports datasets."""
    return node_partition(DataKey.of(config), node)


def node_info(config, node) -> DatasetInfo:
    """What a ClientApp needs to build its model; a silo never reads the run's (server's) dataset."""
    if node.data_path:  # channels and size of the silo's own images; classes from the run config or backbone
        images = node_data(config, node).images
        return DatasetInfo(0, images.shape[1], images.shape[-1])
    return pool_info(DataKey.of(config))


def clear_memory() -> None:
    """Forget what this process has read (tests)."""
    node_partition.cache_clear()
    silo_validation_files.cache_clear()
    node_splits.cache_clear()
    pool_info.cache_clear()
    code_hash.cache_clear()
