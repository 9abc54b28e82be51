"""No unsafe deserialisation anywhere in the app or its scripts: no pickle, no ``eval(``, and ``torch.load``
only with ``weights_only=True`` (checkpoints are safetensors + JSON)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = [REPO / "fedsq_app", REPO / "scripts", REPO / "deploy"]  # tests are exempt (this file names the words)
SUFFIXES = {".py", ".sh", ".toml", ".yaml", ".yml", ".cfg"}

PICKLE = re.compile(r"\b(c?pickle|dill|joblib|shelve|marshal)\b|allow_pickle\s*=\s*True")
EVAL = re.compile(r"(?<![\w.])eval\s*\(")  # builtin eval(...), not model.eval()
TORCH_LOAD = re.compile(r"torch\.load\s*\(")


def _files() -> list[Path]:
    return sorted(p for root in SCANNED if root.is_dir() for p in root.rglob("*")
                  if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts)


def _torch_load_calls(text: str) -> list[str]:
    """Every ``torch.load(...)`` call with its arguments (balanced parentheses, across lines)."""
    calls = []
    for match in TORCH_LOAD.finditer(text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        calls.append(text[match.start() : end + 1])
    return calls


def scan(text: str) -> list[str]:
    problems = [f"pickle-family module or allow_pickle: {m.group(0)!r}" for m in PICKLE.finditer(text)]
    problems += [f"builtin eval: {m.group(0)!r}" for m in EVAL.finditer(text)]
    problems += [f"torch.load without weights_only=True: {c!r}" for c in _torch_load_calls(text)
                 if not re.search(r"weights_only\s*=\s*True", c)]
    return problems


def code_only(text: str, suffix: str) -> str:
    """The text with comments (and, for Python, string literals such as docstrings) blanked out, so prose
    like "No pickle." does not count; code that builds a module name from a string is not our style anyway."""
    if suffix != ".py":
        return "\n".join("" if line.lstrip().startswith("#") else line for line in text.splitlines())
    lines = text.splitlines(keepends=True)
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type in (tokenize.COMMENT, tokenize.STRING):
            (row0, col0), (row1, col1) = token.start, token.end
            for row in range(row0, row1 + 1):
                line = lines[row - 1]
                start = col0 if row == row0 else 0
                end = col1 if row == row1 else len(line.rstrip("\n"))
                lines[row - 1] = line[:start] + " " * (end - start) + line[end:]
    return "".join(lines)


def test_scanner_catches_what_it_must():
    def check(text):
        return scan(code_only(text, ".py"))

    assert check("import pickle\n") and check("from joblib import load") and check("np.load(f, allow_pickle=True)")
    assert check("x = eval(s)") and check("torch.load(path)") and check("torch.load(\n  path, map_location='cpu')")
    assert not check("torch.load(path, map_location='cpu',\n           weights_only=True)")
    assert not check("model.eval()\nmodule.eval()")
    assert not check('"""No pickle here."""\n# nor eval(x) in a comment\nx = "pickle"\n')


def test_there_are_files_to_scan():
    names = {p.name for p in _files()}
    assert {"server_app.py", "client_app.py", "checkpoint.py"} <= names


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_deserialisation(path: Path):
    problems = scan(code_only(path.read_text(errors="replace"), path.suffix))
    assert problems == [], f"{path.relative_to(REPO)}: {problems}"
