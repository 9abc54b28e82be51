"""The Docker compose demo: static checks, and one real end-to-end run on a real engine.

Static (no engine needed, nothing is pulled or run):
- every compose file (and each documented combination) parses and validates: with `docker-compose config`
  when a compose binary exists, else against a structural schema with pyyaml (skipped if neither);
- every flag given to flower-superlink / flower-supernode / flower-superexec is one the installed CLI's
  `--help` lists (so a renamed or removed flag fails here, not on someone's cluster);
- the flwr version in the Dockerfiles and compose files equals requirements.lock's;
- the wiring: ports, process isolation, one ClientApp SuperExec per SuperNode, TLS on every hop that
  crosses the compose network, runtime dependency installation off, host networking on 127.0.0.1 only.

End to end (`test_compose_demo_runs_for_real`): scripts/docker_e2e.sh starts its own dockerd, builds the
images offline, brings the demo up with TLS + SuperNode authentication, runs 2 FedSQ rounds, checks that
each silo's ClientApps were forked by the warm executor (fedsq-superexec), copies results.json out and
brings it down. It skips where the OS forbids an engine (not root, no overlay
filesystem, no cgroups) and, outside CI, where a package of requirements/system-tests.txt is missing (the
reason names the install command); anywhere else an engine that cannot start is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import pytest
from conftest import require_system

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
COMPOSE_FILES = ("compose.yml", "with-ports.yml", "with-tls.yml", "with-auth.yml", "with-gpu.yml",
                 "with-host-network.yml", "certs.yml")
HOST = "with-host-network.yml"  # used with --env-file host-network.env
# The combinations docs/DEPLOYMENT.md tells users to run.
COMBINATIONS = (
    ("compose.yml",),
    ("compose.yml", "with-ports.yml"),
    ("compose.yml", "with-ports.yml", "with-tls.yml"),
    ("compose.yml", "with-ports.yml", "with-tls.yml", "with-auth.yml"),
    ("compose.yml", "with-ports.yml", "with-tls.yml", "with-gpu.yml"),
    ("compose.yml", HOST),
    ("compose.yml", HOST, "with-tls.yml", "with-auth.yml"),
    ("compose.yml", HOST, "with-tls.yml", "with-gpu.yml"),
    ("certs.yml",),
)
ENTRYPOINTS = {"superlink": "flower-superlink", "supernode": "flower-supernode",
               "fedsq-superexec": "flower-superexec"}
# Every variable the compose files read: kept out of the tests' environment so defaults are what is checked.
COMPOSE_VARIABLES = frozenset(
    name for file in COMPOSE_FILES
    for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", (DOCKER / file).read_text()))


def locked_flwr_version() -> str:
    from fedsq_app.lockcheck import read_lock

    return read_lock(REPO / "requirements.lock")["flwr"]


def env_file_values() -> dict[str, str]:
    """docker/host-network.env as compose reads it (KEY=VALUE lines, # comments)."""
    lines = (DOCKER / "host-network.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _yaml():
    return pytest.importorskip("yaml", reason="pyyaml is needed to read the compose files")


def _compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def _env(**extra: str) -> dict[str, str]:
    # PYTHONPATH too: Flower's Ray backend sets it to the venv's sys.path inside this process, and Debian's
    # docker-compose (system python) then imports the venv's cryptography and crashes.
    env = {k: v for k, v in os.environ.items()
           if k not in COMPOSE_VARIABLES and k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", **extra)
    return env


@lru_cache(maxsize=None)
def merged_config(files: tuple[str, ...], use_binary: bool = True, variables: tuple = ()) -> dict:
    """The effective configuration of `docker compose [--env-file host-network.env] -f a -f b ... config`
    (the env file with the host-network overlay, as documented; ``variables``: (name, value) pairs set in
    the environment): the compose binary's own merge when there is one, else a faithful-enough merge for
    our files (mappings merge, lists and scalars replace, except `secrets`/`volumes`/`ports` lists, which
    compose concatenates)."""
    yaml = _yaml()
    binary = _compose_binary() if use_binary else None
    if binary:
        args = [*binary]
        if HOST in files:
            args += ["--env-file", str(DOCKER / "host-network.env")]
        for name in files:
            args += ["-f", str(DOCKER / name)]
        result = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=DOCKER,
                                env=_env(**dict(variables)), timeout=120)
        assert result.returncode == 0, f"`{' '.join(args)} config` failed:\n{result.stderr}{result.stdout}"
        return yaml.safe_load(result.stdout)
    values = dict(env_file_values() if HOST in files else {}, **dict(variables))
    merged: dict = {}
    for name in files:
        merged = _merge(merged, _expand(yaml.safe_load((DOCKER / name).read_text()), values))
    return merged


def _expand(node, values: dict[str, str]):
    """${VAR:-default} / ${VAR-default} -> the value in ``values``, else the default (compose's rules)."""
    def substitute(match: re.Match) -> str:
        name, colon, default = match.group(1), match.group(2), match.group(3) or ""
        value = values.get(name)
        return default if value is None or (colon and value == "") else value

    if isinstance(node, dict):
        return {k: _expand(v, values) for k, v in node.items() if not str(k).startswith("x-")}
    if isinstance(node, list):
        return [_expand(v, values) for v in node]
    if isinstance(node, str):
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)-([^}]*))?\}", substitute, node)
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
    entrypoint = service.get("entrypoint")
    if isinstance(entrypoint, list) and entrypoint and entrypoint[0] == "fedsq-superexec":  # ours, in the image
        return "fedsq-superexec"
    image = str(service.get("image", "")).rsplit("/", 1)[-1]
    for name, command in ENTRYPOINTS.items():
        if image.startswith(name + ":") and not service.get("entrypoint"):
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
               "restart", "secrets", "user", "stop_signal", "deploy", "networks", "network_mode"}
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
    require_system("docker-compose")
    for files in COMBINATIONS:
        by_compose = merged_config(files)["services"]
        by_fallback = merged_config(files, use_binary=False)["services"]
        assert set(by_compose) == set(by_fallback), files
        for name, service in by_compose.items():
            assert [str(a) for a in service.get("command", [])] == \
                   [str(a) for a in by_fallback[name].get("command", [])], (files, name)
            assert service.get("image") == by_fallback[name].get("image"), (files, name)
            assert service.get("network_mode") == by_fallback[name].get("network_mode"), (files, name)
            assert len(service.get("secrets", [])) == len(by_fallback[name].get("secrets", [])), (files, name)
            assert len(service.get("volumes", [])) == len(by_fallback[name].get("volumes", [])), (files, name)


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
        assert not unknown, f"{name}: {command} does not accept {unknown} (flwr {locked_flwr_version()})"
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
def test_dockerfile_flwr_version_matches_the_lock() -> None:
    locked = locked_flwr_version()
    text = (DOCKER / "Dockerfile").read_text()
    default = re.search(r"^ARG FLWR_VERSION=(\S+)", text, re.M)
    assert default, "docker/Dockerfile must declare ARG FLWR_VERSION=<version>"
    assert default.group(1) == locked, f"Dockerfile FLWR_VERSION={default.group(1)}, requirements.lock flwr {locked}"
    # The base is a build argument (offline: a local stand-in) that defaults to the official image.
    assert re.search(r"^ARG BASE_IMAGE=flwr/superexec:\$\{FLWR_VERSION\}$", text, re.M), "BASE_IMAGE default"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), "docker/Dockerfile must build FROM ${BASE_IMAGE}"
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text


