"""docs/DEPLOYMENT.md's command blocks, as the tests run them.

Every ```bash block of the page is preceded by a marker, either

    <!-- block ID, tested by tests/test_x.py::test_name[, tests/...::...][; note] -->
    <!-- block ID, not run in tests: why -->

and a tested block is read from the page by its test (``block(ID)``), never copied into it: the test runs
the block's commands with the loopback federation's ports, paths and names put in (``argv``, ``script``), so
a change to the page is a change to what the test runs (tests/test_doc_blocks.py checks the markers).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "DEPLOYMENT.md"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w+)[ \t]*$", re.M)
MARKER = re.compile(r"^[ \t]*<!-- block (?P<id>[\w-]+), (?:tested by (?P<tests>[^;>]+?)(?:; (?P<note>[^>]*?))?"
                    r"|not run in tests: (?P<why>[^>]+?)) -->[ \t]*$")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Block:
    id: str
    lang: str
    body: str  # the block's text, its indentation removed
    line: int  # the opening fence's line (1-based)
    tests: tuple[str, ...]  # "tests/file.py::name" for a tested block, () otherwise
    why: str  # why a block is not run in tests ("" for a tested one)


def fences(doc: Path = DOC) -> list[tuple[int, str, str]]:
    """Every fenced code block: (line of the opening fence, language, the marker line above it or "")."""
    lines = doc.read_text().splitlines()
    found, inside = [], False
    for number, line in enumerate(lines, start=1):
        match = re.match(r"^[ \t]*```(\w*)[ \t]*$", line)
        if not match:
            continue
        if not inside and match.group(1):
            found.append((number, match.group(1), lines[number - 2] if number >= 2 else ""))
        inside = not inside
    return found


def blocks(doc: Path = DOC) -> dict[str, Block]:
    """The marked blocks by id."""
    lines = doc.read_text().splitlines()
    result: dict[str, Block] = {}
    for number, lang, marker_line in fences(doc):
        marker = MARKER.match(marker_line)
        if not marker:
            continue
        indent = re.match(r"^[ \t]*", lines[number - 1]).group(0)
        body = []
        for line in lines[number:]:
            if re.match(r"^[ \t]*```[ \t]*$", line):
                break
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
        tests = tuple(t.strip() for t in (marker.group("tests") or "").split(",") if t.strip())
        assert marker.group("id") not in result, f"{doc.name}: block id {marker.group('id')!r} used twice"
        result[marker.group("id")] = Block(marker.group("id"), lang, "\n".join(body) + "\n", number, tests,
                                           (marker.group("why") or "").strip())
    return result


def block(block_id: str) -> Block:
    found = blocks().get(block_id)
    assert found is not None, f"docs/DEPLOYMENT.md has no block marked {block_id!r}"
    return found


def commands(text: str) -> list[str]:
    """The block's commands: continuation lines joined, a here-document kept with its command, comment-only
    and blank lines dropped."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        here = re.search(r"<<-?'?(\w+)'?", line)
        if here:
            body = []
            while i < len(lines) and lines[i].strip() != here.group(1):
                body.append(lines[i])
                i += 1
            i += 1  # the terminator
            line = "\n".join([line, *body, here.group(1)])
        out.append(line)
    return out


def _put_in(command: str, subs: dict[str, str], optional: dict[str, str]) -> str:
    for old, new in subs.items():
        assert old in command, f"{old!r} is not in the documented command {command!r}: update the test's substitutions"
        command = command.replace(old, new)
    for old, new in optional.items():
        command = command.replace(old, new)
    return command


