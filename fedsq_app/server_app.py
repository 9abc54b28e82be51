"""ServerApp: the global model, the rounds, central validation each round, test once at the end."""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsq_app.checkpoint import RunState, capture_rng, load_run_state, restore_rng, save_run_state, seed_everything
from fedsq_app.config import ConfigError, RunConfig
from fedsq_app.data import (DataKey, dataset_info, partition_report, partitioned_pool, pool_and_validation,
                            server_split)
from fedsq_app.leakage import check_pretrain_overlap
from fedsq_app.metrics import DriftProbe, run_summary, write_rounds_csv
from fedsq_app.models import save_checkpoint
from fedsq_app.strategy import (FedSQ, FedSQAdam, FedSQMomentum, FedSQWarmup, ReplyOutcome, ValidatedFedAdam,
                                ValidatedFedAvg, ValidatedFedProx)
from fedsq_app.task import build_start_model, global_arrays, load_global_arrays, trainable_model
from fedsq_app.train import evaluate, pick_device
from fedsq_app.warmup import switch_to_structural

app = ServerApp()


def make_strategy(config: RunConfig, structural_sha256: str, max_examples: int | None = None) -> ValidatedFedAvg:
    """``max_examples``: a fixed bound on num-examples when the run config sets none (None: no bound; a
    silo's data is its own, so the server's pool says nothing about it; claims are clipped instead)."""
    common = dict(fraction_train=config.fraction_train, fraction_evaluate=0.0,  # evaluation is central
                  min_train_nodes=config.min_train_nodes, min_available_nodes=config.min_available_nodes,
                  min_valid_replies=config.min_valid_replies, max_update_norm_ratio=config.max_update_norm_ratio,
                  max_num_examples_ratio=config.max_num_examples_ratio, aggregation=config.aggregation,
                  trim_fraction=config.trim_fraction, max_examples=config.max_num_examples or max_examples)
    adam = dict(server_lr=config.server_lr, beta_1=config.server_beta1, beta_2=config.server_beta2,
                tau=config.server_tau)
    if config.strategy == "fedsq":
        return FedSQ(structural_sha256=structural_sha256, **common)
    if config.strategy == "fedsq-adam":  # an extension beyond the paper: Adam's server step on Q
        return FedSQAdam(structural_sha256=structural_sha256, **adam, **common)
    if config.strategy == "fedsq-m":  # beyond the paper: FedAvgM's server momentum on Q
        return FedSQMomentum(structural_sha256=structural_sha256, server_momentum=config.server_momentum, **common)
    if config.strategy == "fedsq-warmup":  # beyond the paper: FedAvg first, then S frozen at the global model
        return FedSQWarmup(structural_sha256=structural_sha256, warmup_rounds=config.warmup_rounds, **common)
    if config.strategy == "fedprox":
        return ValidatedFedProx(proximal_mu=config.proximal_mu, **common)
    if config.strategy == "fedadam":
        return ValidatedFedAdam(**adam, **common)
    return ValidatedFedAvg(**common)


def reply_record(outcome: ReplyOutcome, round_start: float) -> dict:
    """One reply in results.json: who sent it, what it claimed, what the server did with it, and when it
    was created relative to the round's start (by the node's clock: skew between machines shows here)."""
    created = outcome.created_at
    return {"node_id": outcome.node_id, "num_examples": outcome.num_examples, "weight": outcome.weight,
            "train_loss": outcome.train_loss, "accepted": outcome.accepted, "reason": outcome.reason or None,
            "reply_time_s": round(created - round_start, 3) if created else None}


def label_report(data_key: DataKey, accepted: list, num_nodes: int, out_dir: Path) -> dict:
    """How the server's pool splits over the nodes, unless the nodes are silos: a silo (``data-path``)
    trains on its own data, which the server's pool says nothing about, so nothing is written for it."""
    silos = sum(1 for reply in accepted if reply.metrics.get("silo"))
    if silos:
        return {"skipped": f"{silos} of {len(accepted)} accepted replies came from silos training on their own "
                           "data (data-path): the server's pool split does not describe them"}
    return partition_report(data_key, num_nodes, out_dir)


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def _to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in arrays.items()}


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    # np.ascontiguousarray would turn 0-d arrays (BN's num_batches_tracked) into shape (1,)
    return ArrayRecord({key: Array(value if value.flags.c_contiguous else value.copy(order="C"))
                        for key, value in arrays.items()})


