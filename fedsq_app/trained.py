"""The federation's model outside the federation: load a finished run's model to predict with it.

    from fedsq_app import load_trained

    trained = load_trained("outputs/fedsq-smallcnn-embedded-s42")   # a run directory, or its model file
    probabilities = trained.predict_proba(images)                  # uint8 images (N, C, H, W)

A run leaves ``best_model.safetensors``: Q's weights of the best round (the arrays that travelled), with a JSON
sidecar that says how the run built its start model. ``load_trained`` rebuilds that start model exactly as the
server did (architecture, pretrained backbone, seeded head), checks that it hashes to the S the run recorded,
and loads Q into it: for FedSQ the DualCopy (S gates Q), for the baselines the plain network, in eval mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fedsq_app.config import REMOVED_KEYS, RunConfig
from fedsq_app.core.dualcopy import travelling_module
from fedsq_app.data.partitions import DatasetInfo
from fedsq_app.data.tensors import InputSpec
from fedsq_app.runtime.models import load_checkpoint
from fedsq_app.task import build_start_model, trainable_model

MODEL_FILE = "best_model.safetensors"
RESULTS_FILE = "results.json"


class TrainedModelError(ValueError):
    """A trained model cannot be loaded as recorded: a missing file or backbone, another S, a shape mismatch."""


@dataclass
class Trained:
    """A finished run's model, ready to predict: ``model`` in eval mode and how its inputs are prepared."""

    model: nn.Module  # a DualCopy for FedSQ (S gates Q), the plain network for the baselines
    spec: InputSpec  # uint8 images -> the model's input (channels, size, normalisation)
    config: RunConfig  # the run's config
    num_classes: int
    image_shape: tuple[int, int, int]  # (channels, height, width) of the images the run trained on
    metadata: dict  # the model file's sidecar (round, val_accuracy, structural_sha256, ...)
    plain: nn.Module  # the architecture with ordinary ReLUs (for FedSQ, the start model: S's function, ungated)

    @property
    def class_names(self) -> list[str]:
        """The labels' names in class order, as the run's dataset names them ([] when it names none)."""
        names = self.metadata.get("class_names") or []
        return [str(n) for n in names] if len(names) == self.num_classes else []

    def check_images(self, images: torch.Tensor) -> None:
        """Refuse images the model was not trained on, naming the expected input."""
        channels, height, width = self.image_shape
        expected = f"{channels}x{height}x{width} uint8 images (channels x height x width)"
        if images.ndim != 4:
            raise TrainedModelError(f"expected a batch (N, C, H, W) of {expected}, got shape {tuple(images.shape)}")
        if images.shape[1] not in (channels, self.spec.channels, 1):  # grey is widened as in training
            raise TrainedModelError(f"images have {images.shape[1]} channels; this model takes {expected}")
        if not self.spec.size and tuple(images.shape[2:]) != (height, width):
            raise TrainedModelError(f"images are {images.shape[2]}x{images.shape[3]}; this model takes {expected} "
                                    "(it runs at its data's native size, so resize them first)")

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for uint8 images (N, C, H, W) on the model's device."""
        self.check_images(images)
        device = next(self.model.parameters()).device
        return self.model(self.spec.prepare(images.to(device))).float()

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes) for uint8 images (N, C, H, W)."""
        return torch.softmax(self.logits(images), dim=1)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TrainedModelError(f"cannot read {path}: {error}") from error


def _locate(path: str | Path) -> tuple[Path, dict]:
    """(model file, its metadata) for a run directory or a model file; older runs fill in from results.json."""
    path = Path(path).expanduser()
    model_file = path / MODEL_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise TrainedModelError(f"no trained model at {model_file}: give a finished run's directory (it holds "
                                f"{MODEL_FILE} once the run has ended) or the model file itself")
    sidecar = Path(f"{model_file}.json")
    metadata = _read_json(sidecar) if sidecar.is_file() else {}
    if "run_config" not in metadata:
        results_file = model_file.parent / RESULTS_FILE
        if not results_file.is_file():
            raise TrainedModelError(f"{model_file} has no sidecar {sidecar.name} with its run config, and no "
                                    f"{RESULTS_FILE} lies next to it: cannot tell how its start model was built")
        results = _read_json(results_file)
        metadata = {**results, **metadata, "run_config": results["config"]}
    return model_file, metadata


def _dataset_info(config: RunConfig, metadata: dict) -> DatasetInfo:
    data = metadata.get("data")
    if data:
        return DatasetInfo(int(metadata["num_classes"]), int(data["channels"]), int(data["image_size"]))
    from fedsq_app.data.partitions import DataKey, dataset_info  # a run recorded before its sidecar said this

    info = dataset_info(DataKey.of(config))
    return DatasetInfo(int(metadata.get("num_classes") or info.num_classes), info.channels, info.image_size)


def load_trained(path: str | Path, *, backbone: str | Path | None = None, device: str = "cpu") -> Trained:
    """A finished run's best model, in eval mode, with the preprocessing its inputs need.

    ``path``: the run's output directory, or its ``best_model.safetensors`` (a silo's copy too). ``backbone``:
    where S's pretrained weights are now, if not where the run found them. Raises ``TrainedModelError`` when
    the backbone is missing, when it is not the S the run trained under (SHA-256 differs), or when the model
    file does not fit the architecture (another class count, another model).
    """
    model_file, metadata = _locate(path)
    try:  # keys this version no longer has only steered training (trust settings): not needed to rebuild
        config = RunConfig.from_mapping({k: v for k, v in metadata["run_config"].items() if k not in REMOVED_KEYS})
    except Exception as error:
        raise TrainedModelError(f"{model_file}: the recorded run config is not valid here ({error})") from error
    if config.strategy == "fedsq-warmup":
        raise TrainedModelError("a fedsq-warmup run gates with the global model of its switch round, not the "
                                "start model: load_trained supports the other strategies")
    if backbone is not None:
        config = replace(config, pretrained=str(Path(backbone).expanduser().resolve()))
    info = _dataset_info(config, metadata)
    try:
        start = build_start_model(config, info)
    except FileNotFoundError as error:
        raise TrainedModelError(f"the run's backbone is missing: {error}. Pass the backbone's file "
                                "(backbone=... / --backbone)") from error
    model = trainable_model(config, start)
    weights, _ = load_checkpoint(model_file)
    travelling = travelling_module(model)
    own = travelling.state_dict()
    misfit = sorted(set(own) ^ set(weights)) or [k for k in own if own[k].shape != weights[k].shape]
    if misfit:
        key = misfit[0]
        detail = (f"'{key}' is {tuple(weights[key].shape)} in the file, {tuple(own[key].shape)} in model "
                  f"'{config.model}'" if key in own and key in weights else f"keys {misfit[:4]} differ")
        raise TrainedModelError(f"{model_file} does not fit the run's model (class count or architecture "
                                f"differ): {detail}")
    recorded = metadata.get("structural_sha256", "")
    if recorded and start.sha256 != recorded:
        raise TrainedModelError(
            f"the backbone {start.pretrained_from} is not the S this model was trained under: S's SHA-256 is "
            f"{start.sha256[:16]}..., the run recorded {recorded[:16]}... Gated by another S, Q computes another "
            "function: find the backbone the run used (results.json 'pretrained_from')")
    travelling.load_state_dict(weights, strict=True)
    model.to(torch.device(device)).eval()
    shape = (info.channels, info.image_size, info.image_size)
    return Trained(model, start.spec, config, info.num_classes, shape, metadata, start.model.eval())
