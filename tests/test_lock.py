"""The environment is the lock: drift between requirements.lock and what is installed fails here, in CI,
before a user meets it. Also: the lock satisfies pyproject.toml's ranges, and says how to regenerate it."""

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from fedsq_app.lockcheck import lock_mismatches, read_lock

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def test_installed_versions_equal_the_lock():
    problems = lock_mismatches(read_lock(LOCK))
    assert not problems, "the venv drifted from requirements.lock (re-run scripts/setup.sh):\n" + "\n".join(problems)


def test_lock_satisfies_pyproject_ranges():
    pins = read_lock(LOCK)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    for line in declared:
        requirement = Requirement(line)
        locked = pins.get(canonicalize_name(requirement.name))
        assert locked, f"{requirement.name} is declared in pyproject.toml but missing from the lock"
        assert Version(locked) in requirement.specifier, f"lock has {requirement.name}=={locked}, outside {line!r}"


def test_lock_pins_flower_and_says_how_to_regenerate():
    assert read_lock(LOCK)["flwr"] == "1.42.0"
    assert "bash scripts/lock.sh" in LOCK.read_text().split("\n\n")[0]


def test_lockcheck_reports_drift(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("pytest==0.0.1\n    # via x\nnot-a-real-package-fedsq==1.0\n")
    problems = lock_mismatches(read_lock(lock))
    assert any(p.startswith("pytest: locked 0.0.1, installed ") for p in problems)
    assert "not-a-real-package-fedsq: locked 1.0, not installed" in problems
    empty = tmp_path / "empty.lock"
    empty.write_text("# nothing pinned\n")
    with pytest.raises(ValueError, match="no 'name==version' pins"):
        read_lock(empty)


def test_gpu_cell_wheels_are_pinned_as_in_the_lock():
    pins = read_lock(LOCK)
    lines = [line for line in (ROOT / "requirements/gpu-cell-extra.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines
    for line in lines:
        name, version = line.split("==")
        assert pins.get(canonicalize_name(name)) == version, f"{line}: the lock has {pins.get(canonicalize_name(name))}"