def argv(block_id: str, start: str, *, nth: int = 0, env: dict[str, str] | None = None,
         subs: dict[str, str] | None = None, optional: dict[str, str] | None = None) -> list[str]:
    """The ``nth`` command of the block whose words start with ``start`` (e.g. "flower-supernode", "flwr run"),
    as an argument list: ``subs`` (each must occur) and ``optional`` replaced in its text, its trailing comment,
    redirections and ``&`` dropped, and ``$VAR``/``${VAR}`` expanded from ``env`` (a variable not there fails)."""
    words = start.split()
    found = [c for c in commands(block(block_id).body) if c.split()[:len(words)] == words]
    assert len(found) > nth, f"block {block_id!r} has {len(found)} {start!r} command(s), the test wants #{nth + 1}"
    tokens = shlex.split(_put_in(found[nth], subs or {}, optional or {}), comments=True)
    for i, token in enumerate(tokens):
        if token in ("&", "|", ";", "&&") or token.startswith((">", "2>", "<")):
            tokens = tokens[:i]
            break

    def expand(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert env is not None and name in env, f"block {block_id!r}: ${name} has no value in the test"
        return env[name]

    return [VARIABLE.sub(expand, token) for token in tokens]


def script(block_id: str, *, skip: tuple[str, ...] = (), subs: dict[str, str] | None = None,
           optional: dict[str, str] | None = None) -> str:
    """The block as a bash script, minus the commands whose program is in ``skip`` (each must be there),
    with ``subs`` (each must occur somewhere) and ``optional`` replaced."""
    kept, skipped = [], set()
    for command in commands(block(block_id).body):
        program = command.split(None, 1)[0]
        if program in skip:
            skipped.add(program)
        else:
            kept.append(command)
    assert skipped == set(skip), f"block {block_id!r} lacks {set(skip) - skipped}"
    text = "\n".join(kept) + "\n"
    return _put_in(text, subs or {}, optional or {})


def walkthrough_script() -> str:
    """The page's one-machine walk-through as one bash script (scripts/readonly-walkthrough.sh runs it): its
    blocks in order, as written, but with $SUPERLINK_PORT, $SILO1_PORT and $SILO2_PORT for 8000, 9094 and
    9095, `fedsq-prepare --epochs $PREPARE_EPOCHS`, each long-running process in the background (its PID in
    ``pids``, its log under $WORK), a wait where the page says to wait, and the run's id for <run-id>."""
    ports = {"127.0.0.1:8000": "127.0.0.1:$SUPERLINK_PORT", "--port 8000": "--port $SUPERLINK_PORT",
             "--port 9094": "--port $SILO1_PORT", "--port 9095": "--port $SILO2_PORT"}

    def put(text: str) -> str:
        for old, new in ports.items():
            text = text.replace(old, new)
        return text

    def background(command: str, log: str) -> str:
        command = put(command).rstrip()
        if not command.endswith("&"):
            command += f' > "$WORK/{log}" 2>&1 &'
        return command + "\npids+=($!)"

    out = ["# ---- every terminal first", put(block("every-terminal").body), "export PYTHONPATH=$PWD",
           "# ---- terminal 1, the coordinator"]
    for command in commands(block("terminal-1").body):
        if command.startswith("flower-superlink"):
            out += [background(command, "superlink.log"),
                    'for _ in $(seq 120); do grep -q "Uvicorn running on https://127.0.0.1:$SUPERLINK_PORT" '
                    '"$WORK/superlink.log" && break; sleep 1; done', 'grep "Uvicorn running" "$WORK/superlink.log"']
        else:
            out.append(command.replace("fedsq-prepare", 'fedsq-prepare --epochs "$PREPARE_EPOCHS"', 1)
                       if command.startswith("fedsq-prepare") else put(command))
    out += ["# ---- terminal 2, the silos: keys", block("terminal-2-keys").body,
            "# ---- terminal 3, the user: connection and registration", put(block("terminal-3-connection").body),
            "# ---- terminal 2 again: both silos", "export FLWR_HOME=$WORK/flwr-home/silos"]
    for index, command in enumerate(commands(block("terminal-2-silos").body), start=1):
        out.append(background(command, f"silo-{index}.log"))
    out += ["# ---- terminal 3: run FedSQ", "export FLWR_HOME=$WORK/flwr-home/user",
            "for _ in $(seq 60); do",
            """  [ "$(flwr supernode list fedsq-local --format json | grep -c '"online"')" -ge 2 ] && break; sleep 2""",
            "done"]
    for command in commands(block("terminal-3-run").body):
        if "<run-id>" in command and not any(line.startswith("run_id=") for line in out):
            out.append('run_id=$(flwr ls fedsq-local --format json | python -c '
                       '"import json, sys; text = sys.stdin.read(); '
                       'print(json.loads(text[text.find(chr(123)):])[\'runs\'][0][\'run-id\'])")')
        command = command.replace("<run-id>", '"$run_id"')
        out.append(put(command))
    return "\n".join(out) + "\n"



def four_silo_script(subs: dict[str, str] | None = None) -> str:
    """The page's way to four silos as one bash script: the walk-through's first blocks up to its connection
    (every-terminal, terminal-1, terminal-2-keys, terminal-3-connection), then the four-silo block, as
    written, with $SUPERLINK_PORT for 8000 and $((SILO_PORT_BASE + i)) for the silos' $((9093 + i)), each
    command in the terminal the page names (its FLWR_HOME), the SuperLink in the background with a wait for
    it, and the PIDs of every background process in $WORK/pids (also when a command fails). fedsq-prepare is
    left out: the caller puts the app's cache in $FEDSQ_CACHE_DIR first. ``subs`` (each must occur) are
    replaced in the whole script last, e.g. a smaller run config for a test."""
    homes = {"2": "export FLWR_HOME=$WORK/flwr-home/silos", "3": "export FLWR_HOME=$WORK/flwr-home/user"}
    out = ["pids_out() { jobs -p >> \"$WORK/pids\"; }", "trap pids_out EXIT",
           "# ---- every terminal first", block("every-terminal").body, "# ---- terminal 1, the coordinator"]
    for command in commands(block("terminal-1").body):
        if command.startswith("fedsq-prepare"):
            continue
        if command.startswith("flower-superlink"):
            out += [command.replace("--port 8000", "--port $SUPERLINK_PORT") + ' > "$WORK/superlink.log" 2>&1 &',
                    'echo $! >> "$WORK/pids"',
                    'for _ in $(seq 120); do grep -q "Uvicorn running on https://127.0.0.1:$SUPERLINK_PORT" '
                    '"$WORK/superlink.log" && break; sleep 1; done', 'grep "Uvicorn running" "$WORK/superlink.log"']
        else:
            out.append(command)
    out += ["# ---- terminal 2, the silos: keys", block("terminal-2-keys").body,
            "# ---- terminal 3, the user: connection and registration",
            _put_in(block("terminal-3-connection").body, {"127.0.0.1:8000": "127.0.0.1:$SUPERLINK_PORT"}, {}),
            "# ---- the four silos (each command in the terminal the page names)"]
    four = _put_in(block("four-silos").body, {"127.0.0.1:8000": "127.0.0.1:$SUPERLINK_PORT",
                                              "$((9093 + i))": "$((SILO_PORT_BASE + i))"}, {})
    terminal = None
    for command in commands(four):
        named = re.search(r"#\s*terminal (\d)", command)
        if named and named.group(1) != terminal:
            terminal = named.group(1)
            out.append(homes[terminal])
        out.append(command)
        if command.startswith("done"):
            out.append('jobs -p >> "$WORK/pids"')
    return _put_in("\n".join(out) + "\n", subs or {}, {})


if __name__ == "__main__":
    print(walkthrough_script(), end="")
