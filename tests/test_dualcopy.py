"""The DualCopy mechanism, exactly: identity at init, S frozen, masks fixed, Q's gradients by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomise_bn
from fedsq_app.core.dualcopy import DualCopy, UnsupportedActivationError, state_dict_sha256
from fedsq_app.runtime.models import build_model, reset_head


@pytest.mark.parametrize("name,kwargs,shape", [
    ("smallcnn", {"in_channels": 1}, (16, 1, 28, 28)),
    ("resnet18", {"small_stem": True}, (8, 3, 32, 32)),
    ("resnet18", {}, (4, 3, 64, 64)),
    ("alexnet", {}, (4, 3, 64, 64)),
])
def test_identity_at_init(name, kwargs, shape):
    torch.manual_seed(0)
    model = build_model(name, 10, **kwargs)
    randomise_bn(model)
    reset_head(model, name, head_seed=3)
    model.eval()
    dual = DualCopy(model).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        got = dual(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_resnet_masks_follow_call_order():
    """BasicBlock calls one self.relu twice: 1 stem gate + 8 blocks × 2 = 17 masks, distinct shapes in order."""
    model = build_model("resnet18", 10, small_stem=True).eval()
    dual = DualCopy(model)
    masks = dual.masks(torch.randn(2, 3, 32, 32))
    assert len(masks) == 17
    assert all(m.dtype == torch.bool for m in masks)
    assert [tuple(m.shape[1:2]) for m in masks] == [(64,)] * 5 + [(128,)] * 4 + [(256,)] * 4 + [(512,)] * 4


def test_alexnet_has_seven_gates():
    dual = DualCopy(build_model("alexnet", 10))
    assert len(dual.masks(torch.randn(2, 3, 64, 64))) == 7


def test_training_leaves_structural_copy_untouched():
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, in_channels=1)
    dual = DualCopy(model)
    before = {k: v.clone() for k, v in dual.structural.state_dict().items()}
    probe = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    masks_before = dual.masks(probe)
    q_before = {k: v.clone() for k, v in dual.quantitative.state_dict().items()}

    dual.train()
    assert not dual.structural.training and dual.quantitative.training
    optimizer = torch.optim.SGD([p for p in dual.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for step in range(5):
        x = torch.randn(16, 1, 28, 28)
        loss = F.cross_entropy(dual(x), torch.randint(0, 10, (16,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    after = dual.structural.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "S changed during training"
    assert all(p.grad is None for p in dual.structural.parameters()), "S received gradients"
    assert all(not p.requires_grad for p in dual.structural.parameters())
    assert [torch.equal(a, b) for a, b in zip(masks_before, dual.masks(probe))] == [True] * len(masks_before)
    q_after = dual.quantitative.state_dict()
    assert any(not torch.equal(q_before[k], q_after[k]) for k in q_before), "Q did not train"
    assert dual.structural_sha256() == state_dict_sha256(before)


def test_gradients_equal_hand_written_reference():
    """Two-layer net: y = W2 (m ⊙ (W1 x + b1)) + b2 with m = 1[W1s x + b1s > 0], gradients by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    dual = DualCopy(net)
    with torch.no_grad():  # make Q differ from S so that Q's own ReLU would give other gates
        for p in dual.quantitative.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(10, 4)
    target = torch.randint(0, 3, (10,))
    loss = F.cross_entropy(dual(x), target)
    loss.backward()

    w1s, b1s = net[0].weight, net[0].bias
    w1, b1 = dual.quantitative[0].weight.detach(), dual.quantitative[0].bias.detach()
    w2, b2 = dual.quantitative[2].weight.detach(), dual.quantitative[2].bias.detach()
    m = ((x @ w1s.T + b1s) > 0).float()
    h = m * (x @ w1.T + b1)
    y = h @ w2.T + b2
    g_y = (torch.softmax(y, dim=1) - F.one_hot(target, 3).float()) / len(x)
    g_z = (g_y @ w2) * m
    assert torch.allclose(dual.quantitative[2].weight.grad, g_y.T @ h, atol=1e-6)
    assert torch.allclose(dual.quantitative[2].bias.grad, g_y.sum(0), atol=1e-6)
    assert torch.allclose(dual.quantitative[0].weight.grad, g_z.T @ x, atol=1e-6)
    assert torch.allclose(dual.quantitative[0].bias.grad, g_z.sum(0), atol=1e-6)
    # Q never applies its own ReLU: the gated pre-activation can be negative where S is on.
    with torch.no_grad():
        assert torch.allclose(dual(x), y, atol=1e-6)


# ReLU6 is gated exactly (tests/test_library.py), not refused.
@pytest.mark.parametrize("activation", [nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.LeakyReLU()])
def test_unsupported_activation_is_refused(activation):
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), activation, nn.Linear(4, 2))
    with pytest.raises(UnsupportedActivationError, match=rf"layer '3' is {type(activation).__name__}"):
        DualCopy(net)


def test_structural_pass_keeps_dropout_off_and_bn_frozen():
    model = build_model("alexnet", 10)
    dual = DualCopy(model).train()
    x = torch.randn(2, 3, 64, 64)
    first = [a.clone() for a in dual.structural_activations(x)]
    second = dual.structural_activations(x)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "S is not deterministic in train mode"
