"""``fedsq-superexec``: the SuperExec of a ``flower-supernode --isolation process``, with a warm executor.

It takes ``flower-superexec``'s options for a SuperNode (``--runtime-api-address``, ``--insecure`` or
``--root-certificates``, ``--parent-pid``, ``--superexec-auth-secret-file``, the runtime dependency flag)
and runs Flower's loop with Flower's parts: ``RuntimeHttpClient`` with the same interceptors (tracing,
version, SuperExec HMAC auth on AcquireTask), ``AcquireTask`` every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``
seconds (validated by Flower), Flower's ``AutoExecPlugin`` turning each task and its token into an
``ExecutionSpec``. Only the executor differs: ``ForkExecutor`` (``warm_executor``) instead of
``SubprocessExecutor``. TLS to the SuperLink and node authentication stay the SuperNode's. No gRPC health
server: gRPC's threads and ``fork()`` do not mix.

``--parent-pid PID`` (the SuperNode's): stop when that process is gone, checked by Flower's monitor thread
(every 0.2 s, also while a request to the Runtime API is being retried) and on every turn of the task loop.
Without it the executor runs until it is stopped, retrying while its SuperNode is away.
"""

from __future__ import annotations

import argparse
import os
import time
from logging import ERROR, INFO

from flwr.common.args import add_args_runtime_dependency_install
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.auth import add_superexec_auth_secret_args, load_superexec_auth_secret
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
from flwr.supercore.superexec.executor import LaunchResultStatus
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supercore.superexec.run_superexec import _get_task_poll_interval  # Flower's check of its env knob
from flwr.supercore.telemetry import EventType
from flwr.supercore.tls import validate_and_resolve_root_certificates

from fedsq_app.deploy.warm_executor import ForkExecutor

AUTHENTICATED_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})  # as run_superexec protects


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsq-superexec", description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    p.add_argument("--root-certificates", metavar="ROOT_CERT", help="CA bundle verifying the Runtime API")
    p.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                   help="exit when this process (the SuperNode) is gone; default: run until stopped")
    p.add_argument("--preload", action="append", default=None, metavar="MODULE",
                   help="a module imported once before any task (repeatable; default: torch)")
    add_superexec_auth_secret_args(p)
    add_args_runtime_dependency_install(p)
    return p


def process_exists(pid: int) -> bool:
    """Whether a process with this PID exists (a zombie still does, until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        secret = load_superexec_auth_secret(secret_file=args.superexec_auth_secret_file)
    except ValueError as err:
        flwr_exit(ExitCode.SUPEREXEC_AUTH_SECRET_LOAD_FAILED,
                  f"Failed to load SuperExec authentication secret: {err}")
    try:
        poll_s = _get_task_poll_interval()
    except ValueError as err:
        flwr_exit(ExitCode.SUPEREXEC_INVALID_EXECUTOR_CONFIG, str(err))
    log(INFO, "Starting fedsq-superexec (warm ClientApp executor), task poll every %.2f s", poll_s)
    executor = ForkExecutor(tuple(args.preload or ("torch",)))
    serve(args, executor, secret, poll_s)


def serve(args: argparse.Namespace, executor: ForkExecutor, secret: bytes | None, poll_s: float) -> None:
    """Flower's SuperExec loop (``run_superexec``), with ``executor``."""
    interceptors = [RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                         protected_methods=AUTHENTICATED_METHODS))
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address, insecure=args.insecure,
        root_certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())
    register_signal_handlers(event_type=EventType.RUN_SUPEREXEC_LEAVE,
                             exit_message="SuperExec terminated gracefully.",
                             exit_handlers=[client.close, executor.close])
    plugin = AutoExecPlugin(runtime_api_address=args.runtime_api_address, insecure=args.insecure,
                            root_certificates_path=args.root_certificates,
                            runtime_dependency_install=args.runtime_dependency_install, executor=executor)
    try:
        while args.parent_pid is None or process_exists(args.parent_pid):
            executor.reconcile()
            task_types, fab_hashes = executor.get_eligible_capacity(set(plugin.supported_task_types))
            acquired = client.AcquireTask(AcquireTaskRequest(supported_task_types=task_types,
                                                             agentapp_fab_hashes=fab_hashes))
            if acquired.HasField("task") and acquired.token:
                result = plugin.launch_task(token=acquired.token, task=acquired.task)
                if result.status != LaunchResultStatus.ACCEPTED:  # Flower's task expiry then applies
                    log(ERROR, "task %d not launched (%s): %s", acquired.task.task_id, result.status,
                        result.message)
                continue  # another task may be waiting (one per silo and round): ask again at once
            time.sleep(poll_s)
        log(INFO, "fedsq-superexec: parent process %d (its SuperNode) is gone: stopping", args.parent_pid)
    finally:
        client.close()
        executor.close()


if __name__ == "__main__":
    main()
