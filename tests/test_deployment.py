"""Loopback deployment end to end: TLS + SuperNode authentication, two silos, `flwr run` (Flower's SuperExec, then
the warm `fedsq-superexec`), negative checks.

The commands are docs/DEPLOYMENT.md's, read from the page (tests/docblocks.py): the walk-through's blocks
("every-terminal", "terminal-1", "terminal-2-keys", "terminal-3-connection", "terminal-2-silos",
"terminal-3-run"), the warm executor's ("warm-executor", "own-data") and the refused nodes' ("refused"), with
free ports for 8000/909x and pytest's tmp dir for $WORK. A documented `flwr run` that does not aggregate every
round (for two silos: without min-valid-replies=2) fails here.

Everything listens on 127.0.0.1 (free ports picked at start); every process is started in its own
process group and tracked by PID; the fixture teardown kills its whole process tree (Flower's SuperExec
runs in a group of its own) and fails if anything survived. All waits share one deadline
(``DEADLINE_S``). The app's cache comes from the suite's ``fedsq_cache`` fixture (tests/conftest.py) when
there is one, else from running ``fedsq-prepare``. Layout under pytest's tmp dir:

    certs/           deploy/make-certs.sh output (demo CA + SuperLink certificate)
    keys/            deploy/make-node-keys.sh output (silo-1, silo-2 registered; rogue never registered)
    home-*/          one FLWR_HOME per role (coordinator, silo-1, silo-2, user, ...)
    cache-*/         one FEDSQ_CACHE_DIR per role (prepared once, copied: each silo has its own backbone copy)
    logs/            stdout+stderr of every process
    outputs/         the run's out-dir (written by the ServerApp on the "coordinator")

Environment knobs (all optional):
    FEDSQ_SKIP_DEPLOYMENT_TEST=1   skip this module
    FEDSQ_DEPLOY_ROUNDS=N          rounds for the end-to-end run (default 2)
    FEDSQ_DEPLOY_REPORT=path.json  also write the measured timings there
    FEDSQ_DEPLOY_DEADLINE_S=S      the shared deadline (default 420 s, and as much again for the warm-executor
                                   run; raise it on a heavily loaded machine)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import require_system

# Process, port and health helpers shared with the dropped-silo test (tests/loopback.py).
from loopback import any_alive as _any_alive, descendants as _descendants, free_port as _free_port  # noqa: E402
from loopback import free_ports as _free_ports, health_ok as _health_ok, _pgid  # noqa: E402
from loopback import clean_env as _clean_env, tail as _tail, tool as _tool  # noqa: E402
from loopback import BIN, SUPEREXEC_POLL_S  # noqa: E402
from docblocks import argv as doc_argv, script as doc_script  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = float(os.environ.get("FEDSQ_DEPLOY_DEADLINE_S", "420"))  # the module; the warm run gets another
CONNECTION = "fedsq-local"  # the walk-through's connection (its terminal-3 blocks)
ROUNDS = int(os.environ.get("FEDSQ_DEPLOY_ROUNDS", "2"))
RUN_NAME = "deploy-e2e"

if os.environ.get("FEDSQ_SKIP_DEPLOYMENT_TEST") == "1":
    pytest.skip("FEDSQ_SKIP_DEPLOYMENT_TEST=1", allow_module_level=True)


def _require_tools() -> dict[str, str]:
    tools = {name: _tool(name) for name in ("flower-superlink", "flower-supernode", "flwr")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"Flower CLI(s) {', '.join(missing)} not found next to {sys.executable} or on PATH; "
                    "install flwr (>=1.42,<1.43; bash scripts/setup.sh) into this environment to run the deployment test")
    require_system("openssl")  # deploy/make-certs.sh makes the test certificates with it
    if not (REPO / "fedsq_app" / "server_app.py").is_file():
        pytest.skip("the FedSQ app (fedsq_app/server_app.py) is not in this checkout")
    return tools  # type: ignore[return-value]








def _json_from(stdout: str) -> dict:
    """The JSON object in a `flwr ... --format json` output (tolerates text before it)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError(f"no JSON in output: {stdout[-2000:]!r}")
    return json.loads(stdout[start:])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    tree: list[int] = field(default_factory=list)  # PIDs seen below it (filled when stopping)