def test_dockerfile_installs_exactly_the_lock() -> None:
    """The image's environment is requirements.lock (checked in the build by fedsq_app.lockcheck); the app
    itself goes in with --no-deps, so nothing unpinned can slip in."""
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^COPY .*requirements\.lock ", text, re.M), "Dockerfile does not COPY requirements.lock"
    assert re.search(r"pip install .*-r /tmp/requirements\.txt", text.replace("\\\n", " ")), "no -r install"
    assert re.search(r"pip install .*--no-deps \.", text), "the app must be installed with --no-deps"
    assert "fedsq_app.lockcheck" in text, "the build must check the environment against the lock"
    # The lock's pin of torch must be one the CPU index can satisfy too (same version, local label aside).
    from fedsq_app.lockcheck import read_lock

    pins = read_lock(REPO / "requirements.lock")
    assert "torch" in pins and "torchvision" in pins


def test_standin_images_match_the_official_layout() -> None:
    """docker/flwr-standin.Dockerfile (offline stand-ins): flwr pinned by the lock, user app = uid 49999
    (the compose files chown to it), /app as WORKDIR, one target per official image and entry point."""
    text = (DOCKER / "flwr-standin.Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS flwr$", text, re.M)
    assert "-c /tmp/requirements.lock" in text and '"flwr==${FLWR_VERSION}"' in text
    assert "--uid 49999" in text and re.search(r"^WORKDIR /app$", text, re.M) and re.search(r"^USER app$", text, re.M)
    for target in ("superlink", "supernode", "superexec"):
        assert re.search(rf"^FROM flwr AS {target}\nENTRYPOINT \[\"flower-{target}\"\]$", text, re.M), target


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_flwr_versions_match_the_lock(name: str) -> None:
    locked = locked_flwr_version()
    text = (DOCKER / name).read_text()
    for found in re.findall(r"FLWR_VERSION:-([0-9][^}]*)\}", text):
        assert found == locked, f"{name}: default FLWR_VERSION {found}, requirements.lock flwr {locked}"
    assert not re.search(r"image:\s*flwr/", text), f"{name}: Flower images must use ${{FLWR_IMAGE_PREFIX:-flwr/}}"


