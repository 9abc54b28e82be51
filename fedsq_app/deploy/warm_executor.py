"""A SuperExec executor that forks one child per ClientApp task from a warm parent (gunicorn's preload model).

Flower's ``SubprocessExecutor`` starts ``flwr-clientapp`` for every task: a new Python that imports flwr,
torch and the app again (seconds of CPU per message). ``ForkExecutor`` implements the same ``Executor``
protocol but keeps those imported and, once the task's FAB is installed, the FAB's ClientApp module too;
each task is a ``fork()`` whose child runs Flower's own ``run_clientapp`` with that task's token, so pulling
the message, the reply, the heartbeat and the final status are Flower's, unchanged.

Fork-safety: the parent never trains (its intra-op pool is pinned to one thread, so no OpenMP team
exists to be lost in the fork; the child gets the thread count the process started with) and never
initialises CUDA; a task is launched the standard way (a new ``flwr-clientapp``) whenever CUDA is
initialised, the task is not a ClientApp, the FAB is not known, or runtime dependency installation is on.
Children are reaped on every loop turn; one that crashes costs its own reply (Flower's task expiry handles
it), never the executor. A task of another FAB than the one imported is started the standard way and the
executor then re-executes itself, so that no module of the old app survives.

What the parent keeps of a run: once a run's first forked task has ended, the parent calls the ClientApp
module's ``prime(run_config, node_config) -> (built, summary)`` hook (fedsq_app/client_app.py) with that
task's run config and node config, as Flower handed them to the child (which records them, as JSON in a
0600 file of the executor's private state directory). The hook builds the model (S and Q from the pretrained backbone),
the node's data and S's mask cache with the very functions and keys ``train`` uses, so each later child
inherits them by fork (copy-on-write), loads Q from its message and trains: the same results as a new
process. The state is keyed by (run id, FAB hash, run config, node config); another key drops it first
(the module's ``forget()``), and so does ``WARM_IDLE_S`` without a task (a run that ended). S's hash is
checked by each child against the one the server names, as always. The parent stays fork-safe while
priming: torch keeps one thread, the hook declines where the ClientApp would use CUDA, and if priming
initialised CUDA or started threads anyway the executor stops forking, or re-executes itself and never
primes again. A hook that fails is logged at WARNING; the executor goes on without the state (each child
builds its own, as before).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from logging import DEBUG, ERROR, INFO, WARNING
from pathlib import Path

from flwr.clientapp.client_app import LoadClientAppError
from flwr.common.config import get_project_config
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.exit.exit_handler import registered_exit_handlers
from flwr.supercore.object_ref import load_app
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supercore.utils import get_flwr_home
from flwr.supernode.runtime import run_clientapp as flwr_clientapp
from flwr.supernode.runtime.run_clientapp import run_clientapp

APPS_DIR = "apps"  # $FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>, as flwr.cli.install writes it
FAB_HASH_PREFIX = 8
RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD)
WARM_IDLE_S = 600.0  # a run's state is dropped after this long without a task (the run most likely ended)
NO_PRIME = "FEDSQ_WARM_NO_PRIME"  # set before a re-execution whose cause was priming: never prime again


def installed_app_dir(fab_hash: str, flwr_home: Path | None = None) -> Path | None:
    """The directory Flower installed the FAB with this hash in, if exactly one matches."""
    root = (flwr_home or get_flwr_home()) / APPS_DIR
    found = [p for p in root.glob(f"*.{fab_hash[:FAB_HASH_PREFIX]}") if (p / "pyproject.toml").is_file()]
    return found[0] if len(found) == 1 else None


def clientapp_reference(app_dir: Path) -> str:
    return get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]


def forget_own_package() -> None:
    """This executor ships inside a package that the FAB holds too (fedsq_app): forget the installed copy's
    modules (the running executor keeps its own references), so that the ClientApp, in the parent or in a
    child, is imported from the FAB's directory, as a new ``flwr-clientapp`` would import it."""
    own = __name__.split(".")[0]
    for name in [m for m in sys.modules if m == own or m.startswith(own + ".")]:
        del sys.modules[name]


