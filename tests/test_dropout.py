"""Dropped silos on a real loopback deployment: SuperLink + 3 SuperNodes (plain HTTP on 127.0.0.1, started
here, stopped by PID), `flwr run`, one SuperNode SIGKILLed during round 1. The run must still finish every
round, and results.json must record the reply that never came.

Timeline (why it is bounded): round 1 waits the full ``round-timeout`` for the dead node, then aggregates
the two live ones (min-train-nodes=2). Round 2 still samples the dead node (the SuperLink lists it until
its heartbeat expires, about 60 s after the kill) and gets a "Node Unavailable" error reply from the
SuperLink at the latest by then. min-available-nodes=2 keeps Flower from waiting forever for a third node,
and min-valid-replies=2 (the two-silo mode) lets a round of two survivors change the model.

FEDSQ_SKIP_DEPLOYMENT_TEST=1 skips this module (as it does tests/test_deployment.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from loopback import (REPO, Processes, clean_env, start_superlink, start_supernode, tail, tool, wait_until,
                      write_connection)

if os.environ.get("FEDSQ_SKIP_DEPLOYMENT_TEST") == "1":
    pytest.skip("FEDSQ_SKIP_DEPLOYMENT_TEST=1", allow_module_level=True)

ROUND_TIMEOUT_S = 40.0  # what the dead node costs in round 1; the live nodes must finish within it
DEADLINE_S = 300.0


def _online_nodes(env: dict[str, str]) -> list[str]:
    listed = subprocess.run([tool("flwr"), "supernode", "list", "loop", "--format", "json"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    start = listed.stdout.find("{")
    if listed.returncode != 0 or start < 0:
        return []
    return [n["node-id"] for n in json.loads(listed.stdout[start:]).get("nodes", []) if n["status"] == "online"]


def test_sigkilled_supernode_during_round_1_does_not_stop_the_run(fedsq_cache, tmp_path):
    missing = [name for name in ("flower-superlink", "flower-supernode", "flwr") if tool(name) is None]
    if missing:
        pytest.skip(f"Flower CLI(s) {missing} not found next to the interpreter or on PATH")
    env = clean_env(tmp_path, FEDSQ_CACHE_DIR=str(fedsq_cache), FLWR_HOME=str(tmp_path / "home"))
    processes = Processes(tmp_path / "logs")
    started = time.monotonic()
    try:
        _, port = start_superlink(processes, env, tmp_path / "state.db")
        nodes = [start_supernode(processes, env, port, f"partition-id={i} num-partitions=3", name=f"supernode-{i}")
                 for i in range(3)]
        write_connection(tmp_path / "home", "loop", f"127.0.0.1:{port}")
        wait_until(lambda: len(_online_nodes(env)) == 3, 60, "3 SuperNodes online", procs=nodes)
        online = set(_online_nodes(env))

        out_dir = tmp_path / "outputs"
        run_config = " ".join([
            "num-server-rounds=2", "max-train-samples=300", f'out-dir="{out_dir}"', 'run-name="dropout"',
            f"round-timeout={ROUND_TIMEOUT_S}", "min-train-nodes=2", "min-available-nodes=2", "fraction-train=1.0",
            "min-valid-replies=2",  # two survivors: the two-silo mode (docs/RELIABILITY.md)
            'device="cpu"', "probe-size=0",
        ])
        run = processes.start("flwr-run", [tool("flwr"), "run", ".", "loop", "--stream", "--run-config", run_config],
                              env, cwd=REPO)
        wait_until(lambda: "[ROUND 1/2]" in tail(run.log, 1_000_000), 120, "round 1 to start", procs=[run])
        victim = nodes[2]
        processes.kill(victim)  # SIGKILL: SuperNode, its SuperExec and any ClientApp it had started
        killed_at = time.monotonic()

        remaining = DEADLINE_S - (time.monotonic() - started)
        wait_until(lambda: run.popen.poll() is not None, remaining, "the run to finish", procs=[])
        assert run.popen.returncode == 0, tail(run.log)
        results_file = out_dir / "dropout" / "results.json"
        assert results_file.is_file(), tail(run.log)
        results = json.loads(results_file.read_text())
    finally:
        survivors = processes.stop_all()
    assert not survivors, f"processes survived teardown: {survivors}"

    first, second = results["rounds"]
    print(f"\ndropout: round 1 expected={first['expected']} received={first['received']} missing={first['missing']} "
          f"accepted={first['accepted']}; round 2 expected={second['expected']} received={second['received']} "
          f"rejected={second['rejected']} ({[r['reason'][:60] for r in second['rejections']]}); "
          f"run ended {time.monotonic() - killed_at:.0f} s after the kill, {time.monotonic() - started:.0f} s in all")
    # The dead node's reply never comes (round-timeout), or, when the round outlasts its heartbeat on a loaded
    # machine, comes as the SuperLink's "Node Unavailable" error: either way it is the one reply not accepted.
    assert (first["expected"], first["accepted"]) == (3, 2) and first["missing"] + first["rejected"] == 1
    dead = first["missing_nodes"] or [r["node_id"] for r in first["rejections"]]
    assert len(dead) == 1 and str(dead[0]) in online
    assert first["aggregated"] and second["aggregated"]
    assert second["accepted"] == 2  # the dead node: missing again, or the SuperLink's "Node Unavailable" error
    assert second["missing"] + second["rejected"] == second["expected"] - 2
    assert "test_accuracy" in results
    shutil.rmtree(tmp_path / "home" / "apps", ignore_errors=True)  # the installed FAB copies: not needed
