"""Pretrained backbones: ImageNet (download replaced by a local state dict), local files, none, auto,
the number of classes, per-weights input transforms, and refusing pickled objects."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torchvision import models as tv_models

from fedsq_app import task
from fedsq_app.config import ConfigError, RunConfig
from fedsq_app.data.partitions import DatasetInfo
from fedsq_app.data.tensors import InputSpec
from fedsq_app.runtime.models import IMAGENET_MEAN, IMAGENET_STD, build_model, save_checkpoint

GREY_28 = DatasetInfo(num_classes=10, channels=1, image_size=28)


@pytest.fixture
def fake_imagenet(monkeypatch):
    """torchvision's weights API with the download replaced by a local, seeded 1000-class state dict."""
    torch.manual_seed(123)
    weights = build_model("resnet18", 1000).state_dict()
    calls = []

    def get_state_dict(*args, **kwargs):
        calls.append(kwargs)
        return weights

    monkeypatch.setattr(tv_models.ResNet18_Weights.IMAGENET1K_V1, "get_state_dict", get_state_dict)
    return weights, calls


def test_imagenet_weights_fill_the_backbone_and_set_the_transforms(fake_imagenet):
    weights, calls = fake_imagenet
    start = task.build_start_model(RunConfig(model="resnet18", pretrained="imagenet"), GREY_28)
    assert calls, "torchvision's weights API was not used"
    state = start.model.state_dict()
    for key, value in weights.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(state[key], value), key
    assert start.model.fc.out_features == 10  # a new head for the task, not ImageNet's
    # Grey 28 px Fashion-MNIST becomes 3-channel 64 px input, normalised as the weights expect.
    assert start.spec == InputSpec(3, 64, IMAGENET_MEAN, IMAGENET_STD)
    batch = start.spec.prepare(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8))
    assert batch.shape == (2, 3, 64, 64)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(batch[0, :, 5, 5], expected)
    start.model.eval()(batch)  # the network runs on it


def test_imagenet_offline_names_the_local_file_alternative(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_models.ResNet18_Weights.IMAGENET1K_V1, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="pretrained='/path/to/backbone.safetensors'.*fedsq-pretrain"):
        task.build_start_model(RunConfig(model="resnet18", pretrained="imagenet"), GREY_28)


def test_imagenet_needs_a_torchvision_model():
    with pytest.raises(ConfigError, match="resnet18' or 'alexnet"):
        task.build_start_model(RunConfig(model="smallcnn", pretrained="imagenet"), GREY_28)


def test_torch_save_file_loads_with_weights_only_and_as_imagenet_style(tmp_path, fake_imagenet):
    weights, _ = fake_imagenet
    path = tmp_path / "resnet18-f37072fd.pth"  # what $TORCH_HOME/hub/checkpoints holds
    torch.save(weights, path)
    start = task.build_start_model(RunConfig(model="resnet18", pretrained=str(path)), GREY_28)
    assert torch.equal(start.model.state_dict()["conv1.weight"], weights["conv1.weight"])
    assert start.spec == InputSpec(3, 64, IMAGENET_MEAN, IMAGENET_STD)  # no sidecar: fed like ImageNet weights


class NotATensor:  # a pickled object must never be loaded
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": NotATensor()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        task.build_start_model(RunConfig(model="resnet18", pretrained=str(path)), GREY_28)


def _small_checkpoint(tmp_path, num_classes: int = 7) -> str:
    torch.manual_seed(5)
    model = build_model("smallcnn", num_classes, in_channels=1)
    path = tmp_path / "small.safetensors"
    save_checkpoint(path, model.state_dict(), {"model": "smallcnn", "num_classes": num_classes,
                                               "input": {"channels": 1, "size": 0, "mean": [0.3], "std": [0.4]}})
    return str(path)


def test_safetensors_checkpoint_with_metadata(tmp_path):
    path = _small_checkpoint(tmp_path)
    start = task.build_start_model(RunConfig(model="smallcnn", pretrained=path), GREY_28)
    assert start.spec == InputSpec(1, 0, (0.3,), (0.4,))
    assert start.model.head.out_features == 10  # the data's classes, not the backbone's 7
    with pytest.raises(ConfigError, match="holds a 'smallcnn', but model='resnet18'"):
        task.build_start_model(RunConfig(model="resnet18", pretrained=path), GREY_28)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        task.build_start_model(RunConfig(model="smallcnn", pretrained=str(tmp_path / "missing.safetensors")),
                               GREY_28)


def test_num_classes_run_config_then_data_then_backbone_metadata(tmp_path):
    path = _small_checkpoint(tmp_path, num_classes=7)
    silo = DatasetInfo(num_classes=0, channels=1, image_size=28)  # a silo does not guess from its own labels
    assert task.build_start_model(RunConfig(pretrained=path), silo).model.head.out_features == 7
    assert task.build_start_model(RunConfig(pretrained=path, num_classes=12), silo).model.head.out_features == 12
    with pytest.raises(ConfigError, match="set run config num-classes"):
        task.build_start_model(RunConfig(pretrained="none"), silo)
    with pytest.raises(ConfigError, match="num-classes=5, but the data has labels up to 9"):
        task.build_start_model(RunConfig(pretrained="none", num_classes=5), GREY_28)


def test_pretrained_none_and_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSQ_CACHE_DIR", str(tmp_path))
    start = task.build_start_model(RunConfig(model="alexnet", pretrained="none"), GREY_28)
    assert start.spec.channels == 3 and start.spec.size == 64  # AlexNet needs >= 63 px
    start.model.eval()(start.spec.prepare(torch.zeros(1, 1, 28, 28, dtype=torch.uint8)))
    again = task.build_start_model(RunConfig(model="alexnet", pretrained="none"), GREY_28)
    assert start.sha256 == again.sha256  # random init is seeded too
    dataset = "idx:/some/where"
    with pytest.raises(FileNotFoundError, match="fedsq-pretrain"):
        task.build_start_model(RunConfig(dataset=dataset), GREY_28)
    path = task.default_backbone_path("smallcnn", dataset)
    assert ":" not in path.name and path.parent == tmp_path / "backbones"
    save_checkpoint(path, build_model("smallcnn", 10, in_channels=1).state_dict(), {"model": "smallcnn"})
    assert task.build_start_model(RunConfig(dataset=dataset), GREY_28).pretrained_from == str(path)
