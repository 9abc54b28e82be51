"""``fedsq-perf coldstart`` and ``fedsq-perf deploy``: where a ClientApp/ServerApp process spends its start,
and deployment rounds against simulation rounds on the same config.

coldstart: in deployment Flower starts a fresh ``flwr-clientapp`` process for every message, so its start
is paid every round. This replays that process's steps in a fresh interpreter, stage by stage, with the real
FAB (built from ``--app``, installed with Flower's own ``install_from_fab`` into a per-node ``FLWR_HOME``,
loaded with Flower's own loader), then data, model and one training step; and the same for the ServerApp
(data, model, up to round 1). The first process on a node fills its on-disk caches; the ones after it are
what every round pays, so both are shown. Compared against a bare ``import torch`` in a fresh interpreter.

deploy: the same run config as a simulation (``flower-superlink --simulation``, ``num-supernodes=3``) and as
a loopback deployment (SuperLink + 3 SuperNodes, TLS off), each started by this command on 127.0.0.1, one
after the other, and stopped by PID (``fedsq_app.harness.loopback``). Round times are the ServerApp's
``rounds[].wall_time_s``; steady = median of rounds 2..R.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
TRACING = Path(__file__).resolve().parent / "tracing"  # holds the sitecustomize of --trace
FAB_ID, FAB_VERSION = "fedsq/fedsq", "0.1.0"

# Run in a fresh interpreter: everything it does is timed, so it imports nothing it does not time.
# Prologue: Flower's runtime (RUNTIME: what flwr-clientapp / flwr-serverapp import first), then the FAB.
_PROLOGUE = r"""
import json, sys, time
T = {"start": time.time()}
args = json.loads(sys.argv[1])
import RUNTIME
from flwr.cli.install import install_from_fab
from flwr.common.config import get_project_dir
T["flwr"] = time.time()
install_from_fab(open(args["fab"], "rb").read(), skip_prompt=True)
app_dir = str(get_project_dir(args["fab_id"], args["fab_version"], args["fab_hash"]))
T["fab"] = time.time()
"""
_EPILOGUE = r"""
heavy = ("datasets", "flwr_datasets", "matplotlib", "pandas", "pyarrow", "ray", "torchvision", "torch._dynamo")
print("@@" + json.dumps({"t": T, "heavy": sorted(m for m in heavy if m in sys.modules)}), flush=True)
"""
_CLIENT_BODY = r"""
from flwr.clientapp.utils import get_load_client_app_fn
get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(args["fab_id"], args["fab_version"],
                                                                         args["fab_hash"])
T["imports"] = time.time()
mods = {name: sys.modules[name] for name in ("fedsq_app.client_app", "fedsq_app.config", "fedsq_app.data.cache",
                                             "fedsq_app.data.tensors", "fedsq_app.runtime.train")}
config = mods["fedsq_app.config"].RunConfig.from_mapping(args["run_config"])
node = mods["fedsq_app.config"].NodeConfig.from_mapping(args["node_config"])
data = mods["fedsq_app.data.cache"]
data.node_info(config, node)
part = data.node_data(config, node)
T["data"] = time.time()
model, spec, _ = mods["fedsq_app.client_app"].local_model(config, node.data_path)
T["model"] = time.time()
train = mods["fedsq_app.runtime.train"]
first = mods["fedsq_app.data.tensors"].TensorData(part.images[: config.batch_size], part.labels[: config.batch_size])
train.train_local(model, first, spec, train.LocalSchedule(1, config.batch_size, config.lr, config.momentum,
                  config.weight_decay), device=train.pick_device(config.device), seed=0)  # the ClientApp's loop
