"""Typed run and node configuration, validated once where a run starts.

Flower hands apps a flat ``{"key-name": value}`` mapping (``[tool.flwr.app.config]`` merged with
``--run-config``; ``run_simulation`` hands an empty one), so every default also lives here.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from fedsq_app.core.aggregation import AGGREGATIONS
from fedsq_app.core.weights import WEIGHT_MODES
from fedsq_app.core.judge import REPLY_JUDGES, VALIDATION_JUDGE
from fedsq_app.core.defenses import (DEFAULT_CLIP_MULTIPLIER, DEFAULT_DEVIATION_BOUND, DEFAULT_DIRECTION_CHECK,
                                     DEFAULT_INFLUENCE_BOUND)
from fedsq_app.data.partitions import PARTITIONERS
from fedsq_app.data.splits import parse_classes
from fedsq_app.runtime.checkpoint import CHECKPOINT_FILE
from fedsq_app.runtime.models import MODELS
from fedsq_app.runtime.strategies import STRATEGIES
from fedsq_app.util import ConfigError

__all__ = ["ConfigError", "NodeConfig", "RunConfig"]


# Keys of earlier versions whose mechanism the trust model replaced: named, so an old config fails clearly.
REMOVED_KEYS = {
    "max-update-norm-ratio": "the distance guard is replaced by norm clipping of every update (clip-multiplier)",
    "max-num-examples-ratio": "weights are the server's (partition sizes, silo-sizes, or equal), never a "
                              "clipped num-examples claim",
    "max-num-examples": "weights are the server's (partition sizes, silo-sizes, or equal), never a claim",
    "direction-bound": "each silo's pull on the mean is bounded in every direction (influence-bound)",
}


# The server's defences switched off: each method aggregates as its paper describes it (a plain weighted mean
# of every valid reply). The keys of the trust model, for runs and benchmarks that compare against it.
DEFENCES_OFF: dict[str, Any] = {"clip-multiplier": 0.0, "influence-bound": 0.0, "deviation-bound": 0.0,
                                "bn-clamp": False, "direction-check": 0.0, "min-valid-replies": 1}
DEFENCE_KEYS = (*DEFENCES_OFF, "reply-judge", "aggregation", "trim-fraction")


@dataclass(frozen=True)
class RunConfig:
    strategy: str = "fedsq"
    model: str = "smallcnn"
    pretrained: str = "auto"  # auto | imagenet | none | /path/to/checkpoint.safetensors
    dataset: str = "embedded"
    num_server_rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    partitioner: str = "dirichlet"
    alpha: float = 0.3
    min_partition_size: int = 10
    seed: int = 42
    val_fraction: float = 0.1
    max_train_samples: int = 0  # 0 = use the whole training split (a smaller value is for quick tests)
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    round_timeout: float = 600.0
    device: str = "auto"  # auto | cpu | cuda
    out_dir: str = "outputs"
    run_name: str = ""
    # Reliability (docs/RELIABILITY.md).
    min_available_nodes: int = 2  # Flower waits (forever) until this many nodes are connected
    min_valid_replies: int = 3  # fewer valid replies: the round keeps the previous model; 2 = two-silo mode
    clip_multiplier: float = DEFAULT_CLIP_MULTIPLIER  # two-silo rounds: clip updates to k x the median norm; 0 = off
    influence_bound: float = DEFAULT_INFLUENCE_BOUND  # a silo's pull on the mean <= this x median update norm
    deviation_bound: float = DEFAULT_DEVIATION_BOUND  # an update's distance from the median one <= this x the
    # round's median distance (x a size factor); 0 = off
    bn_clamp: bool = True  # clamp each reply's BN statistics into the other replies' range (from 3 replies)
    direction_check: float = DEFAULT_DIRECTION_CHECK  # τ > 0: judge a reply whose update's cosine with the round's
    # median update is below −τ, or that the bound scaled (reply-judge); 0 = off
    reply_judge: str = VALIDATION_JUDGE  # validation: such a reply is rejected when the round's aggregate has a lower
    # loss on the server's validation split without it (the repeat rule without server validation) | repeat: a reply
    # against the median is rejected when the node's previous one was too
    silo_sizes: str = ""  # deployment, a path on the coordinator: JSON {registered name or key sha256: size}
    weights: str = "auto"  # auto | partitions | silo-sizes | equal: where each node's aggregation weight comes from
    aggregation: str = "mean"  # mean (FedAvg's weighted mean) | median | trimmed-mean (Byzantine-robust)
    trim_fraction: float = 0.2  # trimmed-mean: share of largest and smallest values dropped; krum, multi-krum,
    # bulyan: share of the replies assumed hostile
    allow_pretrain_overlap: bool = False  # true: run even if train/test split overlaps the backbone's pretraining
    resume_from: str = ""  # a previous run's output dir: continue from its last checkpoint
    # Data and backbones (docs/DATA.md).
    num_classes: int = 0  # 0 = from the server's data (silos: from the backbone's metadata)
    classes_per_client: int = 2  # the pathological partitioner's classes per partition
    image_column: str = ""  # "" = detect (image, img, ...)
    label_column: str = ""  # "" = detect (label, fine_label, ...); CIFAR-100: fine_label
    train_split: str = "train"  # may carry a slice, e.g. train[6000:] when train[:6000] pretrained S
    test_split: str = "test"
    # Baselines and diagnostics (docs/RESULTS.md).
    proximal_mu: float = 0.01  # fedprox: (mu/2)·||w - w_global||² on the trained parameters
    server_lr: float = 0.003  # fedadam, fedsq-adam: server step (Flower: eta); Reddi et al. EMNIST-CNN: 10^-2.5
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 0.001  # Adam's adaptivity (Flower's tau)
    probe_size: int = 64  # validation images for the per-round gate-disagreement diagnostic; 0 = off
    server_momentum: float = 0.5  # fedsq-m: FedAvgM's server momentum on Q (server learning rate 1)
    warmup_rounds: int = 2  # fedsq-warmup: FedAvg rounds before S is frozen at the global model
    patience: int = 0  # > 0: stop after this many rounds without a new best validation accuracy; 0 = off
    val_seed: int = -1  # -1 = seed; >= 0 fixes the validation split (and max-train-samples subset) across seeds
    classes: str = ""  # "" = all labels; "5-9" or "5,6,7": keep these labels only, remapped to 0..k-1
    # Paper preset on a GPU (docs/RESULTS.md).
    augment: bool = False  # random crop (4 px padding) + horizontal flip of training images
    input_size: int = 0  # 0 = the backbone's default; e.g. 224 for ImageNet weights at their native size
    # Performance (docs/PERFORMANCE.md).
    mask_cache: str = "auto"  # S's masks cached per client; auto: on when exact (no augmentation) and they fit
    mask_cache_max_mb: float = 1024.0  # cap on all mask caches of one process; over it: S runs every step
    amp: str = "off"  # bf16: Q under bfloat16 autocast, S's masks still decided in fp32
    # Federated evaluation: each node's own validation data (docs/DEPLOYMENT.md, "Each silo's validation").
    fraction_evaluate: float = 0.0  # share of nodes asked each round for their own validation accuracy; 0 = off
    local_val_fraction: float = 0.1  # a node's held-out share when it has no validation split of its own
    server_validation: bool = True  # false: the server holds no validation data; BVA from the nodes' accuracy
    evaluate_every: int = 1  # ask the nodes every k rounds (and in the last round); other rounds: no node validation

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config: unknown keys, wrong types and bad ranges raise ``ConfigError``."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values = {}
        for key, value in mapping.items():
            if key in REMOVED_KEYS:
                raise ConfigError(f"run-config key '{key}' is gone: {REMOVED_KEYS[key]} (docs/RELIABILITY.md)")
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(
                    f"unknown run-config key '{key}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
                )
            field = known[key]
            values[field.name] = _coerce(key, value, field.type)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        _choice("strategy", self.strategy, tuple(STRATEGIES))
        _choice("model", self.model, tuple(MODELS))
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        for key in ("num-server-rounds", "local-epochs", "batch-size", "min-train-nodes", "min-available-nodes",
                    "min-valid-replies"):
            _at_least(key, getattr(self, key.replace("-", "_")), 1)
        for key in ("min-partition-size", "max-train-samples", "seed"):
            _at_least(key, getattr(self, key.replace("-", "_")), 0)
        if self.clip_multiplier != 0 and self.clip_multiplier < 1:
            raise ConfigError(f"clip-multiplier must be 0 (off) or >= 1 (a multiple of the round's median update "
                              f"norm: below 1 it clips half the honest updates every round), got {self.clip_multiplier}")
        if self.deviation_bound != 0 and self.deviation_bound < 1:
            raise ConfigError(f"deviation-bound must be 0 (off) or >= 1 (a multiple of the round's median distance "
                              f"from the median update: below 1 it cuts half the honest updates), got "
                              f"{self.deviation_bound}")
        if not 0 <= self.influence_bound <= 1:
            raise ConfigError(f"influence-bound must be in [0, 1] (0 = off: a silo's largest pull on the mean, a "
                              f"fraction of the round's median update norm), got {self.influence_bound}")
        _choice("aggregation", self.aggregation, tuple(AGGREGATIONS))
        _choice("reply-judge", self.reply_judge, REPLY_JUDGES)
        _choice("weights", self.weights, WEIGHT_MODES)
        if self.weights == "silo-sizes" and not self.silo_sizes:
            raise ConfigError("weights='silo-sizes' needs silo-sizes (a JSON file on the coordinator)")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.batch_size < 2 and self.model != "alexnet":
            raise ConfigError(f"batch-size={self.batch_size}: model '{self.model}' has BatchNorm, which cannot "
                              "train on one-sample batches (every step would be skipped and nothing trained); "
                              "use batch-size >= 2")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        _at_least("probe-size", self.probe_size, 0)
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        if self.server_lr <= 0 or self.server_tau <= 0:
            raise ConfigError(f"server-lr and server-tau must be > 0, got {self.server_lr} and {self.server_tau}")
        for key in ("server-beta1", "server-beta2"):
            if not 0 <= getattr(self, key.replace("-", "_")) < 1:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key.replace('-', '_'))}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if self.partitioner == "dirichlet" and self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0 for the Dirichlet partitioner, got {self.alpha}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.round_timeout <= 0:
            raise ConfigError(f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        if not self.dataset:
            raise ConfigError("dataset must not be empty")
        if not self.pretrained:
            raise ConfigError("pretrained must be 'auto', 'imagenet', 'none' or a checkpoint path")
        if not self.out_dir:
            raise ConfigError("out-dir must not be empty")
        _at_least("classes-per-client", self.classes_per_client, 1)
        _at_least("num-classes", self.num_classes, 0)
        if not self.train_split or not self.test_split:
            raise ConfigError("train-split and test-split must not be empty")
        _choice("mask-cache", self.mask_cache, ("auto", "on", "off"))
        if self.mask_cache == "on" and self.augment:
            raise ConfigError("mask-cache='on' with augment=true: augmentation changes every image each epoch, "
                              "so cached masks would be wrong; use mask-cache='auto' (off under augmentation)")
        if self.mask_cache_max_mb < 0:
            raise ConfigError(f"mask-cache-max-mb must be >= 0, got {self.mask_cache_max_mb}")
        _choice("amp", self.amp, ("off", "bf16"))
        if not 0 <= self.server_momentum < 1:
            raise ConfigError(f"server-momentum must be in [0, 1), got {self.server_momentum}")
        _at_least("warmup-rounds", self.warmup_rounds, 1)
        _at_least("patience", self.patience, 0)
        _at_least("val-seed", self.val_seed, -1)
        _at_least("input-size", self.input_size, 0)
        if self.input_size and MODELS[self.model].imagenet_weights is None:
            with_weights = "/".join(name for name, entry in MODELS.items() if entry.imagenet_weights)
            raise ConfigError(f"input-size is for {with_weights} (ImageNet weights); {self.model}'s head is sized "
                              "for its data's native resolution: leave input-size = 0")
        parse_classes(self.classes)  # raises on a malformed list
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        if not 0 < self.local_val_fraction < 1:
            raise ConfigError(f"local-val-fraction must be in (0, 1), got {self.local_val_fraction}")
        _at_least("evaluate-every", self.evaluate_every, 1)
        if not self.server_validation and self.fraction_evaluate <= 0:
            raise ConfigError("server-validation=false needs fraction-evaluate > 0: with no validation on the "
                              "server, the best round can only be chosen on the nodes' own validation accuracy")

    def check_server_paths(self) -> None:
        """Paths only the server reads (a client's run config carries them too, but they are not its own)."""
        if self.pretrained not in ("auto", "imagenet", "none") and not Path(self.pretrained).expanduser().is_file():
            raise ConfigError(f"pretrained='{self.pretrained}': no such checkpoint file")
        if self.silo_sizes and not Path(self.silo_sizes).expanduser().is_file():
            raise ConfigError(f"silo-sizes='{self.silo_sizes}': no such file on the coordinator (the machine "
                              "running the SuperLink and the ServerApp reads it, not the one running flwr run): a "
                              "JSON object {registered name or public-key SHA-256: all the silo's training images}")
        if self.resume_from:
            folder = Path(self.resume_from).expanduser()
            if not (folder / CHECKPOINT_FILE).is_file():
                raise ConfigError(f"resume-from='{self.resume_from}': no {CHECKPOINT_FILE} there "
                                  "(give the output directory of the run to continue)")

    @property
    def uses_dualcopy(self) -> bool:
        """FedSQ from round 1 (fedsq-warmup starts as a plain network and gates only after its switch)."""
        return STRATEGIES[self.strategy].gated

    def resolved_run_name(self) -> str:
        dataset = re.sub(r"[^A-Za-z0-9.-]+", "_", self.dataset).strip("_")  # paths and Hub ids -> file name
        return self.run_name or f"{self.strategy}-{self.model}-{dataset}-s{self.seed}"


@dataclass(frozen=True)
class NodeConfig:
    """Which data this node trains on: a slice of the run's dataset (``partition-id`` / ``num-partitions``,
    which simulation fills automatically), or the silo's own data (``data-path``: the silo is the partition).
    ``val-fraction``: the share of its data a node holds out for federated evaluation when it has no
    validation split of its own (-1 = the run config's ``local-val-fraction``). ``allow-pretrain-overlap``:
    train even on images the backbone was pretrained on (found by content; docs/DATA.md). ``keep-model``: an
    absolute folder where this node keeps the federation's final model (``<folder>/<run-name>/``), with its own
    validation accuracy on it; empty = keep nothing (docs/DEPLOYMENT.md). ``debug-replies``: error replies
    carry the full message and traceback, local paths included (default false: the exception's type and
    message with absolute paths as ``<path>``; the silo's own log has the full detail either way)."""

    partition_id: int = 0
    num_partitions: int = 1
    data_path: str = ""
    val_fraction: float = -1.0
    allow_pretrain_overlap: bool = False
    keep_model: str = ""
    debug_replies: bool = False

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> NodeConfig:
        known = ("partition-id", "num-partitions", "data-path", "val-fraction", "allow-pretrain-overlap",
                 "keep-model", "debug-replies")
        for key in mapping:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(f"unknown node-config key '{key}'" + (f"; did you mean '{hint[0]}'?" if hint
                                                                        else f"; known keys: {', '.join(known)}"))
        val_fraction = _coerce("val-fraction", mapping.get("val-fraction", -1.0), "float")
        if val_fraction != -1.0 and not 0 < val_fraction < 1:
            raise ConfigError(f"node config val-fraction must be in (0, 1), got {val_fraction}")
        extra = dict(val_fraction=val_fraction,
                     allow_pretrain_overlap=_coerce("allow-pretrain-overlap",
                                                    mapping.get("allow-pretrain-overlap", False), "bool"),
                     keep_model=_keep_model_folder(mapping.get("keep-model", "")),
                     debug_replies=_coerce("debug-replies", mapping.get("debug-replies", False), "bool"))
        if mapping.get("data-path"):
            data_path = _coerce("data-path", mapping["data-path"], "str")
            partition_id = _coerce("partition-id", mapping.get("partition-id", 0), "int")  # only seeds training
            return cls(partition_id, 1, data_path, **extra)
        missing = [k for k in ("partition-id", "num-partitions") if k not in mapping]
        if missing:
            raise ConfigError(
                f"node config lacks {missing}: start the SuperNode with "
                "--node-config \"partition-id=0 num-partitions=2\" (a slice of the run's dataset) or "
                "--node-config \"data-path='/data/silo'\" (this silo's own data)"
            )
        partition_id = _coerce("partition-id", mapping["partition-id"], "int")
        num_partitions = _coerce("num-partitions", mapping["num-partitions"], "int")
        _at_least("num-partitions", num_partitions, 1)
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
        return cls(partition_id, num_partitions, **extra)


def _keep_model_folder(value: Any) -> str:
    """The node config's ``keep-model``, checked when the node starts its first task rather than when the run
    ends: an absolute path (a ClientApp's working directory is Flower's choice), a folder or nothing yet, and
    writable where it exists or where it would be created."""
    folder = _coerce("keep-model", value, "str")
    if not folder:
        return ""
    path = Path(folder).expanduser()
    if not path.is_absolute():
        raise ConfigError(f"node config keep-model='{folder}' must be an absolute path (e.g. "
                          "keep-model='/silo/models'): a ClientApp's working directory is Flower's, not yours")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"node config keep-model='{folder}' is a file: give a folder (the model is saved "
                          "under <folder>/<run-name>/)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"node config keep-model='{folder}': this node cannot write under {existing}")
    return str(path)


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    type_name = getattr(type_name, "__name__", type_name)
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a {type_name}, got the boolean {value}")
    if type_name == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if type_name == "float":
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        hint = difflib.get_close_matches(value, options, n=1)
        raise ConfigError(
            f"{key}='{value}' is not one of {', '.join(options)}"
            + (f"; did you mean '{hint[0]}'?" if hint else "")
        )


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
