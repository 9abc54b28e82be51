"""``fedsq-bench --ray-address``: the grid's cells as Ray tasks on a Ray cluster.

Where a cell *runs* (this process, or a Ray task on some node of a cluster) is independent of how a cell
*simulates* its federation: a cell's Ray task always runs it with the in-process engine
(``fedsq_app.harness.inprocess``), never with Flower's Ray simulation engine nested inside a Ray task.

What stays as the local runner has it:

* resume: a cell is done when its ``results.json`` holds ``test_accuracy`` (read by this driver); done
  cells are skipped, FedProx's μ is tuned first and the tuned μ then runs on every seed;
* the figures: each task runs its cell with this driver's torch thread count (float sums depend on it), the
  driver's ``FEDSQ_*`` environment, the same run config and the same output path, so its results.json is
  the one a local run of the cell writes (wall times and engine-drawn ids apart), given nodes of one CPU kind;
* the progress bar and the ``done``/``FAILED`` lines (the node that ran a cell is named too).

The output folder: a task writes its cell where the driver would (``<out>/cells/<cell>``, the driver's
absolute path). It first looks for a token the driver wrote there: if it sees it, the folder is shared
(same machine, or one shared filesystem mounted at the same path) and the files stay where they are.
If it does not, the task sends the cell's files back (results.json, best model, checkpoint, report…),
deletes its node-local copy, and the driver writes them, results.json last. Either way the driver's folder
ends up complete; ``ray_task.json`` beside results.json records the node, host, threads and resources.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

from fedsq_app.tools.bench.grid import Cell, load_results, main_cells, tuning_cells
from fedsq_app.tools.bench.presets import Preset
from fedsq_app.util import write_atomic

TOKEN_FILE = ".fedsq-bench-driver"  # in <out>/cells while a driver runs: a task that sees it shares the folder
TASK_FILE = "ray_task.json"  # where and how a cell's task ran
FORWARDED_ENV = ("FEDSQ_", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def forwarded_env() -> dict[str, str]:
    """The driver's settings a cell depends on (its cache and data: ``FEDSQ_CACHE_DIR``…, offline switches)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


def run_cell_task(run_config: dict, num_clients: int, *, cwd: str, threads: int, env: dict, token: str,
                  copy_back: bool | None, verbose: bool) -> dict:
    """One cell, inside a Ray task: the in-process engine, the driver's threads, env and working directory.

    Returns where it ran and, unless the cell folder is shared with the driver, the folder's files."""
    import ray
    import torch

    from fedsq_app.config import RunConfig
    from fedsq_app.harness.inprocess import simulate_in_process

    saved_env = {k: os.environ.get(k) for k in env}
    saved_cwd, saved_threads = os.getcwd(), torch.get_num_threads()
    os.environ.update(env)
    Path(cwd).mkdir(parents=True, exist_ok=True)
    os.chdir(cwd)  # a relative --out means what it means on the driver
    torch.set_num_threads(threads)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        config = RunConfig.from_mapping(run_config)
        cells_dir = Path(config.out_dir).expanduser().resolve()
        cell_dir = cells_dir / config.resolved_run_name()
        try:
            shared = (cells_dir / TOKEN_FILE).read_text() == token
        except OSError:
            shared = False
        if copy_back is not None:
            shared = not copy_back
        start = time.time()
        simulate_in_process(run_config, num_clients)
        where = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                 "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                 "resources": ray.get_runtime_context().get_assigned_resources(),
                 "shared_output": shared, "wall_time_s": round(time.time() - start, 3)}
        files = None
        if not shared:
            files = {p.name: p.read_bytes() for p in sorted(cell_dir.iterdir()) if p.is_file()}
            shutil.rmtree(cell_dir, ignore_errors=True)
        return {"where": where, "files": files}
    finally:
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_cell(cell_dir: Path, reply: dict) -> None:
    """The task's files into the driver's cell folder (results.json last: it marks the cell done)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    files = reply["files"] or {}
    for name in sorted(files, key=lambda n: n == "results.json"):
        write_atomic(cell_dir / name, files[name])
    write_atomic(cell_dir / TASK_FILE, json.dumps(reply["where"], indent=2))


def run_grid_on_ray(preset: Preset, out: Path, address: str, *, verbose: bool = False, threads: int | None = None,
                    gpus_per_cell: float = 0.0, copy_back: bool | None = None) -> dict:
    """Every cell not yet done, as Ray tasks of ``preset.num_cpus`` CPUs (and ``gpus_per_cell`` GPUs) on the
    cluster at ``address`` ('auto', 'host:port' or 'ray://host:port'). Same return value as ``run_grid``.

    ``threads``: torch threads per cell (default: this process's, as a local run would use).
    ``copy_back``: None detects a shared output folder; True always sends files back (tests the path a
    cluster without a shared filesystem takes); False trusts the folder to be shared."""
    import ray
    import torch
    from tqdm.auto import tqdm

    threads = threads or torch.get_num_threads()
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    (cells_dir / TOKEN_FILE).write_text(token)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                 configure_logging=not verbose)
    task = ray.remote(run_cell_task).options(num_cpus=preset.num_cpus, num_gpus=gpus_per_cell)
    common = dict(cwd=os.getcwd(), threads=threads, env=forwarded_env(), token=token, copy_back=copy_back,
                  verbose=verbose)
    log = {"ran": [], "skipped": [], "failed": []}
    main_count = (len(preset.setups) * len(preset.partitions) * len(preset.epochs) * len(preset.strategies)
                  * len(preset.seeds))
    progress = tqdm(total=len(tuning_cells(preset)) + main_count, desc="fedsq-bench", unit="cell", file=sys.stdout)
    seen: set[str] = set()

    def run_all(cells: list[Cell]) -> None:
        """Submit every cell not done, then collect them as they finish (any order)."""
        pending = {}
        for cell in cells:
            if cell.name in seen:  # a tuning cell that is also a reported cell (tuning seed, best μ)
                progress.total -= 1
                progress.refresh()
                continue
            seen.add(cell.name)
            if load_results(cells_dir, cell) is not None:
                log["skipped"].append(cell.name)
                progress.update(1)
                continue
            pending[task.remote(cell.run_config(preset, cells_dir), preset.num_clients, **common)] = \
                (cell, time.time())
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            cell, start = pending.pop(ref)
            progress.set_postfix_str(cell.name)
            try:
                reply = ray.get(ref)
                write_cell(cells_dir / cell.name, reply)
                if load_results(cells_dir, cell) is None:
                    raise RuntimeError(f"no finished results.json in {cells_dir / cell.name} after the task")
                log["ran"].append(cell.name)
                where = reply["where"]
                progress.write(f"done {cell.name} in {time.time() - start:.0f}s "
                               f"on {where['hostname']} (node {where['node_id'][:8]})")
            except Exception as error:  # one broken cell must not cost the rest of the grid
                error = getattr(error, "cause", None) or error  # a RayTaskError's own exception
                log["failed"].append((cell.name, f"{type(error).__name__}: {error}"))
                progress.write(f"FAILED {cell.name}: {type(error).__name__}: {error}")
            progress.update(1)

    try:
        run_all(tuning_cells(preset))
        run_all(main_cells(preset, cells_dir))  # after the tuning cells: FedProx's cells carry the tuned μ
    finally:
        progress.close()
        (cells_dir / TOKEN_FILE).unlink(missing_ok=True)
        if started_here:
            ray.shutdown()
    return log
