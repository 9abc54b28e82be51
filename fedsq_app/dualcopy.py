"""DualCopy: a frozen structural copy S gates a trainable quantitative copy Q.

At every ReLU call S records its output ``a_S = ReLU(z_S)``; Q, at the same call position, outputs
``m ⊙ z_Q`` with ``m = 1[z_S > 0]`` instead of ``ReLU(z_Q)``. Masks are matched by *call order*, not by
module, because torchvision's ``BasicBlock`` calls one ``self.relu`` twice.

The gate is one fused kernel: ``aten.threshold_backward(z_Q, a_S, 0)`` returns ``z_Q`` where ``a_S > 0``
and 0 elsewhere, which is exactly ``m ⊙ z_Q`` (``a_S > 0`` iff ``z_S > 0``). It is differentiable in
``z_Q``, and it needs no separate mask tensor: S's activation *is* the mask.

Fast S (``fast=True``, the default; docs/PERFORMANCE.md): S runs as a torch.fx graph that stops right after
its last ReLU (the layers behind it only feed S's unused logits). ``fold_bn=True`` additionally folds each
eval-mode BatchNorm into the conv before it. Both are exact up to float reordering; folding can flip the
mask of a unit whose pre-activation is within ~1e-7 of 0, so it is off by default. ``fast=False`` is the
straightforward reference that the tests compare every fast path against.
"""

from __future__ import annotations

import copy
import hashlib
import logging

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

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

    def start(self, activations: list[torch.Tensor] | None = None) -> None:
        self.activations = [] if activations is None else list(activations)
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

    _is_impure = True  # torch.fx must never drop it as dead code: its effect is the recording

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
        gate = self.tape.next_activation(z_q)  # S's activation, or a cached 0/1 mask: "> 0" means on
        if gate.dtype != z_q.dtype and gate.dtype != torch.bool:
            # Mixed precision: S ran in fp32, Q in bf16. Decide "on" in fp32 (a tiny positive fp32 value could
            # round to 0 in bf16), then gate in Q's dtype.
            gate = gate > 0
        return torch.ops.aten.threshold_backward(z_q, gate, 0)


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


class _LeafTracer(fx.Tracer):
    """Keeps S's recording ReLUs as single calls in the graph (their Python side effect must survive)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _RecordReLU) or super().is_leaf_module(module, qualified_name)


def fast_structural(structural: nn.Module, *, fold_bn: bool) -> fx.GraphModule:
    """S as an fx graph that ends at its last ReLU call, optionally with eval BatchNorm folded into convs.

    The graph shares S's modules (no weight copy) except the folded convs, which are new. Raises when
    ``structural`` cannot be traced symbolically (data-dependent control flow): callers fall back to S.
    """
    graph = _LeafTracer().trace(structural)
    module = fx.GraphModule(structural, graph)  # new containers, S's own leaf modules
    modules = dict(module.named_modules())
    if fold_bn:
        for node in list(graph.nodes):
            conv = node.args[0] if node.op == "call_module" and node.args else None
            if (isinstance(modules.get(node.target), nn.BatchNorm2d) and isinstance(conv, fx.Node)
                    and conv.op == "call_module" and isinstance(modules.get(conv.target), nn.Conv2d)
                    and len(conv.users) == 1 and modules[node.target].track_running_stats):
                name = f"_folded_{conv.target.replace('.', '_')}"
                folded = fuse_conv_bn_eval(modules[conv.target].eval(), modules[node.target].eval())
                folded.requires_grad_(False)
                module.add_submodule(name, folded)
                conv.target = name
                node.replace_all_uses_with(conv)
                graph.erase_node(node)
    relus = [n for n in graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), _RecordReLU)]
    if not relus:
        raise RuntimeError("the traced structural copy calls no ReLU")
    # Everything after S's last ReLU only computes S's logits, which nobody reads: cut it off.
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (relus[-1],)
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    return module.eval()


class DualCopy(nn.Module):
    """``DualCopy(model)``: S = frozen copy of ``model`` that gates; Q = trainable copy that computes values.

    ``model`` is the pretrained network with its new task head already attached. S keeps the head too
    (its output is never used: no ReLU follows the head, so the head is ungated).
    ``fast``: run S as a graph cut after its last ReLU (see module docstring); ``fold_bn``: also fold BN.
    """

    def __init__(self, model: nn.Module, *, fast: bool = True, fold_bn: bool = False) -> None:
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
        self.fast, self.fold_bn = fast, fold_bn
        # The fast S is derived state, kept out of the module tree (so out of state_dict() and .to()), and
        # rebuilt whenever S's tensors move or change: _fast_key records which tensors it was built from.
        object.__setattr__(self, "_fast_structural", None)
        object.__setattr__(self, "_fast_key", None)

    def train(self, mode: bool = True) -> DualCopy:
        # S stays in eval mode forever: BN on running stats, dropout off, so the masks are a fixed
        # function of the input, identical on every client and at the server.
        self.training = mode
        self.quantitative.train(mode)
        self.structural.eval()
        return self

    def _structural_tensors_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version, t.dtype) for t in
                     (*self.structural.parameters(), *self.structural.buffers()))

    def _structural_runner(self) -> nn.Module:
        """The module that runs S's forward: the fast graph when enabled and traceable, else S itself."""
        if not self.fast:
            return self.structural
        key = self._structural_tensors_key()
        if self._fast_key != key:
            try:
                runner = fast_structural(self.structural, fold_bn=self.fold_bn)
            except Exception as error:  # untraceable model: correct but slower
                log.warning("DualCopy: cannot trace S for the fast path (%s: %s); running S as is",
                            type(error).__name__, error)
                runner = self.structural
            object.__setattr__(self, "_fast_structural", runner)
            object.__setattr__(self, "_fast_key", key)
        return self._fast_structural

    def _structural_pass(self, x: torch.Tensor) -> list[torch.Tensor]:
        # no_grad, not inference_mode: Q's backward saves S's activations, which inference tensors forbid.
        # autocast off: S's masks are always decided in fp32, so training under bf16 autocast and
        # evaluation in fp32 see the same masks.
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            self._tape.start()
            self._structural_runner()(x)
            activations = self._tape.activations
        self._tape.start()
        return activations

    def structural_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """S's ReLU outputs for ``x`` in call order (``> 0`` gives the masks)."""
        return list(self._structural_pass(x))

    def masks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The binary gating masks ``1[z_S > 0]`` for ``x``, in ReLU call order."""
        return [a > 0 for a in self.structural_activations(x)]

    def forward(self, x: torch.Tensor, gates: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Q's logits gated by S. ``gates``: S's activations or 0/1 masks for ``x`` computed earlier (a mask
        cache); then S does not run."""
        if gates is None:
            gates = self._structural_pass(x)
        self._tape.start(gates)
        try:
            logits = self.quantitative(x)
            if self._tape.position != len(self._tape.activations):
                raise RuntimeError(
                    f"S recorded {len(self._tape.activations)} ReLU calls but Q used {self._tape.position}"
                )
        finally:
            self._tape.start()  # drop references so S's activations are freed with the graph
        return logits

    def structural_sha256(self) -> str:
        return state_dict_sha256(self.structural.state_dict())
