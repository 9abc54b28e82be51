"""ClientApp: load the global Q, train it locally (gated by the local S for FedSQ), send Q back.

S is built here from the same pretrained weights as on the server and never leaves the node. Data and
models are built once per process and reused for every round; under the warm executor (fedsq-superexec)
its parent builds them once per run with ``prime`` and every forked task inherits them.
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from torch import nn

from fedsq_app.config import NodeConfig, RunConfig
from fedsq_app.core import wire
from fedsq_app.core.dualcopy import DualCopy, travelling_module
from fedsq_app.core.packing import is_packed, pack_record
from fedsq_app.core.wire import StructuralMismatchError, check_structural_sha256, disclosed_reason
from fedsq_app.data.cache import clear_memory, node_data, node_info, node_splits, silo_validation_files
from fedsq_app.data.leakage import PretrainOverlapError, check_content_overlap
from fedsq_app.data.partitions import DataKey
from fedsq_app.data.tensors import InputSpec, TensorData
from fedsq_app.runtime import maskcache, warmup
from fedsq_app.runtime.maskcache import choose_mask_cache, client_cache, store_path
from fedsq_app.runtime.models import save_checkpoint
from fedsq_app.runtime.strategies import STRATEGIES
from fedsq_app.runtime.train import LocalSchedule, evaluate, pick_device, train_local
from fedsq_app.task import build_start_model, global_arrays, load_global_arrays, resolve_pretrained, trainable_model

app = ClientApp()
CLIENT_ERROR_CODE = wire.REFUSED  # same as Flower's CLIENT_APP_RAISED_EXCEPTION
# Refusals that asking again cannot change during the run: the server stops sampling the node.
PERMANENT_REFUSALS = (PretrainOverlapError, StructuralMismatchError)


@functools.lru_cache(maxsize=2)
def local_model(config: RunConfig, data_path: str = "") -> tuple[nn.Module, InputSpec, str]:
    """(trainable model, input spec, S's SHA-256), built once per process and run config (and silo data)."""
    start = build_start_model(config, node_info(config, NodeConfig(data_path=data_path)))
    return trainable_model(config, start), start.spec, start.sha256


@functools.lru_cache(maxsize=4)
def check_leakage(config: RunConfig, node: NodeConfig) -> int | None:
    """This node's data against the backbone's pretraining images, by content, once per process (hashing
    costs about 3 ms per 1,000 28x28 images). A silo decides for itself (node config
    ``allow-pretrain-overlap``); a partition of the run's dataset also follows the run config's key, which
    the server's check by split name already applied. Raises ``PretrainOverlapError`` on an overlap not allowed."""
    where = f"data-path='{node.data_path}'" if node.data_path else \
        f"partition {node.partition_id} of dataset '{config.dataset}'"
    allow = node.allow_pretrain_overlap or (not node.data_path and config.allow_pretrain_overlap)
    return check_content_overlap(resolve_pretrained(config), node_data(config, node).images, where, allow=allow)


def node_mask_cache(config: RunConfig, node: NodeConfig, model: nn.Module, spec: InputSpec, structural_sha256: str,
                    data: TensorData, device: torch.device) -> tuple[tuple, object, str]:
    """(key, this client's mask cache or None, why): what ``train`` gates Q with, also for ``prime``."""
    use_cache, why = choose_mask_cache(config.mask_cache, config.augment, isinstance(model, DualCopy))
    # Per client: its S, its data, its inputs. A new S (sha) or input spec is a new key, never old masks.
    key = (structural_sha256, spec, node, DataKey.of(config), config.device)
    if not use_cache:
        return key, None, why
    # Also on disk: a deployed ClientApp that is a new process each round reads them there.
    store = functools.partial(store_path, structural_sha256, spec, data.images, fold_bn=model.fold_bn, device=device)
    return key, client_cache(key, len(data), config.mask_cache_max_mb, store=store, device=device), why


def node_salt(node: NodeConfig, context: Context) -> int:
    """What makes this node's training seed its own: its partition id, or for a silo started without one
    its node id (silos would otherwise all share partition-id 0, hence one seed)."""
    if node.data_path and "partition-id" not in context.node_config:
        return int(context.node_id) % 1_000_003
    return node.partition_id


_LOGGED_MASK_CACHE: set = set()


def _log_mask_cache_once(key: tuple, cache, why: str) -> None:
    """Say once per client and process whether S's masks were cached, and why."""
    state = "on" if cache is not None and not cache.disabled_reason else "off"
    if cache is not None and cache.disabled_reason:
        why = cache.disabled_reason
    if (key, state) not in _LOGGED_MASK_CACHE:
        _LOGGED_MASK_CACHE.add((key, state))
        size = f", {cache.nbytes / 2**20:.1f} MiB" if state == "on" else ""
        if state == "on" and cache.store is not None:
            size += f", {cache.loaded} of {cache.num_samples} samples' masks read from {cache.store[0].name}"
        log(INFO, "mask cache %s for partition %d (%s%s)", state, key[2].partition_id, why, size)


def _error_reply(msg: Message, reason: str, code: int = CLIENT_ERROR_CODE) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _debug_replies(context: Context) -> bool:
    """The node config's ``debug-replies`` (validated by ``NodeConfig``; False if the node config is invalid)."""
    try:
        return NodeConfig.from_mapping(context.node_config).debug_replies
    except Exception:
        return False


def refuse(msg: Message, context: Context, error: Exception) -> Message:
    """The error reply for ``error``: what the silo discloses (``wire.disclosed_reason``: type and message,
    absolute paths redacted, no traceback, unless its node config sets ``debug-replies=true``), with the code
    ``wire.REFUSED_PERMANENTLY`` for a reason that will not change this run (``PERMANENT_REFUSALS``). The
    silo's own log gets the full detail, traceback included, at WARNING."""
    permanent = isinstance(error, PERMANENT_REFUSALS)
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    config = msg.content.config_records.get(wire.CONFIG, {}) if msg.has_content() else {}
    log(WARNING, "refused the %s message of round %s (run %s)%s: %s: %s\n%s", msg.metadata.message_type,
        config.get(wire.SERVER_ROUND, "?"), context.run_id,
        ", for the rest of the run: the server will not ask this node again" if permanent else "",
        type(error).__name__, error, trace.rstrip())
    debug = _debug_replies(context)
    return _error_reply(msg, disclosed_reason(error, debug, trace if debug else ""),
                        wire.REFUSED_PERMANENTLY if permanent else CLIENT_ERROR_CODE)


def named_model(config: RunConfig, node: NodeConfig, msg: Message,
                context: Context) -> tuple[nn.Module, InputSpec, str]:
    """(model, input spec, S's SHA-256) gated by the S this message names: fedsq-warmup's plain network
    during its warm-up, then the S it switched to. Raises ``StructuralMismatchError`` for another S."""
    model, spec, structural_sha256 = local_model(config, node.data_path)
    expected_sha = wire.named_structural_sha256(msg.content.config_records.get(wire.CONFIG, {}))
    if STRATEGIES[config.strategy].switches:  # plain during the warm-up, then gated by the S the server names
        model, structural_sha256 = warmup.client_model(model, structural_sha256, expected_sha, msg, context.state)
    # required=False: this app's own FedSQ server always names S; the library's check_structural refuses.
    check_structural_sha256(expected_sha, structural_sha256, required=False)
    return model, spec, structural_sha256


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        config = RunConfig.from_mapping(context.run_config)
        node = NodeConfig.from_mapping(context.node_config)
        server_config = msg.content.config_records.get(wire.CONFIG, {})
        model, spec, structural_sha256 = named_model(config, node, msg, context)  # StructuralMismatchError
        check_leakage(config, node)  # before any training: refuse data the backbone was pretrained on
        data, _ = node_splits(config, node)  # all of it, or all but its validation hold-out
        load_global_arrays(model, msg.content[wire.ARRAYS])
        server_round = int(server_config.get(wire.SERVER_ROUND, 0))
        # FedProx's mu comes from the server, as Flower's FedProx sends it (absent: plain local SGD).
        schedule = LocalSchedule(config.local_epochs, config.batch_size, config.lr, config.momentum,
                                 config.weight_decay, proximal_mu=float(server_config.get(wire.PROXIMAL_MU, 0.0)),
                                 augment=config.augment)
        seed = config.seed * 100_003 + server_round * 1_009 + node_salt(node, context)
        torch.manual_seed(seed)  # dropout etc.: a node's update depends only on (seed, round, partition)
        device = pick_device(config.device)
        key, cache, why = node_mask_cache(config, node, model, spec, structural_sha256, data, device)
        result = train_local(model, data, spec, schedule, device=device, seed=seed, mask_cache=cache,
                             amp=config.amp)
        if cache is not None:
            cache.save()
        _log_mask_cache_once(key, cache, why)
        metrics = {wire.TRAIN_LOSS: result.train_loss, wire.NUM_EXAMPLES: result.num_examples}
        if node.data_path:
            metrics[wire.SILO] = 1  # the server then writes no label distribution of its own pool for this run
        else:  # the server weighs this node by the size of the partition it names, never by its claim
            metrics[wire.PARTITION_ID], metrics[wire.NUM_PARTITIONS] = node.partition_id, node.num_partitions
        if node.keep_model:  # the server sends the final model only to the nodes that say they want it
            metrics[wire.WANTS_MODEL] = 1
        metrics = MetricRecord(metrics)
        arrays = global_arrays(model)  # in the server's format: packed if it sent Q packed (core/packing.py)
        arrays = pack_record(arrays) if is_packed(msg.content[wire.ARRAYS]) else arrays
        return Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics}), reply_to=msg)
    except Exception as error:  # reply with the reason instead of crashing the node
        return refuse(msg, context, error)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Federated evaluation (run config ``fraction-evaluate`` > 0): the global model's accuracy on this node's
    own validation data (its validation files, or its held-out share), gated by the S the server names.
    The evaluate message that ends a run (``final-model``) is the federation's final model: ``keep_final_model``."""
    try:
        if msg.content.config_records.get(wire.CONFIG, {}).get(wire.FINAL_MODEL):
            return keep_final_model(msg, context)
        config = RunConfig.from_mapping(context.run_config)
        node = NodeConfig.from_mapping(context.node_config)
        model, spec, _ = named_model(config, node, msg, context)  # StructuralMismatchError
        check_leakage(config, node)
        _, validation = node_splits(config, node)
        if validation is None:
            reason = "this node holds no validation data: the run config's fraction-evaluate is 0"
            log(WARNING, "refused the %s message: %s", msg.metadata.message_type, reason)
            return _error_reply(msg, reason)
        load_global_arrays(model, msg.content[wire.ARRAYS])
        loss, accuracy = evaluate(model, validation, spec, device=pick_device(config.device), amp=config.amp)
        metrics = MetricRecord({wire.EVAL_LOSS: loss, wire.EVAL_ACCURACY: accuracy,
                                wire.NUM_EXAMPLES: len(validation)})
        return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)
    except Exception as error:  # reply with the reason instead of crashing the node
        return refuse(msg, context, error)


