"""Refusals: what a silo's error reply discloses (type and message, no traceback, no local paths unless its
node config sets ``debug-replies=true``), what its own log says (WARNING, full detail), and a node refused
for a reason that will not change (leakage, another S) is sampled no more, listed in results.json's
``excluded_nodes``, while the run goes on with the others. Last, a silo that stops stops whole:
``fedsq-superexec --parent-pid`` ends with its SuperNode instead of retrying it."""

from __future__ import annotations

import logging
import subprocess
import time
from importlib import resources

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict

from fedsq_app import client_app
from fedsq_app.config import ConfigError, NodeConfig, RunConfig
from fedsq_app.core import wire
from fedsq_app.core.replies import RoundReplies, permanent_refusals
from fedsq_app.core.strategy import FedSQ, bound_note
from fedsq_app.core.wire import REFUSED, REFUSED_PERMANENTLY, disclosed_reason, redact_paths
from fedsq_app.data.sources import read_idx, write_idx
from fedsq_app.harness.inprocess import FIRST_NODE_ID, InProcessGrid, simulate_in_process
from fedsq_app.harness.loopback import clean_env, free_port, tool


def _embedded(split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = resources.files("fedsq_app") / "embedded"
    return (read_idx(folder / f"{split}-images-idx3-ubyte.gz"), read_idx(folder / f"{split}-labels-idx1-ubyte.gz"))


def make_silo(folder, images: np.ndarray, labels: np.ndarray) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    return f"idx:{folder}"


# ---------------------------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("text, expected", [
    ("30 of the 390 images of data-path='idx:/srv/silo-2/data' overlap",
     "30 of the 390 images of data-path='idx:<path>' overlap"),
    ("[Errno 2] No such file or directory: '/silo/data/my images/a.png'",
     "[Errno 2] No such file or directory: '<path>'"),
    ("cannot read /silo/data/x.gz, or ~/cache/y (or C:\\silo\\z.png)",
     "cannot read <path>, or <path> (or <path>)"),
    ("N/A, 1/2, a/b, ./relative/x and ../up stay; so does a lone / here",
     "N/A, 1/2, a/b, ./relative/x and ../up stay; so does a lone / here"),
])
def test_absolute_paths_are_redacted(text, expected):
    assert redact_paths(text) == expected


def test_the_disclosed_reason_is_type_and_message_unless_debug():
    error = FileNotFoundError("no such file: /silo/data/train.gz")
    assert disclosed_reason(error) == "FileNotFoundError: no such file: <path>"
    trace = "Traceback (most recent call last):\n  File \"/opt/app/x.py\", line 1\n"
    assert disclosed_reason(error, debug=False, trace=trace) == "FileNotFoundError: no such file: <path>"
    detailed = disclosed_reason(error, debug=True, trace=trace)
    assert detailed.startswith("FileNotFoundError: no such file: /silo/data/train.gz\nTraceback")
    assert "/opt/app/x.py" in detailed


def test_debug_replies_is_a_validated_node_config_key():
    assert not NodeConfig.from_mapping({"data-path": "/x"}).debug_replies
    assert NodeConfig.from_mapping({"data-path": "/x", "debug-replies": True}).debug_replies
    with pytest.raises(ConfigError, match="debug-replies must be true or false"):
        NodeConfig.from_mapping({"data-path": "/x", "debug-replies": "yes"})


def _metadata(node_id: int, message_type: str = "train") -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)


def _error(node_id: int, code: int, reason: str = "refused", message_type: str = "train") -> Message:
    return Message(error=Error(code=code, reason=reason), metadata=_metadata(node_id, message_type))


def test_permanent_refusals_are_read_from_the_error_code_and_never_raise():
    good = Message(content=RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1})}), metadata=_metadata(5))
    replies = [_error(1, REFUSED), _error(2, REFUSED_PERMANENTLY, "PretrainOverlapError: 3 images"), good,
               object()]  # not even a message: skipped, never raised
    assert permanent_refusals(replies) == [(2, "PretrainOverlapError: 3 images")]


