"""docs/DEPLOYMENT.md's four silos, deployed for real on loopback: TLS, SuperNode authentication with registered
keys, and each silo's warm executor (`fedsq-superexec --parent-pid ...`).

The commands are the page's, read from it (tests/docblocks.py ``four_silo_script``): the walk-through's blocks up
to its connection ("every-terminal", "terminal-1", "terminal-2-keys", "terminal-3-connection"), then the
"four-silos" block, as written, in one bash, each command in the terminal the page names. Put in by the test:
free ports for 8000 ($SUPERLINK_PORT) and 9094..9097 ($((SILO_PORT_BASE + i))), pytest's tmp dir for $WORK,
the suite's prepared cache for `fedsq-prepare`, and `max-train-samples=1000` for the page's 2000 (CI time).

The run must end `finished:completed` (the page's `flwr ls --run-id <run-id> ... --format json`: `flwr run
--stream` exits 0 whatever became of the run) and every round must aggregate the replies of all four registered
silos. Everything listens on 127.0.0.1; every process the script starts is recorded by PID ($WORK/pids) and
stopped, with its process tree, in the test's ``finally``; the script has a bounded time (``TIMEOUT_S``).

Knobs: FEDSQ_SKIP_DEPLOYMENT_TEST=1 skips it (as tests/test_deployment.py); FEDSQ_FOUR_SILO_TIMEOUT_S=S (default
420) bounds the documented commands (measured on the 2-core machine: about 2.5 min at a load average of ~1.5,
4 min at ~9).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_system
from docblocks import argv as doc_argv, block, commands, four_silo_script
from loopback import BIN, _pgid, any_alive, clean_env, descendants, free_port, tail, tool

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = float(os.environ.get("FEDSQ_FOUR_SILO_TIMEOUT_S", "420"))  # 2.5-4 min measured on 2 cores
SILOS = 4

if os.environ.get("FEDSQ_SKIP_DEPLOYMENT_TEST") == "1":
    pytest.skip("FEDSQ_SKIP_DEPLOYMENT_TEST=1", allow_module_level=True)


def _port_base(count: int) -> int:
    """A base such that base+1 .. base+count are all free on 127.0.0.1 (the block's $((9093 + i)))."""
    for _ in range(200):
        base = random.randint(20000, 60000)
        sockets = []
        try:
            for offset in range(1, count + 1):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def _stop(pids: list[int]) -> list[int]:
    """SIGTERM every process group of the PIDs' trees (Flower's SuperExec and the ServerApp run in a group of
    their own), then SIGKILL what is left after 10 s. Returns the PIDs still alive after that."""
    tree = sorted(set(pids) | {child for pid in pids for child in descendants(pid)})
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pgid in {_pgid(pid) for pid in tree} - {None, os.getpgid(0)}:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.monotonic() + grace_s
        while time.monotonic() < end and any_alive(tree):
            time.sleep(0.2)
        if not any_alive(tree):
            break
    return [pid for pid in tree if any_alive([pid])]


def _json_from(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def test_four_silos_over_tls_with_node_auth_and_the_warm_executor(tmp_path: Path, fedsq_cache: Path) -> None:
    tools = {name: tool(name) for name in ("flower-superlink", "fedsq-supernode", "flwr", "fedsq-superexec")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found next to {sys.executable} or on PATH (bash scripts/setup.sh)")
    require_system("openssl")  # deploy/make-certs.sh
    documented_run = next(c for c in commands(block("four-silos").body) if c.startswith("flwr run"))
    assert "num-server-rounds=2" in documented_run, documented_run  # the rounds this test checks
    run_name = re.search(r"run-name='([^']+)'", documented_run)
    assert run_name, f"the four-silo run names no run-name (its results.json's folder): {documented_run}"

    work = tmp_path / "work"
    shutil.copytree(fedsq_cache, work / "cache" / "fedsq")  # what the skipped `fedsq-prepare` would make
    activate = BIN / "activate"
    script = four_silo_script({
        "source .venv/bin/activate": f"source '{activate}'" if activate.is_file() else ":",
        "max-train-samples=2000": "max-train-samples=1000",  # half the page's, for CI
    })
    (tmp_path / "four-silos.sh").write_text(script)
    env = clean_env(tmp_path, WORK=str(work), SUPERLINK_PORT=str(free_port()), SILO_PORT_BASE=str(_port_base(SILOS)),
                    FLWR=tools["flwr"], PYTHON=sys.executable)
    log_path = tmp_path / "four-silos.log"
    pid_file = work / "pids"
    t0 = time.monotonic()
    shell = None
    try:
        with open(log_path, "wb") as log:
            shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = shell.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the four-silo commands ran past {TIMEOUT_S:.0f} s:\n{tail(log_path, 4000)}\n"
                        + "".join(f"--- {p.name}\n{tail(p, 1500)}\n" for p in sorted(work.glob("s*.log"))))
        script_s = time.monotonic() - t0
        output = log_path.read_text(errors="replace")
        assert code == 0, f"the documented commands failed (exit {code}):\n{output[-6000:]}"

        node_ids = dict(re.findall(r"(silo-\d) registered, node ID (\d+)", output))
        assert sorted(node_ids) == [f"silo-{i}" for i in range(1, SILOS + 1)], output[-4000:]
        started = re.search(r"Successfully started run (\d+)", output)
        assert started, f"`flwr run` started no run:\n{output[-4000:]}"
        run_id = started.group(1)

        # The page's status check (the walk-through's terminal 3 block), as the user.
        listing = doc_argv("terminal-3-run", "flwr ls --run-id", subs={"<run-id>": run_id})
        user_env = dict(env, FLWR_HOME=str(work / "flwr-home" / "user"))
        status = ""
        for _ in range(15):
            listed = subprocess.run([tools["flwr"], *listing[1:]], cwd=REPO, env=user_env, capture_output=True,
                                    text=True, timeout=60)
            if listed.returncode == 0:
                status = _json_from(listed.stdout)["runs"][0]["status"]
                if status.startswith("finished"):
                    break
            time.sleep(2.0)
        assert status == "finished:completed", (
            f"run {run_id}: {status!r}\n{output[-4000:]}\n--- superlink\n{tail(work / 'superlink.log', 3000)}")

        results_path = work / "outputs" / run_name.group(1) / "results.json"
        assert results_path.is_file(), f"no {results_path}:\n{output[-3000:]}"
        results = json.loads(results_path.read_text())
        rounds = results["rounds"]
        assert len(rounds) == 2, rounds
        everyone = {int(node) for node in node_ids.values()}
        for record in rounds:  # no round kept the model it started from: all four silos aggregated
            assert record["aggregated"] and record["accepted"] == SILOS, record
            assert {r["node_id"] for r in record["replies"] if r.get("accepted")} == everyone, record["replies"]
        for i in range(1, SILOS + 1):  # each silo's messages ran in its warm executor's forked children
            executor_log = tail(work / f"superexec-{i}.log", 500_000)
            forked = re.findall(r"task \d+ ends in child \d+, exit (-?\d+)", executor_log)
            assert forked and set(forked) == {"0"}, f"superexec-{i}:\n{executor_log[-3000:]}"
        print(f"\nfour silos: documented commands {script_s:.0f} s, run {run_id} {status}, val_accuracy "
              f"{[round(r['val_accuracy'], 4) for r in rounds]}, round wall "
              f"{[r.get('wall_time_s') for r in rounds]}")
    finally:
        pids = [int(p) for p in pid_file.read_text().split()] if pid_file.is_file() else []
        if shell is not None:
            pids.append(shell.pid)
        survivors = _stop(pids)
        if shell is not None:
            shell.wait(timeout=10)
        assert not survivors, f"processes survived the test: {survivors}"