MODEL_FILE = "best_model.safetensors"  # as the server names its copy: <keep-model>/<run-name>/best_model.safetensors


def final_validation(config: RunConfig, node: NodeConfig) -> tuple[TensorData | None, str]:
    """(data, where it comes from) for this node's accuracy on the final model: what it validated on during
    the run (``fraction-evaluate`` > 0), else a silo's own validation files; never data it trained on, so a
    node that trained on all of its data measures nothing (None)."""
    _, validation = node_splits(config, node)
    if validation is not None:
        return validation, "its validation data during the run (its validation files, or its held-out share)"
    own = silo_validation_files(DataKey.of(config), node) if node.data_path else None
    if own is not None:
        return own, "its own validation files"
    return None, ("none: with fraction-evaluate=0 the node trained on all of its data and has no validation "
                  "files of its own")


def keep_final_model(msg: Message, context: Context) -> Message:
    """The federation's final model (the best round's arrays, sent once after the last round). A node whose
    node config sets ``keep-model`` checks that it gates with the S the server names, measures the model's
    accuracy on its own validation data, and saves it as ``<keep-model>/<run-name>/best_model.safetensors``
    (atomically; the JSON sidecar next to it records the run, the round, S's hash and that accuracy); it
    replies ``kept`` = 1 with the accuracy. Any other node replies ``kept`` = 0 at once and saves nothing."""
    node = NodeConfig.from_mapping(context.node_config)
    if not node.keep_model:
        return Message(RecordDict({wire.METRICS: MetricRecord({wire.KEPT: 0})}), reply_to=msg)
    config = RunConfig.from_mapping(context.run_config)
    server_config = msg.content.config_records.get(wire.CONFIG, {})
    try:
        model, spec, structural_sha256 = named_model(config, node, msg, context)
    except StructuralMismatchError as error:  # Q gated by another S computes another function: keep nothing
        return _error_reply(msg, f"not kept: {error}")
    check_leakage(config, node)
    load_global_arrays(model, msg.content[wire.ARRAYS])
    validation, source = final_validation(config, node)
    metrics = {wire.KEPT: 1}
    loss = accuracy = None
    if validation is not None:
        loss, accuracy = evaluate(model, validation, spec, device=pick_device(config.device), amp=config.amp)
        metrics.update({wire.EVAL_LOSS: loss, wire.EVAL_ACCURACY: accuracy, wire.NUM_EXAMPLES: len(validation)})
    info = node_info(config, node)
    folder = Path(node.keep_model) / config.resolved_run_name()
    metadata = {
        "model": config.model, "strategy": config.strategy, "round": int(server_config.get(wire.MODEL_ROUND, -1)),
        "structural_sha256": structural_sha256, "run_id": int(context.run_id), "run_name": config.resolved_run_name(),
        "node_id": int(context.node_id), "num_classes": int(server_config.get(wire.NUM_CLASSES, 0)),
        "data": {"channels": info.channels, "image_size": info.image_size},
        "run_config": {k.replace("_", "-"): v for k, v in vars(config).items()},
        "federation_val_accuracy": server_config.get(wire.FEDERATION_VAL_ACCURACY),
        "val_accuracy": accuracy, "val_loss": loss, "val_examples": 0 if validation is None else len(validation),
        "validation": source,
        "note": ("Q's weights (the travelling arrays; S gates them)" if isinstance(model, DualCopy) else
                 "the network's weights") + " of the federation's best round, as the server sent them; "
                "val_accuracy is this node's own, on its validation data.",
    }
    if isinstance(model, DualCopy) and STRATEGIES[config.strategy].switches:  # fedsq-warmup's S is no start model
        save_checkpoint(folder / "structural.safetensors", model.structural.state_dict(),
                        {"structural_sha256": structural_sha256, "note": "S of fedsq-warmup, frozen at its switch"})
        metadata["note"] += " S (fedsq-warmup's, from its switch) is structural.safetensors next to this file."
    elif isinstance(model, DualCopy):
        metadata["note"] += " S is the start model (the run's pretrained backbone)."
    save_checkpoint(folder / MODEL_FILE, travelling_module(model).state_dict(), metadata)
    log(INFO, "kept the federation's model of round %s in %s (own validation accuracy %s)", metadata["round"],
        folder / MODEL_FILE, "none" if accuracy is None else f"{accuracy:.4f}")
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


