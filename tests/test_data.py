"""Datasets from local files (imagefolder, parquet, IDX), partitioners, splits, silos, and bad inputs.

Every dataset here is generated in a tmp dir; nothing touches the network or the project's cache.
Each image carries its sample index in its first two pixels, so overlaps between splits are detectable.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from fedsq_app.data import cache, partitions, sources, splits, tensors
from fedsq_app.config import ConfigError, NodeConfig, RunConfig
from fedsq_app.data.partitions import DataKey
from fedsq_app.data.sources import DataError


def _image(index: int, label: int, size: int = 12, mode: str = "RGB") -> np.ndarray:
    rng = np.random.default_rng(index)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    array[0, 0], array[0, 1] = index % 256, index // 256  # identity, survives decoding
    array[1, 1] = label * 20  # a little signal
    return array


def _ids(tensor_data) -> set[int]:
    pixels = tensor_data.images[:, 0, 0, :2].to(torch.int64)
    return set((pixels[:, 0] + 256 * pixels[:, 1]).tolist())


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """MNIST-style gzip IDX files: 300 train and 60 test images (t10k naming, as Debian ships them)."""
    folder = tmp_path_factory.mktemp("idx")
    for prefix, count, offset in (("train", 300, 0), ("t10k", 60, 1000)):
        labels = np.arange(count) % 5
        images = np.stack([_image(offset + i, int(l), size=10, mode="L") for i, l in enumerate(labels)])
        sources.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        sources.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="module")
def imagefolder_dir(tmp_path_factory):
    """<dir>/{train,test}/<class>/*.png with three classes; one train image has an odd size."""
    folder = tmp_path_factory.mktemp("imgs")
    index = 0
    for split, per_class in (("train", 20), ("test", 5)):
        for label, name in enumerate(("cat", "dog", "fox")):
            (folder / split / name).mkdir(parents=True)
            for _ in range(per_class):
                size = 14 if index == 3 else 12
                PILImage.fromarray(_image(index, label, size)).save(folder / split / name / f"{index}.png")
                index += 1
    return folder


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    """CIFAR-100-like parquet files: ``img``, ``fine_label`` and ``coarse_label`` columns."""
    folder = tmp_path_factory.mktemp("pq")
    features = Features({"img": Image(), "fine_label": ClassLabel(num_classes=4), "coarse_label": Value("int64")})
    for split, count, offset in (("train", 80, 0), ("test", 20, 500)):
        labels = [i % 4 for i in range(count)]
        rows = {"img": [PILImage.fromarray(_image(offset + i, l)) for i, l in enumerate(labels)],
                "fine_label": labels, "coarse_label": [l // 2 for l in labels]}
        Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def _key(dataset: str, **overrides) -> DataKey:
    config = {"dataset": dataset, "min-partition-size": 0, "val-fraction": 0.2, **overrides}
    return DataKey.of(RunConfig.from_mapping(config))


# ---------------------------------------------------------------------------------------------- sources
def test_idx_files_load_with_t10k_as_test(idx_dir):
    train = splits.load_dataset_split(f"idx:{idx_dir}", "train")
    test = splits.load_dataset_split(f"idx:{idx_dir}", "test")
    assert (len(train), len(test)) == (300, 60)
    decoded = tensors.decode(train)
    assert decoded.images.shape == (300, 1, 10, 10) and decoded.images.dtype == torch.uint8
    assert decoded.labels.tolist()[:6] == [0, 1, 2, 3, 4, 0]
    # A bare directory is recognised as IDX too, and a split can be sliced.
    assert len(splits.load_dataset_split(str(idx_dir), "train[:40]")) == 40
    assert _ids(tensors.decode(splits.load_dataset_split(str(idx_dir), "train[250:]"))) == set(range(250, 300))


def test_imagefolder_decodes_once_to_one_size(imagefolder_dir):
    train = splits.load_dataset_split(f"imagefolder:{imagefolder_dir}", "train")
    assert train.features["label"].names == ["cat", "dog", "fox"]
    decoded = tensors.decode(train)
    assert decoded.images.shape == (60, 3, 12, 12)  # the 14 px image was resized to the common size
    assert sorted(decoded.labels.tolist()) == [0] * 20 + [1] * 20 + [2] * 20
    assert len(splits.load_dataset_split(f"imagefolder:{imagefolder_dir}", "test")) == 15


def test_parquet_detects_cifar100_style_columns(parquet_dir):
    train = splits.load_dataset_split(f"parquet:{parquet_dir}", "train")
    assert train.column_names == ["image", "label"]
    decoded = tensors.decode(train)
    assert decoded.labels.tolist()[:5] == [0, 1, 2, 3, 0]  # fine_label, not coarse_label
    assert _ids(decoded) == set(range(80))
    coarse = splits.load_dataset_split(f"parquet:{parquet_dir}/*.parquet", "train", label_column="coarse_label")
    assert set(coarse["label"]) == {0, 1} and len(coarse) == 80  # a glob's files split by name too


def test_single_split_imagefolder_gets_a_disjoint_test_split(tmp_path):
    for label in range(2):
        (tmp_path / f"c{label}").mkdir()
        for i in range(label * 25, label * 25 + 25):
            PILImage.fromarray(_image(i, label)).save(tmp_path / f"c{label}" / f"{i}.png")
    train = tensors.decode(splits.load_dataset_split(f"imagefolder:{tmp_path}", "train"))
    test = tensors.decode(splits.load_dataset_split(f"imagefolder:{tmp_path}", "test"))
    assert len(train) + len(test) == 50 and len(test) == 10
    assert not _ids(train) & _ids(test)


# ---------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_the_pool_and_never_the_validation_or_test_data(idx_dir, partitioner):
    key = _key(f"idx:{idx_dir}", partitioner=partitioner, alpha=0.5, **{"classes-per-client": 2})
    pool, validation = partitions.pool_and_validation(key)
    assert len(pool) + len(validation) == 300 and len(validation) == 60
    parts = [partitions.client_partition(key, i, 4) for i in range(4)]
    ids = [_ids(p) for p in parts]
    assert sum(len(p) for p in parts) == len(pool)  # every pool sample lands in exactly one partition
    assert set().union(*ids) == _ids(tensors.decode(pool))
    assert not set().union(*ids) & _ids(partitions.server_split(key, "validation"))
    assert not set().union(*ids) & _ids(partitions.server_split(key, "test"))
    if partitioner == "pathological":
        assert all(len(set(p.labels.tolist())) <= 2 for p in parts)
    # Decoded once per process: the same tensors come back, not a second decode.
    assert partitions.client_partition(key, 0, 4) is parts[0]


def test_same_seed_same_partitions_other_seed_other_partitions(idx_dir):
    first = partitions.client_partition(_key(f"idx:{idx_dir}", seed=1), 0, 3)
    partitions.client_partition.cache_clear(), partitions.partitioned_pool.cache_clear(), partitions.pool_and_validation.cache_clear()
    again = partitions.client_partition(_key(f"idx:{idx_dir}", seed=1), 0, 3)
    other = partitions.client_partition(_key(f"idx:{idx_dir}", seed=2), 0, 3)
    assert _ids(first) == _ids(again) and _ids(first) != _ids(other)


def test_label_distribution_png_and_csv(idx_dir, tmp_path):
    key = _key(f"idx:{idx_dir}", alpha=0.3)
    report = partitions.partition_report(key, 5, tmp_path)
    assert report["png"].endswith("label_distribution.png")
    png = (tmp_path / "label_distribution.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with open(report["csv"]) as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 1 + 5  # header + one row per partition
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == len(partitions.pool_and_validation(key)[0])


# ---------------------------------------------------------------------------------------------- silos
def test_silo_data_path_is_its_own_partition(imagefolder_dir):
    node = NodeConfig.from_mapping({"data-path": f"imagefolder:{imagefolder_dir}"})
    assert node.data_path and node.num_partitions == 1
    config = RunConfig.from_mapping({"dataset": "uoft-cs/cifar10"})  # the server's data: never read here
    silo = cache.node_data(config, node)
    assert len(silo) == 60  # the silo's whole train split, unpartitioned
    assert cache.node_info(config, node) == partitions.DatasetInfo(0, 3, 12)  # classes: run config or backbone


def test_node_config_errors_name_both_modes():
    with pytest.raises(ConfigError, match="data-path"):
        NodeConfig.from_mapping({})
    with pytest.raises(DataError, match="does not exist"):
        cache.node_data(RunConfig(), NodeConfig(data_path="imagefolder:/nonexistent/silo"))


# ---------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_fail_with_clear_errors(idx_dir, parquet_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        splits.load_dataset_split("imagefolder:/nonexistent/dir", "train")
    with pytest.raises(DataError, match="does not exist"):
        splits.load_dataset_split("/nonexistent/dir", "train")
    with pytest.raises(DataError, match="unknown dataset 'cifar10'"):
        splits.load_dataset_split("cifar10", "train")
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        RunConfig.from_mapping({"alpha": 0.0})
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        RunConfig.from_mapping({"alpha": -1.0})
    with pytest.raises(ConfigError, match="partitioner='shards'"):
        RunConfig.from_mapping({"partitioner": "shards"})
    with pytest.raises(DataError, match="exceeds the 240 samples"):
        partitions.partitioned_pool(_key(f"idx:{idx_dir}"), 500)
    with pytest.raises(DataError, match="classes-per-client=9 exceeds the 5 classes"):
        partitions.partitioned_pool(_key(f"idx:{idx_dir}", partitioner="pathological", **{"classes-per-client": 9}), 3)
    with pytest.raises(DataError, match="label-column='nope' is not a column"):
        splits.load_dataset_split(f"parquet:{parquet_dir}", "train", label_column="nope")
    with pytest.raises(DataError, match="has splits"):
        splits.load_dataset_split(f"idx:{idx_dir}", "validation")
    # A parquet file without any label-like column.
    Dataset.from_dict({"img": [PILImage.fromarray(_image(0, 0))], "caption": ["a cat"]},
                      features=Features({"img": Image(), "caption": Value("string")})
                      ).to_parquet(str(tmp_path / "nolabel.parquet"))
    with pytest.raises(DataError, match="no label column .* set run config label-column"):
        splits.load_dataset_split(f"parquet:{tmp_path / 'nolabel.parquet'}", "train")


def test_unreachable_hub_says_how_to_use_local_data():
    # conftest sets HF_DATASETS_OFFLINE=1, so this fails fast and never touches the network.
    with pytest.raises(DataError) as error:
        splits.load_dataset_split("uoft-cs/cifar10", "train")
    message = str(error.value)
    assert "uoft-cs/cifar10" in message and "idx:/usr/share/datasets/fashion-mnist" in message
    assert "imagefolder:" in message


def test_server_reports_bad_data_before_any_training(idx_dir):
    from fedsq_app import server_app

    with pytest.raises(ConfigError, match="does not exist"):
        server_app.load_data(RunConfig.from_mapping({"dataset": "idx:/nonexistent"}))
    with pytest.raises(ConfigError, match="unknown dataset"):
        server_app.load_data(RunConfig.from_mapping({"dataset": "no-such-dataset"}))
