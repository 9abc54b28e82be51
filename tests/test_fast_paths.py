"""Every fast path equals the straightforward DualCopy (``fast=False``): outputs, masks, gradients.

Also: mask cache on vs off gives identical weights, a cache over its cap falls back cleanly, and bf16
autocast sees the same masks as fp32. No timing here: ``fedsq-perf`` measures.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomise_bn
from fedsq_app.runtime import maskcache
from fedsq_app.data.tensors import InputSpec, TensorData
from fedsq_app.core.dualcopy import DualCopy
from fedsq_app.runtime.models import build_model, reset_head
from fedsq_app.runtime.train import LocalSchedule, autocast, train_local

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning threads are much slower. Results do not
    depend on it: every comparison here is between two runs in the same setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


CASES = [
    ("smallcnn", {"in_channels": 1}, (16, 1, 28, 28)),
    ("resnet18", {"small_stem": True}, (4, 3, 32, 32)),
    ("alexnet", {}, (4, 3, 64, 64)),
]


def _pretrained_like(name, kwargs, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, 10, **kwargs)
    randomise_bn(model, seed)
    reset_head(model, name, head_seed=1)
    return model


def _step(dual, x, y):
    """One training-mode forward/backward: (logits, {name: grad})."""
    dual.train()
    dual.zero_grad(set_to_none=True)
    logits = dual(x)
    F.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in dual.quantitative.named_parameters()}


@pytest.mark.parametrize("name,kwargs,shape", CASES)
def test_fast_structural_equals_reference_exactly(name, kwargs, shape):
    model = _pretrained_like(name, kwargs)
    reference, fast = DualCopy(model, fast=False), DualCopy(model, fast=True)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (shape[0],), generator=torch.Generator().manual_seed(3))
    assert isinstance(fast._structural_runner(), torch.fx.GraphModule)  # the fast path really is in use
    for a, b in zip(reference.structural_activations(x), fast.structural_activations(x), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(4)  # AlexNet's dropout in Q
    logits_ref, grads_ref = _step(reference, x, y)
    torch.manual_seed(4)
    logits_fast, grads_fast = _step(fast, x, y)
    assert torch.equal(logits_ref, logits_fast)
    assert all(torch.equal(grads_ref[k], grads_fast[k]) for k in grads_ref)
    # The fast S is derived state: no new keys in state_dict, S's hash unchanged.
    assert fast.state_dict().keys() == reference.state_dict().keys()
    assert fast.structural_sha256() == reference.structural_sha256()


@pytest.mark.parametrize("name,kwargs,shape", CASES[:2])
def test_folded_bn_equals_reference_within_rounding(name, kwargs, shape):
    model = _pretrained_like(name, kwargs)
    reference, folded = DualCopy(model, fast=False), DualCopy(model, fold_bn=True)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (shape[0],), generator=torch.Generator().manual_seed(3))
    runner = folded._structural_runner()
    called = [runner.get_submodule(n.target) for n in runner.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in called), "a BatchNorm was left unfolded"
    for depth, (a, b) in enumerate(zip(reference.structural_activations(x), folded.structural_activations(x),
                                        strict=True), start=1):
        scale = max(1.0, a.abs().max().item())
        # Float reordering only: about 1e-6 relative per layer, compounding through deeper layers.
        assert (a - b).abs().max().item() <= 1e-6 * scale * depth
        # A mask can flip only where |z_S| is at rounding level: none on this probe.
        assert torch.equal(a > 0, b > 0)
    logits_ref, grads_ref = _step(reference, x, y)
    logits_fold, grads_fold = _step(folded, x, y)
    assert torch.allclose(logits_ref, logits_fold, atol=1e-5, rtol=1e-5)
    assert all(torch.allclose(grads_ref[k], grads_fold[k], atol=1e-5, rtol=1e-4) for k in grads_ref)


def test_fast_structural_follows_changes_to_s():
    """Loading other weights into S (or moving it) rebuilds the fast graph: never stale masks."""
    model = _pretrained_like("smallcnn", {"in_channels": 1})
    fast = DualCopy(model)
    x = torch.randn(8, 1, 28, 28)
    fast.masks(x)
    other = _pretrained_like("smallcnn", {"in_channels": 1}, seed=7)
    fast.structural.load_state_dict(other.state_dict())
    expected = DualCopy(other, fast=False).masks(x)
    assert all(torch.equal(a, b) for a, b in zip(expected, fast.masks(x), strict=True))


def test_untraceable_model_falls_back_to_plain_structural(caplog):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.relu, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.fc2(self.relu(self.fc1(x)))

    net = Branchy()
    dual = DualCopy(net)
    x = torch.randn(5, 4)
    with caplog.at_level(logging.WARNING):
        masks = dual.masks(x)
    assert dual._structural_runner() is dual.structural
    assert "cannot trace S" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(masks, DualCopy(net, fast=False).masks(x)))


def test_pack_unpack_roundtrip():
    masks = torch.rand(3, 5, 7, 3) > 0.5  # 105 bits per sample: not a multiple of 8
    packed = maskcache.pack(masks)
    assert packed.shape == (3, 14) and packed.dtype == torch.uint8
    assert torch.equal(maskcache.unpack(packed, masks.shape[1:]), masks)


def _tiny_data(n=80, seed=0):  # batches of 32, 32, 16
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return TensorData(images, torch.randint(0, 10, (n,), generator=generator))


SPEC = InputSpec(1, 0, (0.5,), (0.5,))
SCHEDULE = LocalSchedule(epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _train(cache, data, amp="off", schedule=SCHEDULE):
    dual = DualCopy(_pretrained_like("smallcnn", {"in_channels": 1}))
    result = train_local(dual, data, SPEC, schedule, device=torch.device("cpu"), seed=5, mask_cache=cache, amp=amp)
    return result, dual.quantitative.state_dict()


def test_mask_cache_gives_identical_weights():
    data = _tiny_data()  # no tiny last batch: a GEMV path for 1-7 rows may round S differently
    plain, weights_plain = _train(None, data)
    cache = maskcache.MaskCache(len(data), max_bytes=2**30)
    cached, weights_cached = _train(cache, data)
    assert cache.hits == 3 and cache.misses == 3  # epoch 1 fills, epoch 2 only looks up
    assert cached.train_loss == plain.train_loss
    assert all(torch.equal(weights_plain[k], weights_cached[k]) for k in weights_plain)
    assert cache.nbytes == len(data) * maskcache.bytes_per_sample(cache.shapes)


def test_mask_cache_over_its_cap_falls_back_to_s(caplog):
    data = _tiny_data()
    plain, weights_plain = _train(None, data)
    cache = maskcache.MaskCache(len(data), max_bytes=1024)  # far below 80 samples' masks
    with caplog.at_level(logging.WARNING):
        result, weights = _train(cache, data)
    assert "computing S every step" in cache.disabled_reason and "mask-cache-max-mb" in caplog.text
    assert cache.nbytes == 0 and cache.hits == 0
    assert result.train_loss == plain.train_loss
    assert all(torch.equal(weights_plain[k], weights[k]) for k in weights_plain)


def test_registry_drops_the_oldest_client_to_stay_under_the_cap():
    registry = maskcache.CacheRegistry()
    dual = DualCopy(_pretrained_like("smallcnn", {"in_channels": 1}))
    x = SPEC.prepare(_tiny_data(8).images)
    per_client = 8 * maskcache.bytes_per_sample([a.shape[1:] for a in dual.structural_activations(x[:1])])
    max_mb = 1.5 * per_client / 2**20  # room for one client's masks, not two
    first = registry.get("client-a", 8, max_mb)
    first.gates(dual, x, torch.arange(8))
    second = registry.get("client-b", 8, max_mb)
    second.gates(dual, x, torch.arange(8))
    assert list(registry.caches) == ["client-b"] and registry.total_bytes() == per_client
    assert registry.get("client-b", 8, max_mb) is second  # the same client finds its masks again


def test_amp_masks_equal_fp32_masks():
    dual = DualCopy(_pretrained_like("resnet18", {"small_stem": True}))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    fp32 = dual.masks(x)
    with autocast(torch.device("cpu"), "bf16"):
        amp_masks = dual.masks(x)
        logits = dual.train()(x)
    assert all(torch.equal(a, b) for a, b in zip(fp32, amp_masks, strict=True))
    assert logits.dtype == torch.bfloat16  # Q did run in bf16
    F.cross_entropy(logits.float(), torch.zeros(4, dtype=torch.long)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dual.quantitative.parameters())


def test_amp_training_runs_and_differs_only_by_precision():
    data = _tiny_data()
    one_epoch = LocalSchedule(epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4)
    fp32, _ = _train(None, data, schedule=one_epoch)
    bf16, _ = _train(maskcache.MaskCache(len(data), max_bytes=2**30), data, amp="bf16", schedule=one_epoch)
    assert abs(bf16.train_loss - fp32.train_loss) < 0.1 * fp32.train_loss


def test_client_app_with_mask_cache_replies_identical_weights(fedsq_cache):
    """The ClientApp path: two rounds with mask-cache=on reply exactly what mask-cache=off replies."""
    import time

    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    from fedsq_app import client_app
    from fedsq_app.config import RunConfig
    from fedsq_app.task import global_arrays

    def message(arrays, server_round, sha):
        metadata = Metadata(run_id=1, message_id=f"m{server_round}", src_node_id=0, dst_node_id=3,
                            reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                            message_type="train")
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round,
                                                                         "structural-sha256": sha})})
        return Message(content=content, metadata=metadata)

    def run(run_config):
        model, _, sha = client_app.local_model(RunConfig.from_mapping(run_config))
        arrays = global_arrays(model)
        context = Context(run_id=1, node_id=3, node_config={"partition-id": 1, "num-partitions": 3},
                          state=RecordDict(), run_config=run_config)
        for server_round in (1, 2):
            reply = client_app.train(message(arrays, server_round, sha), context)
            assert not reply.has_error(), reply.error.reason
            arrays = reply.content["arrays"]
        return {k: v.numpy() for k, v in arrays.items()}

    base = {"max-train-samples": 300, "batch-size": 16}
    off = run(base)
    on = run({**base, "mask-cache": "on"})
    caches = [c for k, c in maskcache.REGISTRY.caches.items() if k[2].partition_id == 1]
    assert caches and caches[-1].hits > 0  # round 2 used the cached masks
    assert off.keys() == on.keys() and all((off[k] == on[k]).all() for k in off)
