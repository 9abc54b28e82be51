"""The loopback process helpers live in ``fedsq_app.loopback`` (``fedsq-perf deploy`` uses them too)."""

from fedsq_app.loopback import *  # noqa: F401,F403
from fedsq_app.loopback import _pgid  # noqa: F401
