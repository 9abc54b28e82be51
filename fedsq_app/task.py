"""From a run config to the starting model: pretrained backbone, seeded head, DualCopy or plain.

The ServerApp, every ClientApp and the benchmarks call these same functions, so the pretrained start,
the head initialisation and the input preprocessing are identical everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsq_app.config import ConfigError, RunConfig, cache_dir
from fedsq_app.data import DatasetInfo, InputSpec, source_slug
from fedsq_app.dualcopy import DualCopy, state_dict_sha256, travelling_module
from fedsq_app.models import (IMAGENET_MEAN, IMAGENET_STD, build_model, imagenet_state_dict,
                              load_backbone, load_checkpoint, reset_head)


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


def _native_size_for(model: str, size: int, pretrained: str) -> int:
    if model == "alexnet":
        return max(size, 64)  # torchvision's AlexNet needs >= 63 px to survive its last max-pool
    if model == "resnet18" and pretrained == "imagenet":
        return max(size, 64)
    return 0


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
    channels, image_size = info.channels, info.image_size
    source = resolve_pretrained(config)
    state_dict, meta = load_checkpoint(source) if source not in ("none", "imagenet") else (None, {})
    num_classes = resolve_num_classes(config, info, meta)
    torch.manual_seed(config.seed)  # random init (pretrained='none') is reproducible too
    if source == "none":
        in_channels = channels if config.model == "smallcnn" else 3
        small_stem = config.model == "resnet18" and image_size <= 32
        model = build_model(config.model, num_classes, in_channels=in_channels, small_stem=small_stem)
        mean, std = (0.5,) * in_channels, (0.5,) * in_channels
        spec = InputSpec(in_channels, _native_size_for(config.model, image_size, source), mean, std)
    elif source == "imagenet":
        if config.model == "smallcnn":
            raise ConfigError("pretrained='imagenet' needs model='resnet18' or 'alexnet'")
        model = build_model(config.model, num_classes)
        load_backbone(model, config.model, imagenet_state_dict(config.model))
        spec = InputSpec(3, _native_size_for(config.model, image_size, source), IMAGENET_MEAN, IMAGENET_STD)
    else:
        if meta.get("model", config.model) != config.model:
            raise ConfigError(f"checkpoint {source} holds a '{meta['model']}', but model='{config.model}'")
        # No JSON sidecar: most likely a torchvision file (e.g. ImageNet weights saved by torch.save), so
        # feed it as ImageNet weights expect; fedsq-pretrain checkpoints always carry their own input spec.
        imagenet_style = not meta and config.model != "smallcnn"
        inputs = meta.get("input", {})
        in_channels = int(inputs.get("channels", channels if config.model == "smallcnn" else 3))
        model = build_model(config.model, num_classes, in_channels=in_channels,
                            small_stem=bool(meta.get("small_stem", False)))
        load_backbone(model, config.model, state_dict)
        default_size = _native_size_for(config.model, image_size, "imagenet" if imagenet_style else source)
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet_style else \
            ((0.5,) * in_channels, (0.5,) * in_channels)
        spec = InputSpec(in_channels, int(inputs.get("size", default_size)),
                         tuple(inputs.get("mean", default_mean)), tuple(inputs.get("std", default_std)))
    if config.input_size:  # e.g. 224: ImageNet weights at the resolution they were trained at
        spec = replace(spec, size=config.input_size)
    reset_head(model, config.model, head_seed=config.seed)
    return StartModel(model, spec, source)


def trainable_model(config: RunConfig, start: StartModel) -> nn.Module:
    """FedSQ trains a DualCopy (S gates Q); the baselines train the plain network."""
    return DualCopy(start.model) if config.uses_dualcopy else start.model


def global_arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(travelling_module(model).state_dict())


def load_global_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    travelling_module(model).load_state_dict(arrays.to_torch_state_dict(), strict=True)
