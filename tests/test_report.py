"""report.html: every run writes one self-contained page next to results.json; untrusted text is escaped;
runs with empty rounds still render; a failing report never costs the run its results."""

import html
import logging
import re

from conftest import TINY_RUN, simulate

from fedsq_app.runtime.report import REPORT_FILE, write_report, write_report_or_warn

SHA = "ab" * 32


def assert_self_contained(page: str) -> None:
    """No resource from elsewhere: every src/href is a data: URI or a fragment, no external CSS or scripts."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.I)
    assert all(ref.startswith(("data:", "#")) for ref in refs), refs
    assert not re.search(r"https?://", page.split("<body>", 1)[0])  # nothing fetched by the head
    assert "<script" not in page.lower() and "@import" not in page and "<link" not in page.lower()


def round_rows(page: str) -> list[str]:
    """The body rows of the per-round table (the first table of the 'Validation per round' section)."""
    section = page.split("<h2>Validation per round</h2>", 1)[1].split("</section>", 1)[0]
    body = section.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return re.findall(r"<tr[^>]*>(.*?)</tr>", body)


def test_simulated_run_writes_report(fedsq_cache, tmp_path):
    # Each node also validates on its own data, so the per-node section is drawn from a real run too.
    results = simulate({**TINY_RUN, "strategy": "fedsq", "fraction-evaluate": 1.0, "out-dir": str(tmp_path),
                        "run-name": "report"}, num_supernodes=3)
    page = (tmp_path / "report" / REPORT_FILE).read_text()
    assert_self_contained(page)
    assert re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page)
    assert f"{100 * results['test_accuracy']:.2f} %" in page
    assert results["structural_sha256"] in page
    assert "<code>fedsq</code>" in page and "FedSQ DualCopy" in page
    rows = round_rows(page)
    assert len(rows) == 1 + len(results["rounds"])  # round 0 (the start model) and one row per round
    assert [re.search(r">([\d,]+)</td>", row).group(1) for row in rows] == ["0", "1", "2"]
    assert html.escape("Each node's own validation") in page
    assert "Intended use and limits" in page and "540 training images" in page  # 600 less the 10 % validation


def hand_made_results() -> dict:
    """A run the simulation does not produce: silos (no partition report), a round without an accepted reply
    (kept the previous model, no validation accuracy), node validation with a rejected reply, and hostile
    text in a rejection reason, a config value and a node's validation reason."""
    hostile = "<script>alert('x')</script>"
    reply = {"node_id": 7, "num_examples": 120, "weight": 120, "clip_scale": 0.5, "bn_clamped": 0,
             "train_loss": 1.2, "accepted": True, "reason": None, "reply_time_s": 1.0}
    return {
        "config": {"strategy": "fedsq", "model": "smallcnn", "dataset": "embedded", "num-server-rounds": 3,
                   "run-name": f"x{hostile}", "test-split": "test", "influence-bound": 0.3, "bn-clamp": True,
                   "silo-sizes": "", "server-validation": False, "fraction-evaluate": 1.0},
        "validation_source": "nodes: sample-weighted accuracy", "structural_sha256": SHA,
        "pretrained_from": "/backbones/smallcnn.safetensors", "num_classes": 10,
        "label_distribution": {"skipped": "2 of 2 accepted replies came from silos"},
        "initial": {"val_accuracy": None, "val_loss": None,
                    "node_validation": {"accuracy": None, "loss": None, "num_examples": 0, "nodes": {},
                                        "rejected": []}},
        "rounds": [
            {"round": 1, "val_accuracy": None, "val_loss": None, "train_loss": None, "expected": 2, "received": 1,
             "missing": 1, "missing_nodes": [8], "accepted": 0, "rejected": 1,
             "rejections": [{"node_id": 7, "reason": f"'w' holds NaN or Inf {hostile}"}],
             "replies": [{**reply, "accepted": False, "weight": None, "clip_scale": None,
                          "reason": f"'w' holds NaN or Inf {hostile}"}],
             "aggregated": False, "wall_time_s": 2.0,
             "node_validation": {"accuracy": None, "loss": None, "num_examples": 0, "nodes": {},
                                 "rejected": [{"node_id": 8, "reason": hostile}]}},
            {"round": 2, "val_accuracy": 0.5, "val_loss": 1.5, "train_loss": 1.2, "expected": 2, "received": 2,
             "missing": 0, "accepted": 2, "rejected": 0, "rejections": [],
             "replies": [reply, {**reply, "node_id": 8, "num_examples": 80, "weight": 80, "clip_scale": 1.0}],
             "aggregated": True, "wall_time_s": 1.5, "weights_from": "silo-sizes",
             "node_validation": {"accuracy": 0.5, "loss": 1.5, "num_examples": 40, "rejected": [],
                                 "nodes": {"7": {"accuracy": 0.6, "loss": 1.4, "num_examples": 20, "weight": 20},
                                           "8": {"accuracy": 0.4, "loss": 1.6, "num_examples": 20,
                                                 "weight": 20}}}},
        ],
        "best_val_accuracy": 0.5, "best_round": 2, "test_accuracy": 0.4567, "test_loss": 1.7,
        "total_wall_time_s": 4.0,
    }


def test_hostile_text_is_escaped(tmp_path):
    path = write_report(tmp_path, hand_made_results())
    page = path.read_text()
    assert path == tmp_path / REPORT_FILE
    assert_self_contained(page)  # also: no <script> survived
    escaped = html.escape("<script>alert('x')</script>", quote=True)
    assert page.count(escaped) >= 3  # rejection reason, validation reason, run-name in the config table


def test_rounds_without_accepted_replies_render(tmp_path):
    page = write_report(tmp_path, hand_made_results()).read_text()
    rows = round_rows(page)
    assert len(rows) == 3 and "no: kept the previous model" in rows[1]
    assert "45.67 %" in page and SHA in page
    assert "node 7" in page and "node 8" in page  # per-node validation, round 2
    assert "200 training images" in page  # silos: their claims (120 + 80), not a partition report
    assert "silos" in page  # label_distribution's "skipped" note is shown


def test_empty_run_renders(tmp_path):
    results = {"config": {"strategy": "fedavg"}, "rounds": [], "label_distribution": {"pending": "x"}}
    page = write_report(tmp_path, results).read_text()
    assert "No round finished" in page and "plain network" in page


def test_a_failing_report_only_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(caplog.handler)  # flwr's logger does not propagate to the root logger
    try:
        assert write_report_or_warn(tmp_path, {"rounds": 5}) is None
    finally:
        flwr_logger.removeHandler(caplog.handler)
    assert "report.html not written (TypeError" in caplog.text
    assert not (tmp_path / REPORT_FILE).exists()
