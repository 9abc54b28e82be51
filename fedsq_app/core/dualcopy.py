"""DualCopy: a frozen structural copy S gates a trainable quantitative copy Q.

At every ReLU call S records its output ``a_S = ReLU(z_S)``; Q, at the same call position, outputs
``m ⊙ z_Q`` with ``m = 1[z_S > 0]`` instead of ``ReLU(z_Q)``. Masks are matched by *call order*, not by
module, because torchvision's ``BasicBlock`` calls one ``self.relu`` twice.

The gate is one fused kernel: ``aten.threshold_backward(z_Q, a_S, 0)`` returns ``z_Q`` where ``a_S > 0``
and 0 elsewhere, which is exactly ``m ⊙ z_Q`` (``a_S > 0`` iff ``z_S > 0``). It is differentiable in
``z_Q``, and it needs no separate mask tensor: S's activation *is* the mask.

ReLU6 (MobileNetV2) is gated exactly too, with two masks from S: ``on = 1[z_S > 0]`` and ``linear =
1[z_S < 6]``. Q outputs ``z_Q`` where S is on and linear, 0 where S is off, and the constant 6 where S is
saturated: the same piecewise-linear regime as S, with Q's values (docs/LIBRARY.md says why).

What DualCopy refuses, always with ``UnsupportedActivationError`` naming the layer or module: any other
activation module (GELU, SiLU, Hardswish, LeakyReLU, ...), a Transformer layer (its activation is applied
inside its own forward), and activation *functions* called in a forward (``F.relu``, ``torch.relu``,
``x.relu()``, ``F.gelu``, ...), found by tracing the model with torch.fx (or, for a model fx cannot trace,
by watching the first forward pass): such a call would stay an ungated nonlinearity in Q.

Fast S (``fast=True``, the default; docs/PERFORMANCE.md): S runs as a torch.fx graph that stops right after
its last ReLU (the layers behind it only feed S's unused logits). ``fold_bn=True`` additionally folds each
eval-mode BatchNorm into the conv before it. Both are exact up to float reordering; folding can flip the
mask of a unit whose pre-activation is within ~1e-7 of 0, so it is off by default. ``fast=False`` is the
straightforward reference that the tests compare every fast path against.

Tracing: under ``torch.compile``, ``torch.export`` (so also ``torch.onnx.export(..., dynamo=True)``) and
``torch.jit.trace``, S runs as is, not as the fast graph: the fast graph's cache key reads S's data pointers,
which a tracer's fake tensors do not have, building the graph inside a trace would record that build too, and
the tracer drops S's unused head by itself. S, the gates and Q then trace into one graph (S inside a no-grad
region), with no graph break, whether S runs or ``gates`` are passed in; ``fold_bn`` has no effect there.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from typing import Mapping

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fedsq_app.core.gateable import (FunctionalActivationWatch, UnsupportedActivationError, check_gateable,
                                     functional_refusal, gate_names)
from fedsq_app.core.wire import check_structural_sha256, named_structural_sha256

__all__ = ["DualCopy", "UnsupportedActivationError", "check_gateable", "check_structural", "fast_structural",
           "state_dict_sha256", "travelling_module"]

log = logging.getLogger(__name__)
RELU6_MAX = 6.0

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
    """S's ReLU (or ReLU6, ``upper=6``): computes it out of place (the output must survive later in-place
    ops) and records it."""

    _is_impure = True  # torch.fx must never drop it as dead code: its effect is the recording

    def __init__(self, tape: _GateTape, upper: float | None = None) -> None:
        super().__init__()
        self.tape, self.upper = tape, upper

    def forward(self, z_s: torch.Tensor) -> torch.Tensor:
        a_s = torch.relu(z_s) if self.upper is None else torch.clamp(z_s, 0.0, self.upper)
        self.tape.activations.append(a_s)
        return a_s


class _GatedLinear(nn.Module):
    """Q's replacement for ReLU: passes z_Q where S was on, 0 where S was off. Never Q's own ReLU.

    For ReLU6 (``upper=6``) S's activation carries two masks, on = ``a_S > 0`` and linear = ``a_S < 6``:
    Q passes z_Q where both hold, 0 where S was off, and 6 where S was saturated.
    """

    def __init__(self, tape: _GateTape, upper: float | None = None) -> None:
        super().__init__()
        self.tape, self.upper = tape, upper

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        gate = self.tape.next_activation(z_q)  # S's activation, or a cached 0/1 mask: "> 0" means on
        if self.upper is not None:
            if gate.dtype == torch.bool:
                raise RuntimeError("a ReLU6 gate needs S's activation (two masks: on, and not saturated); "
                                   "a one-bit mask cannot gate it: turn the mask cache off for this model")
            # Both masks decided on S's activation in its own (fp32) dtype, then applied in Q's dtype.
            linear = gate < self.upper
            saturated = (~linear).to(z_q.dtype) * self.upper
            return torch.where(linear & (gate > 0), z_q, saturated)
        if gate.dtype != z_q.dtype and gate.dtype != torch.bool:
            # Mixed precision: S ran in fp32, Q in bf16. Decide "on" in fp32 (a tiny positive fp32 value could
            # round to 0 in bf16), then gate in Q's dtype.
            gate = gate > 0
        return torch.ops.aten.threshold_backward(z_q, gate, 0)


def _upper(module: nn.Module) -> float | None:
    return RELU6_MAX if isinstance(module, nn.ReLU6) else None


def _replace_relus(model: nn.Module, relu_names: list[str], make: callable) -> None:
    for name in relu_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(_upper(getattr(parent, child))))


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

    Guarantees:
    - **S is frozen and never travels.** S's parameters have ``requires_grad=False`` and never receive a
      gradient; S stays in eval mode (BN on running statistics, dropout off) whatever ``.train()`` says, so
      its masks are a fixed function of the input. Only Q (``self.quantitative``, see ``travelling_module``)
      is sent and averaged; S is rebuilt on every node from the same start weights, which
      ``structural_sha256()`` lets the server and the nodes compare (``check_structural``).
    - **Masks are matched by ReLU call order**, not by module: the k-th ReLU call in Q's forward is gated by
      the k-th ReLU call in S's (torchvision's ``BasicBlock`` calls one ``self.relu`` twice). At init, with
      both copies in eval mode, ``DualCopy(model)(x)`` equals ``model(x)`` up to float rounding.
    - **What is refused**, in the constructor, with ``UnsupportedActivationError`` naming the layer or module:
      any activation module but ``nn.ReLU``/``nn.ReLU6``, Transformer layers, activation functions called in
      a forward (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.gelu``...; a model torch.fx cannot trace is
      checked at its first forward pass instead), and a model without any ReLU. See ``check_gateable``.

    ``model`` is the pretrained network with its new task head already attached. S keeps the head too
    (its output is never used: no ReLU follows the head, so the head is ungated).
    ``fast``: run S as a graph cut after its last ReLU (see module docstring); ``fold_bn``: also fold BN.
    """

    def __init__(self, model: nn.Module, *, fast: bool = True, fold_bn: bool = False) -> None:
        super().__init__()
        relu_names, traced = gate_names(model)
        self._tape = _GateTape()
        self.structural = copy.deepcopy(model)
        self.quantitative = copy.deepcopy(model)
        _replace_relus(self.structural, relu_names, lambda upper: _RecordReLU(self._tape, upper))
        _replace_relus(self.quantitative, relu_names, lambda upper: _GatedLinear(self._tape, upper))
        for parameter in self.structural.parameters():
            parameter.requires_grad_(False)
        self.structural.eval()
        self.fast, self.fold_bn = fast, fold_bn
        # Untraceable model: its forward is watched for activation functions once, at the first S pass.
        self._watch_first_pass = not traced
        # The fast S is derived state, kept out of the module tree (so out of state_dict() and .to()), and
        # rebuilt whenever S's tensors move or change: _fast_key records which tensors it was built from.
        object.__setattr__(self, "_fast_structural", None)
        object.__setattr__(self, "_fast_key", None)
        object.__setattr__(self, "_sha256", (None, ""))

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
        if not self.fast or self._watch_first_pass or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.structural  # under a tracer: see the module docstring
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
            if self._watch_first_pass:
                with FunctionalActivationWatch(self.structural, own_gates=_RecordReLU) as watch:
                    self.structural(x)
                if watch.calls:
                    self._tape.start()
                    raise UnsupportedActivationError(functional_refusal(self.structural, watch.calls))
                self._watch_first_pass = False
            else:
                self._structural_runner()(x)
            activations = self._tape.activations
        self._tape.start()
        return activations

    def structural_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """S's ReLU outputs for ``x`` in call order (``> 0`` gives the masks)."""
        return list(self._structural_pass(x))

    def masks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The binary gating masks ``1[z_S > 0]`` for ``x``, in ReLU call order (for ReLU6 gates, the "on"
        mask; its second mask is ``structural_activations(x)[k] < 6``)."""
        return [a > 0 for a in self.structural_activations(x)]

    def mask_bits_per_sample(self, x: torch.Tensor) -> int:
        """Bits that fix one sample's gates at ``x``'s input size: 1 per ReLU unit call, 2 per ReLU6 unit call."""
        bits = []

        def count(recorder: _RecordReLU, args, out: torch.Tensor) -> None:
            bits.append(out[0].numel() * (1 if recorder.upper is None else 2))

        hooks = [m.register_forward_hook(count) for m in self.structural.modules() if isinstance(m, _RecordReLU)]
        try:
            self.structural_activations(x[:1])
        finally:
            for hook in hooks:
                hook.remove()
        return sum(bits)

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
        """SHA-256 of S's weights and buffers (``state_dict_sha256``); recomputed only when S's tensors change."""
        key = self._structural_tensors_key()
        if self._sha256[0] != key:
            object.__setattr__(self, "_sha256", (key, state_dict_sha256(self.structural.state_dict())))
        return self._sha256[1]


def travelling_module(model: nn.Module) -> nn.Module:
    """What goes over the wire: Q (``model.quantitative``) for a DualCopy, the whole network otherwise.

    S never travels: send ``ArrayRecord(travelling_module(model).state_dict())`` and load replies with
    ``travelling_module(model).load_state_dict(...)``; its keys are the plain model's keys, so the traffic
    is exactly FedAvg's.
    """
    return model.quantitative if isinstance(model, DualCopy) else model


def check_structural(model: DualCopy, config: Mapping) -> None:
    """On a node: raise ``StructuralMismatchError`` unless ``config`` (the train config a ``FedSQ`` server
    sends, key ``structural-sha256``) names this DualCopy's S. Averaging Q trained under different gates
    would mix different functions; every node must build S from the same start weights. A config without
    the key (a server that is not FedSQ) is refused too: the node cannot know which S the server gates with."""
    check_structural_sha256(named_structural_sha256(config), model.structural_sha256())