T["step"] = time.time()
"""
_SERVER_BODY = r"""
from flwr.supercore.object_ref import load_app
load_app("fedsq_app.server_app:app", ImportError, app_dir)
T["imports"] = time.time()
server_app = sys.modules["fedsq_app.server_app"]
config = sys.modules["fedsq_app.config"].RunConfig.from_mapping(args["run_config"])
data_key, info, _, validation = server_app.load_data(config)
T["data"] = time.time()
task = sys.modules["fedsq_app.task"]
start = task.build_start_model(config, info)
model = task.trainable_model(config, start)
start.sha256
T["model"] = time.time()
sys.modules["fedsq_app.data.partitions"].partition_report(data_key, args["num_nodes"], args["out_dir"])
sys.modules["fedsq_app.runtime.train"].evaluate(model, validation, start.spec, device=server_app.pick_device(config.device))
T["step"] = time.time()
"""
_CLIENT_CHILD = _PROLOGUE.replace("RUNTIME", "flwr.supernode.runtime.run_clientapp") + _CLIENT_BODY + _EPILOGUE
_SERVER_CHILD = _PROLOGUE.replace("RUNTIME", "flwr.superlink.runtime.run_serverapp") + _SERVER_BODY + _EPILOGUE

STAGES = (("interpreter + flwr", "flwr"), ("FAB install", "fab"), ("app imports", "imports"),
          ("data", "data"), ("model", "model"))


def app_run_config(app: Path, overrides: dict) -> dict:
    """The FAB's ``[tool.flwr.app.config]`` with ``overrides``, as the SuperNode hands it to the app."""
    config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**config, **overrides}


def build_fab(app: Path, out: Path) -> tuple[Path, str]:
    from flwr.cli.build import build_fab_from_disk

    content = build_fab_from_disk(app)
    digest = hashlib.sha256(content).hexdigest()
    path = out / f"{digest[:8]}.fab"
    path.write_bytes(content)
    return path, digest


