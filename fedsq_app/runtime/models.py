"""Backbones (small CNN, ResNet-18, AlexNet), their task heads, and pretrained weights.

Every model is built the same way on the server and on every client: architecture, then the pretrained
backbone, then a new task head initialised from ``head_seed``. So the global Q at round 0, every client's
S and Q, and every baseline start from the same function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedsq_app.util import write_atomic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages with max-pooling, one hidden FC layer, and a task head. Fast on CPU."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *stage(in_channels, width), nn.MaxPool2d(2),
            *stage(width, 2 * width), nn.MaxPool2d(2),
            *stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(2),
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(16 * width, 128), nn.ReLU(inplace=True))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.features(x)))


def _torchvision_models():
    """torchvision, imported on first use: its import pulls in torch._dynamo (~2 s), which the small CNN
    (the default) never needs."""
    from torchvision import models

    return models


def _resnet18(num_classes: int, small_stem: bool) -> nn.Module:
    model = _torchvision_models().resnet18(num_classes=num_classes)
    if small_stem:
        # CIFAR-style stem for <=32 px inputs: a 7x7/2 conv plus max-pool would leave 1x1 maps by layer4.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _alexnet(num_classes: int, small_stem: bool) -> nn.Module:
    return _torchvision_models().alexnet(num_classes=num_classes)


@dataclass(frozen=True)
class ModelEntry:
    """One backbone: how to build it, where its task head is, and how it is fed."""

    build: Callable[[int, int, bool], nn.Module]  # (num classes, input channels, small stem) -> random weights
    head: Callable[[nn.Module], nn.Linear]  # the task head: the last Linear layer, which no ReLU follows
    imagenet_weights: str | None  # torchvision's ImageNet weights enum, None: there are none
    any_channels: bool  # takes the data's channel count (grey stays 1 channel); else always 3 (torchvision)
    small_stem_max: int  # from scratch, inputs up to this size get a CIFAR-style stem (0: no such stem)
    min_size: int  # smallest input that survives the network's pooling (0: any)
    min_size_imagenet_only: bool  # min_size applies only with ImageNet weights (their native scale)

    def native_size(self, image_size: int, imagenet_style: bool) -> int:
        """The input size to resize to (0: the data's own)."""
        if self.min_size and (imagenet_style or not self.min_size_imagenet_only):
            return max(image_size, self.min_size)
        return 0


# The one registry of models (run config ``model``).
MODELS: dict[str, ModelEntry] = {
    "smallcnn": ModelEntry(lambda n, c, stem: SmallCNN(n, in_channels=c), lambda m: m.head, None,
                           any_channels=True, small_stem_max=0, min_size=0, min_size_imagenet_only=False),
    "resnet18": ModelEntry(lambda n, c, stem: _resnet18(n, stem), lambda m: m.fc, "ResNet18_Weights",
                           any_channels=False, small_stem_max=32, min_size=64, min_size_imagenet_only=True),
    # torchvision's AlexNet needs >= 63 px to survive its last max-pool
    "alexnet": ModelEntry(lambda n, c, stem: _alexnet(n, stem), lambda m: m.classifier[6], "AlexNet_Weights",
                          any_channels=False, small_stem_max=0, min_size=64, min_size_imagenet_only=False),
}


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, num_classes: int, *, in_channels: int = 3, small_stem: bool = False) -> nn.Module:
    """An architecture with random weights. torchvision models always take 3-channel input."""
    return model_entry(name).build(num_classes, in_channels, small_stem)


def head_module(model: nn.Module, name: str) -> nn.Linear:
    """The task head: the last Linear layer, which no ReLU follows (so it is never gated)."""
    return model_entry(name).head(model)


def head_prefix(model: nn.Module, name: str) -> str:
    head = head_module(model, name)
    return next(prefix for prefix, module in model.named_modules() if module is head)


def reset_head(model: nn.Module, name: str, head_seed: int) -> None:
    """Re-initialise the task head from a fixed seed, without touching the global RNG."""
    head = head_module(model, name)
    generator = torch.Generator().manual_seed(head_seed)
    bound = 1.0 / head.in_features**0.5
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights (downloads once into TORCH_HOME; needs the internet the first time)."""
    enum = model_entry(name).imagenet_weights
    if enum is None:
        raise ValueError(f"no ImageNet weights for model '{name}': use pretrained='none' or a checkpoint file")
    try:
        return getattr(_torchvision_models(), enum).IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as error:  # URLError, SSL, timeouts: all mean "not reachable"
        raise RuntimeError(
            f"could not download ImageNet weights for {name} ({type(error).__name__}: {error}). Offline, "
            "pass a local checkpoint instead: pretrained='/path/to/backbone.safetensors' (make one with "
            "`fedsq-pretrain`), or put torchvision's file into $TORCH_HOME/hub/checkpoints/"
        ) from error


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
    """safetensors weights plus a JSON sidecar (``<path>.json``) describing them. No pickle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
    write_atomic(f"{path}.json", json.dumps(metadata, indent=2, sort_keys=True))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors checkpoint (or a ``torch.save`` file with ``weights_only=True``) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state_dict = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path} does not hold a state dict")
    meta_path = Path(f"{path}.json")
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return state_dict, metadata


def load_backbone(model: nn.Module, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy pretrained weights into ``model``, everything but the task head, and insist that they fit."""
    prefix = head_prefix(model, name) + "."
    own = model.state_dict()
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    missing = [k for k in own if not k.startswith(prefix) and k not in backbone]
    unexpected = [k for k in backbone if k not in own]
    wrong_shape = [k for k in backbone if k in own and own[k].shape != backbone[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"pretrained weights do not fit model '{name}': missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong_shape[:5]} (was the checkpoint made for another model, "
            "stem or number of input channels?)"
        )
    model.load_state_dict(backbone, strict=False)