def test_official_images_by_default_and_a_prefix_for_others() -> None:
    locked = locked_flwr_version()
    files = ("compose.yml", "with-ports.yml", "with-tls.yml", "with-gpu.yml")
    for prefix, variables in (("flwr/", ()), ("fedsq-offline/", (("FLWR_IMAGE_PREFIX", "fedsq-offline/"),))):
        services = merged_config(files, variables=variables)["services"]
        for role in ("superlink", "supernode-1", "supernode-2"):
            kind = role.split("-")[0]
            assert services[role]["image"] == f"{prefix}{kind}:{locked}", (prefix, role)
        for name in ("superexec-serverapp", "superexec-clientapp-1"):
            assert services[name]["build"]["args"]["BASE_IMAGE"] == f"{prefix}superexec:{locked}", (prefix, name)


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
        # Each silo's ClientApps get their share of the host's cores, not a thread per core each.
        assert str((executor.get("environment") or {}).get("OMP_NUM_THREADS")) == "1", executor.get("environment")
    assert len(partitions) == len(nodes), "every SuperNode needs its own partition/node config"
    assert not [p for s in services.values() for p in s.get("ports", [])], "ports belong in with-ports.yml"
    services = _services(("compose.yml", "with-ports.yml"))
    published = [(name, p) for name, s in services.items() for p in s.get("ports", [])]
    assert len(published) == 1 and published[0][0] == "superlink", f"only the SuperLink is published: {published}"
    port = published[0][1]
    if isinstance(port, dict):  # compose v1 prints the long form
        assert (port["published"], port["target"], port.get("host_ip")) == (8000, 8000, "127.0.0.1"), port
    else:
        assert str(port).removesuffix("/tcp") == "127.0.0.1:8000:8000", port


