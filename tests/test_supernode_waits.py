"""fedsq-supernode: Flower's SuperNode with its two fixed waits set (tests/test_four_silos.py runs it for real)."""

import sys
import time

import pytest

from fedsq_app.deploy import supernode


def test_the_pinned_flower_loop_has_the_waits_it_replaces():
    """A Flower whose SuperNode loop no longer sleeps 3 s / 0.5 s would run unchanged: this says so first."""
    assert supernode.loop_has_waits()


def test_waits_replace_only_flowers_constants(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    waits = supernode.Waits(idle_s=0.4, reply_s=0.07)
    for seconds in (3, 0.5, 1.0, 0.1):
        waits.sleep(seconds)
    assert slept == [0.4, 0.07, 1.0, 0.1]
    assert waits.time is time.time and waits.monotonic is time.monotonic  # the rest is time's


def test_main_sets_the_waits_and_hands_every_other_option_to_flower(monkeypatch):
    seen = {}

    def flower_supernode():
        seen["argv"], seen["time"] = list(sys.argv), supernode.supernode_loop.time

    monkeypatch.setattr(supernode, "flower_supernode", flower_supernode)
    monkeypatch.setattr(supernode.supernode_loop, "time", time)
    supernode.main(["--superlink", "127.0.0.1:9", "--idle-poll", "0.2", "--insecure", "--port", "9100"])
    assert seen["argv"] == ["flower-supernode", "--superlink", "127.0.0.1:9", "--insecure", "--port", "9100"]
    assert seen["time"].instead == {3: 0.2, 0.5: 0.1}


@pytest.mark.parametrize("value", ["0", "-1", "11", "nan"])
def test_a_wait_outside_its_range_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        supernode.main(["--idle-poll", value])
    assert "--idle-poll" in capsys.readouterr().err
