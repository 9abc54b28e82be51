"""The loopback process helpers live in ``fedsq_app.harness.loopback`` (``fedsq-perf deploy`` uses them too)."""

from fedsq_app.harness.loopback import *  # noqa: F401,F403
from fedsq_app.harness.loopback import _pgid  # noqa: F401
