"""Decoded splits: uint8 image tensors decoded once per process, and the per-batch input preprocessing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fedsq_app.data.sources import DataError

if TYPE_CHECKING:
    from datasets import Dataset


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


def stratified_holdout(data: TensorData, fraction: float, seed: int) -> tuple[TensorData, TensorData]:
    """A seeded (rest, holdout) split of decoded data, ``fraction`` of each label held out (rounded; at
    least one sample in all, and at least one left). Pure numpy: no datasets import in a ClientApp."""
    if len(data) < 2:
        raise DataError(f"cannot hold out a validation split from {len(data)} sample(s)")
    labels = data.labels.numpy()
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):  # sorted: the same draws on every machine
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        held.append(members[: int(round(len(members) * fraction))])
    holdout = np.sort(np.concatenate(held))
    if len(holdout) == 0:
        holdout = np.array([int(rng.integers(len(labels)))])
    elif len(holdout) == len(labels):
        holdout = holdout[1:]
    keep = np.ones(len(labels), dtype=bool)
    keep[holdout] = False
    rest = torch.from_numpy(np.flatnonzero(keep))
    held_out = torch.from_numpy(holdout)
    return (TensorData(data.images[rest], data.labels[rest]),
            TensorData(data.images[held_out], data.labels[held_out]))


@dataclass(frozen=True)
class InputSpec:
    """How raw uint8 images become model input: channels, size, normalisation of the pretrained weights."""

    channels: int
    size: int  # 0 = native resolution
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> the model's input."""
        return self.normalise(images.float().div_(255.0))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> the model's input: grey widened, resized, normalised."""
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
