"""The mask cache's packed format and lookups are exact, and ``mask-cache="auto"`` (the default) is on only
when cached masks are right: never under augmentation, and a new S or input spec never reads old masks."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsq_app.runtime import maskcache
from fedsq_app.config import ConfigError, RunConfig
from fedsq_app.core.dualcopy import DualCopy
from fedsq_app.runtime.models import build_model


def _dual(seed: int = 0) -> DualCopy:
    torch.manual_seed(seed)
    return DualCopy(build_model("smallcnn", 10, in_channels=1))


def test_pack_is_numpy_packbits_for_every_byte_and_round_trips():
    every_byte = ((torch.arange(256).unsqueeze(1) >> torch.arange(7, -1, -1)) & 1).bool()
    assert torch.equal(maskcache.pack(every_byte).view(-1), torch.arange(256, dtype=torch.uint8))
    masks = torch.rand(4, 3, 5, 7) > 0.5  # 105 units: not a multiple of 8
    packed = maskcache.pack(masks)
    assert np.array_equal(packed.numpy(), np.packbits(masks.reshape(4, -1).numpy(), axis=1))
    assert torch.equal(maskcache.unpack(packed, masks.shape[1:]), masks)


def test_cache_hits_are_exactly_s_masks_for_any_rows_and_batch_size():
    dual = _dual()
    x = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    cache = maskcache.MaskCache(40, max_bytes=2**30)
    for start in range(0, 40, 16):  # fill: 16, 16, 8
        cache.gates(dual, x[start: start + 16], torch.arange(start, min(start + 16, 40)))
    assert cache.misses == 3 and bool(cache.filled.all())
    for rows in (torch.randperm(40)[:16], torch.randperm(40)[:16], torch.tensor([39, 0, 7])):
        got = cache.gates(dual, x[rows], rows)  # the buffers of one batch size are reused: still exact
        want = [a > 0 for a in dual.structural_activations(x[rows])]
        # 0/1 in Q's dtype: the gate's fast kernel; "on" exactly where S's activation is > 0
        assert all(g.dtype == torch.float32 and torch.equal(g > 0, w) and torch.equal(g, w.float())
                   for g, w in zip(got, want, strict=True))
    assert cache.hits == 3


def test_a_mask_overwritten_before_its_backward_is_refused():
    """Lookups reuse one buffer per batch size; autograd must refuse a graph whose masks changed under it."""
    dual = _dual()
    x = torch.randn(8, 1, 28, 28)
    cache = maskcache.MaskCache(16, max_bytes=2**30)
    cache.gates(dual, x, torch.arange(8))
    cache.gates(dual, x, torch.arange(8, 16))
    first = maskcache.forward(dual, x, torch.arange(8), cache)
    maskcache.forward(dual, x, torch.arange(8, 16), cache)  # same batch size: overwrites the masks
    with pytest.raises(RuntimeError, match="inplace"):
        F.cross_entropy(first, torch.zeros(8, dtype=torch.long)).backward()


def test_auto_is_on_only_when_the_masks_are_fixed():
    assert maskcache.choose_mask_cache("auto", augment=False, gated=True)[0]
    use, why = maskcache.choose_mask_cache("auto", augment=True, gated=True)
    assert not use and "augment" in why
    assert not maskcache.choose_mask_cache("off", augment=False, gated=True)[0]
    assert maskcache.choose_mask_cache("on", augment=False, gated=True)[0]
    assert not maskcache.choose_mask_cache("auto", augment=False, gated=False)[0]  # FedAvg: no S to cache


def test_config_default_is_auto_and_on_with_augmentation_is_refused():
    assert RunConfig().mask_cache == "auto"
    assert RunConfig.from_mapping({"augment": True}).mask_cache == "auto"  # auto turns itself off there
    with pytest.raises(ConfigError, match="augment"):
        RunConfig.from_mapping({"mask-cache": "on", "augment": True})
    with pytest.raises(ConfigError, match="mask-cache"):
        RunConfig.from_mapping({"mask-cache": "yes"})


def _train_message(arrays, sha):
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1,
                                                                                  "structural-sha256": sha})}),
                   metadata=metadata)


def _clear_store(cache_root):
    for path in (cache_root / "masks").glob("*"):
        path.unlink()


def test_client_app_auto_caches_without_augmentation_and_not_with_it(fedsq_cache):
    from flwr.app import Context, RecordDict

    from fedsq_app import client_app
    from fedsq_app.task import global_arrays

    def caches_after(run_config):
        maskcache.REGISTRY.caches.clear()
        _clear_store(fedsq_cache)
        model, _, sha = client_app.local_model(RunConfig.from_mapping(run_config))
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 2, "num-partitions": 3},
                          state=RecordDict(), run_config=run_config)
        reply = client_app.train(_train_message(global_arrays(model), sha), context)
        assert not reply.has_error(), reply.error.reason
        return list(maskcache.REGISTRY.caches.values())

    base = {"max-train-samples": 300, "batch-size": 16}
    (cache,) = caches_after(base)  # auto, no augmentation: filled in this round's epoch
    assert cache.misses > 0 and bool(cache.filled.all()) and not cache.disabled_reason
    assert caches_after({**base, "augment": True}) == []
    assert caches_after({**base, "mask-cache": "off"}) == []
    (capped,) = caches_after({**base, "mask-cache-max-mb": 0.01})  # does not fit: S every step
    assert "mask-cache-max-mb" in capped.disabled_reason and capped.nbytes == 0


# ------------------------------------------------------------------------------------------- on disk
def _client_rounds(run_config: dict, rounds: int, fresh_process_each_round: bool):
    """``rounds`` ClientApp train calls on partition 0; a fresh process each round forgets in-memory caches."""
    from flwr.app import Context, RecordDict

    from fedsq_app import client_app
    from fedsq_app.task import global_arrays

    model, _, sha = client_app.local_model(RunConfig.from_mapping(run_config))
    arrays, caches = global_arrays(model), []
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=run_config)
    for _ in range(rounds):
        if fresh_process_each_round:
            maskcache.REGISTRY.caches.clear()
        reply = client_app.train(_train_message(arrays, sha), context)
        assert not reply.has_error(), reply.error.reason
        arrays = reply.content["arrays"]
        caches += list(maskcache.REGISTRY.caches.values())[-1:]
    return {k: v.numpy() for k, v in arrays.items()}, caches


def test_a_new_process_reads_the_stored_masks_and_trains_bit_identically(fedsq_cache):
    """Deployment: a fresh ClientApp per round. Round 1 fills and stores; round 2 runs S for no sample."""
    _clear_store(fedsq_cache)
    base = {"max-train-samples": 300, "batch-size": 16}
    live, _ = _client_rounds({**base, "mask-cache": "off"}, 2, fresh_process_each_round=True)
    stored, (first, second) = _client_rounds(base, 2, fresh_process_each_round=True)
    assert first is not second  # the registry was emptied: the second round's cache came from disk
    assert first.loaded == 0 and first.misses > 0
    assert second.loaded == second.num_samples and second.misses == 0 and second.hits > 0
    assert len(list((fedsq_cache / "masks").glob("*.safetensors"))) == 1
    assert live.keys() == stored.keys() and all((live[k] == stored[k]).all() for k in live)


def _stored(dual, images, spec, device="cpu"):
    return maskcache.store_path(dual.structural_sha256(), spec, images, fold_bn=dual.fold_bn,
                                device=torch.device(device))


def test_anything_a_mask_depends_on_names_another_file(fedsq_cache):
    from fedsq_app.data.tensors import InputSpec

    spec = InputSpec(1, 0, (0.5,), (0.5,))
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    dual = _dual(0)
    path, digest = _stored(dual, images, spec)
    assert _stored(_dual(0), images.clone(), spec) == (path, digest)  # same S, spec, images: same file
    changed_pixel = images.clone()
    changed_pixel[3, 0, 5, 5] ^= 1
    others = [_stored(_dual(1), images, spec), _stored(dual, changed_pixel, spec),
              _stored(dual, images, InputSpec(1, 32, (0.5,), (0.5,))), _stored(dual, images, spec, "meta"),
              _stored(dual, images, InputSpec(1, 0, (0.4,), (0.5,)))]
    assert len({p for p, _ in others} | {path}) == len(others) + 1


def test_a_corrupt_or_foreign_store_is_ignored_and_rewritten(fedsq_cache, caplog):
    import logging

    dual = _dual()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    store = (fedsq_cache / "masks" / "test-corrupt.safetensors", "digest-a")
    store[0].parent.mkdir(parents=True, exist_ok=True)
    store[0].write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        cache = maskcache.MaskCache(8, max_bytes=2**30, store=store)
        assert cache.load(torch.device("cpu")) == 0 and "ignoring" in caplog.text
    cache.gates(dual, x, torch.arange(8))
    cache.save()
    again = maskcache.MaskCache(8, max_bytes=2**30, store=store)
    assert again.load(torch.device("cpu")) == 8
    want = [a > 0 for a in dual.structural_activations(x)]
    assert all(torch.equal(g > 0, w) for g, w in zip(again.gates(dual, x, torch.arange(8)), want, strict=True))
    assert again.misses == 0
    # the same file under another digest (say, another S) is not read
    assert maskcache.MaskCache(8, max_bytes=2**30, store=(store[0], "digest-b")).load(torch.device("cpu")) == 0
    store[0].unlink()


def test_the_store_folder_stays_under_the_cap_oldest_first(fedsq_cache):
    _clear_store(fedsq_cache)
    dual = _dual()
    x = torch.randn(8, 1, 28, 28)
    folder = fedsq_cache / "masks"
    per_file = None
    for i in range(3):
        cache = maskcache.MaskCache(8, max_bytes=2**30, store=(folder / f"c{i}.safetensors", f"d{i}"))
        cache.gates(dual, x, torch.arange(8))
        cache.save()
        per_file = per_file or (folder / "c0.safetensors").stat().st_size
        os.utime(folder / f"c{i}.safetensors", (1000 + i, 1000 + i))  # c0 oldest
    # room for the new file and about one more: c0 then c1 go, the newest of the others stays
    cache = maskcache.MaskCache(8, max_bytes=int(2.5 * per_file), store=(folder / "c3.safetensors", "d3"))
    cache.gates(dual, x, torch.arange(8))
    cache.save()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["c2.safetensors", "c3.safetensors"]
    _clear_store(fedsq_cache)