def _child_env(flwr_home: Path, cache: Path, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_HOME")}
    env.update(FLWR_HOME=str(flwr_home), FEDSQ_CACHE_DIR=str(cache), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               FLWR_TELEMETRY_ENABLED="0", PYTHONDONTWRITEBYTECODE="0")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_child(script: str, args: dict, env: dict) -> dict:
    spawn, cpu = time.time(), _children_cpu_s()
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tempfile.gettempdir())
    line = next((x for x in proc.stdout.splitlines() if x.startswith("@@")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"cold-start child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(line[2:])
    result["t"]["spawn"] = spawn
    result["cpu_s"] = _children_cpu_s() - cpu  # the whole process, up to its exit: robust to machine load
    return result


def stage_times(t: dict) -> dict[str, float]:
    """Seconds per stage, from the child's wall-clock stamps (the first stage starts at the parent's spawn)."""
    times, previous = {}, t["spawn"]
    for name, key in (*STAGES, ("first training step", "step")):
        times[name] = t[key] - previous
        previous = t[key]
    times["total"] = t["step"] - t["spawn"]
    return times


def import_s(env: dict, modules: str = "torch") -> tuple[float, float]:
    """A fresh interpreter that imports ``modules`` and exits: (wall, CPU) seconds."""
    start, cpu = time.time(), _children_cpu_s()
    subprocess.run([sys.executable, "-c", f"import {modules}"], env=env, check=True, cwd=tempfile.gettempdir())
    return time.time() - start, _children_cpu_s() - cpu


def coldstart(apps: list[Path], runs: int, cache: Path, overrides: dict, node_config: dict, threads: int) -> dict:
    """Per app: ``runs`` client processes (the first on an empty per-node cache) and ``runs`` server ones,
    interleaved across apps and with ``import torch`` so that machine load hits all alike."""
    work = Path(tempfile.mkdtemp(prefix="fedsq-coldstart-"))
    setups = []
    for i, app in enumerate(apps):
        fab, digest = build_fab(app, work)
        node_cache = work / f"cache-{i}"
        shutil.copytree(cache, node_cache, ignore=shutil.ignore_patterns("partitions", "masks"))
        base = {"fab": str(fab), "fab_id": FAB_ID, "fab_version": FAB_VERSION, "fab_hash": digest,
                "run_config": app_run_config(app, overrides)}
        setups.append((app, base, _child_env(work / f"home-{i}", node_cache, threads)))
    results = {str(app): {"client": [], "server": [], "torch": [], "torch cpu": []} for app in apps}
    for run in range(runs):
        for app, base, env in setups:
            print(f"  run {run + 1}/{runs} {app}", file=sys.stderr, flush=True)
            out = results[str(app)]
            wall, cpu = import_s(env, "torch")
            out["torch"].append(wall)
            out["torch cpu"].append(cpu)
            client = _run_child(_CLIENT_CHILD, {**base, "node_config": node_config}, env)
            out["client"].append({**stage_times(client["t"]), "heavy": client["heavy"], "cpu": client["cpu_s"]})
            server = _run_child(_SERVER_CHILD, {**base, "num_nodes": node_config["num-partitions"],
                                                "out_dir": str(work / "server-out")}, env)
            out["server"].append({**stage_times(server["t"]), "heavy": server["heavy"], "cpu": server["cpu_s"]})
    shutil.rmtree(work, ignore_errors=True)
    return results


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def print_coldstart(results: dict) -> None:
    for role in ("client", "server"):
        names = [name for name, _ in STAGES] + ["first training step", "total"]
        print(f"\n{role.capitalize()}App process, seconds (first = empty per-node cache; later = median of the "
              "runs after it, what every deployment round pays)")
        header = "| stage | " + " | ".join(f"{Path(app).name or app} first | {Path(app).name or app} later"
                                           for app in results) + " |"
        print(header + "\n|---|" + "---|---|" * len(results))
        for name in names:
            cells = []
            for out in results.values():
                rows = out[role]
                later = rows[1:] or rows
                cells.append(f"{rows[0][name]:.2f} | {_median(later, name):.2f}")
            label = name if role == "client" or name != "first training step" else "up to round 1"
            print(f"| {label} | " + " | ".join(cells) + " |")
        cells = []
        for out in results.values():
            later = out[role][1:] or out[role]
            cells.append(f"{out[role][0]['cpu']:.2f} | {_median(later, 'cpu'):.2f}")
        print("| CPU seconds of the whole process (user + sys) | " + " | ".join(cells) + " |")
        cells = " | ".join(f"{statistics.median(o['torch']):.2f} | CPU {statistics.median(o['torch cpu']):.2f}"
                           for o in results.values())
        print(f"| `import torch` alone (median wall, CPU) | {cells} |")
        for app, out in results.items():
            later = out[role][1:] or out[role]
            total, cpu = _median(later, "total"), _median(later, "cpu")
            budget, budget_cpu = statistics.median(out["torch"]) + 1.5, statistics.median(out["torch cpu"]) + 1.5
            verdict = "met" if total <= budget else "missed"
            print(f"{role} {app}: later total {total:.2f} s wall ({cpu:.2f} s CPU); goal import torch + 1.5 = "
                  f"{budget:.2f} s wall ({budget_cpu:.2f} s CPU): {verdict}; heavy modules loaded: "
                  f"{', '.join(out[role][-1]['heavy']) or 'none'}")


# ------------------------------------------------------------------------------------------- deploy
def _flwr_json(argv: list[str], env: dict, cwd: Path) -> dict:
    from fedsq_app.harness.loopback import tool

    proc = subprocess.run([tool("flwr"), *argv, "--format", "json"], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"flwr {' '.join(argv)} failed ({proc.returncode}): {proc.stdout[-2000:]} "
                           f"{proc.stderr[-2000:]}") from None


def _final_results(path: Path) -> bool:
    try:
        return "test_accuracy" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _run_and_wait(app: Path, connection: str, run_config: str, env: dict, work: Path, limit_s: float,
                  extra: list[str] = (), done_file: Path | None = None) -> tuple[str, float]:
    """Start a run and wait for its end. ``flwr ls`` costs ~1 CPU-s (a fresh CLI process): asked every second
    it took ~6 of the ~30 CPU-s of a deployed round on two cores. So the run's own ``done_file`` (the
    ServerApp's results.json, final once it holds the test accuracy) is watched instead, and ``flwr ls`` asked
    every 15 s or once the file is final."""
    start = time.time()
    run_id = _flwr_json(["run", str(app), connection, "--run-config", run_config, *extra], env, work)["run-id"]
    status, asked = "", 0.0
    while time.time() - start < limit_s:
        if time.time() - asked >= 15.0 or (done_file is not None and _final_results(done_file)):
            asked = time.time()
            runs = _flwr_json(["ls", "--run-id", str(run_id), connection], env, work).get("runs", [{}])
            status = runs[0].get("status", "") if runs else ""
            if status.startswith("finished"):
                break
        time.sleep(0.5)
    return status, time.time() - start


def deploy_pair(app: Path, cache: Path, overrides: str, nodes: int, rounds: int, superexec_poll: float,
                limit_s: float, threads_per_node: int = 1, trace: Path | None = None) -> dict:
    """One simulation and one loopback deployment of ``app``, each with ``nodes`` SuperNodes.

    ``threads_per_node``: OMP_NUM_THREADS of each SuperNode, hence of its ClientApps (0: unset). The
    simulation gives each client one CPU, for which Ray sets OMP_NUM_THREADS=1; three SuperNodes on a shared
    machine with torch's default (every core each) oversubscribe it, which no real silo does.
    ``trace``: the deployment's processes write their starts, exits and Flower log records there
    (``fedsq_app/tools/perf/tracing``), for ``round_breakdown``.
    """
    from fedsq_app.harness import loopback

    work = Path(tempfile.mkdtemp(prefix="fedsq-deploy-"))
    env = loopback.clean_env(work, FEDSQ_CACHE_DIR=str(cache), RAY_TMPDIR=str(work / "ray"),
                             FLWR_HOME=str(work / "home-user"))
    procs = loopback.Processes(work / "logs")
    results = {}
    base = (f"num-server-rounds={rounds} min-available-nodes={nodes} min-train-nodes={nodes} "
            f"out-dir='{work / 'outputs'}' {overrides}").strip()
    try:
        # Simulation: a --simulation SuperLink, `nodes` simulated SuperNodes of 1 CPU each.
        sim_link, sim_port = loopback.start_superlink(procs, {**env, "FLWR_HOME": str(work / "home-sim")},
                                                      work / "sim.db", name="sim-superlink",
                                                      tls_args=["--insecure", "--simulation"])
        # Deployment: a SuperLink and `nodes` SuperNodes, each with its own FLWR_HOME and cache copy (without
        # partitions and masks: each node starts as a new silo).
        traced = {"PYTHONPATH": os.pathsep.join([str(TRACING), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                  "FEDSQ_TRACE_FILE": str(trace)} if trace else {}
        link, port = loopback.start_superlink(procs, {**env, **traced, "FLWR_HOME": str(work / "home-link")},
                                              work / "state.db")
        for i in range(nodes):
            node_cache = work / f"cache-{i}"
            shutil.copytree(cache, node_cache, ignore=shutil.ignore_patterns("partitions", "masks"))
            node_env = {**env, **traced, "FLWR_HOME": str(work / f"home-node-{i}"), "FEDSQ_CACHE_DIR": str(node_cache),
                        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(superexec_poll)}
            if threads_per_node:
                node_env["OMP_NUM_THREADS"] = str(threads_per_node)
            loopback.start_supernode(procs, node_env, port, f"partition-id={i} num-partitions={nodes}",
                                     name=f"supernode-{i}")
        home = work / "home-user"
        loopback.write_connection(home, "deploy", f"127.0.0.1:{port}")
        with open(home / "config.toml", "a") as handle:
            handle.write(f'\n[superlink.sim]\naddress = "127.0.0.1:{sim_port}"\ninsecure = true\n')
        loopback.wait_until(lambda: sum(n.get("status") == "online" for n in _flwr_json(
            ["supernode", "list", "deploy"], env, work).get("nodes", [])) >= nodes, 120,
            f"{nodes} SuperNodes online", procs=procs.procs, poll_s=1.0)
        for mode in ("sim", "deploy"):
            extra = ["--federation-config", f"num-supernodes={nodes} client-resources-num-cpus=1"] \
                if mode == "sim" else []
            load = os.getloadavg()[0]
            path = work / "outputs" / mode / "results.json"
            status, wall = _run_and_wait(app, mode, f"{base} run-name='{mode}'", env, work, limit_s, extra, path)
            rounds_s = [r["wall_time_s"] for r in json.loads(path.read_text())["rounds"]] if path.is_file() else []
            results[mode] = {"status": status, "wall_s": round(wall, 1), "rounds_s": [round(r, 2) for r in rounds_s],
                             "steady_s": round(statistics.median(rounds_s[1:] or rounds_s), 2) if rounds_s else None,
                             "load_before": round(load, 1)}
            print(json.dumps({"app": str(app), mode: results[mode]}), file=sys.stderr, flush=True)
    finally:
        survivors = procs.stop_all()
        if survivors:
            print(f"warning: still alive after stop: {survivors}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return results


STAGES_DEPLOYED = (
    ("round start → SuperNode has pulled the message (its 3 s poll)", "poll"),
    ("pulling the message's objects from the SuperLink (41 for the small CNN)", "pull"),
    ("pull started → ClientApp process started (SuperExec poll + spawn; overlaps the pull)", "spawn"),
    ("ClientApp process, start → exit (wall)", "clientapp"),
    ("ClientApp process CPU seconds", "clientapp_cpu"),
    ("pushing the reply's objects to the SuperLink", "push"),
    ("last reply at the SuperLink → aggregated (ServerApp pull)", "collect"),
    ("aggregated → round end (central validation)", "validate"),
    ("round, in all", "round"),
)


def _port(program: str, flag: str) -> str:
    words = program.split()
    if flag in words and words.index(flag) + 1 < len(words):
        return words[words.index(flag) + 1].rsplit(":", 1)[-1]
    return ""


def round_breakdown(trace: Path, first_round: int = 2) -> dict[str, list[float]]:
    """Per stage of a deployed round, its seconds for every (silo, round) from ``first_round`` on, read from a
    ``--trace`` file: the ServerApp's round logs, each SuperNode's receive/send logs, each ClientApp
    process's start and exit (matched to its SuperNode by the Runtime API port)."""
    events = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    server = [e for e in events if e["program"].startswith("flwr-serverapp") and e["event"] == "log"]
    starts = {int(m.group(1)): e["t"] for e in server if (m := re.match(r"\[ROUND (\d+)/", e["message"]))}
    ends = {int(m.group(1)): e["t"] for e in server if (m := re.match(r"round (\d+): val", e["message"]))}
    aggregated = sorted(e["t"] for e in server if e["message"].startswith("aggregate_train"))
    nodes: dict[str, list[dict]] = {}
    for e in events:
        if e["program"].startswith("flower-supernode") and e["event"] == "log":
            nodes.setdefault(_port(e["program"], "--port"), []).append(e)
    clientapps = {}
    for e in events:
        if e["program"].startswith("flwr-clientapp") and e["event"] in ("start", "exit"):
            clientapps.setdefault(e["pid"], {"port": _port(e["program"], "--runtime-api-address")})[e["event"]] = e
    stages: dict[str, list[float]] = {key: [] for _, key in STAGES_DEPLOYED}
    for r in sorted(set(starts) & set(ends)):
        if r < first_round:
            continue
        begin, end = starts[r], ends[r]
        agg = next((t for t in aggregated if begin <= t <= end), end)
        sent_times = []
        for port, logs in nodes.items():
            window = [e for e in logs if begin <= e["t"] <= end]
            first = lambda prefix: next((e["t"] for e in window if e["message"].startswith(prefix)), None)  # noqa: E731
            receiving, received = first("Receiving: train"), first("Received successfully")
            sending, sent = first("Sending: train"), first("Sent successfully")
            process = next((c for c in clientapps.values() if c["port"] == port and "start" in c and "exit" in c
                            and begin <= c["start"]["t"] <= end), None)
            if None in (receiving, received, sending, sent) or process is None:
                continue
            stages["poll"].append(receiving - begin)
            stages["pull"].append(received - receiving)
            stages["spawn"].append(process["start"]["t"] - receiving)  # the task exists before the pull ends
            stages["clientapp"].append(process["exit"]["t"] - process["start"]["t"])
            stages["clientapp_cpu"].append(process["exit"]["cpu_s"])
            stages["push"].append(sent - sending)
            sent_times.append(sent)
        if sent_times:
            stages["collect"].append(agg - max(sent_times))
            stages["validate"].append(end - agg)
            stages["round"].append(end - begin)
    return stages


def print_breakdown(stages: dict[str, list[float]]) -> None:
    print("\nDeployed round, stage by stage (seconds; per silo and round from round 2 on: median [min–max])")
    print("| stage | median | range |\n|---|---|---|")
    for label, key in STAGES_DEPLOYED:
        values = stages.get(key) or []
        if values:
            print(f"| {label} | {statistics.median(values):.2f} | {min(values):.2f}–{max(values):.2f} |")


def print_deploy(rows: dict) -> None:
    print("\n| app | SuperExec poll s | threads per node | sim rounds s | deploy rounds s | sim steady s | "
          "deploy steady s | ratio | deploy − sim s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for app, r in rows.items():
        sim, dep = r["sim"], r["deploy"]
        settings = f"{r.get('superexec_poll_s', '')} | {r.get('threads_per_node', '')}"
        if not (sim["steady_s"] and dep["steady_s"]):
            print(f"| {app} | {settings} | {sim['status']} | {dep['status']} | | | | |")
            continue
        print(f"| {app} | {settings} | {', '.join(map(str, sim['rounds_s']))} | "
              f"{', '.join(map(str, dep['rounds_s']))} | {sim['steady_s']} | {dep['steady_s']} | "
              f"{dep['steady_s'] / sim['steady_s']:.2f} | {dep['steady_s'] - sim['steady_s']:.2f} |")
    for app, r in rows.items():
        sim, dep = r["sim"]["steady_s"], r["deploy"]["steady_s"]
        if sim and dep:
            met = dep <= 1.5 * sim or dep <= sim + 4.0
            print(f"{app}: goal deployment <= 1.5x simulation or <= simulation + 4 s: {'met' if met else 'missed'}")


def default_cache() -> Path:
    from fedsq_app.util import cache_dir

    return cache_dir()


def parse_overrides(text: str) -> dict:
    """``"key=value key2='text'"`` (as ``--run-config``) -> dict, with Flower's own parser."""
    from flwr.common.config import parse_config_args

    return parse_config_args([text]) if text.strip() else {}


def main(args) -> None:
    apps = [Path(a).resolve() for a in args.app] or [REPO]
    cache = Path(args.cache).resolve() if args.cache else default_cache()
    if not (cache / "backbones").is_dir():
        raise SystemExit(f"no prepared cache at {cache}: run `fedsq-prepare` (or pass --cache)")
    if args.command == "coldstart":
        node_config = {"partition-id": 0, "num-partitions": args.nodes}
        results = coldstart(apps, args.runs, cache, parse_overrides(args.run_config), node_config, args.threads)
        print(json.dumps(results), flush=True)
        print_coldstart(results)
    else:
        def per_app(values: list, flag: str) -> list:
            values = values * len(apps) if len(values) == 1 else values
            if len(values) != len(apps):
                raise SystemExit(f"{flag} takes one value, or one per --app")
            return values

        polls, threads_each = per_app(args.superexec_poll, "--superexec-poll"), \
            per_app(args.threads_per_node, "--threads-per-node")
        if args.flower_floor:  # the no-op app, with the last app's settings
            from fedsq_app.tools.perf import floor as flower_floor

            apps.append(flower_floor.make_app(Path(tempfile.mkdtemp(prefix="fedsq-floor-")) / "flower-floor"))
            polls, threads_each = [*polls, polls[-1]], [*threads_each, threads_each[-1]]
        rows = {}
        for i, (app, poll, threads) in enumerate(zip(apps, polls, threads_each)):
            trace = Path(f"{args.trace}.{i}") if args.trace else None
            if trace:
                trace.unlink(missing_ok=True)
            row = deploy_pair(app, cache, args.run_config, args.nodes, args.rounds, poll, args.limit, threads, trace)
            rows[f"{i}: {app}"] = {**row, "superexec_poll_s": poll, "threads_per_node": threads or "unset"}
            if trace:
                rows[f"{i}: {app}"]["stages"] = round_breakdown(trace)
        print(json.dumps(rows), flush=True)
        print_deploy(rows)
        for name, row in rows.items():
            if "stages" in row:
                print(f"\n{name} (trace: {args.trace}.{name.split(':')[0]})")
                print_breakdown(row["stages"])
