#!/usr/bin/env bash
# The Docker compose demo for real, offline: its own Docker engine, images built without a registry, the
# demo brought up with TLS + SuperNode authentication, a FedSQ run through it, results copied out, down.
#
#   bash scripts/docker_e2e.sh          # needs root, docker.io, docker-compose (v1), debootstrap, .venv
#
# Steps (docs/DEPLOYMENT.md "Docker compose demo, offline"):
#   1. dockerd with its own data root, exec root and socket; no bridge, no iptables (all traffic on 127.0.0.1)
#   2. wheelhouse: `pip download -r requirements.lock` on the host, served on 127.0.0.1 during the builds
#   3. base image: debootstrap bookworm (python3, venv, openssl, ssh-keygen), `docker import`
#   4. stand-ins for flwr/superlink, flwr/supernode, flwr/superexec (docker/flwr-standin.Dockerfile, flwr
#      pinned by the lock), then the project image (docker/Dockerfile with BASE_IMAGE = the superexec
#      stand-in), then the gen-certs image (docker/certs.Dockerfile)
#   5. certificates and node keys with the demo's own `gen-certs` service (docker/certs.yml)
#   6. compose.yml + with-host-network.yml + with-tls.yml + with-auth.yml up; register the two silos' keys;
#      `flwr run` of ROUNDS FedSQ rounds; `flwr ls` must say finished:completed; results.json copied out;
#      each silo's warm executor (fedsq-superexec) must have forked at least ROUNDS ClientApp tasks
#   7. `down -v`, engine stopped by PID (also on failure: trap)
#
# Cache (FEDSQ_DOCKER_CACHE, default ~/.cache/fedsq-docker), keyed by requirements.lock's sha256: the
# wheelhouse (wheels-<key>/), the base image tarball (base-<key>.tar) and the engine's data root
# (engine/: images and build cache). A repeat run on one machine rebuilds nothing that is unchanged.
# Work files (FEDSQ_DOCKER_WORK, default a new /tmp dir): engine socket/PID/log, certificates, logs,
# results.json and timings.json (the figures docs/DEPLOYMENT.md quotes).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

LOCK="$REPO/requirements.lock"
KEY="$(sha256sum "$LOCK" | cut -c1-16)"
CACHE="${FEDSQ_DOCKER_CACHE:-$HOME/.cache/fedsq-docker}"
WORK="${FEDSQ_DOCKER_WORK:-$(mktemp -d /tmp/fedsq-docker.XXXXXX)}"
ROUNDS="${FEDSQ_DOCKER_ROUNDS:-2}"
# A 1-epoch backbone: this checks the pipeline, not the backbone's quality, and the layer that pretrains
# is rebuilt whenever the app changes (8 epochs took 250 s of a 616 s uncached image build under load).
PREPARE_ARGS="${FEDSQ_DOCKER_PREPARE_ARGS---epochs 1}"
RUN_NAME=docker-e2e
PY="${PYTHON:-$REPO/.venv/bin/python}"
FLWR="$(dirname "$PY")/flwr"
DOCKER="$(command -v /usr/bin/docker || command -v docker)"  # Debian's 20.10 CLI matches the daemon
FLWR_VERSION="$(sed -n 's/^flwr==\([^ ]*\).*/\1/p' "$LOCK")"
[ -n "$FLWR_VERSION" ] || { echo "docker_e2e: no flwr== pin in $LOCK" >&2; exit 1; }
for tool in dockerd docker-compose debootstrap "$DOCKER" "$PY" "$FLWR"; do
  command -v "$tool" >/dev/null || { echo "docker_e2e: $tool not found (apt-get install docker.io docker-compose debootstrap; bash scripts/setup.sh)" >&2; exit 1; }
done

