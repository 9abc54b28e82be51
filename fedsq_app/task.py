"""From a run config to the starting model: pretrained backbone, seeded head, DualCopy or plain.

The ServerApp, every ClientApp and the benchmarks call these same functions, so the pretrained start,
the head initialisation and the input preprocessing are identical everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsq_app.config import RunConfig
from fedsq_app.core.dualcopy import DualCopy, state_dict_sha256, travelling_module
from fedsq_app.core.packing import decode_arrays
from fedsq_app.data.partitions import DatasetInfo
from fedsq_app.data.sources import source_slug
from fedsq_app.data.tensors import InputSpec
from fedsq_app.runtime.models import (IMAGENET_MEAN, IMAGENET_STD, MODELS, head_module, imagenet_state_dict,
                                      load_backbone, load_checkpoint, model_entry, reset_head)
from fedsq_app.util import ConfigError, cache_dir


@dataclass
class StartModel:
    """The pretrained network with its new, seeded task head (plain ReLUs), and how to feed it."""

    model: nn.Module
    spec: InputSpec
    pretrained_from: str

    @property
    def sha256(self) -> str:
        """Hash of the starting weights = hash of FedSQ's structural copy S."""
        return state_dict_sha256(self.model.state_dict())


def default_backbone_path(model: str, dataset: str) -> Path:
    return cache_dir() / "backbones" / f"{model}-{source_slug(dataset)}.safetensors"


def resolve_pretrained(config: RunConfig) -> str:
    """'imagenet', 'none', or the checkpoint file to load ('auto' = this model's backbone in the cache)."""
    if config.pretrained != "auto":
        return config.pretrained
    path = default_backbone_path(config.model, config.dataset)
    if not path.is_file():
        raise FileNotFoundError(
            f"no pretrained backbone for model '{config.model}' on dataset '{config.dataset}' at {path}. "
            "Run `fedsq-prepare` (default model and data) or `fedsq-pretrain`, or set "
            "pretrained='imagenet' | 'none' | '/path/to/checkpoint.safetensors'"
        )
    return str(path)


def resolve_num_classes(config: RunConfig, info: DatasetInfo, metadata: dict) -> int:
    """The head's size: run config ``num-classes``, else the data's labels, else the backbone's metadata.

    A silo (node config ``data-path``) must not guess from its own, possibly incomplete, labels: its info
    carries 0 and the run config or the backbone decides, so that every node builds the same head.
    """
    if config.num_classes and info.num_classes > config.num_classes:
        raise ConfigError(f"num-classes={config.num_classes}, but the data has labels up to {info.num_classes - 1}")
    num_classes = config.num_classes or info.num_classes or int(metadata.get("num_classes", 0))
    if num_classes < 1:
        raise ConfigError("the number of classes is unknown: this node trains on its own data (data-path) and "
                          "the backbone's metadata names none; set run config num-classes=<C>")
    return num_classes


def build_start_model(config: RunConfig, info: DatasetInfo) -> StartModel:
    """Architecture + pretrained backbone (per ``config.pretrained``) + head seeded by ``config.seed``."""
    entry = model_entry(config.model)
    source = resolve_pretrained(config)
    state_dict, meta = load_checkpoint(source) if source not in ("none", "imagenet") else (None, {})
    num_classes = resolve_num_classes(config, info, meta)
    torch.manual_seed(config.seed)  # random init (pretrained='none') is reproducible too
    data_channels = info.channels if entry.any_channels else 3
    if source == "imagenet" and entry.imagenet_weights is None:
        with_weights = " or ".join(f"'{name}'" for name, e in MODELS.items() if e.imagenet_weights)
        raise ConfigError(f"pretrained='imagenet' needs model={with_weights}")
    if source != "none" and meta.get("model", config.model) != config.model:
        raise ConfigError(f"checkpoint {source} holds a '{meta['model']}', but model='{config.model}'")
    # ImageNet weights, or a checkpoint without a JSON sidecar (most likely a torchvision file saved by
    # torch.save): fed as ImageNet weights expect; fedsq-pretrain checkpoints carry their own input spec.
    imagenet_style = source == "imagenet" or (source != "none" and not meta and entry.imagenet_weights is not None)
    inputs = meta.get("input", {})
    in_channels = 3 if source == "imagenet" else int(inputs.get("channels", data_channels))
    small_stem = bool(meta.get("small_stem", False)) if source not in ("none", "imagenet") else \
        source == "none" and info.image_size <= entry.small_stem_max
    model = entry.build(num_classes, in_channels, small_stem)
    if source == "imagenet":
        load_backbone(model, config.model, imagenet_state_dict(config.model))
    elif source != "none":
        load_backbone(model, config.model, state_dict)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet_style else ((0.5,) * in_channels, (0.5,) * in_channels)
    spec = InputSpec(in_channels, int(inputs.get("size", entry.native_size(info.image_size, imagenet_style))),
                     tuple(inputs.get("mean", mean)), tuple(inputs.get("std", std)))
    if config.input_size:  # e.g. 224: ImageNet weights at the resolution they were trained at
        spec = replace(spec, size=config.input_size)
    reset_head(model, config.model, head_seed=config.seed)
    return StartModel(model, spec, source)


def model_metadata(config: RunConfig, info: DatasetInfo, start: StartModel, start_sha256: str,
                   class_names: tuple[str, ...] = ()) -> dict:
    """What a trained model's sidecar records so that ``fedsq_app.load_trained`` can rebuild its start model
    and check it against S's hash, with no dataset at hand. ``start_sha256``: the start model's hash taken
    before training (a baseline trains ``start.model`` itself); ``class_names``: the labels' names, if known."""
    spec = start.spec
    num_classes = head_module(start.model, config.model).out_features
    return {"model": config.model, "strategy": config.strategy, "structural_sha256": start_sha256,
            "pretrained_from": start.pretrained_from, "num_classes": num_classes,
            "class_names": list(class_names) if len(class_names) == num_classes else [],
            "data": {"channels": info.channels, "image_size": info.image_size},
            "input": {"channels": spec.channels, "size": spec.size, "mean": list(spec.mean), "std": list(spec.std)},
            "run_config": {k.replace("_", "-"): v for k, v in vars(config).items()}}


def trainable_model(config: RunConfig, start: StartModel) -> nn.Module:
    """FedSQ trains a DualCopy (S gates Q); the baselines train the plain network."""
    return DualCopy(start.model) if config.uses_dualcopy else start.model


def global_arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(travelling_module(model).state_dict())


def load_global_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load ``arrays`` (packed or one per key, ``core/packing.py``) into the travelling part of ``model``."""
    travelling = travelling_module(model)
    values = decode_arrays(arrays, {k: v.detach().cpu().numpy() for k, v in travelling.state_dict().items()})
    if isinstance(values, str):
        raise ValueError(f"the arrays do not fit this model: {values}")
    travelling.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in values.items()}, strict=True)
