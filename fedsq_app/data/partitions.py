"""The run's splits and partitions: every process derives the same ones from the same seed.

    train split ──► held-out validation (server only, ``val-fraction``, stratified)
                └─► federated pool ──► partitioner (iid | dirichlet | pathological) ──► one partition per node
    test split  ──► touched once, by the server, at the end

A silo (node config ``data-path``) trains on its own data as is: the silo *is* the partition.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedsq_app.data.sources import DATA_FORMS, DataError, raw_splits, parse_source
from fedsq_app.data.splits import split_dataset, load_split, normalise_columns
from fedsq_app.data.tensors import TensorData, decode
from fedsq_app.util import ConfigError

PARTITIONERS = ("iid", "dirichlet", "pathological")  # run config ``partitioner``

if TYPE_CHECKING:  # flwr_datasets (with pandas, matplotlib) costs seconds to import
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner


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
    def of(cls, config) -> DataKey:
        """From a RunConfig (or anything with its data fields)."""
        return cls(config.dataset, config.partitioner, config.alpha, config.min_partition_size, config.seed,
                   config.val_fraction, config.max_train_samples, config.classes_per_client,
                   config.image_column, config.label_column, config.train_split, config.test_split,
                   config.val_seed, config.classes)

    @property
    def split_seed(self) -> int:
        """Seeds the max-train-samples subset and the validation split: fixed across seeds if val-seed >= 0."""
        return self.seed if self.val_seed < 0 else self.val_seed


@functools.lru_cache(maxsize=4)
def pool_and_validation(key: DataKey) -> tuple[Dataset, Dataset]:
    """Split the train split into the federated pool and the server's validation set (disjoint)."""
    train = load_split(key, "train")
    if key.max_train_samples and key.max_train_samples < len(train):
        train = train.shuffle(seed=key.split_seed).select(range(key.max_train_samples))
    return split_dataset(train, key.val_fraction, key.split_seed)


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
def partition_sizes(key: DataKey, num_partitions: int) -> tuple[int, ...]:
    """Each partition's sample count, as the server computes it: the aggregation weights of partition mode."""
    partitioner = partitioned_pool(key, num_partitions)
    return tuple(len(partitioner.load_partition(pid)) for pid in range(num_partitions))


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
    splits = raw_splits(source)
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
def silo_validation(data_path: str, image_column: str = "", label_column: str = "") -> TensorData | None:
    """A silo's own validation files (a ``validation`` split next to its ``train``, e.g. ``val-images-idx3-ubyte``
    or ``<dir>/validation/<class>/``), decoded; None when it has none."""
    splits = raw_splits(parse_source(data_path, key="data-path"))
    if "validation" not in splits or "train" not in splits:
        return None
    return decode(normalise_columns(splits["validation"], image_column, label_column,
                                    where=f"data-path '{data_path}' split 'validation'"))


@functools.lru_cache(maxsize=2)
def server_split(key: DataKey, split: str) -> TensorData:
    """The server's ``validation`` (held out from train) or ``test`` split, decoded once."""
    if split == "validation":
        return decode(pool_and_validation(key)[1])
    return decode(load_split(key, split))


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int  # 0 = unknown here (a silo): the run config or the backbone's metadata decides
    channels: int
    image_size: int


def _num_classes(dataset: Dataset) -> int:
    from datasets import ClassLabel

    label = dataset.features["label"]
    return label.num_classes if isinstance(label, ClassLabel) else int(max(dataset["label"])) + 1


def class_names(key: DataKey) -> tuple[str, ...]:
    """The label names of the run's dataset, in label order (after ``classes``), or () when it has none."""
    from datasets import ClassLabel

    feature = pool_and_validation(key)[0].features["label"]
    return tuple(feature.names) if isinstance(feature, ClassLabel) else ()


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