def warm_key(run_id: int, fab_hash: str, run_config: dict, node_config: dict) -> str:
    """What a run's primed state depends on, as one digest: a task with another key never gets it."""
    text = json.dumps([int(run_id), fab_hash, run_config, node_config], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def os_threads() -> int:
    """This process's threads, native ones included (Linux); 0 where that cannot be read."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


class ForkExecutor:
    """Flower's ``Executor`` protocol, one forked child per ClientApp task.

    ``preload``: modules imported once, in the parent (default ``torch``; Flower's ClientApp runner is
    imported with this module).
    """

    def __init__(self, preload: tuple[str, ...] = ("torch",)) -> None:
        self.cold = SubprocessExecutor()
        self.children: dict[int, int] = {}  # pid -> task id
        self.app_hash: str | None = None  # the FAB whose ClientApp module is imported here
        self.next_hash: str | None = None  # the FAB to import as soon as it is installed
        self.restart_pending = False
        self.app_module: str | None = None  # the ClientApp's module (where the prime/forget hooks live)
        self.state_dir = Path(tempfile.mkdtemp(prefix="fedsq-superexec-"))  # 0700: the children's task records
        self.warm_key: str | None = None  # the run whose state the parent last primed (or tried to)
        self.warm_summary = ""  # what the parent holds of that run; "" while it holds nothing
        self.to_prime: dict | None = None  # the record of a finished task of another run, primed between tasks
        self.primed = 0  # runs primed by this process
        self.last_task = time.monotonic()
        for name in preload:
            importlib.import_module(name)
        self.child_threads = 0
        torch = sys.modules.get("torch")
        if torch is not None:  # before any torch work: the child gets what this process would have used
            self.child_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        if cuda_initialised():
            raise RuntimeError("CUDA is initialised in the warm executor before any fork; preload less")
        forget_own_package()

    # -------------------------------------------------------------------- Flower's Executor protocol
    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[TaskType], set[str]]:
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        why_cold = self._why_cold(spec)
        if why_cold:
            log(INFO, "warm executor: task %d started as a new flwr-clientapp (%s)", spec.task_id, why_cold)
            return self.cold.launch(spec)
        if self.app_hash is None:
            self._preload_app(spec.fab_hash)
        if self.app_hash is None:  # not installed yet: preload once this task's child has installed it
            self.next_hash = spec.fab_hash
        self.last_task = time.monotonic()
        try:
            pid = os.fork()
        except OSError as error:
            return LaunchResult.failed(f"fork failed: {error}")
        if pid == 0:
            self._run_child(spec)  # never returns
        self.children[pid] = spec.task_id
        log(DEBUG, "warm executor: task %d runs in child %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (each one's reply is already pushed, or lost to its crash), then restart
        if the app changed and nothing of ours still runs."""
        self.reap()
        if self.app_hash is None and self.next_hash and not self.children:  # between tasks, off the round's path
            self._preload_app(self.next_hash)
        if self.to_prime and not self.children:  # between tasks too: children fork from a finished state
            self._prime(self.to_prime)
        if self.warm_key and not self.children and time.monotonic() - self.last_task > WARM_IDLE_S:
            self._forget(f"no task for {WARM_IDLE_S:.0f} s")
        if self.restart_pending and not self.children:
            log(INFO, "warm executor: re-executing to drop the old app's modules and state")
            sys.stdout.flush()
            sys.stderr.flush()
            shutil.rmtree(self.state_dir, ignore_errors=True)
            os.execv(sys.executable, sys.orig_argv)

    def close(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.reap()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # -------------------------------------------------------------------- the parent's side
    def _why_cold(self, spec: ExecutionSpec) -> str:
        if spec.task_type != TaskType.CLIENT_APP:
            return f"a {spec.task_type.value} task"
        if spec.runtime_dependency_install:
            return "runtime dependency installation is on: the app may need another environment"
        if not spec.fab_hash:
            return "the task names no FAB"
        if cuda_initialised():
            return "CUDA is initialised in the executor, forking is unsafe"
        if self.app_hash is not None and self.app_hash != spec.fab_hash:
            self.restart_pending = True
            return "another FAB than the one imported; the executor restarts once its children end"
        return ""

    def _preload_app(self, fab_hash: str) -> None:
        """Import the FAB's ClientApp module the way Flower's loader does (so the child's ``load_app`` reuses
        it). The first task of a FAB installs it, in its child: until then the child imports the app."""
        app_dir = installed_app_dir(fab_hash)
        if app_dir is None:
            return
        self.next_hash = None
        reference = clientapp_reference(app_dir)
        try:
            load_app(reference, LoadClientAppError, project_dir=app_dir)
            origin = getattr(sys.modules.get(reference.split(":")[0]), "__file__", "?")
        except Exception as error:  # each child loads it then, and reports the error the standard way
            log(WARNING, "warm executor: could not preload the ClientApp of %s: %s", app_dir.name, error)
            return
        self.app_hash = fab_hash
        self.app_module = reference.split(":")[0]
        if cuda_initialised():  # from now on every task starts the standard way (see _why_cold)
            log(WARNING, "warm executor: importing the ClientApp of %s initialised CUDA; no more forks",
                app_dir.name)
        else:
            log(INFO, "warm executor: ClientApp of %s imported (%s); later tasks fork from here", app_dir.name,
                origin)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            task_id = self.children.pop(pid, None)
            if task_id is None:
                continue  # a standard flwr-clientapp started for a cold task
            self._take_record(task_id, ok=os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
            if os.WIFSIGNALED(status):
                log(ERROR, "warm executor: child %d of task %d killed by signal %d; its reply is lost",
                    pid, task_id, os.WTERMSIG(status))
            elif os.waitstatus_to_exitcode(status) != 0:
                log(WARNING, "warm executor: child %d of task %d exited with %d", pid, task_id,
                    os.waitstatus_to_exitcode(status))

    def _take_record(self, task_id: int, ok: bool) -> None:
        """Read (and delete) the run record a finished child wrote; a run not primed yet is primed next."""
        path = self.state_dir / f"{task_id}.json"
        try:
            record = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return  # the child ended before it pulled its task, or is not a ClientApp of ours
        if ok and record.get("key") != self.warm_key:
            self.to_prime = record

    def _prime(self, record: dict) -> None:
        """Build the run's state here with the ClientApp module's ``prime`` hook, off the round's path."""
        self.to_prime = None
        hook = getattr(sys.modules.get(self.app_module or ""), "prime", None)
        if hook is None or record["fab_hash"] != self.app_hash or os.environ.get(NO_PRIME) or cuda_initialised():
            return  # no hook, another FAB, or not fork-safe: each child builds its own state
        self._forget(f"run {record['run_id']} is another run, or has another node config")
        self.warm_key = record["key"]  # tried once per key, whatever comes of it
        threads, started = os_threads(), time.monotonic()
        try:
            built, summary = hook(record["run_config"], record["node_config"])
        except Exception as error:  # noqa: BLE001 - never the executor's end: children build their own
            log(WARNING, "warm executor: priming run %d failed (%s: %s); its tasks build their own state",
                record["run_id"], type(error).__name__, error)
            self._forget("priming failed")
            self.warm_key = record["key"]  # not tried again for this run
            return
        if cuda_initialised():  # _why_cold then starts every task the standard way
            log(WARNING, "warm executor: priming run %d initialised CUDA; no more forks", record["run_id"])
        elif os_threads() > threads:  # a thread pool forked mid-work can deadlock a child: start afresh
            log(WARNING, "warm executor: priming run %d started threads; re-executing, never to prime again",
                record["run_id"])
            os.environ[NO_PRIME] = "1"
            self.restart_pending = True
        elif not built:
            log(INFO, "warm executor: run %d %s", record["run_id"], summary)
        else:
            self.warm_summary = summary
            self.primed += 1
            log(INFO, "warm executor: primed run %d in %.1f s (%s); its later tasks fork with it",
                record["run_id"], time.monotonic() - started, summary)

    def _forget(self, why: str) -> None:
        """Drop what this process holds of the run it last primed, or tried to (the module's ``forget`` hook)."""
        if self.warm_key is None:
            return
        self.warm_key, self.warm_summary = None, ""
        try:
            getattr(sys.modules[self.app_module or ""], "forget")()
            log(INFO, "warm executor: dropped the state of the last run primed (%s)", why)
        except Exception as error:  # noqa: BLE001 - what it holds cannot be trusted: start afresh
            log(WARNING, "warm executor: could not drop the last run's state (%s); re-executing", error)
            self.restart_pending = True

    # -------------------------------------------------------------------- the child's side
    def _run_child(self, spec: ExecutionSpec) -> None:
        code = 1
        try:
            # Nothing of the parent's runs here: its exit handlers (close its Runtime API client, kill its
            # children) and signal handlers are dropped; Flower's runner registers its own.
            registered_exit_handlers.clear()
            for sig in RESET_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            torch = sys.modules.get("torch")
            if torch is not None and self.child_threads:
                torch.set_num_threads(self.child_threads)
            log(INFO, "warm executor: task %d starts in child %d", spec.task_id, os.getpid())
            self._record_task_input(spec.task_id)
            self._install_once()
            run_clientapp(
                runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
                parent_pid=spec.parent_pid, runtime_dependency_install=spec.runtime_dependency_install)
            code = 0
        except SystemExit as done:  # flwr_exit ends Flower's runner with sys.exit
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:  # noqa: BLE001 - a child must never return into the parent's loop
            traceback.print_exc()
        finally:
            usage = resource.getrusage(resource.RUSAGE_SELF)  # this child's own, counted from the fork
            log(INFO, "warm executor: task %d ends in child %d, exit %d, %.2f CPU-s", spec.task_id, os.getpid(),
                code, usage.ru_utime + usage.ru_stime)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    @staticmethod
    def _install_once() -> None:
        """In this child only: Flower's runner installs the task's FAB every time, extracting and hashing the whole
        archive only to return the directory an earlier task installed it in (``install_from_fab``, an existing
        app with ``skip_prompt``). Return that directory at once when the FAB's SHA-256 names it."""
        install = flwr_clientapp.install_from_fab

        def install_once(fab_file, install_dir=None, skip_prompt=False):
            if isinstance(fab_file, bytes) and install_dir is None and skip_prompt:
                installed = installed_app_dir(hashlib.sha256(fab_file).hexdigest())
                if installed is not None:
                    return installed
            return install(fab_file, install_dir, skip_prompt)

        flwr_clientapp.install_from_fab = install_once

    def _record_task_input(self, task_id: int) -> None:
        """In this child only: wrap Flower's pull of the task's input to record its run for the parent
        (``_take_record``) and to say whether this task gets the parent's state of its run."""
        pull = flwr_clientapp.pull_task_input

        def pull_and_record(client):
            message, context, run, fab = pull(client)
            try:
                record = {"run_id": int(run.run_id), "fab_hash": fab.hash_str,
                          "run_config": dict(context.run_config), "node_config": dict(context.node_config)}
                record["key"] = warm_key(**{k: record[k] for k in ("run_id", "fab_hash", "run_config",
                                                                    "node_config")})
                fd = os.open(self.state_dir / f"{task_id}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as handle:
                    json.dump(record, handle)
                if self.warm_summary and record["key"] == self.warm_key:
                    log(INFO, "warm executor: task %d uses the parent's state of run %d", task_id, run.run_id)
                else:
                    log(INFO, "warm executor: task %d builds its own state (the parent holds none of run %d)",
                        task_id, run.run_id)
            except Exception as error:  # noqa: BLE001 - the task runs all the same
                log(WARNING, "warm executor: task %d: could not record its run (%s)", task_id, error)
            return message, context, run, fab

        flwr_clientapp.pull_task_input = pull_and_record
