"""fedsq-warmup (beyond the paper): ``warmup-rounds`` rounds of FedAvg, then S frozen at that global model.

The server switches once (``switch_to_structural``); ``FedSQWarmup`` (fedsq_app/core/strategy.py) then names the
new S by its SHA-256 and sends S's arrays to each node until that node has them. A node keeps S in its
``Context.state`` (which Flower keeps between a node's messages) and gates with it from then on
(``client_model``). A node that is named an S it cannot verify refuses the round, as plain FedSQ does.
"""

from __future__ import annotations

import copy

from flwr.app import ArrayRecord, Message, RecordDict
from torch import nn

from fedsq_app.core.dualcopy import DualCopy, state_dict_sha256
from fedsq_app.core.wire import STRUCTURAL, check_structural_sha256

_gated: dict[str, DualCopy] = {}  # per process: the DualCopy built for an S hash (one, after the switch)



def forget() -> None:
    """Drop this process's gated copies (a new run starts from nothing)."""
    _gated.clear()


def switch_to_structural(plain: nn.Module) -> tuple[DualCopy, ArrayRecord, str]:
    """The server's switch: S := the current global (plain) model, Q starts equal to it. At the switch the
    DualCopy computes exactly what the plain model computes (Q = S), so no accuracy jumps."""
    state = {k: v.detach().cpu() for k, v in plain.state_dict().items()}
    return DualCopy(plain), ArrayRecord(state), state_dict_sha256(state)


def client_model(plain: nn.Module, start_sha256: str, expected_sha256: str | None, message: Message,
                 state: RecordDict) -> tuple[nn.Module, str]:
    """(model to train, its S hash) for a fedsq-warmup node: the plain network while the server names the
    start model; after the switch, a DualCopy gated by the S the server names (from this message, else
    from the node's state). Raises ``ValueError`` when the node has no S with that hash
    (``StructuralMismatchError`` when the S it holds has another hash)."""
    if expected_sha256 is None or expected_sha256 == start_sha256:
        return plain, start_sha256
    if STRUCTURAL in message.content.array_records:
        state[STRUCTURAL] = message.content[STRUCTURAL]
    if expected_sha256 not in _gated:
        if STRUCTURAL not in state.array_records:
            raise ValueError(f"the server names structural copy sha256={expected_sha256[:12]}..., which this node "
                             "never received (fedsq-warmup sends it once per node after the switch)")
        structural = copy.deepcopy(plain)
        structural.load_state_dict(state[STRUCTURAL].to_torch_state_dict(), strict=True)
        check_structural_sha256(expected_sha256, state_dict_sha256(structural.state_dict()))
        _gated.clear()  # S changes once per run: keep only the current one
        _gated[expected_sha256] = DualCopy(structural)
    return _gated[expected_sha256], expected_sha256
