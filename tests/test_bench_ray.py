"""``fedsq-bench --ray-address``: a grid's cells as Ray tasks on a real two-node Ray cluster on 127.0.0.1.

Both nodes are ``ray start --block`` processes of this test, each the leader of its own process group, so
they stop by PID (the group, then any process left naming this test's Ray temp dir), never by ``ray stop``
(which stops every Ray on the machine). The nodes advertise 127.0.0.1, but Ray 2.55's GCS server and raylets
listen on every interface (it has no option to restrict them); the cluster lives only as long as the test.
Checks: the cells ran as Ray tasks on the cluster's nodes, a rerun skips them, the path without a shared
output folder (files sent back) works, and each cell's results.json has the digest (timings dropped) of a
local run of the same cell.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TINY_RUN
from fedsq_app.tools.bench.cluster import TASK_FILE, TOKEN_FILE, run_grid_on_ray
from fedsq_app.tools.bench.grid import run_grid
from fedsq_app.tools.bench.presets import Preset, Setup
from test_reproducible import digest

RAY = Path(sys.executable).with_name("ray")
TWO = Preset(setups=(Setup("smallcnn"),), strategies=("fedsq", "fedavg"), partitions=("iid",), epochs=(1,),
             seeds=(0,), num_clients=3, base={**TINY_RUN, "max-train-samples": 300, "probe-size": 16}, num_cpus=1)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _node_ports() -> list[str]:
    agent, grpc, runtime_env, metrics, client = _free_ports(5)
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}"]


def _ours(temp_dir: str) -> list[int]:
    """PIDs of processes whose command line names this test's Ray temp dir (workers, agents)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _stop(nodes: list[subprocess.Popen], temp_dir: str) -> None:
    for node in reversed(nodes):
        try:
            os.killpg(node.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    for node in reversed(nodes):
        try:
            node.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while _ours(temp_dir) and time.time() < deadline:
        time.sleep(0.5)
    for pid in _ours(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def two_node_cluster(cpus: int = 1):
    """A head and a second node (resource 'second'), ``cpus`` CPUs each, on 127.0.0.1; this process connected
    as a driver. Yields (address, node ids, the second node's id); stops both nodes by PID on the way out."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0"}
    [port] = _free_ports(1)
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", f"--temp-dir={temp_dir}", "--block",
              "--disable-usage-stats", "--object-store-memory=100000000"]
    nodes = []
    try:
        nodes.append(subprocess.Popen([str(RAY), "start", "--head", f"--port={port}", "--include-dashboard=false",
                                       *common, *_node_ports()], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 90
        while time.time() < deadline:
            # the head writes its address once it is up (ray._private.utils.write_ray_address)
            if (Path(temp_dir) / "ray_current_cluster").is_file():
                break
            assert nodes[0].poll() is None, "ray start --head exited"
            time.sleep(0.5)
        nodes.append(subprocess.Popen([str(RAY), "start", f"--address={address}", '--resources={"second": 1}',
                                       *common, *_node_ports()], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ray.init(address=address, logging_level="WARNING")
        alive = []
        while time.time() < deadline:
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) == 2:
                break
            assert nodes[1].poll() is None, "ray start --address exited"
            time.sleep(0.5)
        assert len(alive) == 2, f"the second node did not join within 90 s: {alive}"
        second = [n["NodeID"] for n in alive if n["Resources"].get("second")]
        assert len(second) == 1
        yield address, {n["NodeID"] for n in alive}, second[0]
    finally:
        ray.shutdown()
        _stop(nodes, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster(fedsq_cache):
    with two_node_cluster() as cluster:
        yield cluster


def test_grid_on_a_two_node_ray_cluster_resumes_and_matches_a_local_run(ray_cluster, tmp_path):
    import torch

    address, node_ids, second = ray_cluster
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per one-CPU cell; the local run below uses the same
    try:
        out = tmp_path / "bench"
        log = run_grid_on_ray(TWO, out, address)
        assert len(log["ran"]) == 2 and not log["failed"], log["failed"]
        cells = out / "cells"
        where = {name: json.loads((cells / name / TASK_FILE).read_text()) for name in log["ran"]}
        assert {w["node_id"] for w in where.values()} == node_ids  # one cell on each node: 1 CPU each
        assert all(w["torch_threads"] == 1 and w["resources"].get("CPU") == 1 and w["shared_output"]
                   for w in where.values()), where
        assert not (cells / TOKEN_FILE).exists()

        # Resume: a rerun on the cluster skips both finished cells.
        log = run_grid_on_ray(TWO, out, address)
        assert log["ran"] == [] and sorted(log["skipped"]) == sorted(where) and not log["failed"]

        # No shared folder: the task sends the files back and deletes its own copy; the driver writes them.
        fedavg = "smallcnn-embedded-fedavg-iid-e1-s0"
        (cells / fedavg / "results.json").unlink()
        log = run_grid_on_ray(TWO, out, address, copy_back=True)
        assert log["ran"] == [fedavg] and len(log["skipped"]) == 1 and not log["failed"], log
        assert json.loads((cells / fedavg / TASK_FILE).read_text())["shared_output"] is False
        assert {"results.json", "best_model.safetensors", "rounds.csv"} <= {p.name for p in (cells / fedavg).iterdir()}

        # The same cells run locally, at the same path (results.json records it): the same figures.
        out.rename(tmp_path / "bench-ray")
        log = run_grid(TWO, out)
        assert len(log["ran"]) == 2 and not log["failed"], log["failed"]
    finally:
        torch.set_num_threads(threads)
    for name in where:
        on_ray = json.loads((tmp_path / "bench-ray" / "cells" / name / "results.json").read_text())
        local = json.loads((cells / name / "results.json").read_text())
        print(f"{name}: ray {digest(on_ray)[:16]} local {digest(local)[:16]}")
        assert digest(on_ray) == digest(local), name
        ray_files = {p.name for p in (tmp_path / "bench-ray" / "cells" / name).iterdir()} - {TASK_FILE}
        assert ray_files == {p.name for p in (cells / name).iterdir()}, name


def test_help_documents_ray_address(capsys):
    from fedsq_app.tools.bench.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--ray-address ADDRESS" in text and "ray://host:port" in text and "--gpus-per-cell" in text
    with pytest.raises(SystemExit, match="cannot run nested"):
        main(["--ray-address", "auto", "--engine", "ray"])
