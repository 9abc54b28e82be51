"""Compare the packages installed in this environment with requirements.lock.

    python -m fedsq_app.lockcheck requirements.lock   # exit 0 when every pin is installed at its version

A local build label is ignored (``torch 2.14.1+cpu`` satisfies ``torch==2.14.1``), so a CPU-only torch
swapped in with TORCH_SPEC still counts as matching.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def read_lock(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` for every ``name==version`` line of a pip-compile lock."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    if not pins:
        raise ValueError(f"{path}: no 'name==version' pins found")
    return pins


def lock_mismatches(pins: dict[str, str]) -> list[str]:
    """One line per pinned package that is missing or installed at another version."""
    problems = []
    for name, locked in sorted(pins.items()):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name}: locked {locked}, not installed")
            continue
        if Version(installed).public != Version(locked).public:
            problems.append(f"{name}: locked {locked}, installed {installed}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    lock = args[0] if args else "requirements.lock"
    problems = lock_mismatches(read_lock(lock))
    for problem in problems:
        print(problem)
    print(f"{lock}: {'OK' if not problems else f'{len(problems)} mismatches'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