def send_and_receive(grid: Grid, messages: list, timeout: float | None, poll_s: float = 0.2) -> list:
    """``grid.send_and_receive``, but Flower's deployment grid (HttpGrid) pulls replies only every 3 s, so a
    round would end up to 3 s after its last reply: pull every ``poll_s`` instead (one cheap request to the
    local SuperLink). Same result: the replies that arrived before ``timeout``. Other grids (simulation,
    tests) poll fast already and are used as they are."""
    if type(grid).__name__ != "HttpGrid":
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    end = None if timeout is None else time.time() + timeout
    replies: list = []
    while waiting and (end is None or time.time() < end):
        arrived = list(grid.pull_messages(waiting))
        replies.extend(arrived)
        waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if waiting:
            time.sleep(poll_s)
    return replies


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


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)  # every key checked before any work
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
    structural_sha256 = start.sha256
    model = trainable_model(config, start)  # what is evaluated: the DualCopy for FedSQ, never Q alone
    device = pick_device(config.device)
    # The paper's premise, measured each round (fedsq_app/metrics.py): gates and weights vs the pretrained.
    drift = DriftProbe(start.model, start.spec.prepare(validation.images[: config.probe_size])) \
        if config.probe_size else None

    strategy = make_strategy(config, structural_sha256)
    arrays = global_arrays(model)
    train_config = ConfigRecord({"lr": config.lr, "local-epochs": config.local_epochs})
    config_json = {k.replace("_", "-"): v for k, v in vars(config).items()}

    if config.resume_from:
        state = resume_state(config, structural_sha256, arrays)
        results = state.results
        results["config"] = config_json
        results.setdefault("resumed", []).append({"from": str(Path(config.resume_from).expanduser().resolve()),
                                                  "after_round": state.round})
        results["rounds"] = [r for r in results["rounds"] if r["round"] <= state.round]
        arrays = _to_record(state.arrays)
        best_acc, best_round, best_arrays = state.best_val_accuracy, state.best_round, _to_record(state.best_arrays)
        strategy.load_state_dict(state.strategy_arrays, state.strategy_info)
        if isinstance(strategy, FedSQWarmup) and strategy.structural is not None:  # resumed after the switch
            load_global_arrays(model, strategy.structural)
            model = switch_to_structural(model)[0]
        restore_rng(state.rng["info"], state.rng["arrays"])  # last: the setup above must not move the RNGs
        first_round = state.round + 1
        log(INFO, "resuming from %s after round %d", config.resume_from, state.round)
    else:
        results = {"config": config_json, "structural_sha256": structural_sha256,
                   "pretrained_from": start.pretrained_from, "num_classes": info.num_classes,
                   "validation_size": len(validation), "max_num_examples": strategy.max_examples, "rounds": []}
        num_nodes = len(list(grid.get_node_ids()))
        if num_nodes:
            partitioned_pool(data_key, num_nodes)  # an impossible split stops the run before any training
        # Written once the first accepted replies tell partitions (demo mode) from silos (data-path).
        results["label_distribution"] = {"pending": "written after the first round with accepted replies"}
        val_loss, val_acc = evaluate(model, validation, start.spec, device=device)
        results["initial"] = {"val_accuracy": val_acc, "val_loss": val_loss}
        log(INFO, "round 0: val_accuracy=%.4f val_loss=%.4f", val_acc, val_loss)
        best_acc, best_round, best_arrays = val_acc, 0, arrays  # round 0 competes: training may only hurt
        seed_everything(config.seed)  # node sampling (random.sample) is reproducible, and resumable
        first_round = 1

    run_start = time.time()
    for server_round in range(first_round, config.num_server_rounds + 1):
        round_start = time.time()
        log(INFO, "[ROUND %d/%d]", server_round, config.num_server_rounds)
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        named_sha256 = getattr(strategy, "structural_sha256", None)  # the S this round's config names (FedSQ)
        replies = send_and_receive(grid, messages, timeout=config.round_timeout)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        load_global_arrays(model, arrays)
        if isinstance(strategy, FedSQWarmup) and server_round == config.warmup_rounds:
            model, structural, sha = switch_to_structural(model)  # S changes here, and only here
            strategy.switch(structural, sha)
            log(INFO, "fedsq-warmup: S frozen at the global model of round %d (sha256 %s...)", server_round, sha[:12])
        val_loss, val_acc = evaluate(model, validation, start.spec, device=device)
        checked = strategy.round_replies.get(server_round)
        train_loss = train_metrics.get("train_loss") if train_metrics else None
        sent_to = sorted({m.metadata.dst_node_id for m in messages})
        replied = {_src_node(m) for m in replies}
        record = {
            "round": server_round, "val_accuracy": val_acc, "val_loss": val_loss,
            "train_loss": float(train_loss) if train_loss is not None else None,
            "expected": len(messages), "received": len(replies), "missing": max(len(messages) - len(replies), 0),
            "missing_nodes": [n for n in sent_to if n not in replied],
            "accepted": len(checked.accepted) if checked else 0,
            "rejected": len(checked.rejected) if checked else 0,
            "rejections": [{"node_id": n, "reason": r} for n, r in checked.rejected] if checked else [],
            "replies": [reply_record(o, round_start) for o in _content_order(checked.outcomes)] if checked else [],
            "aggregated": new_arrays is not None, "wall_time_s": time.time() - round_start,
        }
        if named_sha256 is not None:
            record["structural_sha256"] = named_sha256
        if "pending" in results.get("label_distribution", {}) and checked and checked.accepted:
            results["label_distribution"] = label_report(data_key, checked.accepted, len(list(grid.get_node_ids())),
                                                         out_dir)
        record["bytes_per_client"] = arrays.count_bytes()  # each way: replies carry the same keys and shapes
        record.update(drift.measure(arrays) if drift else {})
        if val_acc > best_acc:
            best_acc, best_round, best_arrays = val_acc, server_round, arrays
        record["best_val_accuracy_so_far"] = best_acc
        results["rounds"].append(record)
        log(INFO, "round %d: val_accuracy=%.4f val_loss=%.4f train_loss=%s, %d/%d replies, %d accepted (%.1fs)",
            server_round, val_acc, val_loss, record["train_loss"], len(replies), len(messages),
            record["accepted"], record["wall_time_s"])
        # A finished round is never lost: the checkpoint first (what a resume needs), then results.json.
        strategy_arrays, strategy_info = strategy.state_dict()
        rng_info, rng_arrays = capture_rng()
        save_run_state(out_dir, RunState(
            round=server_round, arrays=_to_numpy(arrays), best_round=best_round, best_val_accuracy=best_acc,
            best_arrays=_to_numpy(best_arrays), results=results, structural_sha256=structural_sha256,
            strategy_arrays=strategy_arrays, strategy_info=strategy_info,
            rng={"info": rng_info, "arrays": rng_arrays}))
        write_json_atomic(out_dir / "results.json", results)
        if config.patience and server_round - best_round >= config.patience:
            # Uncensored rounds-to-best: the best round is followed by `patience` rounds that did not beat it.
            results["stopped_early"] = {"after_round": server_round, "patience": config.patience}
            log(INFO, "no new best validation accuracy for %d rounds: stopping after round %d",
                config.patience, server_round)
            break

    if "pending" in results.get("label_distribution", {}):
        results["label_distribution"] = {"skipped": "no round had an accepted reply"}
    # The test split is touched exactly once: with the best round's model.
    load_global_arrays(model, best_arrays)
    test_loss, test_acc = evaluate(model, server_split(data_key, "test"), start.spec, device=device)
    results.update(run_summary(results["rounds"]))
    results.update(best_val_accuracy=best_acc, best_round=best_round,
                   rounds_to_best=best_round,
                   test_accuracy=test_acc, test_loss=test_loss, total_wall_time_s=time.time() - run_start)
    save_checkpoint(out_dir / "best_model.safetensors", best_arrays.to_torch_state_dict(),
                    {"model": config.model, "strategy": config.strategy, "round": best_round,
                     "val_accuracy": best_acc, "structural_sha256": structural_sha256,
                     "note": "Q's weights (the travelling arrays). FedSQ evaluates them gated by S: "
                             "load them into DualCopy(start model).quantitative."})
    write_json_atomic(out_dir / "results.json", results)
    write_rounds_csv(out_dir / "rounds.csv", results["rounds"])
    log(INFO, "best val_accuracy=%.4f at round %d; test_accuracy=%.4f; results in %s", best_acc, best_round,
        test_acc, out_dir / "results.json")


def _content_order(outcomes: list) -> list:
    """Replies by what they say (not by arrival or engine-drawn node id), so a seeded run's results.json
    repeats exactly; the node id still tells which silo sent which reply."""
    return sorted(outcomes, key=lambda o: (not o.accepted, o.num_examples or 0, o.train_loss or 0.0, o.reason))


def _src_node(message) -> int:
    try:
        return int(message.metadata.src_node_id)
    except Exception:
        return -1
