"""The one local training loop and the one evaluation loop.

Used by the ClientApp (simulation and deployment), the ServerApp's central evaluation, the pretrain
command and the benchmarks, so every number in this project comes from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedsq_app.data.tensors import InputSpec, TensorData
from fedsq_app.runtime import maskcache


@dataclass(frozen=True)
class LocalSchedule:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    proximal_mu: float = 0.0  # FedProx: (mu/2)·||w - w_global||² on the trained parameters
    augment: bool = False  # random crop (4 px zero padding) + horizontal flip of every training batch


@dataclass(frozen=True)
class TrainResult:
    train_loss: float  # mean cross-entropy over all samples seen in training
    num_examples: int  # size of the local dataset (the aggregation weight)
    steps: int
    skipped: int = 0  # samples left out because they would have formed a one-sample batch (BatchNorm)


class MomentumSGD:
    """SGD with momentum and weight decay, the update of ``torch.optim.SGD`` (no dampening, no Nesterov).

    Written out because ``torch.optim``'s ``step`` imports ``torch._dynamo`` on first use: ~1.1 s of CPU in
    every deployed ClientApp, which Flower starts afresh for each message. ``tests/test_train_loop.py``
    checks it is bit-identical to ``torch.optim.SGD``.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float, weight_decay: float) -> None:
        self.params, self.lr, self.momentum, self.weight_decay = list(params), lr, momentum, weight_decay
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            if param.grad is None:  # as torch.optim: no gradient, no update, no momentum
                continue
            grad = param.grad if self.weight_decay == 0 else param.grad.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                buffer = self.momentum_buffers[i]
                if buffer is None:
                    buffer = self.momentum_buffers[i] = grad.detach().clone()
                else:
                    buffer.mul_(self.momentum).add_(grad)
                grad = buffer
            param.add_(grad, alpha=-self.lr)


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device, amp: str):
    """``amp='bf16'``: Q's forward in bfloat16 autocast (a DualCopy keeps S in fp32); ``'off'``: fp32."""
    if amp not in ("off", "bf16"):
        raise ValueError(f"amp must be 'off' or 'bf16', got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def step_plan(num_samples: int, batch_size: int, epochs: int, drop_single: bool) -> tuple[int, int]:
    """(optimiser steps, samples skipped) of a local run. ``drop_single``: one-sample batches are skipped
    (BatchNorm in train mode normalises a batch by its own statistics; one sample has none worth using)."""
    full, rest = divmod(num_samples, batch_size)
    if drop_single and batch_size == 1:
        return 0, num_samples * epochs
    single_rest = drop_single and rest == 1
    return epochs * (full + (1 if rest and not single_rest else 0)), epochs * (1 if single_rest else 0)


def _batches(num_samples: int, batch_size: int, generator: torch.Generator, drop_single: bool):
    order = torch.randperm(num_samples, generator=generator)
    for start in range(0, num_samples, batch_size):
        batch = order[start : start + batch_size]
        if len(batch) > 1 or not drop_single:  # counted in step_plan's ``skipped``
            yield batch


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The paper preset's augmentation: per image, a random crop of the zero-padded (normalised) image at its
    own size and a horizontal flip with probability 1/2; drawn from ``generator``, so runs are reproducible."""
    n, channels, height, width = x.shape
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=generator) for _ in range(2))
    flip = torch.rand(n, generator=generator) < 0.5
    rows = torch.arange(height)[None, :] + dy[:, None]
    cols = torch.arange(width)[None, :] + dx[:, None]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = F.pad(x, (pad, pad, pad, pad))
    index = (torch.arange(n)[:, None, None, None], torch.arange(channels)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :])
    return padded[tuple(i.to(x.device) for i in index)]


def train_local(
    model: nn.Module,
    data: TensorData,
    spec: InputSpec,
    schedule: LocalSchedule,
    *,
    device: torch.device,
    seed: int,
    mask_cache: maskcache.MaskCache | None = None,
    amp: str = "off",
) -> TrainResult:
    """SGD on ``data`` for ``schedule.epochs``; only parameters with ``requires_grad`` are trained.

    For a DualCopy those are Q's: S is frozen. The optimiser (and its momentum) is fresh each call,
    the usual stateless-client choice. ``mask_cache``: S's masks by sample index (``fedsq_app.runtime.maskcache``);
    ``amp``: see ``autocast``.
    """
    drop_single = has_batchnorm(model)
    planned, skipped = step_plan(len(data), schedule.batch_size, schedule.epochs, drop_single)
    if planned == 0:  # refuse a silent no-op: the reply would carry an unchanged model as if trained
        why = ("the model has BatchNorm, which cannot train on one-sample batches: use batch-size >= 2 and "
               "at least 2 samples") if drop_single and len(data) else "there is nothing to train on"
        raise ValueError(f"zero training steps: {len(data)} sample(s), batch-size={schedule.batch_size}, "
                         f"{schedule.epochs} epoch(s); {why}")
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = MomentumSGD(trainable, schedule.lr, schedule.momentum, schedule.weight_decay)
    anchor = [p.detach().clone() for p in trainable] if schedule.proximal_mu > 0 else None
    generator = torch.Generator().manual_seed(seed)
    images, labels = data.images.to(device), data.labels.to(device)
    loss_sum, seen, steps = 0.0, 0, 0
    for _ in range(schedule.epochs):
        for batch in _batches(len(data), schedule.batch_size, generator, drop_single):
            rows = batch.to(device)
            with autocast(device, amp):
                inputs = spec.prepare(images[rows])
                if schedule.augment:
                    inputs = augment_batch(inputs, generator)
                logits = maskcache.forward(model, inputs, batch, mask_cache)
                loss = F.cross_entropy(logits, labels[rows])
            objective = loss
            if anchor is not None:
                drift = sum((p - a).pow(2).sum() for p, a in zip(trainable, anchor))
                objective = loss + 0.5 * schedule.proximal_mu * drift
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            seen += len(batch)
            steps += 1
    if seen and not torch.isfinite(torch.tensor(loss_sum)):
        raise FloatingPointError(f"local training diverged (loss is {loss_sum}); lower lr")
    return TrainResult(train_loss=loss_sum / max(seen, 1), num_examples=len(data), steps=steps, skipped=skipped)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, spec: InputSpec, *, device: torch.device,
             batch_size: int = 256, amp: str = "off") -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) in eval mode."""
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device)
        labels = data.labels[start : start + batch_size].to(device)
        with autocast(device, amp):
            logits = model(spec.prepare(images)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
    return loss_sum / max(len(data), 1), correct / max(len(data), 1)
