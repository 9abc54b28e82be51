"""DualCopy: a frozen structural copy S gates a trainable quantitative copy Q.

At every ReLU call S records its output ``a_S = ReLU(z_S)``; Q, at the same call position, outputs
``m ⊙ z_Q`` with ``m = 1[z_S > 0]`` instead of ``ReLU(z_Q)``. Masks are matched by *call order*, not by
module, because torchvision's ``BasicBlock`` calls one ``self.relu`` twice.

The gate is one fused kernel: ``aten.threshold_backward(z_Q, a_S, 0)`` returns ``z_Q`` where ``a_S > 0``
and 0 elsewhere, which is exactly ``m ⊙ z_Q`` (``a_S > 0`` iff ``z_S > 0``). It is differentiable in
``z_Q``, and it needs no separate mask tensor: S's activation *is* the mask.
"""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

# Activations that are not a 0/1 gate on their input: DualCopy cannot freeze their "regime".
UNSUPPORTED_ACTIVATIONS = (
    nn.GELU, nn.SiLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.RReLU,
    nn.Tanhshrink, nn.Softsign, nn.LogSigmoid, nn.Threshold, nn.GLU,
)


class UnsupportedActivationError(ValueError):
    """The model contains an activation DualCopy cannot gate."""


def check_gateable(model: nn.Module) -> list[str]:
    """Return the names of the model's ``nn.ReLU`` modules; raise on any activation that is not ReLU."""
    relu_names = []
    for name, module in model.named_modules():
        if isinstance(module, UNSUPPORTED_ACTIVATIONS):
            raise UnsupportedActivationError(
                f"layer '{name}' is {type(module).__name__}: FedSQ gates only nn.ReLU "
                "(a binary on/off regime); replace it or use another model"
            )
        if isinstance(module, nn.ReLU):
            relu_names.append(name)
    if not relu_names:
        raise UnsupportedActivationError("the model has no nn.ReLU modules: there is nothing to gate")
    return relu_names


class _GateTape:
    """S's activations of one forward pass, in ReLU call order, read back by Q in the same order."""

    def __init__(self) -> None:
        self.activations: list[torch.Tensor] = []
        self.position = 0

    def start(self) -> None:
        self.activations = []
        self.position = 0

    def next_activation(self, like: torch.Tensor) -> torch.Tensor:
        if self.position >= len(self.activations):
            raise RuntimeError(
                f"Q called ReLU #{self.position + 1} but S recorded only {len(self.activations)} calls: "
                "S and Q must have the same architecture"
            )
        activation = self.activations[self.position]
        if activation.shape != like.shape:
            raise RuntimeError(
                f"ReLU call #{self.position + 1}: S's activation has shape {tuple(activation.shape)}, "
                f"Q's pre-activation {tuple(like.shape)}"
            )
        self.position += 1
        return activation


class _RecordReLU(nn.Module):
    """S's ReLU: computes ReLU out of place (the output must survive later in-place ops) and records it."""

    def __init__(self, tape: _GateTape) -> None:
        super().__init__()
        self.tape = tape

    def forward(self, z_s: torch.Tensor) -> torch.Tensor:
        a_s = torch.relu(z_s)
        self.tape.activations.append(a_s)
        return a_s


class _GatedLinear(nn.Module):
    """Q's replacement for ReLU: passes z_Q where S was on, 0 where S was off. Never Q's own ReLU."""

    def __init__(self, tape: _GateTape) -> None:
        super().__init__()
        self.tape = tape

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        a_s = self.tape.next_activation(z_q)
        return torch.ops.aten.threshold_backward(z_q, a_s, 0)


def _replace_relus(model: nn.Module, relu_names: list[str], make: callable) -> None:
    for name in relu_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make())


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over keys, dtypes, shapes and bytes, in sorted key order: identical weights, identical hash."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DualCopy(nn.Module):
    """``DualCopy(model)``: S = frozen copy of ``model`` that gates; Q = trainable copy that computes values.

    ``model`` is the pretrained network with its new task head already attached. S keeps the head too
    (its output is never used: no ReLU follows the head, so the head is ungated).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        relu_names = check_gateable(model)
        self._tape = _GateTape()
        self.structural = copy.deepcopy(model)
        self.quantitative = copy.deepcopy(model)
        _replace_relus(self.structural, relu_names, lambda: _RecordReLU(self._tape))
        _replace_relus(self.quantitative, relu_names, lambda: _GatedLinear(self._tape))
        for parameter in self.structural.parameters():
            parameter.requires_grad_(False)
        self.structural.eval()

    def train(self, mode: bool = True) -> DualCopy:
        # S stays in eval mode forever: BN on running stats, dropout off, so the masks are a fixed
        # function of the input, identical on every client and at the server.
        self.training = mode
        self.quantitative.train(mode)
        self.structural.eval()
        return self

    @torch.no_grad()
    def structural_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """S's ReLU outputs for ``x`` in call order (``> 0`` gives the masks)."""
        self._tape.start()
        self.structural(x)
        return list(self._tape.activations)

    def masks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The binary gating masks ``1[z_S > 0]`` for ``x``, in ReLU call order."""
        return [a > 0 for a in self.structural_activations(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no_grad, not inference_mode: Q's backward saves S's activations, which inference tensors forbid.
        with torch.no_grad():
            self._tape.start()
            self.structural(x)
        logits = self.quantitative(x)
        if self._tape.position != len(self._tape.activations):
            raise RuntimeError(
                f"S recorded {len(self._tape.activations)} ReLU calls but Q used {self._tape.position}"
            )
        self._tape.start()  # drop references so S's activations are freed with the graph
        return logits

    def structural_sha256(self) -> str:
        return state_dict_sha256(self.structural.state_dict())
