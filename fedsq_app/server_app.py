"""ServerApp: the global model, the rounds, central validation each round, test once at the end."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedsq_app.config import RunConfig
from fedsq_app.core import wire
from fedsq_app.core.judge import VALIDATION_JUDGE
from fedsq_app.core.replies import ReplyOutcome, node_id_of
from fedsq_app.core.strategy import ValidatedFedAvg, contiguous
from fedsq_app.core.variants import FedSQWarmup
from fedsq_app.data.leakage import check_pretrain_overlap
from fedsq_app.data.partitions import (DataKey, DatasetInfo, class_names, dataset_info, partition_report,
                                       partitioned_pool, pool_and_validation, server_split)
from fedsq_app.data.tensors import TensorData
from fedsq_app.runtime.checkpoint import (RunState, capture_rng, load_run_state, restore_rng, save_run_state,
                                          seed_everything)
from fedsq_app.runtime.delivery import deliver_final_model, nodes_that_asked
from fedsq_app.runtime.metrics import DriftProbe, run_summary, write_rounds_csv
from fedsq_app.runtime.models import save_checkpoint
from fedsq_app.runtime.report import write_report_or_warn
from fedsq_app.runtime.strategies import make_strategy
from fedsq_app.runtime.train import evaluate, pick_device
from fedsq_app.runtime.validation import federated_evaluation, fmt as _fmt, validation_source
from fedsq_app.runtime.waiting import send_and_receive
from fedsq_app.runtime.warmup import switch_to_structural
from fedsq_app.runtime.weighting import check_federation, fit_decider, size_mismatch_of, weight_policy
from fedsq_app.task import (StartModel, build_start_model, global_arrays, load_global_arrays, model_metadata,
                            trainable_model)
from fedsq_app.util import ConfigError, write_atomic

app = ServerApp()


def reply_record(outcome: ReplyOutcome, round_start: float, size_mismatch: str | None = None) -> dict:
    """One reply in results.json: who sent it, what it claimed, what the server did with it, and when it
    was created relative to the round's start (by the node's clock: skew between machines shows here).
    ``size_mismatch``: why its reported count is far from its silo-sizes entry, recorded only when it is."""
    created = outcome.created_at
    record = {"node_id": outcome.node_id, "num_examples": outcome.num_examples, "weight": outcome.weight,
              "clip_scale": outcome.clip_scale, "bn_clamped": outcome.bn_clamped,
              "update_norm": outcome.update_norm, "deviation": outcome.deviation, "alignment": outcome.alignment,
              "train_loss": outcome.train_loss, "accepted": outcome.accepted, "reason": outcome.reason or None,
              "reply_time_s": round(created - round_start, 3) if created else None}
    if size_mismatch:
        record["size_mismatch"] = size_mismatch
    return record


def label_report(data_key: DataKey, accepted: list, num_nodes: int, out_dir: Path) -> dict:
    """How the server's pool splits over the nodes, unless the nodes are silos: a silo (``data-path``)
    trains on its own data, which the server's pool says nothing about, so nothing is written for it."""
    silos = sum(1 for reply in accepted if reply.metrics.get(wire.SILO))
    if silos:
        return {"skipped": f"{silos} of {len(accepted)} accepted replies came from silos training on their own "
                           "data (data-path): the server's pool split does not describe them"}
    return partition_report(data_key, num_nodes, out_dir)


def _to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in arrays.items()}


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(contiguous(value)) for key, value in arrays.items()})


def load_data(config: RunConfig):
    """The server's data, with a missing dataset reported against the ``dataset`` key."""
    data_key = DataKey.of(config)
    try:
        info = dataset_info(data_key)
        pool, _ = pool_and_validation(data_key)
        validation = server_split(data_key, "validation")
    except FileNotFoundError as error:
        raise ConfigError(f"dataset='{config.dataset}': {error}") from error
    return data_key, info, len(pool), validation


def validation_loss(run: Run, arrays: dict[str, np.ndarray]) -> float:
    """The server's validation loss of ``arrays`` as the run's travelling part (the direction check's judge)."""
    load_global_arrays(run.model, _to_record(arrays))
    return evaluate(run.model, run.validation, run.start.spec, device=run.device)[0]


