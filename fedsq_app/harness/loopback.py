"""Helpers for starting a real Flower deployment on loopback (SuperLink, SuperNodes, `flwr run`), shared by
the tests and ``fedsq-perf deploy``: tools next to this interpreter, free 127.0.0.1 ports, processes tracked by PID and stopped
as whole trees, health checks, and a `$FLWR_HOME/config.toml` connection.

Flower starts each SuperNode's SuperExec in a process group of its own, and the ClientApp processes in
that one: stopping a SuperNode's own process group is not enough. ``Processes.stop``/``kill`` collect the
tree first (before anything is reparented) and signal every process group in it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    """The CLI next to this interpreter (the project venv), else on PATH."""
    local = BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment minus any FLWR_*/FEDSQ_* of the caller, offline, with caches under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "FEDSQ_"))}
    env.update(
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp / "hf"), MPLCONFIGDIR=str(tmp / "mpl"), UV_CACHE_DIR=str(tmp / "uv"),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1", COLUMNS="250",
        NO_COLOR="1",
    )
    env.update(extra)
    return env


def write_connection(flwr_home: Path, name: str, address: str, *, root_certificates: Path | None = None) -> Path:
    """A default SuperLink connection in ``$FLWR_HOME/config.toml`` (never in pyproject.toml).

    Without ``root_certificates`` the connection is ``insecure = true`` (plain HTTP, loopback tests only).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"\n' if root_certificates else "insecure = true\n"
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}')
    return path


def health_ok(port: int, ca: Path | None = None) -> bool:
    """The SuperLink's /health answers 200 (https with ``ca``, plain http without)."""
    scheme = "https" if ca else "http"
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", context=context, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- processes
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    tree: list[int] = field(default_factory=list)  # PIDs seen below it (kept after they are reparented)


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) for every process (`ps`, so it works on Linux and macOS)."""
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True,
                         timeout=10).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit():
            table[int(parts[0])] = (int(parts[1]), int(parts[2]), parts[3])
    return table


def descendants(pid: int) -> list[int]:
    table = process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def any_alive(pids: list[int]) -> bool:
    """True while any of the PIDs is a live (non-zombie) process."""
    table = process_table()
    return any(pid in table and not table[pid][2].startswith("Z") for pid in pids)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class Processes:
    """Every process a test starts: each in a session of its own, logged to ``logs/<name>.log``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Proc:
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as handle:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(argv, cwd=cwd or self.log_dir, env=env, stdout=handle,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def snapshot(self, proc: Proc) -> None:
        """Remember the processes below ``proc`` now (they are reparented once it exits)."""
        if proc.popen.poll() is None:
            proc.tree = sorted(set(proc.tree) | set(descendants(proc.popen.pid)))

    def _signal_tree(self, proc: Proc, sig: int) -> None:
        proc.tree = sorted(set(proc.tree) | {proc.popen.pid} | set(descendants(proc.popen.pid)))
        for pgid in {_pgid(pid) for pid in proc.tree} - {None, os.getpgid(0)}:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self, proc: Proc) -> None:
        """SIGKILL the whole tree at once: the machine of a silo dies, nothing gets to say goodbye."""
        self._signal_tree(proc, signal.SIGKILL)
        self._wait_gone(proc, 10.0)

    def stop(self, proc: Proc) -> None:
        """SIGTERM the process tree, then SIGKILL whatever is left of it after 10 s."""
        for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            self._signal_tree(proc, sig)
            if self._wait_gone(proc, grace_s):
                break

    def _wait_gone(self, proc: Proc, grace_s: float) -> bool:
        end = time.monotonic() + grace_s
        while time.monotonic() < end and any_alive(proc.tree):
            proc.popen.poll()  # reap the leader so it does not linger as a zombie
            time.sleep(0.1)
        try:
            proc.popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        return not any_alive(proc.tree)

    def stop_all(self) -> list[str]:
        """Stop everything (last started first); returns the names of processes that survived."""
        for proc in reversed(self.procs):
            self.stop(proc)
        return [p.name for p in self.procs if any_alive(p.tree or [p.popen.pid])]


def wait_until(predicate, limit_s: float, what: str, *, procs: list[Proc] = (), poll_s: float = 0.3) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` (and the logs of ``procs``) after ``limit_s``."""
    end = time.monotonic() + limit_s
    while not predicate():
        for proc in procs:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited with {proc.popen.returncode} while waiting for "
                                     f"{what}:\n{tail(proc.log)}")
        if time.monotonic() > end:
            logs = "\n".join(f"--- {p.name}\n{tail(p.log)}" for p in procs)
            raise AssertionError(f"timed out after {limit_s:.0f} s waiting for {what}\n{logs}")
        time.sleep(poll_s)


def start_superlink(processes: Processes, env: dict[str, str], state_db: Path, *, name: str = "superlink",
                    tls_args: list[str] | None = None, limit_s: float = 60.0) -> tuple[Proc, int]:
    """A SuperLink on 127.0.0.1 (``--insecure`` unless ``tls_args``); returns it and its port once healthy."""
    port = free_port()
    argv = [tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--database", str(state_db),
            "--disable-runtime-dependency-installation"] + (tls_args if tls_args is not None else ["--insecure"])
    link = processes.start(name, argv, env)
    ca = None
    if tls_args and "--ssl-ca-certfile" in tls_args:
        ca = Path(tls_args[tls_args.index("--ssl-ca-certfile") + 1])
    wait_until(lambda: health_ok(port, ca), limit_s, f"SuperLink health on 127.0.0.1:{port}", procs=[link])
    return link, port


# The ClientApp SuperExec's task poll (FLWR_SUPEREXEC_TASK_POLL_INTERVAL, Flower's one supported timing knob,
# default 1 s): a message waits up to one interval before its ClientApp starts; each poll is one local HTTP
# call to the SuperNode, ten a second cost nothing measurable. A caller's own value wins.
SUPEREXEC_POLL_S = 0.1
EXECUTORS = {"warm": "fedsq-superexec", "standard": "flower-superexec"}


def start_supernode(processes: Processes, env: dict[str, str], superlink_port: int, node_config: str, *,
                    name: str, extra_args: list[str] | None = None, runtime_port: int | None = None,
                    isolation: str = "subprocess", command: str = "flower-supernode") -> Proc:
    """A SuperNode (``--insecure`` unless ``extra_args`` give TLS options) with its own Runtime API port:
    Flower's ``flower-supernode``, or ``fedsq-supernode`` (the same with short waits between its pulls).

    ``isolation="process"``: the SuperNode runs no SuperExec of its own; start one with ``start_superexec``
    on the same ``runtime_port``."""
    argv = [tool(command), "--superlink", f"127.0.0.1:{superlink_port}", "--host", "127.0.0.1",
            "--port", str(runtime_port or free_port()), "--node-config", node_config, "--isolation", isolation]
    argv += extra_args if extra_args is not None else ["--insecure"]
    env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL_S), **env}  # for the SuperExec it starts
    return processes.start(name, argv, env)


def start_superexec(processes: Processes, env: dict[str, str], runtime_port: int, *, name: str,
                    executor: str = "warm") -> Proc:
    """The ClientApp SuperExec of a ``--isolation process`` SuperNode: ``fedsq-superexec`` (warm: one fork
    per task) or Flower's ``flower-superexec`` (standard: one new process per task). Plain HTTP to the
    SuperNode's Runtime API on 127.0.0.1, as Flower's own SuperNode does it."""
    env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL_S), **env}
    argv = [tool(EXECUTORS[executor]), "--insecure", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    return processes.start(name, argv, env)
