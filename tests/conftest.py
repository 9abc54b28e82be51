"""Shared fixtures: an isolated cache with the embedded data and a quickly pretrained backbone, and an
in-process Flower simulation that can take run-config overrides (``run_simulation`` passes none)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYSTEM_PACKAGES_FILE = Path(__file__).resolve().parents[1] / "requirements" / "system-tests.txt"


def system_packages() -> dict[str, str]:
    """requirements/system-tests.txt as {command: Debian package}."""
    lines = (line.split("#", 1)[0].split() for line in SYSTEM_PACKAGES_FILE.read_text().splitlines())
    return {fields[0]: fields[1] for fields in lines if fields}


def require_system(*commands: str) -> None:
    """Skip (fail under CI=true, so CI never goes green by skipping) unless every command is installed."""
    packages = system_packages()
    unknown = set(commands) - set(packages)
    assert not unknown, f"{sorted(unknown)} not listed in {SYSTEM_PACKAGES_FILE.name}"
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = sorted({packages[c] for c in commands if shutil.which(c, path=path) is None})
    if not missing:
        return
    reason = (f"missing system package(s) {', '.join(missing)}: install with `apt-get install -y {' '.join(missing)}` "
              "(`bash scripts/setup.sh --tests` does this as root)")
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


# Small and fast, but the real code path: 3 clients, 600 training samples, 2 rounds.
TINY_RUN = {"num-server-rounds": 2, "max-train-samples": 600, "batch-size": 32, "lr": 0.05}


@pytest.fixture(scope="session")
def fedsq_cache(tmp_path_factory) -> Path:
    """FEDSQ_CACHE_DIR with the embedded subset installed and a 1-epoch small-CNN backbone."""
    cache = tmp_path_factory.mktemp("fedsq-cache")
    previous = os.environ.get("FEDSQ_CACHE_DIR")
    os.environ["FEDSQ_CACHE_DIR"] = str(cache)
    from fedsq_app.data.sources import install_embedded_data
    from fedsq_app.tools.pretrain import pretrain

    install_embedded_data()
    pretrain("smallcnn", "embedded", "pretrain", epochs=1)
    yield cache
    if previous is None:
        os.environ.pop("FEDSQ_CACHE_DIR", None)
    else:
        os.environ["FEDSQ_CACHE_DIR"] = previous


def simulate(run_config: dict, num_supernodes: int = 3) -> dict:
    """The real apps in Flower's in-process simulation (see fedsq_app.harness.simulation); returns results.json."""
    from fedsq_app.harness.simulation import simulate as run

    return run(run_config, num_supernodes)


def randomise_bn(model, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine terms, as a pretrained model has, so eval BN is not a no-op."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0, 0.2, generator=generator)
