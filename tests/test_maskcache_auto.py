"""The mask cache's packed format and lookups are exact, and ``mask-cache="auto"`` (the default) is on only
when cached masks are right: never under augmentation, and a new S or input spec never reads old masks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsq_app import maskcache
from fedsq_app.config import ConfigError, RunConfig
from fedsq_app.dualcopy import DualCopy
from fedsq_app.models import build_model


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


def test_client_app_auto_caches_without_augmentation_and_not_with_it(fedsq_cache):
    from flwr.app import Context, RecordDict

    from fedsq_app import client_app
    from fedsq_app.task import global_arrays

    def caches_after(run_config):
        maskcache.REGISTRY.caches.clear()
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
