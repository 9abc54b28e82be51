"""The package layout's rules, checked by machine: import-linter contracts, no torch behind the strategy, no
borrowed private names, short modules, one atomic writer, cache keys by module."""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fedsq_app"
MAX_MODULE_LINES = 400


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "sitecustomize" not in p.name)


def test_import_linter_contracts_hold():
    """Layers, independence, forbidden imports (torch behind the strategy included) and no cycles, as
    written in pyproject.toml's [tool.importlinter]; function-level imports count."""
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout and " broken" in out.stdout  # the summary line: "N kept, 0 broken"


@pytest.mark.parametrize("statement", ["import fedsq_app.core.strategy", "from fedsq_app import FedSQ",
                                       "import fedsq_app.core.replies, fedsq_app.core.aggregation, "
                                       "fedsq_app.core.defenses, fedsq_app.core.wire"])
def test_the_strategy_side_loads_no_torch(statement):
    code = f"import sys\n{statement}\nprint(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _private_imports(path: Path, root: Path = REPO) -> list[str]:
    """``from x import _name`` and ``module._name`` on an imported fedsq_app module, in one file."""
    tree = ast.parse(path.read_text())
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedsq_app"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fedsq_app"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [line for path in _modules() for line in _private_imports(path)]
    assert found == []


def test_the_private_name_scan_sees_both_forms(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from fedsq_app.core import wire\nfrom fedsq_app.x import _hidden\nwire._secret\nwire.__doc__\n")
    found = [line.split(": ", 1)[1] for line in _private_imports(sample, root=tmp_path)]
    assert found == ["from fedsq_app.x import _hidden", "wire._secret"]


def test_no_module_is_longer_than_about_400_lines():
    lengths = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in _modules()}
    assert {k: v for k, v in lengths.items() if v > MAX_MODULE_LINES} == {}


def test_every_name_list_is_one_registry():
    """Config validation, the server, the client and the bench read the same registries."""
    from fedsq_app.config import ConfigError, RunConfig
    from fedsq_app.core.aggregation import AGGREGATIONS
    from fedsq_app.runtime.models import MODELS
    from fedsq_app.runtime.strategies import BASELINES, CANDIDATES, STRATEGIES

    for name in STRATEGIES:
        assert RunConfig(strategy=name).uses_dualcopy == STRATEGIES[name].gated
    assert set(CANDIDATES) | set(BASELINES) == set(STRATEGIES) and "fedsq" in CANDIDATES and "fedavg" in BASELINES
    for key, names in (("strategy", STRATEGIES), ("model", MODELS), ("aggregation", AGGREGATIONS)):
        for name in names:
            RunConfig.from_mapping({key: name})
        with pytest.raises(ConfigError, match=f"{key}='nope' is not one of {', '.join(names)}"):
            RunConfig.from_mapping({key: "nope"})


def test_write_atomic_fsyncs_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from fedsq_app import util

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(util.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = util.write_atomic(tmp_path / "deep" / "a.json", json.dumps({"a": 1}))
    assert json.loads(path.read_text()) == {"a": 1} and len(synced) == 1

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        util.write_atomic(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}  # the old file stays whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_every_writer_goes_through_write_atomic():
    """The files a run writes (results.json, rounds.csv, checkpoints, backbones, caches) use the one helper;
    nothing else in the package renames a temporary file into place or fsyncs."""
    writers = {"server_app.py", "runtime/metrics.py", "runtime/models.py", "runtime/checkpoint.py",
               "runtime/maskcache.py", "data/cache.py"}
    for name in writers:
        assert "write_atomic(" in (PACKAGE / name).read_text(), name
    for path in _modules():
        if path.name != "util.py":
            text = path.read_text()
            assert "os.replace(" not in text and "tmp.replace(" not in text and "fsync(" not in text, path


def test_cache_digests_follow_the_module_not_its_file(tmp_path, monkeypatch):
    """The digest reads a module's source through its import loader: by module, wherever it lives."""
    from fedsq_app.util import source_digest

    (tmp_path / "moved_somewhere").mkdir()
    module_file = tmp_path / "moved_somewhere" / "digest_probe.py"
    module_file.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "moved_somewhere"))
    import importlib

    probe = importlib.import_module("digest_probe")
    first = source_digest(probe)
    module_file.write_text("X = 2\n")
    assert source_digest(probe) != first  # the code changed: a new key
    module_file.write_text("X = 1\n")
    assert source_digest(probe) == first
    with pytest.raises(ValueError, match="no source"):
        source_digest(types.ModuleType("built_in_memory"))
    sys.modules.pop("digest_probe", None)


def test_bench_presets_are_toml_files_without_history():
    from fedsq_app.tools.bench.presets import PRESETS

    conf = PACKAGE / "tools" / "bench" / "conf"
    assert sorted(PRESETS) == sorted(p.stem for p in conf.glob("*.toml"))
    for path in conf.glob("*.toml"):
        assert "issue" not in path.read_text().lower() and "bench13" not in path.read_text()


# ---------------------------------------------------------------------------------------------- statistics
def _stored(folder: Path) -> tuple[list[dict], list[dict]]:
    def number(text: str):
        try:
            return float(text)
        except ValueError:
            return text

    with open(folder / "cells.csv") as handle:
        cells = [{k: number(v) if k not in ("setup", "partition", "strategy") else v for k, v in row.items()}
                 for row in csv.DictReader(handle)]
    with open(folder / "paired.csv") as handle:
        paired = list(csv.DictReader(handle))
    return cells, paired


@pytest.mark.parametrize("name", ["same-domain", "cross-domain"])
def test_scipy_statistics_reproduce_the_stored_results(name):
    """docs/results/*/paired.csv was written by the hand-written Student-t code; scipy.stats gives the same
    means, CIs and p-values to 1e-6, from the per-seed cells of the same runs."""
    from fedsq_app.tools.bench.stats import paired_comparisons, t_interval

    cells, paired = _stored(REPO / "docs" / "results" / name)
    rows, seen = [], set()
    for cell in cells:  # cells.csv lists the reported cells first, then the μ-tuning runs
        key = (cell["setup"], cell["partition"], cell["epochs"], cell["strategy"], cell["seed"])
        if key not in seen:
            seen.add(key)
            rows.append({**cell, "epochs": int(cell["epochs"]), "seed": int(cell["seed"])})
    computed = {(c["candidate"], c["baseline"], c["metric"]): c for c in paired_comparisons(rows)}
    assert len(paired) > 20
    for stored in paired:
        c = computed[(stored["candidate"], stored["baseline"], stored["metric"])]
        assert c["n"] == int(stored["n"])
        for field in ("mean", "std", "low", "high", "p"):
            expected = float(stored[field])
            assert (math.isnan(c[field]) and math.isnan(expected)) or c[field] == pytest.approx(expected, abs=1e-6), \
                (stored, field)
        if int(stored["n"]) >= 2 and float(stored["std"]) > 0:  # the same from the three summary numbers
            low, high, p = t_interval(float(stored["mean"]), float(stored["std"]), int(stored["n"]))
            assert (low, high, p) == pytest.approx((float(stored["low"]), float(stored["high"]),
                                                    float(stored["p"])), abs=1e-6)
