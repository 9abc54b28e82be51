"""The warm executor (fedsq_app/deploy/warm_executor.py) without a deployment: which tasks fork and which
start the standard way, a crashing child costs its own task only, the child gets the thread count the
parent started with, and the FAB's install directory is found by hash. Each case runs in a fresh Python
(the executor pins torch to one thread and forks: not something to do inside pytest's process).
The end-to-end run over TLS + node auth is tests/test_deployment.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, os, sys, time
import fedsq_app.deploy.warm_executor as warm
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

out = sys.argv[1]
def fake_runner(**kwargs):  # stands in for Flower's run_clientapp: what the child sees, then its fate
    import torch
    token = kwargs["token"]
    with open(os.path.join(out, token), "w") as handle:
        json.dump({"threads": torch.get_num_threads(), "cuda": torch.cuda.is_initialized()}, handle)
    if token == "crash":
        os.kill(os.getpid(), 9)
    if token == "raise":
        raise RuntimeError("boom")
warm.run_clientapp = fake_runner

import torch
started_with = torch.get_num_threads()
executor = warm.ForkExecutor()
cold = []
executor.cold.launch = lambda spec: cold.append(spec.token) or LaunchResult.accepted()

def spec(token, task_id, task_type=TaskType.CLIENT_APP, fab="a" * 64):
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:1", token=token, insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
                         suppress_output=False, task_id=task_id, fab_hash=fab)

results = [executor.launch(spec(t, i + 1)).status.value for i, t in enumerate(["crash", "raise", "fine"])]
deadline = time.time() + 60
while executor.children and time.time() < deadline:
    executor.reconcile()
    time.sleep(0.05)
executor.launch(spec("serverapp", 9, TaskType.SERVER_APP))
executor.app_hash = "a" * 64  # as if that FAB's ClientApp were imported: another FAB must not fork
executor.launch(spec("other-fab", 10, fab="b" * 64))
print(json.dumps({"results": results, "left": len(executor.children), "cold": cold,
                  "restart": executor.restart_pending, "parent_threads": torch.get_num_threads(),
                  "started_with": started_with, "own_package_forgotten": "fedsq_app" not in sys.modules}))
"""


def test_fork_executor_forks_reaps_and_falls_back(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "2", "FLWR_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["results"] == ["accepted"] * 3 and report["left"] == 0  # all three reaped, the crash too
    assert report["cold"] == ["serverapp", "other-fab"] and report["restart"]
    assert report["parent_threads"] == 1 and report["started_with"] == 2
    assert report["own_package_forgotten"]  # so the ClientApp is imported from the FAB, not this install
    for token in ("crash", "raise", "fine"):  # every child ran, with the threads the process started with
        seen = json.loads((tmp_path / token).read_text())
        assert seen == {"threads": 2, "cuda": False}, token
    log = done.stderr
    assert "killed by signal 9; its reply is lost" in log, log[-3000:]
    assert "RuntimeError: boom" in log and "exited with 1" in log, log[-3000:]


def test_installed_app_dir_is_found_by_the_fab_hash(tmp_path: Path) -> None:
    from fedsq_app.deploy.warm_executor import installed_app_dir

    fab_hash = "0123abcd" + "e" * 56
    app = tmp_path / "apps" / "fedsq.fedsq.0.1.0.0123abcd"
    app.mkdir(parents=True)
    assert installed_app_dir(fab_hash, tmp_path) is None  # no pyproject.toml yet: not installed
    (app / "pyproject.toml").write_text("[project]\n")
    assert installed_app_dir(fab_hash, tmp_path) == app
    assert installed_app_dir("f" * 64, tmp_path) is None
