"""The warm executor (fedsq_app/deploy/warm_executor.py) without a deployment: which tasks fork and which
start the standard way, a crashing child costs its own task only, the child gets the thread count the
parent started with, and the FAB's install directory is found by hash. Each case runs in a fresh Python
(the executor pins torch to one thread and forks: not something to do inside pytest's process).
The parent's state of a run: primed once per key and never served to another (a fake app), the app's
``prime`` hook against a fresh process (in this process), and a loopback deployment with each executor
giving the same results. The end-to-end run over TLS + node auth is tests/test_deployment.py."""

from __future__ import annotations

import json
import os
import re
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


def test_a_child_installs_a_fab_only_when_no_task_installed_it_before(tmp_path: Path, monkeypatch) -> None:
    """Flower's runner reinstalls the FAB in every task; a forked child returns the directory of an earlier
    task's install instead (what Flower's install returns too, after extracting and hashing the archive)."""
    import hashlib

    from flwr.supernode.runtime import run_clientapp as flwr_clientapp

    from fedsq_app.deploy.warm_executor import ForkExecutor

    calls = []
    monkeypatch.setattr(flwr_clientapp, "install_from_fab", lambda *args, **kwargs: calls.append(args) or "installed")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    ForkExecutor._install_once()
    fab = b"a FAB's bytes"
    assert flwr_clientapp.install_from_fab(fab, skip_prompt=True) == "installed" and len(calls) == 1
    app = tmp_path / "apps" / f"fedsq.fedsq.0.1.0.{hashlib.sha256(fab).hexdigest()[:8]}"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text("[project]\n")
    assert flwr_clientapp.install_from_fab(fab, skip_prompt=True) == app and len(calls) == 1
    assert flwr_clientapp.install_from_fab(b"another FAB", skip_prompt=True) == "installed" and len(calls) == 2


# ---------------------------------------------------------------------------------------- the parent's state
PRIME_SCRIPT = r"""
import json, os, stat, sys, time, types
import fedsq_app.deploy.warm_executor as warm
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec

out, fab = sys.argv[1], "a" * 64
calls = []
app = types.ModuleType("fake_app")  # stands in for the FAB's ClientApp module and its two hooks
def prime(run_config, node_config):
    calls.append(["prime", run_config, node_config])
    if run_config.get("fail"):
        raise RuntimeError("cannot build")
    app.state = {**run_config, **node_config}
    return True, "built"
def forget():
    calls.append(["forget"])
    app.state = None
app.prime, app.forget, app.state = prime, forget, None
sys.modules["fake_app"] = app

tasks = {}  # token -> (run id, run config, node config): what Flower's pull hands the child
def fake_pull(token):
    run_id, run_config, node_config = tasks[token]
    context = types.SimpleNamespace(run_config=run_config, node_config=node_config)
    return None, context, types.SimpleNamespace(run_id=run_id), types.SimpleNamespace(hash_str=fab)
warm.flwr_clientapp.pull_task_input = fake_pull
def fake_runner(**kwargs):  # Flower's runner pulls the task's input first; then what the child inherited
    warm.flwr_clientapp.pull_task_input(kwargs["token"])
    with open(os.path.join(out, kwargs["token"]), "w") as handle:
        json.dump(app.state, handle)
warm.run_clientapp = fake_runner

executor = warm.ForkExecutor()
executor.app_hash, executor.app_module = fab, "fake_app"  # as if the FAB's ClientApp were imported
state_dir_mode = stat.S_IMODE(os.stat(executor.state_dir).st_mode)
modes = []
def run(token, run_id, run_config, node_config):
    tasks[token] = (run_id, run_config, node_config)
    executor.launch(ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:1", token=token,
                                  insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                                  parent_pid=os.getpid(), suppress_output=False, task_id=len(tasks), fab_hash=fab))
    deadline = time.time() + 60
    while executor.children and time.time() < deadline:
        modes.extend(oct(stat.S_IMODE(p.stat().st_mode)) for p in executor.state_dir.glob("*.json"))
        executor.reconcile()
        time.sleep(0.01)
    executor.reconcile()  # primes, now that no child runs

A, B, P0, P1 = {"lr": 0.1}, {"lr": 0.2}, {"partition-id": 0}, {"partition-id": 1}
run("a-first", 1, A, P0)     # nothing primed yet: the child builds its own; then the parent primes (A, P0)
run("a-second", 1, A, P0)    # inherits it
run("a-node", 1, A, P1)      # another node config: not served the state of P0, which is dropped; P1 primed
run("a-node-again", 1, A, P1)
run("b-first", 2, B, P1)     # another run and run config: the same
run("b-second", 2, B, P1)
run("c-fails", 3, {"fail": True}, P1)  # its prime raises: logged, state dropped, the executor goes on
run("c-after", 3, {"fail": True}, P1)  # forked all the same, builds its own; its prime is not retried
primed = executor.primed
warm.WARM_IDLE_S = 0.0
run("d-first", 4, A, P0)
time.sleep(0.05)
executor.reconcile()         # idle: the run's state is dropped
idle_dropped = executor.warm_key is None
executor.close()
print(json.dumps({"calls": calls, "primed": primed, "idle_dropped": idle_dropped, "dir_mode": oct(state_dir_mode),
                  "record_modes": sorted(set(modes)), "dir_left": executor.state_dir.exists()}))
"""