def resume_state(config: RunConfig, structural_sha256: str, arrays: ArrayRecord) -> RunState:
    """Load ``resume-from``'s checkpoint and check that it belongs to this model."""
    state = load_run_state(config.resume_from)
    if state.structural_sha256 != structural_sha256:
        raise ConfigError(f"resume-from='{config.resume_from}' was trained from another start model "
                          f"(S sha256 {state.structural_sha256[:12]}..., this run's {structural_sha256[:12]}...)")
    expected = {k: (v.shape, v.dtype) for k, v in _to_numpy(arrays).items()}
    if {k: (v.shape, v.dtype) for k, v in state.arrays.items()} != expected:
        raise ConfigError(f"resume-from='{config.resume_from}': the checkpoint's arrays do not fit model "
                          f"'{config.model}'")
    previous = state.results.get("config", {})
    ignored = {"resume-from", "num-server-rounds", "round-timeout", "out-dir", "run-name"}
    changed = sorted(k for k, v in previous.items() if k not in ignored and vars(config).get(k.replace("-", "_")) != v)
    if changed:
        log(WARNING, "resuming with a different run config for %s: the continuation is not the run it would "
            "have been", changed)
    return state


@dataclass
class Run:
    """What the round loop carries: the model being evaluated, the global arrays, the best round so far,
    and results.json as it grows."""

    config: RunConfig
    out_dir: Path
    data_key: DataKey
    info: DatasetInfo
    validation: TensorData
    start: StartModel
    model: nn.Module  # the DualCopy for FedSQ (what is evaluated), never Q alone
    device: torch.device
    strategy: ValidatedFedAvg
    drift: DriftProbe | None
    arrays: ArrayRecord = None
    results: dict = field(default_factory=dict)
    best_acc: float = 0.0
    best_round: int = 0
    best_arrays: ArrayRecord = None
    first_round: int = 1


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = set_up(context)
    run.strategy.weigh = weight_policy(run.config, run.data_key, grid,
                                       fit_decider(run.model, run.data_key, run.start.spec, run.device, run.validation))
    if run.config.server_validation and run.config.reply_judge == VALIDATION_JUDGE:
        run.strategy.judge = partial(validation_loss, run)
    if run.config.resume_from:
        resume(run)
    else:
        start_fresh(run, grid)
    # Nodes refused for good (leakage, another S; never sampled again): one list, the strategy's and results.json's.
    run.strategy.excluded_nodes = run.results.setdefault("excluded_nodes", run.strategy.excluded_nodes)
    run.strategy.quarantine.records = run.results.setdefault("quarantined_nodes", run.strategy.quarantine.records)
    run_start = time.time()
    train_config = ConfigRecord({wire.LR: run.config.lr, wire.LOCAL_EPOCHS: run.config.local_epochs})
    for server_round in range(run.first_round, run.config.num_server_rounds + 1):
        round_start = time.time()
        log(INFO, "[ROUND %d/%d]", server_round, run.config.num_server_rounds)
        messages = list(run.strategy.configure_train(server_round, run.arrays, train_config, grid))
        named_sha256 = getattr(run.strategy, "structural_sha256", None)  # the S this round's config names (FedSQ)
        replies = send_and_receive(grid, messages, timeout=run.config.round_timeout)
        new_arrays, train_metrics = run.strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            run.arrays = new_arrays
        load_global_arrays(run.model, run.arrays)
        maybe_switch(run, server_round)
        nodes = node_validation(run, server_round, grid)
        val_loss, val_acc = validate(run, nodes)
        record = round_record(run, server_round, messages, replies, new_arrays is not None, train_metrics,
                              val_loss, val_acc, round_start)
        record.update({k: v for k, v in (("node_validation", nodes), ("structural_sha256", named_sha256)) if v is not None})
        record["weights_from"] = getattr(run.strategy.weigh, "source", "equal")
        note_label_distribution(run, server_round, grid)
        record["bytes_per_client"] = run.arrays.count_bytes()  # each way: replies carry the same keys and shapes
        record.update(run.drift.measure(run.arrays) if run.drift else {})
        if val_acc is not None and val_acc > run.best_acc:
            run.best_acc, run.best_round, run.best_arrays = val_acc, server_round, run.arrays
        record["best_val_accuracy_so_far"] = _best(run)
        run.results["rounds"].append(record)
        log(INFO, "round %d: val_accuracy=%s val_loss=%s (%s) train_loss=%s, %d/%d replies, %d accepted (%.1fs)",
            server_round, _fmt(val_acc), _fmt(val_loss), run.results["validation_source"], record["train_loss"],
            len(replies), len(messages), record["accepted"], record["wall_time_s"])
        save_round(run, server_round)
        if run.config.patience and server_round - run.best_round >= run.config.patience:
            # Uncensored rounds-to-best: the best round is followed by `patience` rounds that did not beat it.
            run.results["stopped_early"] = {"after_round": server_round, "patience": run.config.patience}
            log(INFO, "no new best validation accuracy for %d rounds: stopping after round %d",
                run.config.patience, server_round)
            break
    finish(run, run_start, grid)


