"""``fedsq-perf deploy``: deployment rounds against simulation rounds on the same config.

The same run config as a simulation (``flower-superlink --simulation``, ``num-supernodes=3``) and as a
loopback deployment per ``--executor`` (SuperLink + 3 SuperNodes, TLS off; ``standard``: Flower's SuperExec,
a new ``flwr-clientapp`` per message; ``warm``: ``fedsq-superexec``, a fork per message; ``warm-short-poll``: the
same with ``fedsq-supernode``, whose idle poll is 0.5 s instead of Flower's 3 s), each started by
this command on 127.0.0.1, one after the other, and stopped by PID (``fedsq_app.harness.loopback``). Round times are the ServerApp's
``rounds[].wall_time_s``; steady = median of rounds 2..R. With ``--trace``, each deployed round stage by
stage (``tracing/sitecustomize.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRACING = Path(__file__).resolve().parent / "tracing"  # holds the sitecustomize of --trace


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


GOAL_S = 3.0  # a deployed round may cost the simulated one plus this much (docs/PERFORMANCE.md)
VOLATILE = ("wall_time", "time_s", "reply_time", "node_id", "nodes")  # timings; ids drawn per deployment


def figures(value):
    """The results with every timing and node id dropped (keys naming them), recursively."""
    if isinstance(value, dict):
        return {k: figures(v) for k, v in value.items() if not any(t in k for t in VOLATILE)}
    if isinstance(value, list):
        return [figures(v) for v in value]
    return value


def results_digest(results: dict, run_name: str) -> str:
    """SHA-256 of a run's figures (``figures``), its run name (hence out-dir) written as RUN: equal digests,
    equal results, whichever executor or engine produced them."""
    text = json.dumps(figures(results), sort_keys=True).replace(run_name, "RUN")
    return hashlib.sha256(text.encode()).hexdigest()


def forked_children(log_dir: Path) -> dict[str, int]:
    """Per fedsq-superexec log of a deployment: tasks forked, and how many used the parent's state of their run."""
    text = "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("superexec-*.log")))
    return {"forked": len(WARM_CHILD_ENDS.findall(text)), "primed": text.count("uses the parent's state of run")}


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


# Each deployment's SuperNode command: ``warm-short-poll`` is ``warm`` with ``fedsq-supernode``'s short waits.
SUPERNODES = {"standard": "flower-supernode", "warm": "flower-supernode", "warm-short-poll": "fedsq-supernode"}


def _start_deployment(procs, env: dict, work: Path, cache: Path, nodes: int, superexec_poll: float,
                      threads_per_node: int, traced: dict, executor: str) -> int:
    """A SuperLink and ``nodes`` SuperNodes for one executor; returns the SuperLink's port once all are online.

    ``standard``: ``--isolation subprocess``, each SuperNode starts Flower's ``flower-superexec`` (a new
    ``flwr-clientapp`` per message). ``warm``: ``--isolation process`` and one ``fedsq-superexec`` per silo."""
    from fedsq_app.harness import loopback

    link, port = loopback.start_superlink(procs, {**env, **traced, "FLWR_HOME": str(work / f"home-link-{executor}")},
                                          work / f"state-{executor}.db", name=f"superlink-{executor}")
    runtime_ports = loopback.free_ports(nodes)
    for i in range(nodes):
        # Each node its own FLWR_HOME and cache copy (without partitions and masks: a new silo).
        node_cache = work / f"cache-{executor}-{i}"
        shutil.copytree(cache, node_cache, ignore=shutil.ignore_patterns("partitions", "masks"))
        node_env = {**env, **traced, "FLWR_HOME": str(work / f"home-node-{executor}-{i}"),
                    "FEDSQ_CACHE_DIR": str(node_cache), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(superexec_poll)}
        if threads_per_node:
            node_env["OMP_NUM_THREADS"] = str(threads_per_node)
        warm = executor.startswith("warm")
        loopback.start_supernode(procs, node_env, port, f"partition-id={i} num-partitions={nodes}",
                                 name=f"supernode-{executor}-{i}", runtime_port=runtime_ports[i],
                                 isolation="process" if warm else "subprocess", command=SUPERNODES[executor])
        if warm:
            loopback.start_superexec(procs, node_env, runtime_ports[i], name=f"superexec-{executor}-{i}")
    loopback.write_connection(work / "home-user", executor, f"127.0.0.1:{port}")  # rewritten per executor
    loopback.wait_until(lambda: sum(n.get("status") == "online" for n in _flwr_json(
        ["supernode", "list", executor], env, work).get("nodes", [])) >= nodes, 120,
        f"{nodes} SuperNodes online", procs=procs.procs, poll_s=1.0)
    return port