def test_the_parent_primes_each_run_once_and_never_serves_another_key(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PRIME_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    A, B, P0, P1 = {"lr": 0.1}, {"lr": 0.2}, {"partition-id": 0}, {"partition-id": 1}
    assert report["calls"] == [["prime", A, P0], ["forget"], ["prime", A, P1], ["forget"], ["prime", B, P1],
                               ["forget"], ["prime", {"fail": True}, P1], ["forget"],  # its partial state
                               ["forget"], ["prime", A, P0], ["forget"]], report["calls"]  # (whatever is held)
    assert report["primed"] == 3 and report["idle_dropped"]
    assert report["dir_mode"] == "0o700" and report["record_modes"] in ([], ["0o600"]) and not report["dir_left"]
    seen = {token: json.loads((tmp_path / token).read_text()) for token in
            ("a-first", "a-second", "a-node", "a-node-again", "b-first", "b-second", "c-fails", "c-after")}
    assert seen["a-first"] is None and seen["a-second"] == {"lr": 0.1, "partition-id": 0}
    assert seen["a-node-again"] == {"lr": 0.1, "partition-id": 1} and seen["b-second"] == {"lr": 0.2, "partition-id": 1}
    assert seen["c-after"] is None  # the failed prime's partial state was dropped
    log = done.stderr
    uses = re.findall(r"task (\d+) (uses the parent's state|builds its own state)", log)
    assert [kind.startswith("uses") for _, kind in sorted(uses, key=lambda u: int(u[0]))] == \
        [False, True, False, True, False, True, False, False, False], uses
    assert "priming run 3 failed (RuntimeError: cannot build); its tasks build their own state" in log, log[-3000:]


def test_warm_deployment_gives_the_standard_executors_results(fedsq_cache: Path) -> None:
    """The same run deployed twice on loopback (fedsq-perf deploy's harness, 2 silos, 3 rounds): Flower's
    executor (a new flwr-clientapp per task) and the warm one. Same figures (timings and node ids aside),
    and from round 2 on every warm task forked from a parent holding its run's model, data and masks."""
    import pytest

    from fedsq_app.harness.loopback import tool
    from fedsq_app.tools.perf.deploy import deploy_pair

    if os.environ.get("FEDSQ_SKIP_DEPLOYMENT_TEST") == "1":
        pytest.skip("FEDSQ_SKIP_DEPLOYMENT_TEST=1")
    if not all(tool(name) for name in ("flower-superlink", "flower-supernode", "flwr", "fedsq-superexec")):
        pytest.skip("Flower's CLIs or fedsq-superexec are not installed next to this interpreter")
    nodes, rounds = 2, 3
    overrides = "max-train-samples=600 batch-size=32 lr=0.05 device='cpu' min-valid-replies=2 seed=3"
    results = deploy_pair(Path(__file__).resolve().parents[1], fedsq_cache, overrides, nodes, rounds,
                          superexec_poll=0.1, limit_s=400, executors=("standard", "warm"), simulate=False)
    standard, warm = results["deploy-standard"], results["deploy-warm"]
    print(json.dumps(results))
    assert standard["status"] == warm["status"] == "finished:completed", results
    assert len(standard["rounds_s"]) == len(warm["rounds_s"]) == rounds, results
    # A reply lost in transfer (Flower's push-session expiry on an overloaded machine) changes the figures.
    assert standard["accepted"] == warm["accepted"] == [nodes] * rounds, f"a reply was lost: {results}"
    assert standard["digest"] and standard["digest"] == warm["digest"], results
    # Round 1's task builds its own state; every later task of the run uses the parent's.
    assert warm["children"]["primed"] >= nodes * (rounds - 1), warm["children"]


def test_prime_builds_what_train_uses_and_the_reply_is_the_same(fedsq_cache: Path) -> None:
    """The app's hook (fedsq_app/client_app.py ``prime``), in this process: after one task of the run (which
    stores S's masks), a process that primed then trains replies exactly as a fresh process does, without
    building the model or running S; another node config or run config is built anew, never served the
    primed state."""
    import time

    import numpy as np
    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    from fedsq_app import client_app
    from fedsq_app.config import RunConfig
    from fedsq_app.runtime import maskcache
    from fedsq_app.task import global_arrays

    run = {"max-train-samples": 300, "batch-size": 16, "device": "cpu", "seed": 5}
    node = {"partition-id": 0, "num-partitions": 3}

    def train(arrays, sha, run_config=run, node_config=node):
        metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                            group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
        msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
            {"server-round": 2, "structural-sha256": sha})}), metadata=metadata)
        reply = client_app.train(msg, Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(),
                                              run_config=run_config))
        assert not reply.has_error(), reply.error.reason
        return {k: v.numpy() for k, v in reply.content["arrays"].items()}

    client_app.forget()
    for path in (fedsq_cache / "masks").glob("*"):
        path.unlink()
    model, _, sha = client_app.local_model(RunConfig.from_mapping(run))
    start = global_arrays(model)
    client_app.forget()
    train(start, sha)  # the run's first task: fills and stores S's masks
    client_app.forget()  # a fresh process
    cold = train(start, sha)
    client_app.forget()

    built, summary = client_app.prime(run, node)
    assert built and "masks" in summary and "incomplete" not in summary, summary
    models = client_app.local_model.cache_info().misses
    (cache,) = maskcache.REGISTRY.caches.values()
    warm = train(start, sha)
    assert client_app.local_model.cache_info().misses == models  # the primed model, not a new one
    assert cache.misses == 0 and cache.hits > 0  # the primed masks: S never ran
    assert sorted(warm) == sorted(cold) and all(np.array_equal(warm[k], cold[k]) for k in cold)

    train(start, sha, node_config={"partition-id": 1, "num-partitions": 3})  # another node: its own masks
    assert len(maskcache.REGISTRY.caches) == 2
    train(start, sha, run_config={**run, "lr": 0.02})  # another run config: another model
    assert client_app.local_model.cache_info().misses == models + 1
    assert client_app.prime({**run, "device": "cuda"}, node)[0] is False  # never CUDA in a forking parent
    client_app.forget()
    assert client_app.local_model.cache_info().currsize == 0 and not maskcache.REGISTRY.caches
