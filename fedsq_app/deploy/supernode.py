"""``fedsq-supernode``: Flower's ``flower-supernode``, with its two fixed waits made settable.

Flower 1.42's SuperNode sleeps 3 s after every pull that found no message, so a round's message reaches an
idle silo 1.5 s late on average, and it checks every 0.5 s whether the ClientApp's reply is ready to push.
Both are constants in ``flwr.supernode.start_client_internal``. This command runs Flower's own
``flower-supernode`` (same options, same TLS, node authentication and isolation) with those two waits set by

    --idle-poll SECONDS    between pulls that found no message (default 0.5; Flower's: 3)
    --reply-poll SECONDS   between checks for the ClientApp's reply (default 0.1; Flower's: 0.5)

A round waits for the last silo to see its message: with three idle silos polling every T seconds that is
0.75 T on average, 2.25 s with Flower's wait and 0.4 s with the default here. Each idle poll is one small
request to the SuperLink, about 10 ms of its CPU here: three silos at 0.5 s cost it 0.06 CPU-s per second
(Flower's 3 s: 0.01), twelve silos four times that. Every
other option is ``flower-supernode``'s (``fedsq-supernode --help`` prints them). On a Flower whose loop no
longer has those constants the waits are left as they are, with a warning.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from logging import WARNING

from flwr.supercore import log
from flwr.supernode import start_client_internal as supernode_loop
from flwr.supernode.cli import flower_supernode

FLOWER_WAITS = {"idle": 3, "reply": 0.5}  # the constants in start_client_internal, seconds


class Waits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: ``sleep`` of one of Flower's two
    constants sleeps the configured time instead; everything else is ``time``'s."""

    def __init__(self, idle_s: float, reply_s: float) -> None:
        self.instead = {FLOWER_WAITS["idle"]: idle_s, FLOWER_WAITS["reply"]: reply_s}

    def sleep(self, seconds: float) -> None:
        time.sleep(self.instead.get(seconds, seconds))

    def __getattr__(self, name: str):
        return getattr(time, name)


def seconds(text: str) -> float:
    value = float(text)
    if not 0.01 <= value <= 10:
        raise argparse.ArgumentTypeError(f"{value} s: choose a wait from 0.01 to 10 s")
    return value


def loop_has_waits() -> bool:
    """Whether Flower's SuperNode loop still sleeps those constants through its module's ``time``."""
    source = inspect.getsource(supernode_loop)
    return supernode_loop.time is time and all(f"time.sleep({v})" in source for v in FLOWER_WAITS.values())


def main(argv: list[str] | None = None) -> None:
    own = argparse.ArgumentParser(prog="fedsq-supernode", add_help=False, description=__doc__.split("\n\n")[0])
    own.add_argument("--idle-poll", type=seconds, default=0.5, metavar="SECONDS",
                     help="between pulls that found no message (Flower's: 3)")
    own.add_argument("--reply-poll", type=seconds, default=0.1, metavar="SECONDS",
                     help="between checks for the ClientApp's reply (Flower's: 0.5)")
    args, flower_args = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(flower_args):  # ours first; flower-supernode's help follows and exits
        print(own.format_help().replace("options:", "fedsq-supernode's own options:"))
    if loop_has_waits():
        supernode_loop.time = Waits(args.idle_poll, args.reply_poll)
    else:
        log(WARNING, "fedsq-supernode: this Flower's SuperNode loop has no fixed 3 s / 0.5 s waits to set; "
            "running it unchanged")
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
