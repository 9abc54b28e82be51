"""``fedsq-perf coldstart`` (and the entry of ``fedsq-perf deploy``, whose probe is ``deploy.py``): where a
ClientApp/ServerApp process spends its start.

coldstart: in deployment Flower starts a fresh ``flwr-clientapp`` process for every message, so its start
is paid every round. This replays that process's steps in a fresh interpreter, stage by stage, with the real
FAB (built from ``--app``, installed with Flower's own ``install_from_fab`` into a per-node ``FLWR_HOME``,
loaded with Flower's own loader), then data, model and one training step; and the same for the ServerApp
(data, model, up to round 1). The first process on a node fills its on-disk caches; the ones after it are
what every round pays, so both are shown. Compared against a bare ``import torch`` in a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from fedsq_app.tools.perf import deploy

REPO = Path(__file__).resolve().parents[3]
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
        deploy.run(args, apps, cache)
