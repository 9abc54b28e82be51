"""FedSQ for your own Flower app: the public API (docs/LIBRARY.md shows a quickstart turned into FedSQ).

    from fedsq_app import DualCopy, FedSQ, travelling_module, check_structural

- ``DualCopy(model)``: S, a frozen copy of your pretrained ``model``, gates Q, a trainable copy. **S is frozen
  and never travels**: only ``travelling_module(model)`` (Q) is sent and averaged. **Masks are matched by
  ReLU call order**: the k-th ReLU call in Q's forward is gated by S's k-th. ReLU6 is gated exactly.
- **What is refused**, when ``DualCopy(model)`` is built, with ``UnsupportedActivationError`` naming the layer
  or module: other activation modules (GELU, SiLU, Hardswish...), Transformer layers, activation functions
  called in a forward (``F.relu``, ``torch.relu``, ``x.relu()``...), a model without ReLU. ``check_gateable``
  answers the same question without building anything.
- ``FedSQ(structural_sha256=..., **FedAvg_kwargs)``: Flower's FedAvg for Q, which validates every reply
  (keys, shapes, dtypes, finite values, ``num-examples``) and drops a bad one instead of ending the run, and
  sends S's hash with every round so that nodes refuse to train under another S (``check_structural``,
  ``StructuralMismatchError``).

- ``load_trained(run_dir)``: a finished run's best model (the DualCopy for FedSQ), in eval mode, with the
  preprocessing its inputs need; S is rebuilt from the recorded backbone and checked against the run's hash.

These names are the public surface; every other module and name in the package is internal to the app.
Importing this package is light: the names load (torch, flwr) on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DualCopy": "fedsq_app.core.dualcopy",
    "UnsupportedActivationError": "fedsq_app.core.gateable",
    "StructuralMismatchError": "fedsq_app.core.wire",
    "check_gateable": "fedsq_app.core.gateable",
    "check_structural": "fedsq_app.core.dualcopy",
    "travelling_module": "fedsq_app.core.dualcopy",
    "FedSQ": "fedsq_app.core.strategy",
    "load_trained": "fedsq_app.trained",
    "Trained": "fedsq_app.trained",
    "TrainedModelError": "fedsq_app.trained",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy: a ClientApp that imports fedsq_app.client_app pays for torch/flwr there, not here.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedsq_app' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
