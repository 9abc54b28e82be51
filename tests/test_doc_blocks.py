"""Every command block of docs/DEPLOYMENT.md is either run by a named test, read from the page (tests/docblocks.py),
or says why it is not run here. Fast: it parses the page and the tests, it starts nothing."""

from __future__ import annotations

import re
from pathlib import Path

from docblocks import DOC, MARKER, blocks, commands, fences

REPO = Path(__file__).resolve().parents[1]


def test_every_bash_block_is_marked_tested_or_not_run():
    unmarked = [(line, lang) for line, lang, marker in fences() if lang in ("bash", "sh", "shell")
                and not MARKER.match(marker)]
    assert not unmarked, (f"{DOC.name}: command blocks at lines {unmarked} need a marker on the line before the "
                          "fence: <!-- block ID, tested by tests/test_x.py::test_name --> or <!-- block ID, not run "
                          "in tests: why -->")
    marked = blocks()
    assert len(marked) == sum(1 for _, lang, _ in fences() if lang in ("bash", "sh", "shell"))
    for block in marked.values():
        assert block.tests or len(block.why) > 20, f"block {block.id}: say why it is not run in tests"


def test_a_tested_block_names_tests_that_exist_and_read_it_from_the_page():
    for block in blocks().values():
        for test in block.tests:
            path, _, name = test.partition("::")
            source = (REPO / path).read_text() if (REPO / path).is_file() else ""
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"block {block.id}: no test {test}"
            # The test (or its module's fixture) takes the block from the page, never from a copy of its own.
            assert re.search(rf"""["']{re.escape(block.id)}["']""", source), \
                f"block {block.id}: {path} does not read it from {DOC.name} (docblocks.block/argv/script)"


def test_the_walk_through_is_one_run_of_marked_blocks():
    """The walk-through's blocks, in the page's order, are all run by the end-to-end test."""
    order = [b.id for b in sorted(blocks().values(), key=lambda b: b.line)]
    walk = ["every-terminal", "terminal-1", "terminal-2-keys", "terminal-3-connection", "terminal-2-silos",
            "terminal-3-run"]
    assert [i for i in order if i in walk] == walk
    assert all(blocks()[i].tests for i in walk)


def test_commands_join_continuations_and_keep_here_documents():
    text = "export A=1  # note\n# only a comment\nflower-supernode --a 1 \\\n  --b 2\ncat > f <<TOML\nx = 1\nTOML\nls\n"
    assert commands(text) == ["export A=1  # note", "flower-supernode --a 1  --b 2", "cat > f <<TOML\nx = 1\nTOML",
                              "ls"]