@pytest.mark.parametrize("files", [c for c in COMBINATIONS if HOST in c], ids=lambda f: "+".join(f))
def test_host_network_overlay_keeps_everything_on_loopback(files: tuple[str, ...]) -> None:
    """With with-host-network.yml + host-network.env: every service on the host's network, nothing
    published, every address a service listens on or dials is 127.0.0.1, resolv.conf points at 127.0.0.1."""
    services = _services(files)
    for name, service in services.items():
        assert service.get("network_mode") == "host", name
        assert not service.get("ports"), name
        mounts = [str(v.get("target") if isinstance(v, dict) else str(v).split(":")[1]) for v in service["volumes"]]
        assert "/etc/resolv.conf" in mounts, f"{name}: no resolv.conf mount"
        command = [str(a) for a in service.get("command", [])]
        for flag in ("--host", "--superlink", "--runtime-api-address"):
            value = _arg(command, flag)
            if value is not None:
                assert value.split(":")[0] == "127.0.0.1", f"{name}: {flag} {value}"
    resolv = (DOCKER / "resolv.conf").read_text()
    assert re.findall(r"^nameserver\s+(\S+)", resolv, re.M) == ["127.0.0.1"], resolv
    ports = [_arg(services[n]["command"], "--port") for n in ("superlink", "supernode-1", "supernode-2")]
    assert len(set(ports)) == 3, f"services sharing the host's stack need distinct ports: {ports}"
    chosen = (("SUPERLINK_PORT", "18000"), ("SUPERNODE_1_PORT", "19094"), ("SUPERNODE_2_PORT", "19095"))
    moved = merged_config(files, variables=chosen)["services"]  # the e2e test picks free ports this way
    assert _arg(moved["superexec-clientapp-2"]["command"], "--runtime-api-address") == "127.0.0.1:19095"
    assert _arg(moved["supernode-1"]["command"], "--superlink") == "127.0.0.1:18000"


def test_silos_run_the_warm_executor() -> None:
    """Each silo's ClientApps run under fedsq-superexec (a fork per message), in every documented combination;
    the ServerApp keeps the image's flower-superexec."""
    for files in COMBINATIONS[:-1]:
        services = _services(files)
        silos = [name for name in services if name.startswith("superexec-clientapp-")]
        assert len(silos) >= 2, files
        for name in silos:
            assert _entrypoint(services[name]) == "fedsq-superexec", (files, name)
        assert _entrypoint(services["superexec-serverapp"]) == "flower-superexec", files


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
    for name in filter(None, needed):
        assert re.search(rf"^COPY .*\b{re.escape(name)}\b", dockerfile, re.M), f"Dockerfile does not COPY {name}"


@pytest.mark.parametrize("dockerfile", ("Dockerfile", "flwr-standin.Dockerfile", "certs.Dockerfile"))
def test_build_context_holds_what_each_dockerfile_copies(dockerfile: str) -> None:
    """Everything a Dockerfile COPYs is let through both ignore files: the root .dockerignore (the legacy
    builder, which compose v1 and scripts/docker_e2e.sh use) and docker/<name>.dockerignore (BuildKit)."""
    sources = []
    for line in (DOCKER / dockerfile).read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += [arg.rstrip("/") for arg in line.split()[1:-1] if not arg.startswith("--")]
    assert sources, dockerfile
    for ignore_file in (REPO / ".dockerignore", DOCKER / f"{dockerfile}.dockerignore"):
        allowed = {line[1:].rstrip("/") for line in ignore_file.read_text().splitlines() if line.startswith("!")}
        assert "**" in ignore_file.read_text().splitlines(), f"{ignore_file.name} must exclude everything else"
        missing = [source for source in sources if source not in allowed]
        assert not missing, f"{ignore_file} keeps {missing} (COPYed by {dockerfile}) out of the build context"


# ---------------------------------------------------------------------------------------------- for real
E2E_TIMEOUT_S = float(os.environ.get("FEDSQ_DOCKER_E2E_TIMEOUT", "2400"))


