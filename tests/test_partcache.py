"""The per-node on-disk partition cache (fedsq_app/data/cache.py): exact hits, rebuilt when its key changes,
never a torn file, and a ClientApp start that imports no datasets once the cache holds the partition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from fedsq_app.data import cache, partitions, tensors
from fedsq_app.config import NodeConfig, RunConfig

CONFIG = RunConfig(max_train_samples=600, seed=3)
NODE = NodeConfig(1, 3)


@pytest.fixture
def fresh(fedsq_cache):
    """An empty partitions/ folder and no in-memory copies."""
    for path in (fedsq_cache / "partitions").glob("*") if (fedsq_cache / "partitions").is_dir() else []:
        path.unlink()
    cache.clear_memory()
    yield fedsq_cache
    cache.clear_memory()


def _no_rebuild(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt although the cache holds this partition")

    monkeypatch.setattr(cache, "client_partition", refuse)
    monkeypatch.setattr(cache, "dataset_info", refuse)


def test_hit_is_exactly_the_built_partition(fresh, monkeypatch):
    built, info = cache.node_data(CONFIG, NODE), cache.node_info(CONFIG, NODE)
    key = partitions.DataKey.of(CONFIG)
    assert torch.equal(built.images, partitions.client_partition(key, 1, 3).images)
    assert info == partitions.dataset_info(key)
    cache.clear_memory()  # as a fresh process: only the files are left
    _no_rebuild(monkeypatch)
    hit = cache.node_data(CONFIG, NODE)
    assert torch.equal(hit.images, built.images) and torch.equal(hit.labels, built.labels)
    assert hit.images.dtype == torch.uint8 and hit.labels.dtype == torch.int64
    assert cache.node_info(CONFIG, NODE) == info


def test_rebuilt_when_its_key_changes(fresh, monkeypatch):
    first = cache.node_data(CONFIG, NODE)
    other_seed = RunConfig(max_train_samples=600, seed=4)
    second = cache.node_data(other_seed, NODE)  # another Dirichlet draw: another file, other samples
    assert not torch.equal(first.labels, second.labels) or len(first) != len(second)
    assert len(list((fresh / "partitions").glob("*p1of3*.safetensors"))) == 2
    # The partition count and the source's files are part of the key too.
    assert cache.partition_key(partitions.DataKey.of(CONFIG), NodeConfig(1, 4)) != \
        cache.partition_key(partitions.DataKey.of(CONFIG), NODE)
    before = cache.partition_key(partitions.DataKey.of(CONFIG), NODE)
    source = sorted((fresh / "data").rglob("train-labels*"))[0]
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 1))
    assert cache.partition_key(partitions.DataKey.of(CONFIG), NODE) != before


def test_a_file_holding_another_key_or_garbage_is_rebuilt(fresh):
    built = cache.node_data(CONFIG, NODE)
    key = cache.partition_key(partitions.DataKey.of(CONFIG), NODE)
    path = cache.cache_path(key)
    # Same file name, but the stored key says it was written for something else: not used.
    stale = {**key, "partition-id": 2}
    cache.write(path, stale, tensors.TensorData(built.images[:5], built.labels[:5]))
    assert cache.read(path, key) is None
    cache.clear_memory()
    assert torch.equal(cache.node_data(CONFIG, NODE).images, built.images)
    assert cache.read(path, key) is not None  # rewritten for the right key
    path.write_bytes(path.read_bytes()[:100])  # torn file (cannot happen with os.replace, but be safe)
    assert cache.read(path, key) is None


def test_concurrent_writers_leave_one_whole_file(fresh):
    built = cache.node_data(CONFIG, NODE)
    key = cache.partition_key(partitions.DataKey.of(CONFIG), NODE)
    path = cache.cache_path(key)
    path.unlink()
    errors = []

    def writer():
        try:
            for _ in range(5):
                cache.write(path, key, built)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert torch.equal(cache.read(path, key).images, built.images)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_cached_client_start_imports_no_datasets_nor_dynamo(fresh):
    cache.node_data(CONFIG, NODE), cache.node_info(CONFIG, NODE)  # fills the cache
    script = (
        "import sys, json\n"
        "from fedsq_app import client_app\n"
        "from fedsq_app.data import cache, tensors\n"
        "from fedsq_app.config import RunConfig, NodeConfig\n"
        f"config, node = RunConfig(**json.loads({json.dumps(json.dumps({'max_train_samples': 600, 'seed': 3}))})), "
        "NodeConfig(1, 3)\n"
        "model, spec, _ = client_app.local_model(config)\n"
        "part = cache.node_data(config, node)\n"
        "print(len(part))\n"
        "from fedsq_app.runtime import train\n"  # one training step: torch.optim's would import torch._dynamo
        "train.train_local(model, tensors.TensorData(part.images[:32], part.labels[:32]), spec, "
        "train.LocalSchedule(1, 32, 0.01, 0.9, 5e-4), device=train.pick_device('cpu'), seed=0)\n"
        "print(json.dumps(sorted(m for m in ('datasets', 'flwr_datasets', 'matplotlib', 'pandas', 'pyarrow', "
        "'torchvision', 'ray', 'torch._dynamo') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "FEDSQ_CACHE_DIR": str(fresh)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert int(lines[0]) == len(cache.node_data(CONFIG, NODE))
    assert json.loads(lines[1]) == []
