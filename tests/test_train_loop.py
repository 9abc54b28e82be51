"""The local training loop's optimiser: the update of torch.optim.SGD, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsq_app.runtime.train import MomentumSGD


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    net[0].bias.requires_grad_(False)  # frozen: must stay untouched, as torch.optim leaves it
    return net


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 5e-4), (0.9, 0.0), (0.0, 1e-3), (0.0, 0.0)])
def test_momentum_sgd_is_bit_identical_to_torch_optim_sgd(momentum, weight_decay):
    ours, theirs = _net(0), _net(0)
    trainable = lambda net: [p for p in net.parameters() if p.requires_grad]  # noqa: E731
    optimizers = (MomentumSGD(trainable(ours), 0.05, momentum, weight_decay),
                  torch.optim.SGD(trainable(theirs), lr=0.05, momentum=momentum, weight_decay=weight_decay))
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(5, 1, 8, 8, generator=generator), torch.randint(0, 3, (5,), generator=generator)
        for net, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if step == 2:  # a parameter without a gradient in one step: no update, no momentum change
                net[4].bias.grad = None
            optimizer.step()
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), f"step {step}: {name} differs"
    assert torch.equal(ours[0].bias, _net(0)[0].bias)


def test_zero_grad_drops_gradients():
    net = _net(0)
    optimizer = MomentumSGD([p for p in net.parameters() if p.requires_grad], 0.1, 0.9, 0.0)
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.zero_grad()
    assert all(p.grad is None for p in net.parameters())
