"""``fedsq-perf overhead`` and ``fedsq-perf scale``: Flower simulation vs a bare loop, and 100 clients.

overhead: the real ServerApp/ClientApp in Flower's in-process simulation (``fedsq_app.harness.simulation``'s way of
injecting a run config) vs a bare PyTorch loop doing the same per-round work with the same functions
(``client_partition``, ``train_local``, ``weighted_average``, ``evaluate``) on the same partitions.
Both report start-up (everything before round 1's training starts, plus round 1 itself, which pays for
Ray actors, imports, model builds and data decodes) separately from the steady rounds 2..R.

scale: peak RSS of the whole simulation (this process and all its descendants: Ray's GCS, raylet and
workers), sampled from /proc every 0.2 s, and the steady round time, for several total client counts
with the same number of clients sampled per round and the same data per client.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from fedsq_app.config import NodeConfig, RunConfig


# ------------------------------------------------------------------------------------------- memory
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_memory_bytes(root: int) -> tuple[int, int]:
    """(RSS, PSS) summed over ``root`` and all its descendants. The RSS sum counts pages shared between
    processes (libtorch, Ray's object store) once per process: an upper bound. PSS splits each shared page
    between its users, so its sum is the memory the whole process tree really holds."""
    tree, rss, pss, stack = _children(), 0, 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(tree.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


class PeakRss:
    """Samples the process tree's RSS in a thread while the ``with`` block runs."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self.peak_pss, self._stop = interval, 0, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = tree_memory_bytes(os.getpid())
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------- runs
def run_config(clients: int, sampled: int, rounds: int, samples_per_client: int, strategy: str,
               mask_cache: str, out_dir: str, name: str) -> dict:
    val_fraction = 0.1
    pool = clients * samples_per_client
    return {"strategy": strategy, "model": "smallcnn", "num-server-rounds": rounds, "partitioner": "iid",
            "max-train-samples": int(round(pool / (1 - val_fraction))), "val-fraction": val_fraction,
            "fraction-train": min(1.0, sampled / clients), "min-train-nodes": min(2, clients),
            "probe-size": 0, "mask-cache": mask_cache, "device": "cpu", "out-dir": out_dir, "run-name": name}


def flower_run(config: dict, clients: int, stats_file: Path, actors: int = 2) -> dict:
    """The real apps in Flower's simulation; each ClientApp call appends its process's cache stats."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedsq_app import client_app, server_app
    from fedsq_app.data import partitions
    from fedsq_app.harness.simulation import with_run_config

    server, client = ServerApp(), ClientApp()

    @server.main()
    def _main(grid, context):
        server_app.main(grid, with_run_config(context, config))

    @client.train()
    def _train(msg, context):
        reply = client_app.train(msg, with_run_config(context, config))
        # Are models and partitions really built once per process? lru_cache statistics per actor.
        with open(stats_file, "a") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "partition": context.node_config.get("partition-id"),
                                     "local_model": client_app.local_model.cache_info()._asdict(),
                                     "client_partition": partitions.client_partition.cache_info()._asdict()}) + "\n")
        return reply

    results_file = Path(config["out-dir"]) / config["run-name"] / "results.json"
    results_file.unlink(missing_ok=True)
    start = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": actors, "logging_level": "ERROR"}})
    wall = time.perf_counter() - start
    results = json.loads(results_file.read_text())
    return {"wall_s": wall, "round_s": [r["wall_time_s"] for r in results["rounds"]],
            "val_accuracy": results["rounds"][-1]["val_accuracy"]}


def bare_run(config_map: dict, clients: int) -> dict:
    """The same rounds without Flower: one process, the same functions, no messages, no Ray."""
    from fedsq_app.core.aggregation import weighted_average
    from fedsq_app.core.replies import CheckedReply
    from fedsq_app.data.partitions import client_partition
    from fedsq_app.runtime.train import LocalSchedule, evaluate, train_local
    from fedsq_app.server_app import load_data
    from fedsq_app.task import build_start_model, global_arrays, load_global_arrays, trainable_model

    start = time.perf_counter()
    config = RunConfig.from_mapping(config_map)
    data_key, info, _, validation = load_data(config)
    start_model = build_start_model(config, info)
    server_model = trainable_model(config, start_model)
    client_model = trainable_model(config, build_start_model(config, info))  # built once, like an actor's
    arrays = {k: v.numpy() for k, v in global_arrays(server_model).to_torch_state_dict().items()}
    schedule = LocalSchedule(config.local_epochs, config.batch_size, config.lr, config.momentum, config.weight_decay)
    device = torch.device("cpu")
    evaluate(server_model, validation, start_model.spec, device=device)  # round 0, as the ServerApp does
    rng = random.Random(config.seed)
    sampled = max(2, int(clients * config.fraction_train)) if clients > 1 else 1
    round_s = []
    for server_round in range(1, config.num_server_rounds + 1):
        round_start = time.perf_counter()
        replies = []
        for partition_id in sorted(rng.sample(range(clients), min(sampled, clients))):
            node = NodeConfig(partition_id, clients)
            data = client_partition(data_key, node.partition_id, node.num_partitions)
            load_global_arrays(client_model, _record(arrays))
            seed = config.seed * 100_003 + server_round * 1_009 + partition_id
            torch.manual_seed(seed)
            result = train_local(client_model, data, start_model.spec, schedule, device=device, seed=seed)
            state = {k: v.detach().numpy().copy() for k, v in
                     global_arrays(client_model).to_torch_state_dict().items()}
            replies.append(CheckedReply(partition_id, state, result.num_examples, {"train_loss": result.train_loss}))
        arrays = weighted_average(replies, arrays)
        load_global_arrays(server_model, _record(arrays))
        evaluate(server_model, validation, start_model.spec, device=device)
        round_s.append(time.perf_counter() - round_start)
    return {"wall_s": time.perf_counter() - start, "round_s": round_s}


def _record(arrays: dict):
    from flwr.app import ArrayRecord

    return ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()})


def _summary(run: dict) -> dict:
    steady = run["round_s"][1:] or run["round_s"]
    return {"wall_s": round(run["wall_s"], 2), "round1_s": round(run["round_s"][0], 2),
            "steady_round_median_s": round(statistics.median(steady), 3),
            "startup_s": round(run["wall_s"] - sum(steady), 2)}


def main(args) -> None:
    out_dir = tempfile.mkdtemp(prefix="fedsq-perf-")
    if args.command == "overhead":
        clients = args.clients[0]
        config = run_config(clients, min(args.sampled, clients), args.rounds, args.samples // clients,
                            args.strategy, args.mask_cache, out_dir, "overhead")
        stats = Path(out_dir) / "cache-stats.jsonl"
        # Like for like: Ray gives each 1-CPU actor one thread; with --actors 1 Flower also trains one client
        # at a time, as the bare loop does.
        torch.set_num_threads(1)
        bare = _summary(bare_run(config, clients))
        print(json.dumps({"bare": bare}), flush=True)
        flower = _summary(flower_run(config, clients, stats, actors=args.actors))
        print(json.dumps({"flower": flower}), flush=True)
        lines = [json.loads(line) for line in stats.read_text().splitlines()]
        per_pid = {}
        for line in lines:
            per_pid[line["pid"]] = line
        print(json.dumps({"per_actor_last_cache_info": list(per_pid.values())}), flush=True)
        ratio = flower["steady_round_median_s"] / bare["steady_round_median_s"]
        print(f"\nclients={clients} actors={args.actors} rounds={args.rounds} samples/client={args.samples // clients} "
              f"strategy={args.strategy} mask-cache={args.mask_cache}")
        print("| | wall s | start-up s | round 1 s | steady round s (median) |\n|---|---|---|---|---|")
        for name, s in (("bare loop", bare), ("Flower simulation", flower)):
            print(f"| {name} | {s['wall_s']} | {s['startup_s']} | {s['round1_s']} | {s['steady_round_median_s']} |")
        print(f"steady-round ratio Flower / bare = {ratio:.2f}")
    else:
        rows = []
        for clients in args.clients:
            config = run_config(clients, args.sampled, args.rounds, args.per_client, args.strategy,
                                args.mask_cache, out_dir, f"scale-{clients}")
            with PeakRss() as rss:
                run = flower_run(config, clients, Path(out_dir) / f"stats-{clients}.jsonl")
            row = {"clients": clients, "sampled": args.sampled, **_summary(run), "peak_rss_gb": round(rss.peak / 1e9, 2),
                   "peak_pss_gb": round(rss.peak_pss / 1e9, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print("\n| clients | sampled/round | peak PSS (GB, all processes) | peak RSS sum (GB) | steady round s (median) "
              "| start-up s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['clients']} | {r['sampled']} | {r['peak_pss_gb']} | {r['peak_rss_gb']} | "
                  f"{r['steady_round_median_s']} | {r['startup_s']} |")