def test_the_bound_log_line_describes_a_pull_or_a_length():
    pull = bound_note(RoundReplies(clip_bound=0.5584, bound_kind="pull"), 0.13)
    assert pull.startswith("pull bounded:") and "scaled by 0.13" in pull and "pull 4.295 -> limit 0.5584" in pull
    norm = bound_note(RoundReplies(clip_bound=2.0, bound_kind="norm"), 0.5)
    assert norm.startswith("update norm-clipped: scaled by 0.5") and "length bound 2" in norm


# ---------------------------------------------------------------------------------------------- the strategy
def test_an_excluded_node_is_not_sampled_again_and_sampling_does_not_wait_for_it(caplog):
    strategy = FedSQ(structural_sha256="abc", fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=4,
                     min_evaluate_nodes=4, min_available_nodes=4)
    grid = InProcessGrid({}, 4)
    nodes = sorted(grid.get_node_ids())
    with caplog.at_level(logging.INFO, logger="flwr"):  # a grid run earlier in the session may quiet flwr
        strategy.aggregate_evaluate(0, [_error(nodes[1], REFUSED_PERMANENTLY, "StructuralMismatchError: S",
                                               "evaluate"), _error(nodes[2], REFUSED, "busy", "evaluate")])
    assert strategy.excluded_nodes == [{"node_id": nodes[1], "round": 0, "reason": "StructuralMismatchError: S"}]
    assert "not sampled again" in caplog.text
    # Flower would wait for 4 available nodes forever: the minimum counts drop by the excluded ones.
    sent = [m.metadata.dst_node_id for m in strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), grid)]
    assert sorted(sent) == [nodes[0], nodes[2], nodes[3]]
    evaluated = [m.metadata.dst_node_id for m in strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord({}),
                                                                            grid)]
    assert sorted(evaluated) == [nodes[0], nodes[2], nodes[3]]
    assert (strategy.min_available_nodes, strategy.min_train_nodes) == (4, 4)  # restored after sampling


def test_round_zero_log_says_each_node_counts_once(caplog):
    strategy = FedSQ(structural_sha256="abc")
    replies = [Message(content=RecordDict({wire.METRICS: MetricRecord({wire.EVAL_ACCURACY: acc, wire.EVAL_LOSS: 1.0,
                                                                       wire.NUM_EXAMPLES: n})}),
                       metadata=_metadata(node, "evaluate")) for node, acc, n in ((1, 0.2, 100), (2, 0.6, 300))]
    with caplog.at_level(logging.INFO, logger="flwr"):  # a grid run earlier in the session may quiet flwr
        metrics = strategy.aggregate_evaluate(0, replies)
    assert metrics[wire.EVAL_ACCURACY] == pytest.approx(0.4)  # the equal-weight mean, not 0.5 (by samples)
    assert "accuracy 0.4000 each node counting once" in caplog.text and "weighted accuracy" not in caplog.text


# ---------------------------------------------------------------------------------------------- the silo
def _context(node_config: dict, run: dict) -> Context:
    return Context(run_id=1, node_id=1002, node_config=node_config, state=RecordDict(), run_config=run)


def _train_message() -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord(), wire.CONFIG: ConfigRecord({"server-round": 1})})
    return Message(content=content, metadata=Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=1002, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=3600.0, message_type="train"))


def test_a_failing_silo_discloses_no_traceback_or_path_and_logs_the_detail(fedsq_cache, tmp_path, caplog):
    missing = tmp_path / "no-such-silo"
    run = {"max-train-samples": 300}
    with caplog.at_level(logging.WARNING):
        reply = client_app.train(_train_message(), _context({"data-path": f"idx:{missing}"}, run))
    assert reply.has_error() and reply.error.code == REFUSED  # data may appear: asking again may help
    reason = reply.error.reason
    print(f"\nreply: {reason}")
    assert reason.startswith("DataError:") and "<path>" in reason
    assert str(tmp_path) not in reason and "Traceback" not in reason and "\n" not in reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "refused the train message" in r.getMessage()]
    assert warnings, caplog.text
    assert str(missing) in warnings[0].getMessage() and "Traceback" in warnings[0].getMessage()

    debug = client_app.train(_train_message(), _context({"data-path": f"idx:{missing}", "debug-replies": True}, run))
    assert str(missing) in debug.error.reason and "Traceback" in debug.error.reason