@dataclass
class Federation:
    tmp: Path
    tools: dict[str, str]
    deadline: float
    base_env: dict[str, str]
    port: int = 0
    certs: Path = Path()
    keys: Path = Path()
    procs: list[Proc] = field(default_factory=list)
    user_env: dict[str, str] = field(default_factory=dict)
    node_ids: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ time
    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"deployment test ran past its {DEADLINE_S:.0f} s budget")
        return left

    # ------------------------------------------------------------------ processes
    def env(self, role: str, **extra: str) -> dict[str, str]:
        """Environment of one role: its own FLWR_HOME and FEDSQ_CACHE_DIR under tmp."""
        home = self.tmp / f"home-{role}"
        home.mkdir(exist_ok=True)
        env = dict(self.base_env, FLWR_HOME=str(home), FEDSQ_CACHE_DIR=str(self.tmp / f"cache-{role}"),
                   FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(SUPEREXEC_POLL_S))  # what the docs tell silos to set
        env.update(extra)
        return env

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.tmp / "logs" / f"{name}.log"
        handle = open(log, "wb")
        try:
            popen = subprocess.Popen(argv, cwd=self.tmp, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            handle.close()  # the child holds its own copy
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """SIGTERM the process tree, then SIGKILL whatever is left of it after 10 s.

        Flower starts its SuperExec in a process group of its own (the ServerApp/ClientApp processes are
        in that one), so killing the leader's group is not enough: the tree is collected first (before
        anything is reparented) and every process group in it is signalled.
        """
        proc.tree = sorted(set(proc.tree) | {proc.popen.pid} | set(_descendants(proc.popen.pid)))
        for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pgid in {_pgid(pid) for pid in proc.tree} - {None, os.getpgid(0)}:
                try:
                    os.killpg(pgid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            end = time.monotonic() + grace_s
            while time.monotonic() < end and _any_alive(proc.tree):
                proc.popen.poll()  # reap the leader so it does not linger as a zombie
                time.sleep(0.1)
            if not _any_alive(proc.tree):
                break
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def snapshot(self, proc: Proc) -> None:
        """Remember the processes below ``proc`` now (they are reparented once it exits)."""
        if proc.popen.poll() is None:
            proc.tree = sorted(set(proc.tree) | set(_descendants(proc.popen.pid)))

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)

    def run(self, argv: list[str], env: dict[str, str], timeout: float | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """A short-lived command (flwr CLI, scripts), bounded by the shared deadline."""
        limit = min(timeout or 120.0, self.remaining())
        return subprocess.run(argv, cwd=cwd or self.tmp, env=env, capture_output=True, text=True,
                              timeout=limit, start_new_session=True)

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self.run([self.tools["flwr"], *args], self.user_env, timeout=timeout, cwd=REPO)

    # ------------------------------------------------------------------ the page's commands
    def doc_env(self, **extra: str) -> dict[str, str]:
        """The variables the page's commands use: $WORK is this test's tmp dir."""
        return dict(WORK=str(self.tmp), FLWR_HOME=str(self.tmp / "flwr-home" / "coordinator"), **extra)

    def doc_shell(self, *scripts: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the page's blocks (docblocks.script) in one bash, after its "every terminal first" block."""
        activate = BIN / "activate"
        first = doc_script("every-terminal", subs={"source .venv/bin/activate": f"source '{activate}'" if
                                                   activate.is_file() else ":"})
        env = dict(env or self.base_env, WORK=str(self.tmp), PYTHON=sys.executable, FLWR=self.tools["flwr"])
        done = self.run(["bash", "-euo", "pipefail", "-c", first + "".join(scripts)], env, cwd=REPO)
        assert done.returncode == 0, f"documented commands failed:\n{''.join(scripts)}\n{done.stdout}\n{done.stderr}"
        return done

    def doc_command(self, block_id: str, start: str, **kwargs) -> list[str]:
        """One documented command as an argument list, its program this environment's."""
        argv = doc_argv(block_id, start, env=self.doc_env(), **kwargs)
        return [self.tools.get(argv[0]) or _tool(argv[0]) or argv[0], *argv[1:]]

    # ------------------------------------------------------------------ SuperNodes
    def supernode_argv(self, key: Path | None, runtime_port: int, partition_id: int, tls: str = "ca",
                       max_retries: int | None = None, node_config: str | None = None) -> list[str]:
        """tls: "ca" (--root-certificates demo CA), "system" (no CA given), "insecure" (plain HTTP).
        ``node_config``: instead of partition ``partition_id`` of 2 (e.g. a silo's own ``data-path``)."""
        argv = [self.tools["flower-supernode"], "--superlink", f"127.0.0.1:{self.port}",
                "--host", "127.0.0.1", "--port", str(runtime_port),
                "--node-config", node_config or f"partition-id={partition_id} num-partitions=2"]
        if tls == "ca":
            argv += ["--root-certificates", str(self.certs / "ca.crt")]
        elif tls == "insecure":
            argv += ["--insecure"]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key)]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries), "--max-wait-time", "30"]
        return argv

    def wait_exit(self, proc: Proc, limit_s: float) -> int | None:
        end = time.monotonic() + min(limit_s, self.remaining())
        while time.monotonic() < end:
            self.snapshot(proc)
            code = proc.popen.poll()
            if code is not None:
                return code
            time.sleep(0.2)
        return None












