"""A SuperExec executor that forks one child per ClientApp task from a warm parent (gunicorn's preload model).

Flower's ``SubprocessExecutor`` starts ``flwr-clientapp`` for every task: a new Python that imports flwr,
torch and the app again (seconds of CPU per message). ``ForkExecutor`` implements the same ``Executor``
protocol but keeps those imported and, once the task's FAB is installed, the FAB's ClientApp module too;
each task is a ``fork()`` whose child runs Flower's own ``run_clientapp`` with that task's token, so pulling
the message, the reply, the heartbeat and the final status are Flower's, unchanged.

Fork-safety: the parent never runs torch work (its intra-op pool is pinned to one thread, so no OpenMP team
exists to be lost in the fork; the child gets the thread count the process started with) and never
initialises CUDA; a task is launched the standard way (a new ``flwr-clientapp``) whenever CUDA is
initialised, the task is not a ClientApp, the FAB is not known, or runtime dependency installation is on.
Children are reaped on every loop turn; one that crashes costs its own reply (Flower's task expiry handles
it), never the executor. A task of another FAB than the one imported is started the standard way and the
executor then re-executes itself, so that no module of the old app survives.
"""

from __future__ import annotations

import importlib
import os
import resource
import signal
import sys
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
from flwr.supernode.runtime.run_clientapp import run_clientapp

APPS_DIR = "apps"  # $FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>, as flwr.cli.install writes it
FAB_HASH_PREFIX = 8
RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD)


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
        if self.restart_pending and not self.children:
            log(INFO, "warm executor: another FAB arrived; re-executing to drop the old app's modules")
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, sys.orig_argv)

    def close(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.reap()

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
            if os.WIFSIGNALED(status):
                log(ERROR, "warm executor: child %d of task %d killed by signal %d; its reply is lost",
                    pid, task_id, os.WTERMSIG(status))
            elif os.waitstatus_to_exitcode(status) != 0:
                log(WARNING, "warm executor: child %d of task %d exited with %d", pid, task_id,
                    os.waitstatus_to_exitcode(status))

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