# ------------------------------------------------------------------ the warm executor's hooks
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # torch's documented fork-safe CUDA availability check


def trains_on_cpu(device: str) -> bool:
    """Whether ``pick_device(device)`` is the CPU, found out without initialising CUDA in this process."""
    if device != "auto":
        return device == "cpu"
    previous = os.environ.get(NVML_CHECK)
    os.environ[NVML_CHECK] = "1"
    try:
        return not torch.cuda.is_available()
    finally:
        if previous is None:
            del os.environ[NVML_CHECK]
        else:
            os.environ[NVML_CHECK] = previous


def prime(run_config: Mapping, node_config: Mapping) -> tuple[bool, str]:
    """Build in this process what ``train`` and ``evaluate_local`` build for this run and node, with the same
    functions and keys: the model (S and Q from the pretrained backbone), the node's data and its splits,
    the leakage check and S's mask cache (read from the node's disk cache). The warm executor
    (fedsq_app/deploy/warm_executor.py) calls it in its parent after a run's first task, so that every task
    forked later finds all of it built and only loads Q and trains. Trains nothing and never touches CUDA.
    Returns (whether it built, a one-line summary or why not: ``train`` would run on a GPU, or refuse)."""
    config = RunConfig.from_mapping(dict(run_config))
    node = NodeConfig.from_mapping(dict(node_config))
    if not trains_on_cpu(config.device):
        return False, f"not primed: device='{config.device}' trains on a GPU (the forking parent must not touch it)"
    model, spec, structural_sha256 = local_model(config, node.data_path)
    try:
        check_leakage(config, node)
    except PretrainOverlapError:
        return False, "not primed: the ClientApp refuses this node's data (pretraining overlap)"
    data, validation = node_splits(config, node)
    key, cache, why = node_mask_cache(config, node, model, spec, structural_sha256, data, torch.device("cpu"))
    masks = f"no mask cache ({why})" if cache is None else f"{cache.loaded} of {len(data)} samples' masks"
    if cache is not None and cache.loaded < cache.num_samples:  # children would each fill the rest again:
        maskcache.REGISTRY.caches.pop(key)  # each reads the node's disk copy instead, which they complete
        masks += " (incomplete: not kept)"
    return True, (f"S {structural_sha256[:12]}, {len(data)} training and "
                  f"{0 if validation is None else len(validation)} validation samples, {masks}")


def forget() -> None:
    """Drop what ``prime`` (or a ClientApp call) built in this process: a new run starts from nothing."""
    local_model.cache_clear()
    check_leakage.cache_clear()
    clear_memory()
    maskcache.REGISTRY.caches.clear()
    warmup.forget()