NO_BEST = -1.0  # best_acc before any round had a validation accuracy (nodes' mode, no valid reply yet)


def _best(run: Run) -> float | None:
    return run.best_acc if run.best_acc > NO_BEST else None


def node_validation(run: Run, server_round: int, grid: Grid) -> dict | None:
    """The nodes' own validation of the current global model (``fraction-evaluate`` > 0, every
    ``evaluate-every`` rounds, round 0 and the last round included), else None."""
    config = run.config
    if config.fraction_evaluate <= 0 or (server_round % config.evaluate_every
                                         and server_round != config.num_server_rounds):
        return None
    return federated_evaluation(run.strategy, run.arrays, server_round, grid, send_and_receive,
                                run.config.round_timeout)


def validate(run: Run, nodes: dict | None) -> tuple[float | None, float | None]:
    """(loss, accuracy) this round is judged by: the server's validation split, or with
    ``server-validation=false`` the nodes' accuracy averaged with the server's weights for them (None when no
    node reply counted)."""
    if run.config.server_validation:
        return evaluate(run.model, run.validation, run.start.spec, device=run.device)
    return (nodes or {}).get("loss"), (nodes or {}).get("accuracy")


def set_up(context: Context) -> Run:
    """The run config (every key checked before any work), the data, the start model and the strategy."""
    config = RunConfig.from_mapping(context.run_config)
    config.check_server_paths()
    out_dir = Path(config.out_dir).expanduser().resolve() / config.resolved_run_name()
    out_dir.mkdir(parents=True, exist_ok=True)
    log(INFO, "FedSQ app: strategy=%s model=%s dataset=%s -> %s", config.strategy, config.model,
        config.dataset, out_dir)
    data_key, info, _, validation = load_data(config)
    try:
        start = build_start_model(config, info)
    except FileNotFoundError as error:  # e.g. pretrained='auto' before `fedsq-prepare` ran
        raise ConfigError(f"pretrained='{config.pretrained}': {error}") from error
    check_pretrain_overlap(config, start.pretrained_from)  # leakage: stops here, before any training
    model = trainable_model(config, start)
    # The paper's premise, measured each round (runtime/metrics.py): gates and weights vs the pretrained.
    drift = DriftProbe(start.model, start.spec.prepare(validation.images[: config.probe_size])) \
        if config.probe_size else None
    run = Run(config, out_dir, data_key, info, validation, start, model, pick_device(config.device),
              make_strategy(config, start.sha256), drift)
    run.arrays = global_arrays(model)
    return run


def config_json(config: RunConfig) -> dict:
    return {k.replace("_", "-"): v for k, v in vars(config).items()}


def resume(run: Run) -> None:
    """Continue from ``resume-from``'s checkpoint: the global and best models, the strategy's state, the RNGs."""
    config, strategy = run.config, run.strategy
    state = resume_state(config, run.start.sha256, run.arrays)
    run.results = state.results
    run.results["config"] = config_json(config)
    run.results["validation_source"] = validation_source(config, len(run.validation))
    run.results.setdefault("resumed", []).append({"from": str(Path(config.resume_from).expanduser().resolve()),
                                                  "after_round": state.round})
    run.results["rounds"] = [r for r in run.results["rounds"] if r["round"] <= state.round]
    run.arrays = _to_record(state.arrays)
    run.best_acc, run.best_round = state.best_val_accuracy, state.best_round
    run.best_arrays = _to_record(state.best_arrays)
    strategy.load_state_dict(state.strategy_arrays, state.strategy_info)
    if isinstance(strategy, FedSQWarmup) and strategy.structural is not None:  # resumed after the switch
        load_global_arrays(run.model, strategy.structural)
        run.model = switch_to_structural(run.model)[0]
    restore_rng(state.rng["info"], state.rng["arrays"])  # last: the setup above must not move the RNGs
    run.first_round = state.round + 1
    log(INFO, "resuming from %s after round %d", config.resume_from, state.round)


