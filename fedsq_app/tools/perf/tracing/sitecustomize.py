"""``fedsq-perf deploy --trace``: put this folder on PYTHONPATH and every Python process of a deployment
(SuperLink, SuperNodes, SuperExecs, ServerApp, ClientApps) appends to ``$FEDSQ_TRACE_FILE`` one JSON line
when it starts, one when it exits (with its CPU seconds) and one per Flower log record, each with a wall
clock stamp. Flower's own logs carry no timestamps unless at DEBUG level. Diagnostics only: inert when
FEDSQ_TRACE_FILE is unset.
"""

import atexit
import json
import logging
import os
import resource
import sys
import time

_PATH = os.environ.get("FEDSQ_TRACE_FILE")

if _PATH:
    _PROGRAM = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:200] if sys.argv else ""

    def _write(**fields) -> None:
        with open(_PATH, "a") as handle:  # one short write per line: lines of processes do not interleave
            handle.write(json.dumps({"pid": os.getpid(), "program": _PROGRAM, **fields}) + "\n")

    def _exit() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _write(t=time.time(), event="exit", cpu_s=usage.ru_utime + usage.ru_stime)

    _write(t=time.time(), event="start")
    atexit.register(_exit)
    _call_handlers = logging.Logger.callHandlers

    def _traced(self, record):
        if record.name.startswith(("flwr", "fedsq")):
            try:
                message = record.getMessage()
            except Exception:  # a malformed record is Flower's to report, not ours
                message = str(record.msg)
            if message.strip():
                _write(t=record.created, event="log", message=message[:300])
        return _call_handlers(self, record)

    logging.Logger.callHandlers = _traced
