"""Which models DualCopy can gate, and why not: every check behind ``UnsupportedActivationError``.

FedSQ gates only ``nn.ReLU`` and ``nn.ReLU6`` *modules*. Refused, always naming the layer or module: any other
activation module, Transformer layers (their activation runs inside their own forward), and activation
functions called in a forward (``F.relu``, ``torch.relu``, ``x.relu()``...), found by torch.fx tracing or,
for a model fx cannot trace, by watching its first forward pass (``FunctionalActivationWatch``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

# Activations that are not a 0/1 gate on their input: DualCopy cannot freeze their "regime".
# (nn.ReLU6 is gated exactly; it subclasses nn.Hardtanh, so it is matched before this list.)
UNSUPPORTED_ACTIVATIONS = (
    nn.GELU, nn.SiLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.RReLU,
    nn.Tanhshrink, nn.Softsign, nn.LogSigmoid, nn.Threshold, nn.GLU,
)
# torch.nn layers that apply an activation inside their own forward (fx keeps them as one opaque call).
OPAQUE_ACTIVATION_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

# Activation functions a forward may call directly: F.<name>, torch.<name>, and the Tensor method.
_ACTIVATION_FUNCTION_NAMES = (
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
    "leaky_relu", "leaky_relu_", "prelu", "elu", "elu_", "selu", "selu_", "celu", "celu_", "softplus",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "rrelu", "rrelu_", "logsigmoid", "softsign", "tanhshrink",
    "threshold", "threshold_", "glu",
)
_ACTIVATION_FUNCTIONS = {
    getattr(namespace, name): f"{prefix}.{name}"
    for namespace, prefix in ((F, "torch.nn.functional"), (torch, "torch"), (torch.Tensor, "Tensor"))
    for name in _ACTIVATION_FUNCTION_NAMES if hasattr(namespace, name)
}


class UnsupportedActivationError(ValueError):
    """The model cannot be gated: an activation other than ``nn.ReLU``/``nn.ReLU6``, an activation
    function called in a forward (``F.relu``, ``x.relu()``, ...), or no ReLU at all. The message names the
    layer or module and the reason."""


def module_refusal(name: str, module: nn.Module) -> str | None:
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return None
    if isinstance(module, UNSUPPORTED_ACTIVATIONS):
        return (f"layer '{name}' is {type(module).__name__}: FedSQ gates only nn.ReLU (a binary on/off regime) "
                "and nn.ReLU6; replace it or use another model")
    if isinstance(module, OPAQUE_ACTIVATION_LAYERS):
        return (f"layer '{name}' is {type(module).__name__}: it applies its activation inside its own forward "
                "(and a fused kernel in eval mode), where S cannot gate Q")
    return None


def function_name(target) -> str | None:
    try:
        return _ACTIVATION_FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None


def functional_activation_calls(model: nn.Module) -> list[tuple[str, str]] | None:
    """``(module path, function)`` for every activation function the model's forwards call, found by
    torch.fx symbolic tracing (``''`` = the model's own forward). ``None`` if fx cannot trace the model."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception as error:  # data-dependent control flow etc.: checked at the first forward instead
        log.info("DualCopy: fx cannot trace %s (%s: %s)", type(model).__name__, type(error).__name__, error)
        return None
    calls = []
    for node in graph.nodes:
        if node.op == "call_function":
            function = function_name(node.target)
        elif node.op == "call_method" and node.target in _ACTIVATION_FUNCTION_NAMES:
            function = f"Tensor.{node.target}"
        else:
            continue
        if function:
            stack = node.meta.get("nn_module_stack") or {}
            calls.append((next(reversed(stack.values()))[0] if stack else "", function))  # (path, type)
    return calls


def functional_refusal(model: nn.Module, calls: list[tuple[str, str]]) -> str:
    modules = dict(model.named_modules())
    counts: dict[tuple[str, str], int] = {}
    for call in calls:
        counts[call] = counts.get(call, 0) + 1
    where = []
    for (path, function), count in counts.items():
        module = modules.get(path)
        owner = f"the model ({type(model).__name__})" if not path else \
            f"module '{path}'" + (f" ({type(module).__name__})" if module is not None else "")
        where.append(f"{owner} calls {function}" + (f" {count} times" if count > 1 else "") + " in its forward")
    return ("; ".join(where[:4]) + (f"; and {len(where) - 4} more modules" if len(where) > 4 else "")
            + ": DualCopy gates only nn.ReLU/nn.ReLU6 *modules*, so such a call would stay an ungated "
              "nonlinearity in Q. Use a module instead (self.relu = nn.ReLU() in __init__, self.relu(x) in forward)")


def gate_names(model: nn.Module) -> tuple[list[str], bool]:
    """(names of the ReLU/ReLU6 modules, whether fx traced the model); raises on anything refused."""
    names = []
    for name, module in model.named_modules():
        reason = module_refusal(name, module)
        if reason:
            raise UnsupportedActivationError(reason)
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            names.append(name)
    calls = functional_activation_calls(model)
    if calls:
        raise UnsupportedActivationError(functional_refusal(model, calls))
    if not names:
        raise UnsupportedActivationError("the model has no nn.ReLU modules: there is nothing to gate")
    return names, calls is not None


def check_gateable(model: nn.Module) -> list[str]:
    """Whether ``DualCopy(model)`` accepts ``model``: the names of its ``nn.ReLU``/``nn.ReLU6`` modules (the
    gates), or ``UnsupportedActivationError`` naming the first layer or module it refuses and why.

    Refused: any other activation module, Transformer layers, activation functions called in a forward
    (found by torch.fx tracing; a model fx cannot trace is checked at DualCopy's first forward instead).
    """
    return gate_names(model)[0]


class FunctionalActivationWatch(TorchFunctionMode):
    """Records activation functions called during a forward pass, and the innermost module calling them:
    the check for models that fx cannot trace."""

    def __init__(self, model: nn.Module, own_gates: type = ()) -> None:
        super().__init__()
        self.own_gates = own_gates  # modules whose activation calls are S's own gates, not the model's
        self.stack: list[nn.Module] = []
        self.calls: list[tuple[str, str]] = []
        self.names = {module: name for name, module in model.named_modules()}
        self.hooks = []
        for module in self.names:
            self.hooks.append(module.register_forward_pre_hook(self._enter))
            self.hooks.append(module.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args) -> None:
        self.stack.append(module)

    def _leave(self, module: nn.Module, args, output) -> None:  # returns None: the output stays as is
        self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        function = function_name(func)
        inner = self.stack[-1] if self.stack else None
        if function and not isinstance(inner, self.own_gates):  # S's own gates are the ReLUs we put there
            self.calls.append((self.names.get(inner, ""), function))
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)