def start_fresh(run: Run, grid: Grid) -> None:
    """Round 0: check the split, evaluate the start model (it competes: training may only hurt), seed."""
    config = run.config
    run.results = {"config": config_json(config),
                   "validation_source": validation_source(config, len(run.validation)),
                   "structural_sha256": run.start.sha256,
                   "pretrained_from": run.start.pretrained_from, "num_classes": run.info.num_classes,
                   "validation_size": len(run.validation), "rounds": []}
    num_nodes = len(list(grid.get_node_ids()))
    if num_nodes:
        partitioned_pool(run.data_key, num_nodes)  # an impossible split stops the run before any training
    check_federation(config, grid, num_nodes)
    # Written once the first accepted replies tell partitions (demo mode) from silos (data-path).
    run.results["label_distribution"] = {"pending": "written after the first round with accepted replies"}
    log(INFO, "validation (best round, BVA) from the %s", run.results["validation_source"])
    # The start model competes (training may only hurt); judged by the nodes when the server holds no validation.
    nodes = None if config.server_validation else node_validation(run, 0, grid)
    val_loss, val_acc = validate(run, nodes)
    run.results["initial"] = {"val_accuracy": val_acc, "val_loss": val_loss}
    if nodes is not None:
        run.results["initial"]["node_validation"] = nodes
    log(INFO, "round 0: val_accuracy=%s val_loss=%s", _fmt(val_acc), _fmt(val_loss))
    run.best_acc, run.best_round, run.best_arrays = NO_BEST if val_acc is None else val_acc, 0, run.arrays
    seed_everything(config.seed)  # node sampling (random.sample) is reproducible, and resumable
    run.first_round = 1


def maybe_switch(run: Run, server_round: int) -> None:
    """fedsq-warmup: S changes here, and only here."""
    if isinstance(run.strategy, FedSQWarmup) and server_round == run.config.warmup_rounds:
        run.model, structural, sha = switch_to_structural(run.model)
        run.strategy.switch(structural, sha)
        log(INFO, "fedsq-warmup: S frozen at the global model of round %d (sha256 %s...)", server_round, sha[:12])


def round_record(run: Run, server_round: int, messages: list, replies: list, aggregated: bool,
                 train_metrics, val_loss: float, val_acc: float, round_start: float) -> dict:
    """One round in results.json: validation, who was asked, who replied, and what became of each reply."""
    checked = run.strategy.round_replies.get(server_round)
    train_loss = train_metrics.get(wire.TRAIN_LOSS) if train_metrics else None
    sent_to = sorted({m.metadata.dst_node_id for m in messages})
    replied = {node_id_of(m) for m in replies}
    return {
        "round": server_round, "val_accuracy": val_acc, "val_loss": val_loss,
        "train_loss": float(train_loss) if train_loss is not None else None,
        "expected": len(messages), "received": len(replies), "missing": max(len(messages) - len(replies), 0),
        "missing_nodes": [n for n in sent_to if n not in replied],
        "accepted": len(checked.accepted) if checked else 0,
        "rejected": len(checked.rejected) if checked else 0,
        "rejections": [{"node_id": n, "reason": r} for n, r in checked.rejected] if checked else [],
        "clip_bound": checked.clip_bound if checked else None,
        "judged": run.strategy.judged.get(server_round, {}),  # {node: [validation loss with, without]}
        "replies": [reply_record(o, round_start, size_mismatch_of(run.strategy.weigh, o.node_id))
                    for o in _content_order(checked.outcomes)] if checked else [],
        "aggregated": aggregated, "wall_time_s": time.time() - round_start,
    }


def note_label_distribution(run: Run, server_round: int, grid: Grid) -> None:
    """Once the first accepted replies tell partitions from silos: the pool's split over the nodes."""
    checked = run.strategy.round_replies.get(server_round)
    if "pending" in run.results.get("label_distribution", {}) and checked and checked.accepted:
        run.results["label_distribution"] = label_report(run.data_key, checked.accepted,
                                                         len(list(grid.get_node_ids())), run.out_dir)


