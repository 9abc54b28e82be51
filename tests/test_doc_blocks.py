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


def test_every_command_block_parses_as_bash():
    import subprocess

    for block in blocks().values():
        parsed = subprocess.run(["bash", "-n"], input=block.body, text=True, capture_output=True, timeout=30)
        assert parsed.returncode == 0, f"block {block.id} (line {block.line}): {parsed.stderr}"


def _options(args: list[str]) -> set[str]:
    return {arg for arg in args if arg.startswith("--")}


def test_the_four_silo_loop_is_the_warm_executor_block_four_times(tmp_path):
    """Run dry (tests/test_four_silos.py deploys it for real): its fedsq-supernode / fedsq-superexec / flwr are
    shell functions that record their arguments and environment. Four silos on ports 9094..9097, each SuperNode with
    the warm-executor block's options (--isolation process among them) and its own fedsq-superexec on its
    port, stopped with it (--parent-pid), with the task poll and one thread each."""
    import shlex
    import subprocess

    from docblocks import argv, block

    record = 'echo "$FLWR_SUPEREXEC_TASK_POLL_INTERVAL $OMP_NUM_THREADS $*"'
    prelude = "\n".join([f"fedsq-supernode() {{ {record}; }}", f"fedsq-superexec() {{ {record}; }}",
                         f"flwr() {{ {record} >> \"$WORK/flwr-run.txt\"; }}"])
    body = "\n".join(line for line in block("four-silos").body.splitlines()
                     if not line.startswith(("deploy/make-node-keys.sh", "deploy/register-node-keys.sh")))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", f"{prelude}\n{body}\nwait"], text=True,
                          capture_output=True, env={"WORK": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 0, done.stderr
    warm_node = _options(argv("warm-executor", "fedsq-supernode"))
    warm_exec = _options(argv("warm-executor", "fedsq-superexec", optional={"$!": "1"}))
    for i in range(1, 5):
        node = shlex.split((tmp_path / f"silo-{i}.log").read_text())
        executor = shlex.split((tmp_path / f"superexec-{i}.log").read_text())
        assert node[:2] == ["0.1", "1"] and executor[:2] == ["0.1", "1"], (node, executor)  # poll, threads
        assert _options(node) == warm_node and _options(executor) == warm_exec, (node, executor)
        port = node[node.index("--port") + 1]
        assert port == str(9093 + i) and node[node.index("--isolation") + 1] == "process"
        assert executor[executor.index("--runtime-api-address") + 1] == f"127.0.0.1:{port}"
        assert executor[executor.index("--parent-pid") + 1].isdigit()
        assert node[node.index("--auth-supernode-private-key") + 1] == f"{tmp_path}/keys/silo-{i}"
    run = (tmp_path / "flwr-run.txt").read_text()
    assert "min-available-nodes=4" in run and "min-train-nodes=4" in run, run
