"""ServerApp: the global model, the rounds, central validation each round, test once at the end."""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsq_app.config import RunConfig
from fedsq_app.data import DataKey, dataset_info, partition_report, server_split
from fedsq_app.metrics import DriftProbe, run_summary, write_rounds_csv
from fedsq_app.models import save_checkpoint
from fedsq_app.strategy import FedSQ, FedSQAdam, ValidatedFedAdam, ValidatedFedAvg, ValidatedFedProx
from fedsq_app.task import build_start_model, global_arrays, load_global_arrays, trainable_model
from fedsq_app.train import evaluate, pick_device

app = ServerApp()


def make_strategy(config: RunConfig, structural_sha256: str) -> ValidatedFedAvg:
    common = dict(fraction_train=config.fraction_train, fraction_evaluate=0.0,  # evaluation is central
                  min_train_nodes=config.min_train_nodes, min_available_nodes=config.min_train_nodes)
    adam = dict(server_lr=config.server_lr, beta_1=config.server_beta1, beta_2=config.server_beta2,
                tau=config.server_tau)
    if config.strategy == "fedsq":
        return FedSQ(structural_sha256=structural_sha256, **common)
    if config.strategy == "fedsq-adam":  # an extension beyond the paper: Adam's server step on Q
        return FedSQAdam(structural_sha256=structural_sha256, **adam, **common)
    if config.strategy == "fedprox":
        return ValidatedFedProx(proximal_mu=config.proximal_mu, **common)
    if config.strategy == "fedadam":
        return ValidatedFedAdam(**adam, **common)
    return ValidatedFedAvg(**common)


def rounds_to_best(val_accuracies: list[float]) -> int:
    """First round (1-based) whose validation accuracy equals the best one."""
    best = max(val_accuracies)
    return val_accuracies.index(best) + 1


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)  # every key checked before any work
    out_dir = Path(config.out_dir).expanduser().resolve() / config.resolved_run_name()
    out_dir.mkdir(parents=True, exist_ok=True)
    log(INFO, "FedSQ app: strategy=%s model=%s dataset=%s -> %s", config.strategy, config.model,
        config.dataset, out_dir)

    data_key = DataKey.of(config)
    info = dataset_info(data_key)
    validation = server_split(data_key, "validation")
    start = build_start_model(config, info)
    structural_sha256 = start.sha256
    model = trainable_model(config, start)  # what is evaluated: the DualCopy for FedSQ, never Q alone
    device = pick_device(config.device)
    # The paper's premise, measured each round (fedsq_app/metrics.py): gates and weights vs the pretrained.
    drift = DriftProbe(start.model, start.spec.prepare(validation.images[: config.probe_size])) \
        if config.probe_size else None


    strategy = make_strategy(config, structural_sha256)
    arrays = global_arrays(model)
    train_config = ConfigRecord({"lr": config.lr, "local-epochs": config.local_epochs})

    results = {"config": {k.replace("_", "-"): v for k, v in vars(config).items()},
               "structural_sha256": structural_sha256, "pretrained_from": start.pretrained_from,
               "num_classes": info.num_classes, "validation_size": len(validation), "rounds": []}
    # How the pool splits over the nodes connected now (demo mode; silos with data-path have their own).
    results["label_distribution"] = partition_report(data_key, len(list(grid.get_node_ids())), out_dir)
    val_loss, val_acc = evaluate(model, validation, start.spec, device=device)
    results["initial"] = {"val_accuracy": val_acc, "val_loss": val_loss}
    log(INFO, "round 0: val_accuracy=%.4f val_loss=%.4f", val_acc, val_loss)

    best_acc, best_round, best_arrays = -1.0, 0, arrays
    run_start = time.time()
    for server_round in range(1, config.num_server_rounds + 1):
        round_start = time.time()
        log(INFO, "[ROUND %d/%d]", server_round, config.num_server_rounds)
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, train_config, grid),
                                        timeout=config.round_timeout)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        load_global_arrays(model, arrays)
        val_loss, val_acc = evaluate(model, validation, start.spec, device=device)
        checked = strategy.round_replies.get(server_round)
        record = {
            "round": server_round, "val_accuracy": val_acc, "val_loss": val_loss,
            "train_loss": float(train_metrics["train_loss"]) if train_metrics else None,
            "accepted": len(checked.accepted) if checked else 0,
            "rejected": len(checked.rejected) if checked else 0,
            "rejections": [{"node_id": n, "reason": r} for n, r in checked.rejected] if checked else [],
            "aggregated": new_arrays is not None, "wall_time_s": time.time() - round_start,
        }
        record["bytes_per_client"] = arrays.count_bytes()  # each way: replies carry the same keys and shapes
        record.update(drift.measure(arrays) if drift else {})
        if val_acc > best_acc:
            best_acc, best_round, best_arrays = val_acc, server_round, arrays
        record["best_val_accuracy_so_far"] = best_acc
        results["rounds"].append(record)
        log(INFO, "round %d: val_accuracy=%.4f val_loss=%.4f train_loss=%s (%.1fs)", server_round, val_acc,
            val_loss, record["train_loss"], record["wall_time_s"])
        write_json_atomic(out_dir / "results.json", results)  # a finished round is never lost

    # The test split is touched exactly once: with the best round's model.
    load_global_arrays(model, best_arrays)
    test_loss, test_acc = evaluate(model, server_split(data_key, "test"), start.spec, device=device)
    accuracies = [r["val_accuracy"] for r in results["rounds"]]
    results.update(run_summary(results["rounds"]))
    results.update(best_val_accuracy=best_acc, best_round=best_round, rounds_to_best=rounds_to_best(accuracies),
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
