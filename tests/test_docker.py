"""Offline checks of the Docker compose demo (no Docker engine needed, nothing is pulled or run).

- every compose file (and each documented combination) parses and validates: with `docker-compose config`
  when a compose binary exists, else against a structural schema with pyyaml (skipped if neither);
- every flag given to flower-superlink / flower-supernode / flower-superexec is one the installed CLI's
  `--help` lists (so a renamed or removed flag fails here, not on someone's cluster);
- the flwr version in the Dockerfile and compose files equals the installed flwr;
- the wiring: ports, process isolation, one ClientApp SuperExec per SuperNode, TLS on every hop that
  crosses the compose network, runtime dependency installation off.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
COMPOSE_FILES = ("compose.yml", "with-tls.yml", "with-auth.yml", "with-gpu.yml", "certs.yml")
# The combinations docs/DEPLOYMENT.md tells users to run.
COMBINATIONS = (
    ("compose.yml",),
    ("compose.yml", "with-tls.yml"),
    ("compose.yml", "with-tls.yml", "with-auth.yml"),
    ("compose.yml", "with-tls.yml", "with-gpu.yml"),
    ("certs.yml",),
)
ENTRYPOINTS = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode",
               "fedsq-superexec": "flower-superexec"}


def installed_flwr_version() -> str:
    return importlib.metadata.version("flwr")


def _yaml():
    return pytest.importorskip("yaml", reason="pyyaml is needed to read the compose files")


def _compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def _env() -> dict[str, str]:
    # PYTHONPATH too: Flower's Ray backend sets it to the venv's sys.path inside this process, and Debian's
    # docker-compose (system python) then imports the venv's cryptography and crashes.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLWR_VERSION", "FEDSQ_IMAGE", "TORCH_")) and k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return env


@lru_cache(maxsize=None)
def merged_config(files: tuple[str, ...], use_binary: bool = True) -> dict:
    """The effective configuration of `docker compose -f a -f b ...`: the compose binary's own merge when
    there is one, else a faithful-enough merge for our files (mappings merge, lists and scalars replace,
    except `secrets`/`volumes`/`ports` lists, which compose concatenates)."""
    yaml = _yaml()
    binary = _compose_binary() if use_binary else None
    if binary:
        args = [*binary]
        for name in files:
            args += ["-f", str(DOCKER / name)]
        result = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=DOCKER, env=_env(),
                                timeout=120)
        assert result.returncode == 0, f"`{' '.join(args)} config` failed:\n{result.stderr}{result.stdout}"
        return yaml.safe_load(result.stdout)
    merged: dict = {}
    for name in files:
        merged = _merge(merged, _expand(yaml.safe_load((DOCKER / name).read_text())))
    return merged


def _expand(node):
    """${VAR:-default} -> default (what compose does with an empty environment)."""
    if isinstance(node, dict):
        return {k: _expand(v) for k, v in node.items() if not str(k).startswith("x-")}
    if isinstance(node, list):
        return [_expand(v) for v in node]
    if isinstance(node, str):
        return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", node)
    return node


def _merge(base, override, key: str = ""):
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(override, list) and key in ("secrets", "volumes", "ports"):
        return base + [item for item in override if item not in base]
    return override


@lru_cache(maxsize=None)
def cli_flags(command: str) -> frozenset[str]:
    exe = BIN / command
    path = str(exe) if exe.is_file() else shutil.which(command)
    if path is None:
        pytest.skip(f"{command} is not installed here; cannot check the compose flags against its --help")
    env = dict(_env(), COLUMNS="200", FLWR_HOME=os.path.join(tempfile.gettempdir(), f"fedsq-flwr-help-{os.getuid()}"))
    result = subprocess.run([path, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", result.stdout))


def _flags(command: list) -> list[str]:
    return [str(arg).split("=", 1)[0] for arg in command if str(arg).startswith("--")]


def _arg(command: list, flag: str) -> str | None:
    command = [str(a) for a in command]
    for index, arg in enumerate(command):
        if arg == flag and index + 1 < len(command):
            return command[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _entrypoint(service: dict) -> str | None:
    image = str(service.get("image", ""))
    for prefix, command in ENTRYPOINTS.items():
        if image.startswith(prefix + ":") and not service.get("entrypoint"):
            return command
    return None


# ---------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_is_yaml_with_services(name: str) -> None:
    data = _yaml().safe_load((DOCKER / name).read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict) and data["services"], name
    unknown = set(data) - {"services", "volumes", "secrets", "networks", "configs", "name"}
    unknown = {k for k in unknown if not k.startswith("x-")}
    assert not unknown, f"{name}: unexpected top-level keys {unknown}"


@pytest.mark.parametrize("files", COMBINATIONS, ids=lambda f: "+".join(f))
def test_compose_combination_validates(files: tuple[str, ...]) -> None:
    config = merged_config(files)
    services = config["services"]
    allowed = {"image", "build", "command", "entrypoint", "environment", "volumes", "ports", "depends_on",
               "restart", "secrets", "user", "stop_signal", "deploy", "networks"}
    for name, service in services.items():
        assert set(service) <= allowed, f"{name}: unexpected keys {set(service) - allowed}"
        assert "image" in service or "build" in service, name
        assert isinstance(service.get("command", []), list), f"{name}: command must be a list"
    for name, service in services.items():  # every named volume/secret is declared at top level
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in (config.get("volumes") or {}), f"{name}: volume {source} not declared"
        for secret in service.get("secrets", []):
            source = secret["source"] if isinstance(secret, dict) else secret
            assert source in (config.get("secrets") or {}), f"{name}: secret {source} not declared"


def test_fallback_merge_agrees_with_compose() -> None:
    """The pyyaml fallback (used where no compose binary exists) reads our files as compose does."""
    if _compose_binary() is None:
        pytest.skip("no docker-compose / docker compose binary to compare the fallback with")
    for files in COMBINATIONS:
        by_compose = merged_config(files)["services"]
        by_fallback = merged_config(files, use_binary=False)["services"]
        assert set(by_compose) == set(by_fallback), files
        for name, service in by_compose.items():
            assert [str(a) for a in service.get("command", [])] == \
                   [str(a) for a in by_fallback[name].get("command", [])], (files, name)
            assert service.get("image") == by_fallback[name].get("image"), (files, name)
            assert len(service.get("secrets", [])) == len(by_fallback[name].get("secrets", [])), (files, name)


# ---------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("files", COMBINATIONS[:-1], ids=lambda f: "+".join(f))
def test_every_flower_flag_is_accepted_by_the_installed_cli(files: tuple[str, ...]) -> None:
    services = merged_config(files)["services"]
    checked = 0
    for name, service in services.items():
        command = _entrypoint(service)
        if command is None:
            continue
        unknown = [flag for flag in _flags(service.get("command", [])) if flag not in cli_flags(command)]
        assert not unknown, f"{name}: {command} does not accept {unknown} (flwr {installed_flwr_version()})"
        checked += 1
    assert checked >= 6, f"expected the superlink, supernodes and superexecs to be checked, got {checked}"


def test_no_deprecated_or_removed_flower_flags() -> None:
    """Flags from the pre-1.40 layout (separate gRPC ports) must not creep back in."""
    old = ("--fleet-api-address", "--control-api-address", "--serverappio-api-address",
           "--clientappio-api-address", "--appio-api-address", "--plugin-type", "--fleet-api-type",
           "--auth-list-public-keys", "--auth-supernode-public-key", "--executor-config")
    for name in COMPOSE_FILES:
        text = (DOCKER / name).read_text()
        found = [flag for flag in old if flag in text]
        assert not found, f"{name} uses old flags {found}"
        assert not re.search(r":909[123]\b", text), f"{name} still points at the old 9091-9093 ports"


# ---------------------------------------------------------------------------------------------- versions
def test_dockerfile_flwr_version_matches_installed() -> None:
    installed = installed_flwr_version()
    text = (DOCKER / "Dockerfile").read_text()
    default = re.search(r"^ARG FLWR_VERSION=(\S+)", text, re.M)
    assert default, "docker/Dockerfile must declare ARG FLWR_VERSION=<version>"
    assert default.group(1) == installed, f"Dockerfile FLWR_VERSION={default.group(1)}, installed flwr {installed}"
    assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}", text, re.M), "base must be flwr/superexec"
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_flwr_versions_match_installed(name: str) -> None:
    installed = installed_flwr_version()
    text = (DOCKER / name).read_text()
    for found in re.findall(r"FLWR_VERSION:-([0-9][^}]*)\}", text):
        assert found == installed, f"{name}: default FLWR_VERSION {found}, installed flwr {installed}"
    for found in re.findall(r"image:\s*flwr/\w+:([0-9][\w.]*)", text):
        assert found == installed, f"{name}: pinned flwr image {found}, installed flwr {installed}"


# ---------------------------------------------------------------------------------------------- wiring
def _services(files: tuple[str, ...]) -> dict:
    return merged_config(files)["services"]


def test_base_demo_wiring() -> None:
    services = _services(("compose.yml",))
    link = services["superlink"]["command"]
    assert _arg(link, "--isolation") == "process" and _arg(link, "--host") == "0.0.0.0"
    assert _arg(link, "--port") == "8000" and _arg(link, "--database", ).startswith("state/")
    assert "--disable-runtime-dependency-installation" in link
    assert any("/app/state" in str(v) for v in services["superlink"]["volumes"]), "state DB not on a volume"
    assert _arg(services["superexec-serverapp"]["command"], "--runtime-api-address") == "superlink:8000"

    nodes = sorted(n for n in services if re.fullmatch(r"supernode-\d+", n))
    assert len(nodes) >= 2
    partitions = set()
    for node in nodes:
        index = node.rsplit("-", 1)[1]
        command = services[node]["command"]
        assert _arg(command, "--superlink") == "superlink:8000"
        assert _arg(command, "--isolation") == "process" and _arg(command, "--host") == "0.0.0.0"
        port = _arg(command, "--port")
        partitions.add(_arg(command, "--node-config"))
        executor = services[f"superexec-clientapp-{index}"]
        assert _arg(executor["command"], "--runtime-api-address") == f"{node}:{port}"
        volumes = [str(v) for v in executor.get("volumes", [])]
        assert any(f"silo-{index}" in v for v in volumes), f"silo {index} has no data volume of its own"
    assert len(partitions) == len(nodes), "every SuperNode needs its own partition/node config"
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert len(published) == 1 and "8000" in str(published[0]), f"only the SuperLink port is published: {published}"


def test_tls_overlay_secures_every_network_hop() -> None:
    services = _services(("compose.yml", "with-tls.yml"))
    link = services["superlink"]["command"]
    assert "--insecure" not in link
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert _arg(link, flag), f"superlink lacks {flag}"
    assert "--insecure" not in services["superexec-serverapp"]["command"]
    assert _arg(services["superexec-serverapp"]["command"], "--root-certificates")
    for node in (n for n in services if n.startswith("supernode-")):
        assert "--insecure" not in services[node]["command"], node
        assert _arg(services[node]["command"], "--root-certificates"), node


def test_auth_overlay_enables_node_authentication() -> None:
    services = _services(("compose.yml", "with-tls.yml", "with-auth.yml"))
    assert "--enable-supernode-auth" in services["superlink"]["command"]
    for node in (n for n in services if n.startswith("supernode-")):
        assert _arg(services[node]["command"], "--auth-supernode-private-key"), node


def test_gpu_overlay_reserves_a_gpu_for_clientapps() -> None:
    services = _services(("compose.yml", "with-tls.yml", "with-gpu.yml"))
    for name in (n for n in services if n.startswith("superexec-clientapp-")):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d.get("capabilities", []) for d in devices), name


def test_certs_service_reuses_the_deploy_scripts() -> None:
    text = (DOCKER / "certs.yml").read_text() + (DOCKER / "certs.Dockerfile").read_text()
    assert "make-certs.sh" in text and "make-node-keys.sh" in text
    assert "deploy/make-certs.sh" in (DOCKER / "certs.Dockerfile").read_text()


def test_dockerfile_copies_what_pyproject_needs_to_build() -> None:
    """`pip install .` in the image needs every file pyproject.toml points at (readme, license file)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = ["pyproject.toml"]
    readme = project.get("readme")
    needed.append(readme if isinstance(readme, str) else (readme or {}).get("file"))
    license_ = project.get("license")
    if isinstance(license_, dict):
        needed.append(license_.get("file"))
    needed += project.get("license-files", [])
    dockerfile = (DOCKER / "Dockerfile").read_text()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text()
    for name in filter(None, needed):
        assert re.search(rf"^COPY .*\b{re.escape(name)}\b", dockerfile, re.M), f"Dockerfile does not COPY {name}"
        assert f"!{name}" in ignore, f"docker/Dockerfile.dockerignore keeps {name} out of the build context"