mkdir -p "$CACHE" "$WORK/logs" "$WORK/out"
ENGINE="$WORK/engine"       # exec root, socket, PID file: short path (unix sockets are limited to 108 bytes)
mkdir -p "$ENGINE"
export DOCKER_HOST="unix://$ENGINE/docker.sock" DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
export COMPOSE_PROJECT_NAME=fedsq-e2e COMPOSE_HTTP_TIMEOUT=300
unset PYTHONPATH PYTHONHOME  # Debian's docker-compose runs on the system python
BASE_IMAGE="fedsq-offline/bookworm-py:$KEY"
export FLWR_IMAGE_PREFIX=fedsq-offline/ FLWR_VERSION FEDSQ_IMAGE_TAG=lock

TIMINGS="$WORK/timings.json"
echo "{}" > "$TIMINGS"
now() { date +%s.%N; }
record() {  # record NAME START: seconds since START into timings.json
  "$PY" - "$TIMINGS" "$1" "$2" "$(now)" <<'EOF'
import json, sys
path, name, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
data = json.load(open(path)); data[name] = round(end - start, 1); json.dump(data, open(path, "w"), indent=1)
print(f"docker_e2e: {name} = {data[name]}")
EOF
}
say() { echo "docker_e2e: $*"; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port_free() {  # as http.server binds: SO_REUSEADDR, so a port in TIME_WAIT counts as free
  "$PY" -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}

# One run at a time per cache (the engine's data root lives there).
exec 9>"$CACHE/.lock"
flock -w 1800 9 || { echo "docker_e2e: another run holds $CACHE/.lock" >&2; exit 1; }

DOCKERD_PID="" HTTP_PID="" COMPOSE_UP=0
cleanup() {
  local rc=$?
  set +e
  if [ "$COMPOSE_UP" = 1 ]; then
    say "failure cleanup: compose down -v"
    timeout 120 "${COMPOSE[@]}" down -v --timeout 10 >>"$WORK/logs/compose.log" 2>&1
  fi
  [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    kill -TERM "$DOCKERD_PID"
    for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && { say "dockerd $DOCKERD_PID ignored SIGTERM: SIGKILL"; kill -KILL "$DOCKERD_PID"; }
  fi
  # dockerd leaves the bind mount of its default network namespace behind (exec root /netns/default).
  grep -o " $ENGINE/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l
  if [ "$rc" != 0 ]; then
    say "FAILED (exit $rc); logs in $WORK/logs"
    for log in "$WORK"/logs/*.log; do echo "----- tail of $log"; tail -n 25 "$log"; done
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
T_ALL="$(now)"

# 1. The engine: host and none networks only; stopped by PID in cleanup().
t="$(now)"
echo '{}' > "$ENGINE/daemon.json"
dockerd --config-file "$ENGINE/daemon.json" --data-root "$CACHE/engine" --exec-root "$ENGINE/x" \
  -H "$DOCKER_HOST" -p "$ENGINE/docker.pid" --bridge=none --iptables=false --ip6tables=false \
  --ip-masq=false --userland-proxy=false --storage-driver=overlay2 --log-level=warn \
  >"$WORK/logs/dockerd.log" 2>&1 &
DOCKERD_PID=$!
echo "$DOCKERD_PID" > "$WORK/dockerd.pid"  # for the pytest finalizer, should this script be killed
for _ in $(seq 1 150); do
  "$DOCKER" version >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || { say "dockerd exited:"; tail -n 30 "$WORK/logs/dockerd.log" >&2; exit 1; }
  sleep 0.2
done
"$DOCKER" version >/dev/null 2>&1 || { say "dockerd not answering after 30 s:"; tail -n 30 "$WORK/logs/dockerd.log" >&2; exit 1; }
record engine_start_s "$t"

# 2. Wheelhouse, keyed by the lock; served on 127.0.0.1 only while images build.
WHEELS="$CACHE/wheels-$KEY"
if [ ! -f "$WHEELS/.complete" ]; then
  t="$(now)"
  say "downloading the locked wheels into $WHEELS (pip download; several GB)"
  rm -rf "$WHEELS.tmp"
  nice -n 10 "$PY" -m pip download -q --only-binary=:all: -r "$LOCK" -d "$WHEELS.tmp" \
    >"$WORK/logs/pip-download.log" 2>&1 || { tail -n 30 "$WORK/logs/pip-download.log" >&2; exit 1; }
  rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS" && touch "$WHEELS/.complete"
  record wheelhouse_s "$t"
fi
# A fixed port keeps the image build cache valid between runs (the URL is part of each RUN's cache key).
WHEEL_PORT="${FEDSQ_WHEELHOUSE_PORT:-38471}"
port_free "$WHEEL_PORT" || { WHEEL_PORT="$(free_port)"; say "port 38471 busy: wheelhouse on $WHEEL_PORT (build cache misses)"; }
"$PY" -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$WHEEL_PORT" >"$WORK/logs/wheelhouse.log" 2>&1 &
HTTP_PID=$!
PIP_INSTALL_ARGS="--no-index --find-links http://127.0.0.1:$WHEEL_PORT/"

# 3. Base image: Debian bookworm by debootstrap (the apt mirror), imported; the tarball is cached.
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  TARBALL="$CACHE/base-$KEY.tar"
  if [ ! -f "$TARBALL" ]; then
    t="$(now)"
    say "debootstrap bookworm into $WORK/rootfs"
    nice -n 10 debootstrap --variant=minbase \
      --include=python3,python3-venv,ca-certificates,openssl,openssh-client bookworm "$WORK/rootfs" \
      >"$WORK/logs/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/logs/debootstrap.log" >&2; exit 1; }
    rm -rf "$WORK/rootfs/var/lib/apt/lists/"* "$WORK/rootfs/var/cache/apt/archives/"*.deb
    tar -C "$WORK/rootfs" -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$WORK/rootfs"
    record debootstrap_s "$t"
  fi
  t="$(now)"
  "$DOCKER" import -c 'ENV LANG=C.UTF-8' "$TARBALL" "$BASE_IMAGE" >/dev/null
  record base_import_s "$t"
fi

# 4. Images: host network for every build, wheels from the wheelhouse only. The build context holds
# only what the root .dockerignore lets through, with fixed modes and times, so that the layer cache
# depends on file contents alone (a fresh clone of the same commit hits it too).
CONTEXT="$WORK/context"
rm -rf "$CONTEXT" && mkdir -p "$CONTEXT"
for path in $(sed -n 's|^!\(.*[^/]\)/*$|\1|p' .dockerignore); do
  mkdir -p "$CONTEXT/$(dirname "$path")" && cp -r "$path" "$CONTEXT/$path"
done
cp .dockerignore "$CONTEXT/"
find "$CONTEXT" -name __pycache__ -prune -exec rm -rf {} +
find "$CONTEXT" -type d -exec chmod 755 {} + && find "$CONTEXT" -type f -exec chmod 644 {} +
find "$CONTEXT" -exec touch -h -d @946684800 {} +
build() {  # build LOGNAME docker-build-args...
  local name="$1"; shift
  nice -n 10 "$DOCKER" build --network host "$@" "$CONTEXT" >"$WORK/logs/build-$name.log" 2>&1 ||
    { tail -n 40 "$WORK/logs/build-$name.log" >&2; exit 1; }
}
t="$(now)"
for role in superlink supernode superexec; do
  build "$role" -f docker/flwr-standin.Dockerfile --target "$role" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg FLWR_VERSION="$FLWR_VERSION" --build-arg PIP_INSTALL_ARGS="$PIP_INSTALL_ARGS" \
    -t "${FLWR_IMAGE_PREFIX}$role:$FLWR_VERSION"
done
record standin_images_s "$t"
t="$(now)"
build fedsq-superexec -f docker/Dockerfile --build-arg BASE_IMAGE="${FLWR_IMAGE_PREFIX}superexec:$FLWR_VERSION" \
  --build-arg PIP_INSTALL_ARGS="$PIP_INSTALL_ARGS" --build-arg TORCH_INDEX_URL= \
  --build-arg PREPARE_ARGS="$PREPARE_ARGS" -t "fedsq-superexec:$FEDSQ_IMAGE_TAG"
record project_image_s "$t"
build gen-certs -f docker/certs.Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" -t fedsq-gen-certs:local
kill "$HTTP_PID"; HTTP_PID=""
"$DOCKER" image prune -f >/dev/null  # layers of images this run replaced
for old in $("$DOCKER" images --format '{{.Repository}}:{{.Tag}}' fedsq-offline/bookworm-py); do
  [ "$old" = "$BASE_IMAGE" ] || "$DOCKER" rmi "$old" >/dev/null
done
"$DOCKER" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' > "$WORK/out/images.txt"

# 5. Certificates and node keys, made the way the demo makes them (gen-certs service, no network).
export FEDSQ_CERTS_DIR="$WORK/certs" FEDSQ_KEYS_DIR="$WORK/keys"
mkdir -p "$FEDSQ_CERTS_DIR" "$FEDSQ_KEYS_DIR"
docker-compose -f docker/certs.yml run --rm gen-certs >"$WORK/logs/gen-certs.log" 2>&1 ||
  { tail -n 30 "$WORK/logs/gen-certs.log" >&2; exit 1; }

# 6. The demo on host networking: every address on 127.0.0.1, ports picked free.
read -r SUPERLINK_PORT SUPERNODE_1_PORT SUPERNODE_2_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export SUPERLINK_PORT SUPERNODE_1_PORT SUPERNODE_2_PORT
COMPOSE=(docker-compose --env-file "$REPO/docker/host-network.env" -f docker/compose.yml
         -f docker/with-host-network.yml -f docker/with-tls.yml -f docker/with-auth.yml)
# The SuperLink side first, so that the silos' keys are registered before their SuperNodes start (an
# unregistered SuperNode exits and is restarted with a growing back-off).
t="$(now)"
COMPOSE_UP=1
"${COMPOSE[@]}" up -d --no-build superlink superexec-serverapp >"$WORK/logs/compose.log" 2>&1 ||
  { tail -n 30 "$WORK/logs/compose.log" >&2; exit 1; }
record compose_up_superlink_s "$t"

export FLWR_HOME="$WORK/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 NO_COLOR=1 COLUMNS=250
mkdir -p "$FLWR_HOME"
CONN=fedsq-docker-e2e
printf '[superlink]\ndefault = "%s"\n\n[superlink.%s]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s"\n' \
  "$CONN" "$CONN" "$SUPERLINK_PORT" "$FEDSQ_CERTS_DIR/ca.crt" > "$FLWR_HOME/config.toml"
t="$(now)"
for _ in $(seq 1 120); do
  curl -sf --cacert "$FEDSQ_CERTS_DIR/ca.crt" "https://127.0.0.1:$SUPERLINK_PORT/health" >/dev/null && break
  sleep 0.5
done
curl -sf --cacert "$FEDSQ_CERTS_DIR/ca.crt" "https://127.0.0.1:$SUPERLINK_PORT/health" >/dev/null ||
  { "${COMPOSE[@]}" logs --no-color superlink | tail -n 30 >&2; say "SuperLink not healthy after 60 s"; exit 1; }
record superlink_healthy_s "$t"
FLWR="$FLWR" bash deploy/register-node-keys.sh "$CONN" "$FEDSQ_KEYS_DIR/silo-1.pub" "$FEDSQ_KEYS_DIR/silo-2.pub" \
  | tee "$WORK/logs/register.log"
t="$(now)"
"${COMPOSE[@]}" up -d --no-build >>"$WORK/logs/compose.log" 2>&1 || { tail -n 30 "$WORK/logs/compose.log" >&2; exit 1; }
record compose_up_silos_s "$t"
t="$(now)"
nodes_online() {
  "$FLWR" supernode list "$CONN" --format json 2>/dev/null | "$PY" -c '
import json, sys
text = sys.stdin.read(); nodes = json.loads(text[text.index("{"):])["nodes"]
sys.exit(0 if sum(n["status"] == "online" for n in nodes) >= 2 else 1)'
}
for _ in $(seq 1 90); do nodes_online && break; sleep 2; done
nodes_online || { "${COMPOSE[@]}" logs --no-color supernode-1 supernode-2 | tail -n 40 >&2; say "SuperNodes not online after 180 s"; exit 1; }
record supernodes_online_s "$t"

t="$(now)"
# 1,000 training samples across the two silos (as tests/test_deployment.py): the demo's code path at a
# cost that fits a test; FEDSQ_DOCKER_RUN_CONFIG="max-train-samples=0" trains on everything.
# Two silos: the two-silo mode (docs/RELIABILITY.md).
OVERRIDES="num-server-rounds=$ROUNDS out-dir='/app/outputs' run-name='$RUN_NAME' device='cpu' max-train-samples=1000 min-valid-replies=2"
OVERRIDES="$OVERRIDES ${FEDSQ_DOCKER_RUN_CONFIG:-}"
"$FLWR" run . "$CONN" --run-config "$OVERRIDES" --format json >"$WORK/logs/flwr-run.json" 2>"$WORK/logs/flwr-run.log" ||
  { cat "$WORK/logs/flwr-run.json" "$WORK/logs/flwr-run.log" >&2; exit 1; }
RUN_ID="$("$PY" -c 'import json,sys; t=open(sys.argv[1]).read(); print(json.loads(t[t.index("{"):])["run-id"])' "$WORK/logs/flwr-run.json")"
say "run $RUN_ID started: $OVERRIDES"
# `flwr log --stream` returns when the run ends (and exits 0 even for a failed run: the status decides).
timeout "${FEDSQ_DOCKER_RUN_TIMEOUT:-900}" "$FLWR" log "$RUN_ID" "$CONN" --stream >"$WORK/logs/run.log" 2>&1 || true
STATUS=""
for _ in $(seq 1 20); do
  STATUS="$("$FLWR" ls --run-id "$RUN_ID" "$CONN" --format json 2>/dev/null | "$PY" -c '
import json, sys
text = sys.stdin.read(); print(json.loads(text[text.index("{"):])["runs"][0]["status"])' || true)"
  case "$STATUS" in finished:*) break ;; esac
  sleep 3
done
record flwr_run_s "$t"
echo "$STATUS" > "$WORK/out/status.txt"
[ "$STATUS" = "finished:completed" ] || { tail -n 40 "$WORK/logs/run.log" >&2; say "run $RUN_ID status '$STATUS'"; exit 1; }
"$DOCKER" cp "$("${COMPOSE[@]}" ps -q superexec-serverapp):/app/outputs/$RUN_NAME/results.json" "$WORK/out/results.json"
"${COMPOSE[@]}" logs --no-color >"$WORK/logs/containers.log" 2>&1 || true
# Each silo's ClientApps ran in children forked by the warm executor (compose.yml's entrypoint
# fedsq-superexec), at least one per round, not in new flwr-clientapp processes.
for i in 1 2; do
  "${COMPOSE[@]}" logs --no-color "superexec-clientapp-$i" 2>&1 |
    sed 's/\x1b\[[0-9;]*m//g' | grep -E "warm executor: task [0-9]+ starts in child [0-9]+" >"$WORK/out/forks-$i.txt" || true
  forks="$(wc -l <"$WORK/out/forks-$i.txt")"
  say "superexec-clientapp-$i: $forks ClientApp tasks forked by the warm executor"
  [ "$forks" -ge "$ROUNDS" ] || { "${COMPOSE[@]}" logs --no-color "superexec-clientapp-$i" | tail -n 40 >&2
    say "superexec-clientapp-$i forked $forks tasks, expected at least $ROUNDS"; exit 1; }
done

# 7. Down, volumes included; the engine stops in cleanup().
t="$(now)"
"${COMPOSE[@]}" down -v --timeout 20 >>"$WORK/logs/compose.log" 2>&1
COMPOSE_UP=0
record compose_down_s "$t"
record total_s "$T_ALL"
"$PY" - "$WORK/out/results.json" <<'EOF'
import json, sys
rounds = json.load(open(sys.argv[1]))["rounds"]
print("docker_e2e: validation accuracy per round:", ", ".join(f"{r['round']}: {r['val_accuracy']:.4f}" for r in rounds))
EOF
cp "$TIMINGS" "$WORK/out/timings.json"
say "finished:completed; results in $WORK/out (results.json, timings.json, images.txt)"