def _app_config_keys() -> set[str]:
    with open(REPO / "pyproject.toml", "rb") as handle:
        pyproject = tomllib.load(handle)
    config = pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})

    def flatten(table: dict, prefix: str = "") -> set[str]:
        keys: set[str] = set()
        for key, value in table.items():
            if isinstance(value, dict):
                keys |= flatten(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")
        return keys

    return flatten(config)


def _toml_value(value: object) -> str:
    return json.dumps(value) if isinstance(value, (str, bool)) else str(value)  # TOML: "x", true, 1.0


SILO_SIZES = {"silo-1": 300, "silo-2": 700}


def run_config_overrides(documented: str, out_dir: Path, run_name: str = RUN_NAME) -> str:
    """The page's --run-config as written, plus the test's keys it does not set: run-name, the operator's
    silo sizes, and the CPU keys where the app has them. The page's keys (min-valid-replies=2 among them, or
    the run does not aggregate) are never overridden."""
    keys = _app_config_keys()
    # Two silos, the operator's weights keyed by registered name (a path on the coordinator: here, tmp).
    sizes = out_dir.parent / "silo-sizes.json"
    sizes.write_text(json.dumps(SILO_SIZES))
    documented_keys = {part.split("=", 1)[0] for part in documented.split()}
    wanted: dict[str, object] = {"run-name": run_name, "silo-sizes": str(sizes), "device": "cpu", "local-epochs": 1,
                                 "max-train-samples": 1000}
    missing = [key for key in [*documented_keys, "run-name", "silo-sizes"] if key not in keys]
    assert not missing, f"pyproject [tool.flwr.app.config] lacks {missing}; the deployment test needs them"
    added = " ".join(f"{key}={_toml_value(value)}" for key, value in wanted.items()
                     if key in keys and key not in documented_keys)
    return f"{documented} {added}"


# ---------------------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    tools = _require_tools()
    try:  # the suite's shared, already prepared cache (tests/conftest.py), if there is one
        prepared_cache = Path(request.getfixturevalue("fedsq_cache"))
    except pytest.FixtureLookupError:
        prepared_cache = None  # run `fedsq-prepare` ourselves
    tmp = tmp_path_factory.mktemp("deploy")
    (tmp / "logs").mkdir()
    base_env = _clean_env(tmp)  # no inherited Flower/app state from the caller's shell; offline
    fed = Federation(tmp=tmp, tools=tools, deadline=time.monotonic() + DEADLINE_S, base_env=base_env)
    try:
        _bring_up(fed, prepared_cache)
        yield fed
    finally:
        fed.stop_all()
        leftovers = [p.name for p in fed.procs if _any_alive(p.tree)]
        assert not leftovers, f"processes survived teardown: {leftovers}"


def _bring_up(fed: Federation, prepared_cache: Path | None) -> None:
    t0 = time.monotonic()
    tmp = fed.tmp
    # Certificates and keys: the walk-through's terminal 1 (all but fedsq-prepare, whose cache is the suite's,
    # and the SuperLink, started below) and terminal 2's key block, as written; $WORK is tmp.
    fed.certs, fed.keys = tmp / "certs", tmp / "keys"
    fed.doc_shell(doc_script("terminal-1", skip=("fedsq-prepare", "flower-superlink")),
                  doc_script("terminal-2-keys"))
    assert (fed.certs / "ca.crt").is_file() and (fed.keys / "silo-2.pub").is_file()

    # The app's cache (embedded data + pretrained backbone): made once, copied to the coordinator and to
    # each silo, as the docs recommend (every party needs the same backbone: FedSQ checks S's hash).
    if prepared_cache is None:
        prepare = _tool("fedsq-prepare")
        argv = [prepare] if prepare else [sys.executable, "-c",
                                          "from fedsq_app.tools.pretrain import prepare_main; prepare_main()"]
        made = fed.run(argv, fed.env("prepare"), timeout=240)
        assert made.returncode == 0, f"fedsq-prepare failed:\n{made.stdout[-3000:]}\n{made.stderr[-3000:]}"
        prepared_cache = tmp / "cache-prepare"
    for role in ("coordinator", "silo-1", "silo-2"):
        shutil.copytree(prepared_cache, tmp / f"cache-{role}")
    fed.timings["prepare_s"] = time.monotonic() - t0

    # SuperLink (terminal 1): TLS, node auth, persistent state, no runtime dependency installation.
    fed.port = _free_port()
    t1 = time.monotonic()
    link = fed.start("superlink", fed.doc_command("terminal-1", "flower-superlink",
                                                  subs={"--port 8000": f"--port {fed.port}"}),
                     fed.env("coordinator", FLWR_HOME=fed.doc_env()["FLWR_HOME"]))
    while not _health_ok(fed.port, fed.certs / "ca.crt"):
        if link.popen.poll() is not None:
            pytest.fail(f"SuperLink exited with {link.popen.returncode}:\n{_tail(link.log)}")
        if time.monotonic() - t1 > 60:
            pytest.fail(f"SuperLink not healthy on https://127.0.0.1:{fed.port} after 60 s:\n{_tail(link.log)}")
        fed.remaining()
        time.sleep(0.3)
    fed.timings["superlink_start_s"] = time.monotonic() - t1

    # The user (terminal 3): the connection in $WORK/flwr-home/user/config.toml (never in pyproject.toml), and
    # the two silos' public keys registered (the rogue key of the refused-node block stays unregistered).
    fed.user_env = fed.env("user", FLWR_HOME=str(tmp / "flwr-home" / "user"))
    registered = fed.doc_shell(doc_script("terminal-3-connection", subs={"127.0.0.1:8000": f"127.0.0.1:{fed.port}"}),
                               env=fed.user_env)
    assert (Path(fed.user_env["FLWR_HOME"]) / "config.toml").is_file()
    for silo in ("silo-1", "silo-2"):
        found = re.search(rf"{silo} registered, node ID (\d+)", registered.stdout)
        assert found, registered.stdout
        fed.node_ids[silo] = found.group(1)

    # Two authenticated SuperNodes, each with its own partition of the data (terminal 2).
    runtime_ports = _free_ports(2)
    for index, silo in enumerate(("silo-1", "silo-2")):
        argv = fed.doc_command("terminal-2-silos", "flower-supernode", nth=index,
                               subs={"127.0.0.1:8000": f"127.0.0.1:{fed.port}",
                                     f"--port {9094 + index}": f"--port {runtime_ports[index]}"})
        fed.start(silo, argv, fed.env(silo))
    t2 = time.monotonic()
    _wait_online(fed, t2)
    fed.timings["supernodes_online_s"] = time.monotonic() - t2


def _wait_online(fed: Federation, t0: float) -> None:
    """Until both registered silos are online (or a SuperNode exits, or 60 s pass)."""
    while True:
        listing = fed.flwr("supernode", "list", CONNECTION, "--format", "json")
        if listing.returncode == 0:
            nodes = {n["node-id"]: n["status"] for n in _json_from(listing.stdout)["nodes"]}
            if all(nodes.get(node_id) == "online" for node_id in fed.node_ids.values()):
                break
        for proc in [p for p in fed.procs[1:] if p.popen.returncode is None]:
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited with {proc.popen.returncode}:\n{_tail(proc.log)}")
        if time.monotonic() - t0 > 60:
            pytest.fail(f"SuperNodes not online after 60 s: {listing.stdout[-1500:]} {listing.stderr[-1500:]}")
        time.sleep(1.0)


# ---------------------------------------------------------------------------------------------- tests
def _documented_run(block_id: str, out_dir: Path, run_name: str) -> list[str]:
    """The block's `flwr run ... --stream --run-config "..."` as written ($WORK = tmp), with the test's
    rounds and the keys it adds (``run_config_overrides``)."""
    argv = doc_argv(block_id, "flwr run", env={"WORK": str(out_dir.parent)},
                    subs={"num-server-rounds=2": f"num-server-rounds={ROUNDS}"},
                    optional={"max-train-samples=2000": "max-train-samples=1000"})  # half the page's, for CI
    assert argv[1:4] == ["run", ".", CONNECTION] and "--stream" in argv, argv
    at = argv.index("--run-config") + 1
    argv[at] = run_config_overrides(argv[at], out_dir, run_name)
    return argv[1:]


def _run_to_completion(fed: Federation, run_name: str, block_id: str = "terminal-3-run") -> tuple[dict, str, float]:
    """The page's `flwr run` (``block_id``); assert it ends `finished:completed` with every round aggregating
    both silos. Returns (results.json, the run's log, wall seconds)."""
    out_dir = fed.tmp / "outputs"
    documented = _documented_run(block_id, out_dir, run_name)
    t0 = time.monotonic()
    # `flwr run --stream` follows the log until the run ends; then the page's `flwr ls --run-id <run-id> ...
    # --format json`: `--stream` exits 0 even for failed runs, the status is the truth.
    try:
        streamed = fed.flwr(*documented, timeout=max(fed.remaining() - 20, 5))
        log = streamed.stdout + streamed.stderr
    except subprocess.TimeoutExpired as expired:
        log = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                      for part in (expired.stdout, expired.stderr))
    started = re.search(r"Successfully started run (\d+)", log)
    assert started, f"`flwr {' '.join(documented)}` started no run:\n{log[-4000:]}"
    run_id = started.group(1)
    listing = doc_argv("terminal-3-run", "flwr ls --run-id", subs={"<run-id>": run_id})
    status = ""
    for _ in range(10):
        listed = fed.flwr(*listing[1:])
        if listed.returncode == 0:
            status = _json_from(listed.stdout)["runs"][0]["status"]
            if status.startswith("finished") or fed.deadline - time.monotonic() < 10:
                break
        time.sleep(3.0)
    wall_s = time.monotonic() - t0
    (fed.tmp / "logs" / f"run-{run_name}.log").write_text(log)
    assert status == "finished:completed", (
        f"run {run_id} status {status!r}\n--- run log ---\n{log[-4000:]}\n"
        f"--- superlink ---\n{_tail(fed.procs[0].log)}")

    # The page's `flwr log <run-id> ... --show`: a short CLI call, given its own minute past the deadline.
    show = doc_argv("terminal-3-run", "flwr log", subs={"<run-id>": run_id})
    shown = subprocess.run([fed.tools["flwr"], *show[1:]], cwd=REPO, env=fed.user_env, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    results_path = out_dir / run_name / "results.json"
    assert results_path.is_file(), f"no {results_path}; run log:\n{log[-3000:]}"
    results = json.loads(results_path.read_text())
    rounds = results.get("rounds", [])
    assert len(rounds) == ROUNDS, rounds
    weights = {int(fed.node_ids[silo]): size for silo, size in SILO_SIZES.items()}
    for record in rounds:  # both silos trained and were aggregated in every round, with the operator's weights
        assert record["aggregated"] and record["accepted"] == 2 and record["weights_from"] == "silo-sizes", record
        assert {r["node_id"]: r["weight"] for r in record["replies"]} == weights, record["replies"]
    return results, log, wall_s


def test_fedsq_run_completes_over_tls_with_node_auth(federation: Federation) -> None:
    fed = federation
    results, log, wall_s = _run_to_completion(fed, RUN_NAME)
    round_times = [r.get("wall_time_s") for r in results["rounds"]]
    logged = [float(s) for s in re.findall(r"round \d+: .*\((\d+(?:\.\d+)?)s\)", log)]
    report = dict(fed.timings, run_wall_s=wall_s, round_wall_s=round_times, round_wall_s_from_log=logged,
                  rounds=ROUNDS, command=_documented_run("terminal-3-run", fed.tmp / "outputs", RUN_NAME))
    print("\nloopback deployment timings:", json.dumps(report))
    if os.environ.get("FEDSQ_DEPLOY_REPORT"):
        Path(os.environ["FEDSQ_DEPLOY_REPORT"]).write_text(json.dumps(report, indent=2))


def test_unregistered_supernode_is_refused(federation: Federation) -> None:
    fed = federation
    fed.doc_shell(doc_script("refused", skip=("flower-supernode",)))  # the rogue's key pair, never registered
    rogue = fed.start("rogue", fed.doc_command("refused", "flower-supernode", nth=0, subs={
        "127.0.0.1:8000": f"127.0.0.1:{fed.port}", "--port 9196": f"--port {_free_port()}"}), fed.env("rogue"))
    code = fed.wait_exit(rogue, 60)
    log = _tail(rogue.log)
    assert code is not None and code != 0, f"unregistered SuperNode still running or exited 0:\n{log}"
    assert "Failed to activate SuperNode" in log or "2004" in log, log
    link_log = _tail(fed.procs[0].log, 500_000)
    assert "No SuperNode found with the given public key" in link_log or "activate-node HTTP/1.1\" 412" in link_log
    # ...and the federation still has exactly the two registered nodes online.
    listing = _json_from(fed.flwr("supernode", "list", CONNECTION, "--format", "json").stdout)
    online = sorted(n["node-id"] for n in listing["nodes"] if n["status"] == "online")
    assert online == sorted(fed.node_ids.values())


def test_supernode_without_ca_certificate_cannot_connect(federation: Federation) -> None:
    fed = federation
    # A registered key, but no --root-certificates: the system trust store does not know the demo CA.
    stray = fed.start("no-ca", fed.doc_command("refused", "flower-supernode", nth=1, subs={
        "127.0.0.1:8000": f"127.0.0.1:{fed.port}", "--port 9197": f"--port {_free_port()}"}), fed.env("no-ca"))
    code = fed.wait_exit(stray, 60)
    log = _tail(stray.log)
    assert code is not None and code != 0, f"SuperNode without the CA still running or exited 0:\n{log}"
    assert "CERTIFICATE_VERIFY_FAILED" in log, log


def test_plaintext_supernode_cannot_connect(federation: Federation) -> None:
    fed = federation
    plain = fed.start("insecure", fed.supernode_argv(None, _free_port(), 1, tls="insecure", max_retries=1),
                      fed.env("insecure"))
    code = fed.wait_exit(plain, 60)
    assert code is not None and code != 0, f"--insecure SuperNode connected to the TLS SuperLink:\n{_tail(plain.log)}"


def test_cli_without_ca_certificate_cannot_connect(federation: Federation) -> None:
    fed = federation
    home = fed.tmp / "home-user-no-ca"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "no-ca"\n\n[superlink.no-ca]\naddress = "127.0.0.1:{fed.port}"\n')
    result = fed.run([fed.tools["flwr"], "ls", "no-ca", "--format", "json"], dict(fed.user_env, FLWR_HOME=str(home)),
                     timeout=60, cwd=REPO)
    assert result.returncode != 0 or '"success": false' in result.stdout, result.stdout + result.stderr


SILO_OVERLAP = 25  # pretraining images in silo-2's own data (allowed there, knowingly)


def _silo_data(fed: Federation) -> dict[str, str]:
    """Each silo's own data (`data-path`, IDX files): silo-1 300 images of the embedded train split, silo-2
    400 more plus SILO_OVERLAP of the backbone's pretraining images (what a silo on the official files has)."""
    from importlib import resources

    from fedsq_app.data.sources import read_idx, write_idx

    shipped = resources.files("fedsq_app") / "embedded"
    images, labels = (read_idx(shipped / f"train-{k}-idx{n}-ubyte.gz") for k, n in (("images", 3), ("labels", 1)))
    pre_images, pre_labels = (read_idx(shipped / f"pretrain-{k}-idx{n}-ubyte.gz")
                              for k, n in (("images", 3), ("labels", 1)))
    parts = {"silo-1": (images[:300], labels[:300]),
             "silo-2": (np.concatenate([images[300:700], pre_images[:SILO_OVERLAP]]),
                        np.concatenate([labels[300:700], pre_labels[:SILO_OVERLAP]]))}
    paths = {}
    for silo, (silo_images, silo_labels) in parts.items():
        folder = fed.tmp / "silo-data" / silo
        folder.mkdir(parents=True, exist_ok=True)
        write_idx(folder / "train-images-idx3-ubyte.gz", silo_images)
        write_idx(folder / "train-labels-idx1-ubyte.gz", silo_labels)
        paths[silo] = f"idx:{folder}"
    return paths


def test_fedsq_run_completes_with_the_warm_executor(federation: Federation) -> None:
    """The same silos (same keys, so the same node ids) restarted with ``--isolation process`` and
    ``fedsq-superexec``, now on their own data (``data-path``): the run completes over TLS + node auth, the
    ClientApps ran in forked children, and with the server validating nothing (server-validation=false)
    each silo's own validation accuracy, keyed by its node id, is in results.json and picks the best round.
    silo-2's data holds pretraining images: it trains because its node config allows it."""
    fed = federation
    fed.deadline = time.monotonic() + DEADLINE_S  # a second FedSQ run: a budget of its own
    superexec = _tool("fedsq-superexec")
    assert superexec, "fedsq-superexec is not installed next to this interpreter (bash scripts/setup.sh)"
    for proc in [p for p in fed.procs if p.name in ("silo-1", "silo-2")]:
        fed.stop(proc)
    data = _silo_data(fed)
    kept = fed.tmp / "kept"  # silo-1 keeps the federation's model (keep-model); silo-2 does not ask
    node_configs = {"silo-1": f"data-path='{data['silo-1']}' keep-model='{kept}'",
                    "silo-2": f"data-path='{data['silo-2']}' allow-pretrain-overlap=true"}
    runtime_ports = _free_ports(2)
    for index, silo in enumerate(("silo-1", "silo-2")):
        env = fed.env(silo)  # the silo's FLWR_HOME and cache: the FAB it installed before is found there
        # The page's warm-executor block, its placeholders put in: coordinator, CA, key, port, node config.
        node = fed.start(f"{silo}-warm", fed.doc_command("warm-executor", "fedsq-supernode", subs={
            "coord.example.org:8000": f"127.0.0.1:{fed.port}", "/path/to/ca.crt": str(fed.certs / "ca.crt"),
            "/etc/fedsq/keys/silo-a": str(fed.keys / silo), "--port 9094": f"--port {runtime_ports[index]}",
            "data-path='/srv/silo-a/images'": node_configs[silo]}), env)
        argv = fed.doc_command("warm-executor", "fedsq-superexec", subs={
            "127.0.0.1:9094": f"127.0.0.1:{runtime_ports[index]}"}, optional={"$!": str(node.popen.pid)})
        assert argv[0] == superexec, argv
        fed.start(f"{silo}-superexec", argv, env)
    _wait_online(fed, time.monotonic())
    # The page's own-data run: fraction-evaluate=1.0 server-validation=false, as written.
    results, log, _ = _run_to_completion(fed, f"{RUN_NAME}-warm", block_id="own-data")
    assert results["validation_source"].startswith("nodes:") and "validation from the nodes" in log
    # silo-sizes: silo-1 (300 images, 268 after its hold-out) is as registered; silo-2 (425 images, registered
    # as 700) reports far fewer than 700 less the hold-out, and the ServerApp says so at WARNING.
    flagged = set(re.findall(r"node (\d+): reported \d+ training examples, but silo-sizes says", log))
    assert flagged == {fed.node_ids["silo-2"]}, flagged
    recorded = {str(r["node_id"]) for rnd in results["rounds"] for r in rnd["replies"] if r.get("size_mismatch")}
    assert recorded == {fed.node_ids["silo-2"]}, recorded  # and results.json names it in each of its replies
    expected = {fed.node_ids["silo-1"]: 32, fed.node_ids["silo-2"]: 42}  # their 10 % hold-outs (per label, rounded)
    curve = []
    for record in [results["initial"], *results["rounds"]]:
        validation = record["node_validation"]
        counts = {node: entry["num_examples"] for node, entry in validation["nodes"].items()}
        assert counts == expected, validation
        assert all(0.0 <= entry["accuracy"] <= 1.0 for entry in validation["nodes"].values())
        assert record["val_accuracy"] == validation["accuracy"]
        curve.append(record["val_accuracy"])
    print("\nper-silo validation accuracy (node id -> accuracy), round 0 first:",
          [{node: round(e["accuracy"], 4) for node, e in r["node_validation"]["nodes"].items()}
           for r in [results["initial"], *results["rounds"]]])
    assert results["best_val_accuracy"] == max(curve) and results["rounds_to_best"] == curve.index(max(curve))

    # silo-1 asked for the model: it holds the server's best model and its own accuracy on it; silo-2 got nothing.
    (delivered,) = results["model_delivered_to"]
    assert delivered["node_id"] == int(fed.node_ids["silo-1"]) and delivered["kept"], delivered
    assert delivered["num_examples"] == expected[fed.node_ids["silo-1"]]  # its hold-out, as in every round
    model_file = kept / f"{RUN_NAME}-warm" / "best_model.safetensors"
    sidecar = json.loads(Path(f"{model_file}.json").read_text())
    assert sidecar["val_accuracy"] == delivered["val_accuracy"] and sidecar["round"] == results["best_round"]
    assert sidecar["structural_sha256"] == results["structural_sha256"] and sidecar["node_id"] == delivered["node_id"]
    from safetensors.numpy import load_file

    theirs = load_file(str(model_file))
    ours = load_file(str(fed.tmp / "outputs" / f"{RUN_NAME}-warm" / model_file.name))
    assert sorted(theirs) == sorted(ours) and all(np.array_equal(theirs[k], ours[k]) for k in ours)

    for silo in ("silo-1", "silo-2"):
        log = _tail(next(p for p in fed.procs if p.name == f"{silo}-superexec").log, 500_000)
        forked = re.findall(r"task \d+ ends in child \d+, exit (-?\d+)", log)
        assert len(forked) >= ROUNDS and set(forked) == {"0"}, log[-4000:]
        imported = re.search(r"ClientApp of \S+ imported \((\S+)\); later tasks fork from here", log)
        assert imported and f"{os.sep}apps{os.sep}" in imported.group(1), log[-4000:]  # the FAB's copy
        # After round 1 the parent holds the run's model, data and masks: round 2's task forks with them.
        assert re.search(r"primed run \d+ in [\d.]+ s", log) and "uses the parent's state of run" in log, \
            log[-4000:]