def deploy_pair(app: Path, cache: Path, overrides: str, nodes: int, rounds: int, superexec_poll: float,
                limit_s: float, threads_per_node: int = 1, trace: Path | None = None,
                executors: tuple[str, ...] = ("standard",), simulate: bool = True) -> dict:
    """One simulation (unless not ``simulate``) and, per executor, one loopback deployment of ``app``, each
    with ``nodes`` SuperNodes, one after the other on this machine (results keyed ``sim`` and
    ``deploy-<executor>``).

    ``threads_per_node``: OMP_NUM_THREADS of each SuperNode, hence of its ClientApps (0: unset). The
    simulation gives each client one CPU, for which Ray sets OMP_NUM_THREADS=1; three SuperNodes on a shared
    machine with torch's default (every core each) oversubscribe it, which no real silo does.
    ``trace``: the deployments' processes write their starts, exits and Flower log records to
    ``trace.<executor>`` (``fedsq_app/tools/perf/tracing``), for ``round_breakdown``.
    """
    from fedsq_app.harness import loopback

    work = Path(tempfile.mkdtemp(prefix="fedsq-deploy-"))
    env = loopback.clean_env(work, FEDSQ_CACHE_DIR=str(cache), RAY_TMPDIR=str(work / "ray"),
                             FLWR_HOME=str(work / "home-user"))
    results = {}
    base = (f"num-server-rounds={rounds} min-available-nodes={nodes} min-train-nodes={nodes} "
            f"out-dir='{work / 'outputs'}' {overrides}").strip()
    for mode in (["sim"] if simulate else []) + [f"deploy-{e}" for e in executors]:
        procs = loopback.Processes(work / "logs" / mode)
        try:
            if mode == "sim":  # a --simulation SuperLink, `nodes` simulated SuperNodes of 1 CPU each
                _, port = loopback.start_superlink(procs, {**env, "FLWR_HOME": str(work / "home-sim")},
                                                   work / "sim.db", name="sim-superlink",
                                                   tls_args=["--insecure", "--simulation"])
                loopback.write_connection(work / "home-user", "sim", f"127.0.0.1:{port}")
                connection, extra = "sim", ["--federation-config", f"num-supernodes={nodes} client-resources-num-cpus=1"]
            else:
                executor = mode.split("-", 1)[1]
                traced = {"PYTHONPATH": os.pathsep.join([str(TRACING), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                          "FEDSQ_TRACE_FILE": f"{trace}.{executor}"} if trace else {}
                _start_deployment(procs, env, work, cache, nodes, superexec_poll, threads_per_node, traced, executor)
                connection, extra = executor, []
            load = os.getloadavg()[0]
            path = work / "outputs" / mode / "results.json"
            status, wall = _run_and_wait(app, connection, f"{base} run-name='{mode}'", env, work, limit_s, extra, path)
            run = json.loads(path.read_text()) if path.is_file() else {"rounds": []}
            rounds_s = [r["wall_time_s"] for r in run["rounds"]]
            results[mode] = {"status": status, "wall_s": round(wall, 1), "rounds_s": [round(r, 2) for r in rounds_s],
                             "steady_s": round(statistics.median(rounds_s[1:] or rounds_s), 2) if rounds_s else None,
                             "load_before": round(load, 1), "load_after": round(os.getloadavg()[0], 1),
                             "digest": results_digest(run, mode) if path.is_file() else None,
                             "accepted": [r.get("accepted") for r in run["rounds"]]}
            if mode.startswith("deploy-warm"):  # fedsq-superexec's executors: forked children to count
                results[mode]["children"] = forked_children(procs.log_dir)
            print(json.dumps({"app": str(app), mode: results[mode]}), file=sys.stderr, flush=True)
        finally:
            survivors = procs.stop_all()
            if survivors:
                print(f"warning: still alive after stop: {survivors}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return results


STAGES_DEPLOYED = (
    ("round start → SuperNode has pulled the message (its 3 s poll)", "poll"),
    ("pulling the message's objects from the SuperLink (packed Q: 6; one array per tensor: 42)", "pull"),
    ("pull started → ClientApp started (SuperExec poll + spawn or fork; overlaps the pull)", "spawn"),
    ("ClientApp process (warm: forked child), start → exit (wall)", "clientapp"),
    ("ClientApp process (warm: forked child) CPU seconds", "clientapp_cpu"),
    ("pushing the reply's objects to the SuperLink", "push"),
    ("last reply at the SuperLink → aggregated (ServerApp pull)", "collect"),
    ("aggregated → round end (central validation)", "validate"),
    ("round, in all", "round"),
)


# fedsq_app/deploy/warm_executor.py's lines from a forked child, which inherits its parent's program name
WARM_CHILD = re.compile(r"warm executor: task \d+ (starts|ends) in child \d+(?:, exit -?\d+, ([\d.]+) CPU-s)?")
WARM_CHILD_ENDS = re.compile(r"warm executor: task \d+ ends in child \d+")


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
        if e["program"].startswith(("flower-supernode", "fedsq-supernode")) and e["event"] == "log":
            nodes.setdefault(_port(e["program"], "--port"), []).append(e)
    clientapps = {}
    for e in events:
        if e["program"].startswith("flwr-clientapp") and e["event"] in ("start", "exit"):
            clientapps.setdefault(e["pid"], {"port": _port(e["program"], "--runtime-api-address")})[e["event"]] = e
        elif e["program"].startswith("fedsq-superexec") and e["event"] == "log" and (
                m := WARM_CHILD.match(e["message"])):  # a forked ClientApp: its start and end lines
            child = clientapps.setdefault(e["pid"], {"port": _port(e["program"], "--runtime-api-address")})
            child["start" if m.group(1) == "starts" else "exit"] = {**e, "cpu_s": float(m.group(2) or 0.0)}
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
    """One line per (app, executor): its deployed rounds beside the simulated rounds of the same run."""
    print("\n| app | executor | SuperExec poll s | threads per node | load before→after | sim rounds s | "
          "deploy rounds s | sim steady s | deploy steady s | ratio | deploy − sim s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    def rounds(result: dict) -> str:
        return ", ".join(map(str, result["rounds_s"])) or result["status"]

    verdicts = []
    for app, r in rows.items():
        sim = r.get("sim") or {"status": "not run", "rounds_s": [], "steady_s": None}  # --only-floor
        settings = f"{r.get('superexec_poll_s', '')} | {r.get('threads_per_node', '')}"
        for mode, dep in r.items():
            if not (mode.startswith("deploy-") and isinstance(dep, dict)):
                continue
            executor = mode.split("-", 1)[1]
            load = f"{dep['load_before']}→{dep['load_after']}"
            if not (sim["steady_s"] and dep["steady_s"]):
                print(f"| {app} | {executor} | {settings} | {load} | {rounds(sim)} | {rounds(dep)} | "
                      f"{sim['steady_s'] or ''} | {dep['steady_s'] or ''} | | |")
                continue
            print(f"| {app} | {executor} | {settings} | {load} | {rounds(sim)} | {rounds(dep)} | {sim['steady_s']} | "
                  f"{dep['steady_s']} | {dep['steady_s'] / sim['steady_s']:.2f} | "
                  f"{dep['steady_s'] - sim['steady_s']:.2f} |")
            met = dep["steady_s"] <= sim["steady_s"] + GOAL_S
            verdicts.append(f"{app} [{executor}]: goal steady deployed round <= simulated + {GOAL_S:g} s: "
                            f"{'met' if met else 'missed'}")
    for app, r in rows.items():  # the same figures whatever ran the ClientApps (timings and node ids aside)
        digests = {m: d["digest"][:12] for m, d in r.items() if isinstance(d, dict) and d.get("digest")}
        same = "identical" if len(set(digests.values())) == 1 else "DIFFERENT"
        children = next((d["children"] for d in r.values() if isinstance(d, dict) and "children" in d), None)
        warm = f"; warm: {children['primed']} of {children['forked']} forked tasks used the parent's state of " \
               "their run" if children else ""
        verdicts.append(f"{app}: results (figures, timings and node ids aside) {same}: {digests}{warm}")
    print("\n".join(verdicts))


def print_floor(rows: dict) -> None:
    """The no-op app once per ``--floor-arrays`` N (same bytes each time): what fewer, larger arrays save."""
    floor = [r for r in rows.values() if "floor_arrays" in r]
    if not floor:
        return
    print("\nFlower floor by arrays per message (same bytes; steady = median of rounds 2..R; pull/push: median "
          "per silo and round, with --trace)")
    print("| arrays per message | executor | sim steady s | deploy steady s | pull s | push s |")
    print("|---|---|---|---|---|---|")
    for r in floor:
        for mode, dep in r.items():
            if not (mode.startswith("deploy-") and isinstance(dep, dict)):
                continue
            executor = mode.split("-", 1)[1]
            stages = r.get("stages", {}).get(executor, {})
            pull, push = (f"{statistics.median(stages[k]):.2f}" if stages.get(k) else "" for k in ("pull", "push"))
            print(f"| {r['floor_arrays']} | {executor} | {(r.get('sim') or {}).get('steady_s') or ''} | "
                  f"{dep['steady_s'] or dep['status']} | {pull} | {push} |")


def run(args, apps: list[Path], cache: Path) -> None:
    """``fedsq-perf deploy``: each app simulated and deployed (per executor) with the same config, side by
    side; with ``--flower-floor``, then the no-op app once per ``--floor-arrays`` value (``--only-floor``: only
    its deployments)."""
    def per_app(values: list, flag: str) -> list:
        values = values * len(apps) if len(values) == 1 else values
        if len(values) != len(apps):
            raise SystemExit(f"{flag} takes one value, or one per --app")
        return values

    polls, threads_each = per_app(args.superexec_poll, "--superexec-poll"), \
        per_app(args.threads_per_node, "--threads-per-node")
    if min(args.floor_arrays) < 1:
        raise SystemExit("--floor-arrays takes counts >= 1")
    # (label, app, SuperExec poll, threads per node, floor-arrays or None)
    jobs = [] if args.only_floor else [(str(a), a, p, t, None) for a, p, t in zip(apps, polls, threads_each)]
    if args.flower_floor or args.only_floor:  # the no-op app, with the last app's settings, once per array count
        from fedsq_app.tools.perf import floor as flower_floor

        floor_app = flower_floor.make_app(Path(tempfile.mkdtemp(prefix="fedsq-floor-")) / "flower-floor")
        jobs += [(f"flower floor, floor-arrays={n}", floor_app, polls[-1], threads_each[-1], n)
                 for n in args.floor_arrays]
    rows = {}
    executors = tuple(args.executor)
    for i, (label, app, poll, threads, arrays) in enumerate(jobs):
        # absolute: the deployments' processes write it from their own working directories
        trace = Path(f"{args.trace}.{i}").resolve() if args.trace else None
        for executor in executors if trace else ():
            Path(f"{trace}.{executor}").unlink(missing_ok=True)
        overrides = f"{args.run_config} floor-arrays={arrays}" if arrays else args.run_config
        row = deploy_pair(app, cache, overrides, args.nodes, args.rounds, poll, args.limit, threads, trace,
                          executors, simulate=not args.only_floor)
        name = f"{i}: {label}"
        rows[name] = {**row, "superexec_poll_s": poll, "threads_per_node": threads or "unset"}
        if arrays:
            rows[name]["floor_arrays"] = arrays
        if trace:
            rows[name]["stages"] = {e: round_breakdown(Path(f"{trace}.{e}")) for e in executors
                                    if Path(f"{trace}.{e}").is_file()}
    print(json.dumps(rows), flush=True)
    print_deploy(rows)
    print_floor(rows)
    for name, row in rows.items():
        for executor, stages in row.get("stages", {}).items():
            print(f"\n{name} [{executor}] (trace: {args.trace}.{name.split(':')[0]}.{executor})")
            print_breakdown(stages)