def engine_forbidden() -> str | None:
    """Why this OS cannot run a Docker engine at all (the only reasons the real test may skip), else None."""
    if os.geteuid() != 0:
        return "not root: dockerd needs root"
    if not re.search(r"\boverlay$", Path("/proc/filesystems").read_text(), re.M):
        return "the kernel has no overlay filesystem (dockerd's overlay2 storage driver needs it)"
    cgroup = Path("/sys/fs/cgroup")
    if not cgroup.is_dir() or not any(cgroup.iterdir()):
        return "no cgroup hierarchy mounted at /sys/fs/cgroup"
    return None


def stop_pid_file(path: Path, grace_s: float = 60.0) -> str | None:
    """SIGTERM the process whose PID ``path`` holds (dockerd stops its containers on SIGTERM), SIGKILL
    after ``grace_s``; returns what was done, or None when there was nothing to stop."""
    try:
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return f"stopped {path.name} {pid}"
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    return f"killed {path.name} {pid} (no exit {grace_s:.0f} s after SIGTERM)"


@pytest.fixture
def docker_work():
    """A short work directory (the engine's sockets live there); afterwards, whatever happened to the
    script, its dockerd and that dockerd's containerd are stopped by PID."""
    work = Path(tempfile.mkdtemp(prefix="fedsq-dkr-", dir="/tmp"))
    yield work
    for pid_file in (work / "dockerd.pid", work / "engine" / "x" / "containerd" / "containerd.pid"):
        done = stop_pid_file(pid_file)
        if done:
            print(f"docker e2e finalizer: {done}")
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{work}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)  # e.g. dockerd's netns bind mount
    shutil.rmtree(work, ignore_errors=True)


def test_compose_demo_runs_for_real(docker_work: Path) -> None:
    """scripts/docker_e2e.sh on a real engine: offline images, compose up with TLS + SuperNode auth on
    127.0.0.1, 2 FedSQ rounds `finished:completed`, results.json copied out of the volume, down -v."""
    reason = engine_forbidden()
    if reason:
        print(f"docker e2e skipped: {reason}")
        pytest.skip(reason)
    require_system("dockerd", "docker-compose", "debootstrap", "curl")
    log = docker_work / "docker_e2e.log"
    env = _env(FEDSQ_DOCKER_WORK=str(docker_work), PYTHON=sys.executable)
    with log.open("w") as out:
        script = subprocess.Popen(["bash", str(REPO / "scripts" / "docker_e2e.sh")], cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = script.wait(timeout=E2E_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGTERM)  # the script's trap brings the demo down, stops dockerd
            code = script.wait(timeout=180)
            pytest.fail(f"scripts/docker_e2e.sh still running after {E2E_TIMEOUT_S:.0f} s:\n{log.read_text()[-6000:]}")
    output = log.read_text()
    assert code == 0, f"scripts/docker_e2e.sh exited {code}:\n{output[-8000:]}"
    out = docker_work / "out"
    assert (out / "status.txt").read_text().strip() == "finished:completed"
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2], rounds
    for record in rounds:
        assert 0.0 <= record["val_accuracy"] <= 1.0, record
        if "accepted" in record:  # both silos trained and were aggregated
            assert record["accepted"] == 2, record
    for i in (1, 2):  # the silos' ClientApps ran in children forked by the warm executor
        forks = (out / f"forks-{i}.txt").read_text().splitlines()
        assert len(forks) >= len(rounds), f"superexec-clientapp-{i}: {forks}"
        print(f"docker e2e superexec-clientapp-{i}: {len(forks)} forks, first: {forks[0].strip()}")
    timings = json.loads((out / "timings.json").read_text())
    print("\ndocker e2e timings (s):", json.dumps(timings))
    print("docker e2e validation accuracy per round:", [round(r["val_accuracy"], 4) for r in rounds])
    print("docker e2e images:", (out / "images.txt").read_text().replace("\n", "; "))
