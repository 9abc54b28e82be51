"""What travels between the ServerApp and the ClientApps: every record, config and metric key, written once,
and the one check of the structural-copy handshake (S's SHA-256, sent with every FedSQ round).

Pure Python: the server side, the node side and library users import it without torch or flwr.
"""

from __future__ import annotations

import re
from typing import Mapping

# Records of a message's RecordDict.
ARRAYS = "arrays"  # the travelling arrays (Q for FedSQ, the whole network otherwise)
METRICS = "metrics"  # a reply's MetricRecord
CONFIG = "config"  # the train config Flower's strategies send
STRUCTURAL = "structural"  # the ArrayRecord that carries S to a node, once, after fedsq-warmup's switch

# Train-config keys (server -> node).
STRUCTURAL_SHA256 = "structural-sha256"  # the S every node must gate with
SERVER_ROUND = "server-round"  # set by Flower's strategies
LR = "lr"
LOCAL_EPOCHS = "local-epochs"
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx

# Reply metrics (node -> server).
NUM_EXAMPLES = "num-examples"  # the aggregation weight (as claimed: the server never takes it on trust)
TRAIN_LOSS = "train_loss"
SILO = "silo"  # 1: the node trains on its own data (data-path), not on a partition of the server's pool
PARTITION_ID = "partition-id"  # which partition of the server's pool the node trains on (its weight's key)
NUM_PARTITIONS = "num-partitions"
WANTS_MODEL = "wants-model"  # 1: the node's config asks to keep the final model (keep-model); absent otherwise
# Who a node is, not what it measured: never averaged into the round's train metrics.
IDENTITY_METRICS = (NUM_EXAMPLES, SILO, PARTITION_ID, NUM_PARTITIONS, WANTS_MODEL)
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"

# The final model: after the last round, one evaluate message to each node that asked for it (WANTS_MODEL in its
# train replies) carries the best round's arrays with these config keys; the node saves them (docs/DEPLOYMENT.md).
FINAL_MODEL = "final-model"  # true: this evaluate message delivers the final model (never a validation round)
MODEL_ROUND = "model-round"  # the round whose model it is (the best round; 0 = the start model)
NUM_CLASSES = "num-classes"  # the model's class count, for the node's sidecar
FEDERATION_VAL_ACCURACY = "federation-val-accuracy"  # the best round's validation accuracy, as the server judged it
KEPT = "kept"  # reply metric: 1 = saved under the node's keep-model folder, 0 = the node's config does not ask


# Error replies (node -> server). A node refuses a message with an Error whose reason is what the silo chooses
# to disclose (``disclosed_reason``); the code says whether asking it again can help.
REFUSED = 2  # same as Flower's CLIENT_APP_RAISED_EXCEPTION: this message failed, the next one may not
# This node refuses for a reason that will not change during the run (its data overlaps the backbone's
# pretraining images; it holds another S): the server samples it no more for the rest of the run.
REFUSED_PERMANENTLY = 4001

# An absolute path in an error message: POSIX (/srv/..., ~/...) or Windows (C:\...), not preceded by a
# character that would make it part of a word, a number or a relative path ("N/A", "1/2", "a/b"). Quoted, it
# runs to the closing quote (spaces included); bare, to the first space or delimiter.
_START = r"(?<![\w.~/\\-])(?:~?/|[A-Za-z]:\\)"
_QUOTED_PATH = re.compile(r"(?<=['\"`])" + _START + r"[^'\"`\n]+(?=['\"`])")
_BARE_PATH = re.compile(_START + r"[^\s'\"`,;()\[\]<>{}]+")


def redact_paths(text: str) -> str:
    """``text`` with every absolute path replaced by ``<path>`` (pure)."""
    return _BARE_PATH.sub("<path>", _QUOTED_PATH.sub("<path>", text))


def disclosed_reason(error: BaseException, debug: bool = False, trace: str = "") -> str:
    """What a silo's error reply says: the exception's type and message, with absolute paths replaced by
    ``<path>``; with ``debug`` (node config ``debug-replies=true``) the message as is and ``trace`` (the
    traceback, if given) after it. The silo's own log keeps the full detail either way."""
    reason = f"{type(error).__name__}: {error}"
    if debug:
        return f"{reason}\n{trace}".rstrip("\n") if trace else reason
    return redact_paths(reason)


class StructuralMismatchError(ValueError):
    """The server's structural copy S (its SHA-256, sent by ``FedSQ`` each round) is not this node's S."""


def check_structural_sha256(expected: str | None, actual: str, *, required: bool = True) -> None:
    """The one S-hash check: raise ``StructuralMismatchError`` unless the S the server names (``expected``)
    is this node's S (``actual``). Averaging Q trained under different gates would mix different functions.
    ``expected`` None means the server names no S (a server that is not FedSQ): refused when ``required``
    (a gated node cannot know which S the server averages under), accepted for a plain model."""
    if expected is None:
        if required:
            raise StructuralMismatchError(
                f"the server's train config names no structural copy ('{STRUCTURAL_SHA256}' missing): a DualCopy "
                "node trains only under a FedSQ server, which names its S every round")
        return
    if expected != actual:
        raise StructuralMismatchError(
            f"structural copy mismatch: server S sha256={expected}, this node's S sha256={actual}; "
            "build S from the same pretrained weights as the server")


def named_structural_sha256(config: Mapping) -> str | None:
    """The S a train config names (None if it names none)."""
    return config.get(STRUCTURAL_SHA256)