OVERLAP = 20  # pretraining images slipped into the last silo


def test_a_leaking_silo_is_refused_once_then_never_sampled_and_the_run_goes_on(fedsq_cache, tmp_path, caplog):
    images, labels = _embedded("train")
    pre_images, pre_labels = _embedded("pretrain")
    paths = [make_silo(tmp_path / f"silo-{i}", images[i * 150:(i + 1) * 150], labels[i * 150:(i + 1) * 150])
             for i in range(3)]
    paths.append(make_silo(tmp_path / "silo-3", np.concatenate([images[450:570], pre_images[:OVERLAP]]),
                           np.concatenate([labels[450:570], pre_labels[:OVERLAP]])))
    run = {"num-server-rounds": 2, "max-train-samples": 300, "out-dir": str(tmp_path / "out"), "run-name": "refusals",
           "probe-size": 0, "min-available-nodes": 4, "min-train-nodes": 4}
    with caplog.at_level(logging.INFO, logger="flwr"):  # a grid run earlier in the session may quiet flwr
        results = simulate_in_process(run, 4, node_configs=[{"data-path": p} for p in paths])
    leaky = FIRST_NODE_ID + 3
    (excluded,) = results["excluded_nodes"]
    assert excluded["node_id"] == leaky and excluded["round"] == 1
    assert excluded["reason"].startswith("PretrainOverlapError:") and "<path>" in excluded["reason"]
    assert str(tmp_path) not in excluded["reason"] and "Traceback" not in excluded["reason"]
    first, *later = results["rounds"]
    assert first["expected"] == 4 and first["accepted"] == 3
    assert [r["reason"] for r in first["rejections"]] == [f"error reply: {excluded['reason']}"]
    for record in later:  # the run goes on with the other three, and never asks the leaking silo again
        assert record["expected"] == 3 and record["accepted"] == 3 and record["aggregated"], record
        assert leaky not in [reply["node_id"] for reply in record["replies"]]
    assert "not sampled again" in caplog.text and f"sampling without node(s) [{leaky}]" in caplog.text
    refused = [r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING and "refused the train message" in r.getMessage()]
    assert len(refused) == 1 and "for the rest of the run" in refused[0] and str(tmp_path) in refused[0]


# ---------------------------------------------------------------------------------------------- the executor
STOP_WITHIN_S = 20.0  # Flower's monitor looks every 0.2 s; the rest is the executor's own shutdown


def test_the_warm_executor_stops_when_its_parent_is_gone(tmp_path):
    """``fedsq-superexec --parent-pid`` (as docs/DEPLOYMENT.md starts it): its "SuperNode" (a sleep here) is
    killed while the executor retries an absent Runtime API; the executor exits within ``STOP_WITHIN_S``."""
    superexec = tool("fedsq-superexec")
    assert superexec, "fedsq-superexec is not installed next to this interpreter (bash scripts/setup.sh)"
    parent = subprocess.Popen(["sleep", "600"])
    log = tmp_path / "superexec.log"
    with open(log, "wb") as handle:
        executor = subprocess.Popen([superexec, "--insecure", "--runtime-api-address", f"127.0.0.1:{free_port()}",
                                     "--parent-pid", str(parent.pid), "--preload", "json"],
                                    env=clean_env(tmp_path), stdout=handle, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(3.0)
        assert executor.poll() is None, log.read_text()  # running (retrying) while its parent lives
        parent.kill()
        parent.wait()  # reaped: the PID is gone, as a stopped SuperNode's is
        start = time.monotonic()
        code = executor.wait(timeout=60)
        took = time.monotonic() - start
        print(f"\nfedsq-superexec exited {code} {took:.1f} s after its parent")
        assert took < STOP_WITHIN_S, log.read_text()
    finally:
        for process in (executor, parent):  # only what this test started, by PID
            if process.poll() is None:
                process.kill()
                process.wait()
