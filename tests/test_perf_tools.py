"""The deployment diagnostics: the --trace hook writes what round_breakdown reads, and round_breakdown
attributes a round's seconds to the right stages and silos."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedsq_app.tools.perf.deploy import TRACING, round_breakdown


def _line(t, pid, program, event="log", **fields):
    return json.dumps({"t": t, "pid": pid, "program": program, "event": event, **fields})


def _breakdown(tmp_path, lines: list[str]) -> dict:
    """round_breakdown of a trace file holding ``lines``."""
    trace = tmp_path / "trace"
    trace.write_text("\n".join(lines) + "\n")
    return round_breakdown(trace)


def test_round_breakdown_splits_a_round_into_its_stages(tmp_path):
    server, node_a, node_b = "flwr-serverapp --runtime-api-address 127.0.0.1:9", "flower-supernode --port 7001", \
        "flower-supernode --port 7002"
    lines = [
        _line(100.0, 1, server, message="[ROUND 2/2]"),
        _line(101.0, 2, node_a, message="Receiving: train message (ID: a)"),
        _line(101.5, 2, node_a, message="Received successfully"),
        _line(102.5, 3, node_b, message="Receiving: train message (ID: b)"),
        _line(102.7, 3, node_b, message="Received successfully"),
        _line(101.6, 10, "flwr-clientapp --runtime-api-address 127.0.0.1:7001", "start"),
        _line(102.8, 11, "flwr-clientapp --runtime-api-address 127.0.0.1:7002", "start"),
        _line(105.6, 10, "flwr-clientapp --runtime-api-address 127.0.0.1:7001", "exit", cpu_s=3.5),
        _line(107.8, 11, "flwr-clientapp --runtime-api-address 127.0.0.1:7002", "exit", cpu_s=4.5),
        _line(105.7, 2, node_a, message="Sending: train message (ID: c)"),
        _line(106.2, 2, node_a, message="Sent successfully"),
        _line(107.9, 3, node_b, message="Sending: train message (ID: d)"),
        _line(108.9, 3, node_b, message="Sent successfully"),
        _line(109.4, 1, server, message="aggregate_train: 2 replies accepted, 0 rejected"),
        _line(110.0, 1, server, message="round 2: val_accuracy=0.5 ..."),
    ]
    stages = _breakdown(tmp_path, lines)
    expect = {"poll": [1.0, 2.5], "pull": [0.5, 0.2], "spawn": [0.6, 0.3], "clientapp": [4.0, 5.0],
              "clientapp_cpu": [3.5, 4.5], "push": [0.5, 1.0], "collect": [0.5], "validate": [0.6], "round": [10.0]}
    for key, values in expect.items():
        assert stages[key] == pytest.approx(values), key


def test_trace_hook_records_start_logs_and_exit_with_cpu(tmp_path):
    trace = tmp_path / "trace"
    script = "import logging; logging.getLogger('flwr').warning('hello %s', 'there')"
    env = {**os.environ, "PYTHONPATH": str(TRACING), "FEDSQ_TRACE_FILE": str(trace)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "log", "exit"]
    assert events[1]["message"] == "hello there" and events[2]["cpu_s"] > 0
    untraced = {k: v for k, v in env.items() if k != "FEDSQ_TRACE_FILE"}
    subprocess.run([sys.executable, "-c", script], env=untraced, check=True, timeout=60, capture_output=True)
    assert len(trace.read_text().splitlines()) == 3  # inert without FEDSQ_TRACE_FILE


def test_flower_floor_app_builds_and_its_client_echoes_without_torch(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from fedsq_app.tools.perf import floor as flower_floor

    app = flower_floor.make_app(tmp_path / "floor")
    assert len(build_fab_from_disk(app)) > 0  # a valid Flower app: pyproject and components resolve
    script = (
        "import sys, time, numpy as np\n"
        "from flwr.app import Array, ArrayRecord, Context, Message, Metadata, RecordDict\n"
        "import flower_floor\n"
        "arrays = ArrayRecord({'a': Array(np.ones((3, 2), dtype=np.float32))})\n"
        "meta = Metadata(run_id=1, message_id='m', src_node_id=0, dst_node_id=1, reply_to_message_id='',\n"
        "                group_id='', created_at=time.time(), ttl=60.0, message_type='train')\n"
        "context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})\n"
        "reply = flower_floor.echo(Message(RecordDict({'arrays': arrays}), metadata=meta), context)\n"
        "assert (reply.content['arrays']['a'].numpy() == 1).all()\n"
        "assert 'torch' not in sys.modules, 'the floor ClientApp must not import torch'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=app, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_round_breakdown_reads_the_warm_executors_forked_children(tmp_path):
    """A forked ClientApp has no process start of its own: its executor's start and end lines stand for it."""
    server, node = "flwr-serverapp --runtime-api-address 127.0.0.1:9", "flower-supernode --port 7001"
    warm = "fedsq-superexec --insecure --runtime-api-address 127.0.0.1:7001"
    lines = [
        _line(100.0, 1, server, message="[ROUND 2/2]"),
        _line(101.0, 2, node, message="Receiving: train message (ID: a)"),
        _line(101.5, 2, node, message="Received successfully"),
        _line(101.2, 20, warm, message="warm executor: task 5 starts in child 20"),
        _line(103.2, 20, warm, message="warm executor: task 5 ends in child 20, exit 0, 1.25 CPU-s"),
        _line(103.3, 2, node, message="Sending: train message (ID: c)"),
        _line(103.8, 2, node, message="Sent successfully"),
        _line(104.0, 1, server, message="aggregate_train: 1 replies accepted, 0 rejected"),
        _line(104.5, 1, server, message="round 2: val_accuracy=0.5 ..."),
    ]
    stages = _breakdown(tmp_path, lines)
    assert stages["spawn"] == pytest.approx([0.2]) and stages["clientapp"] == pytest.approx([2.0])
    assert stages["clientapp_cpu"] == pytest.approx([1.25]) and stages["round"] == pytest.approx([4.5])


def test_flower_floor_packs_the_same_bytes_into_fewer_arrays():
    """--floor-arrays N: the small CNN's 22 arrays as they are, or the same bytes as N flat float32 arrays;
    Flower then moves 2 objects per array (Array and its chunk) besides the record's own two."""
    from flwr.app import Array, ArrayRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedsq_app.tools.perf.floor import SMALL_CNN_SHAPES, floor_arrays

    model = floor_arrays(len(SMALL_CNN_SHAPES))
    assert [a.shape for a in model] == SMALL_CNN_SHAPES
    total = sum(a.nbytes for a in model)
    for count in (1, 2, 7, 40):
        packed = floor_arrays(count)
        assert len(packed) == count and sum(a.nbytes for a in packed) == total, count
        assert all(a.dtype == np.float32 and a.ndim == 1 for a in packed), count
        content = RecordDict({"arrays": ArrayRecord({f"a{i}": Array(a) for i, a in enumerate(packed)})})
        assert len(get_all_nested_objects(content)) == 2 + 2 * count, count
    with pytest.raises(ValueError):
        floor_arrays(0)


def test_the_screening_benchmark_prints_one_row_per_direction_check_setting(capsys):
    """``fedsq-perf screen`` times the server's screening of a round of real-shaped replies (no figure is
    checked: numbers are the machine's)."""
    from fedsq_app.tools.perf.cli import main

    main(["screen", "--model", "smallcnn", "--replies", "4", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| smallcnn |")]
    assert [row.split(" | ")[3] for row in rows] == ["0.0", "0.2"]