def save_round(run: Run, server_round: int) -> None:
    """A finished round is never lost: the checkpoint first (what a resume needs), then results.json."""
    strategy_arrays, strategy_info = run.strategy.state_dict()
    rng_info, rng_arrays = capture_rng()
    save_run_state(run.out_dir, RunState(
        round=server_round, arrays=_to_numpy(run.arrays), best_round=run.best_round,
        best_val_accuracy=run.best_acc, best_arrays=_to_numpy(run.best_arrays), results=run.results,
        structural_sha256=run.start.sha256, strategy_arrays=strategy_arrays, strategy_info=strategy_info,
        rng={"info": rng_info, "arrays": rng_arrays}))
    write_atomic(run.out_dir / "results.json", json.dumps(run.results, indent=2))


def finish(run: Run, run_start: float, grid: Grid) -> None:
    """The test split, touched exactly once (with the best round's model), the best model (also to the silos
    that ask for it) and the summary."""
    results, config = run.results, run.config
    if "pending" in results.get("label_distribution", {}):
        results["label_distribution"] = {"skipped": "no round had an accepted reply"}
    load_global_arrays(run.model, run.best_arrays)
    test_loss, test_acc = evaluate(run.model, server_split(run.data_key, "test"), run.start.spec, device=run.device)
    results.update(run_summary(results["rounds"]))
    results.update(best_val_accuracy=_best(run), best_round=run.best_round, rounds_to_best=run.best_round,
                   test_accuracy=test_acc, test_loss=test_loss, total_wall_time_s=time.time() - run_start)
    metadata = model_metadata(config, run.info, run.start, results["structural_sha256"], class_names(run.data_key))
    save_checkpoint(run.out_dir / "best_model.safetensors", run.best_arrays.to_torch_state_dict(),
                    {**metadata, "round": run.best_round, "val_accuracy": run.best_acc, "test_accuracy": test_acc,
                     "note": "Q's weights (the travelling arrays): fedsq_app.load_trained(<this file>) rebuilds "
                             "the model (for FedSQ, S gates them) and checks S's hash."})
    results["model_delivered_to"] = deliver_best_model(run, grid)
    write_atomic(run.out_dir / "results.json", json.dumps(results, indent=2))
    write_rounds_csv(run.out_dir / "rounds.csv", results["rounds"])
    write_report_or_warn(run.out_dir, results, input_spec=run.start.spec)  # last: it may fail, results may not
    log(INFO, "best val_accuracy=%s at round %d (validation from the %s); test_accuracy=%.4f; results in %s",
        _fmt(_best(run)), run.best_round, results["validation_source"], test_acc, run.out_dir / "results.json")


def deliver_best_model(run: Run, grid: Grid) -> list[dict]:
    """The best round's model, under the S it was validated with, to the nodes that asked for it (node config
    ``keep-model``; runtime/delivery.py). Returns results.json's ``model_delivered_to``."""
    strategy, structural = run.strategy, None
    asked = nodes_that_asked(strategy.round_replies)
    if not asked:  # nobody asked (every simulation): nothing to build, nothing sent
        return []
    sha = getattr(strategy, "structural_sha256", None)
    if isinstance(strategy, FedSQWarmup):  # the start model before its switch, the S it switched to after
        switched = strategy.structural is not None and run.best_round >= run.config.warmup_rounds
        sha, structural = (sha, strategy.structural) if switched else (run.start.sha256, None)
    config = {wire.FINAL_MODEL: True, wire.MODEL_ROUND: run.best_round, wire.NUM_CLASSES: run.info.num_classes}
    if sha is not None:
        config[wire.STRUCTURAL_SHA256] = sha
    if _best(run) is not None:
        config[wire.FEDERATION_VAL_ACCURACY] = float(_best(run))
    return deliver_final_model(grid, asked, strategy.outgoing_arrays(run.best_arrays), config, send_and_receive,
                               run.config.round_timeout, structural=structural,
                               holders=getattr(strategy, "holders", ()))


def _content_order(outcomes: list) -> list:
    """Replies by what they say (not by arrival or engine-drawn node id), so a seeded run's results.json
    repeats exactly; the node id still tells which silo sent which reply."""
    return sorted(outcomes, key=lambda o: (not o.accepted, o.num_examples or 0, o.train_loss or 0.0, o.reason))

