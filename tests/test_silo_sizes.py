"""``silo-sizes``: one key (a silo's registered name or its public key's SHA-256), one meaning of size (all the
images of the silo's training split, before its validation hold-out), and each reply's reported count checked
against it, like with like (fedsq_app/runtime/weighting.py). The docs say the same everywhere."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedsq_app.config import RunConfig
from fedsq_app.core.replies import CheckedReply
from fedsq_app.runtime.weighting import (SIZE_TOLERANCE, SizeCheckedSiloSizes, expected_training_count, size_mismatch,
                                         size_mismatch_of, weight_policy)
from fedsq_app.data.partitions import DataKey
from fedsq_app.util import ConfigError

DOCS = Path(__file__).resolve().parents[1]


def _reply(node_id: int, claimed: int) -> CheckedReply:
    return CheckedReply(node_id, {}, claimed, {"silo": 1}, claimed)


def test_reported_count_is_compared_with_the_registry_less_the_hold_out():
    # The four silos: 200/300/400/3,000 images reported 180/270/360/2,700 with a 10 % hold-out.
    for size, reported in ((200, 180), (300, 270), (400, 360), (3000, 2700)):
        assert size_mismatch(size, reported, held_out=0.1) is None
        assert expected_training_count(size, 0.1) == pytest.approx(reported)
    assert size_mismatch(300, 300, held_out=0.0) is None  # no hold-out: it trains on all of them
    assert size_mismatch(300, 268, held_out=0.1) is None  # the stratified hold-out rounds per label
    assert size_mismatch(200, 180, held_out=0.2) is None  # a silo's own val-fraction moves it a little
    far = size_mismatch(700, 383, held_out=0.1)
    assert far and "383" in far and "700" in far and "630" in far and "hold-out" in far
    assert size_mismatch(200, 2700, held_out=0.1)  # far more
    assert size_mismatch(3000, 180, held_out=0.0)  # far fewer
    edge = 1000 * (1 + SIZE_TOLERANCE)
    assert size_mismatch(1000, int(edge), 0.0) is None and size_mismatch(1000, int(edge) + 1, 0.0)


def test_a_silo_far_from_its_size_is_logged_once_and_named_for_its_reply(caplog):
    identities = {1: ["ab" * 32, "silo-a"], 2: ["cd" * 32, "silo-b"]}
    weigh = SizeCheckedSiloSizes({"silo-a": 300, "cd" * 32: 700}, lambda n: identities.get(n, []), "'s.json'",
                                 held_out=0.1)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        for _ in range(3):  # three rounds, same counts: one warning
            assert weigh([_reply(1, 268), _reply(2, 383)]) == [300, 700]  # the weight stays the registry's
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("node 2: reported 383"), warnings
    assert weigh.mismatch_of(1) is None and "383" in weigh.mismatch_of(2)
    weigh([_reply(1, 268), _reply(2, 630)])  # the next round it reports what the registry says
    assert weigh.mismatch_of(2) is None


class _Grid:
    def get_node_ids(self):
        return [7]

    def get_nodes(self):
        return [SimpleNamespace(node_id=7, public_key=b"k", name="silo-a")]


def test_weight_policy_holds_out_what_the_run_holds_out(tmp_path):
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps({"silo-a": 1000}))
    for fraction_evaluate, reported, flagged in ((0.0, 1000, False), (1.0, 900, False), (1.0, 1000, False),
                                                 (0.0, 500, True)):
        config = RunConfig.from_mapping({"silo-sizes": str(path), "fraction-evaluate": fraction_evaluate,
                                         "server-validation": True})
        weigh = weight_policy(config, DataKey.of(config), _Grid())
        assert weigh([_reply(7, reported)]) == [1000] and weigh.source == "silo-sizes"
        assert (size_mismatch_of(weigh, 7) is not None) == flagged


def test_a_missing_registry_names_the_coordinator():
    config = RunConfig.from_mapping({"silo-sizes": "/no/such/silo-sizes.json"})
    with pytest.raises(ConfigError, match="coordinator"):
        config.check_server_paths()


def test_the_docs_give_one_key_and_one_meaning_of_size():
    """Every passage on silo-sizes says: registered name or public-key SHA-256, all the silo's training images
    before the hold-out, a path on the coordinator."""
    passages = {}
    for doc in ("README.md", "docs/DATA.md", "docs/DEPLOYMENT.md", "docs/RELIABILITY.md"):
        text = " ".join((DOCS / doc).read_text().split())  # line breaks as spaces
        found = [m.start() for m in re.finditer(r"`silo-sizes`", text)]
        assert found, f"{doc} says nothing of silo-sizes"
        passages[doc] = text
        assert "public key" in text or "public-key" in text, doc
        assert re.search(r"registered name", text), f"{doc}: the key is the registered name or the key's SHA-256"
        assert "SHA-256" in text, doc
        assert not re.search(r"keyed by each SuperNode's registered public key\b(?! ?'s)", text), doc
    for doc in ("README.md", "docs/DATA.md", "docs/DEPLOYMENT.md", "docs/RELIABILITY.md"):
        assert re.search(r"before (its|the) (validation )?hold-out", passages[doc]), \
            f"{doc}: size = all the silo's training images, before the hold-out"
    assert "on the coordinator" in passages["docs/DEPLOYMENT.md"]
