#!/usr/bin/env bash
# Build the workmem image and smoke-test it for real, on a machine with no container
# registry (Docker Hub unreachable; PyPI and Debian reachable, HTTPS possibly re-signed by
# a local CA). Needs root. Called by .ci/run after the tests; runs on its own too:
#   sudo SMOKE_CMD='.venv/bin/python .ci/smoke_chat.py' bash .ci/docker-smoke.sh
#
# 1. docker.io + debootstrap (apt), dockerd started here if none is running (and stopped after)
# 2. stand-in `python:3.11-slim` (debootstrap bookworm + Debian's python3.11) unless one
#    exists. It carries no local CA, like the real one. A separate builder image adds the
#    host's CA bundle for the install stages only (build-arg BUILDER_IMAGE).
# 3. local wheels (the host pip's find-links, e.g. the CPU torch wheel) served on loopback
#    to the build (build-arg PIP_FIND_LINKS)
# 4. docker build, then checks on the image: non-root USER, no host CA anywhere in its
#    layers, the default model answers offline (--network none)
#    and carries no C compiler
# 5. docker run on a loopback port: /health answers, HEALTHCHECK turns healthy, uid != 0,
#    the log names the native kernel variant the server chose (and /version reports it),
#    then SMOKE_CMD runs with URL=http://127.0.0.1:PORT exported
#
# env: IMAGE (tag, default workmem:ci), DOCKERFILE (default Dockerfile), WORK (scratch dir),
#      WHEELS (folder of local wheels), WHEEL_PORT, BUILD_FLAGS (extra `docker build` flags,
#      e.g. --no-cache), READY_TIMEOUT_S, SMOKE_CMD, KEEP_DOCKERD=1 (leave a dockerd we started),
#      EXPECT_NATIVE_KERNELS=0 (an image without prebuilt kernels, e.g. Dockerfile.cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-workmem:ci}
DOCKERFILE=${DOCKERFILE:-Dockerfile}
APP_PORT=8000
READY_TIMEOUT_S=${READY_TIMEOUT_S:-180}
WORK=${WORK:-$(mktemp -d)}
NAME=workmem-smoke-$$
BUILDER_CA_IMAGE=workmem-ci/python:3.11-slim-ca
mkdir -p "$WORK"
export DOCKER_BUILDKIT=0          # the docker CLI here has no buildx: classic builder
t0=$(date +%s.%N)
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
step() { echo "[docker-smoke $(secs "$t0" "$(now)")s] $*"; }
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
fail() { echo "docker-smoke: FAILED: $*" >&2; exit 1; }

DOCKERD_PID= WHEEL_PID=
cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  if [ -n "$WHEEL_PID" ]; then kill "$WHEEL_PID" 2>/dev/null || true; fi
  if [ -n "$DOCKERD_PID" ] && [ -z "${KEEP_DOCKERD:-}" ]; then
    kill "$DOCKERD_PID" 2>/dev/null || true; wait "$DOCKERD_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# 1. engine: Debian's docker.io (dockerd + containerd + runc), overlay2, default bridge
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  step "apt-get install docker.io debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  step "starting dockerd"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; fail "dockerd did not start"; }
fi

# 2. base images without a registry
if ! docker image inspect python:3.11-slim >/dev/null 2>&1; then
  if ! docker image inspect workmem-ci/bookworm >/dev/null 2>&1; then
    step "debootstrap bookworm -> workmem-ci/bookworm"
    MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    R=$WORK/rootfs; rm -rf "$R"
    debootstrap --variant=minbase bookworm "$R" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$R"/var/cache/apt/*.bin "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*
    tar -C "$R" -c . | docker import \
      -c "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" -c "ENV LANG=C.UTF-8" \
      -c 'CMD ["/bin/bash"]' - workmem-ci/bookworm >/dev/null
    rm -rf "$R"
  fi
  # Debian's python 3.11 with `python`/`pip` on PATH; apt over plain HTTP needs no CA
  step "building stand-in python:3.11-slim"
  printf '%s\n' 'FROM workmem-ci/bookworm' \
    'RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python-is-python3 ca-certificates && rm -rf /var/lib/apt/lists/* /usr/lib/python3*/EXTERNALLY-MANAGED && ln -sf /usr/bin/pip3 /usr/local/bin/pip' \
    'LABEL org.workmem.ci-stand-in=1' 'CMD ["python3"]' \
    | docker build -q -t python:3.11-slim - >/dev/null
fi
# The host's extra CAs (HTTPS egress re-signed locally): the install stages need them, the
# image must not carry them. They go into a builder image derived from the base.
HOST_CAS=(/usr/local/share/ca-certificates/*.crt)
[ -e "${HOST_CAS[0]}" ] || HOST_CAS=()
BUILD_ARGS=()
if [ ${#HOST_CAS[@]} -gt 0 ]; then
  if ! docker image inspect "$BUILDER_CA_IMAGE" >/dev/null 2>&1; then
    step "builder image $BUILDER_CA_IMAGE (python:3.11-slim + the host's CA bundle)"
    mkdir -p "$WORK/ca" && cp /etc/ssl/certs/ca-certificates.crt "$WORK/ca/host-ca-bundle.crt"
    CA=/etc/ssl/certs/host-ca-bundle.crt
    printf '%s\n' 'FROM python:3.11-slim' "COPY host-ca-bundle.crt $CA" \
      "ENV SSL_CERT_FILE=$CA REQUESTS_CA_BUNDLE=$CA PIP_CERT=$CA" \
      | docker build -q -t "$BUILDER_CA_IMAGE" -f - "$WORK/ca" >/dev/null
  fi
  BUILD_ARGS+=(--build-arg BUILDER_IMAGE="$BUILDER_CA_IMAGE")
fi

# 3. local wheels on loopback. Fixed port: the build-arg is part of the build cache key.
WHEELS=${WHEELS:-${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}}
WHEEL_PORT=${WHEEL_PORT:-18999}
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
  python3 -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$WHEELS" >"$WORK/wheels.log" 2>&1 &
  WHEEL_PID=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$WHEEL_PORT/" >/dev/null && break; sleep 0.2; done
  # the wheels replace the PyTorch CPU index (unreachable here)
  BUILD_ARGS+=(--build-arg PIP_FIND_LINKS="http://127.0.0.1:$WHEEL_PORT/" --build-arg PIP_EXTRA_INDEX_URL=)
  step "offering $(ls "$WHEELS" | wc -l) local wheel(s) from $WHEELS"
fi

# 4. build (host network: RUN steps reach PyPI like the host, and the loopback wheel server)
step "docker build -f $DOCKERFILE -> $IMAGE"
b0=$(now)
# shellcheck disable=SC2086
docker build --network=host ${BUILD_FLAGS:-} "${BUILD_ARGS[@]}" -f "$DOCKERFILE" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; fail "docker build"; }
BUILD_S=$(secs "$b0" "$(now)")
grep -E '^(Step |torch )' "$WORK/build.log" | sed 's/^/  /'
docker image ls "$IMAGE"
SIZE=$(docker image ls --format '{{.Size}}' "$IMAGE" | head -1)
step "built in ${BUILD_S}s, image size $SIZE"

USER_CFG=$(docker image inspect --format '{{.Config.User}}' "$IMAGE")
case "$USER_CFG" in ""|root|0|0:*) fail "image USER is '${USER_CFG:-root}'";; esac
if docker image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | grep -E '^(SSL_CERT_FILE|PIP_CERT|REQUESTS_CA_BUNDLE)='; then
  fail "the image's environment points at a build-time CA bundle"
fi
# Every layer, not just the final filesystem: no PEM line of the host's extra CAs.
PATTERNS=()
for crt in "${HOST_CAS[@]}"; do
  line=$(grep -v -- '-----' "$crt" | sed -n 3p)
  [ -z "$line" ] || PATTERNS+=(-e "$line")
done
if [ ${#PATTERNS[@]} -gt 0 ]; then
  n=$(docker save "$IMAGE" | grep -a -c -F "${PATTERNS[@]}" || true)   # -c reads it all: no SIGPIPE
  [ "${n:-0}" = 0 ] || fail "the image contains a host CA from /usr/local/share/ca-certificates (a stale stand-in base? docker rmi python:3.11-slim)"
fi
if docker run --rm --entrypoint sh "$IMAGE" -c 'command -v cc || command -v gcc' ; then
  fail "the runtime image carries a C compiler"
fi
step "image checks OK (USER $USER_CFG, none of ${#HOST_CAS[@]} host CA(s) inside, no C compiler)"

# The default model is inside the image: it answers with no network at all.
docker run --rm --network none --entrypoint workmem "$IMAGE" \
  generate --chat --max-tokens 16 --max-model-len 1024 --kv-cache-memory 67108864 "What is 2+2?" >"$WORK/offline.log" 2>&1 \
  || { cat "$WORK/offline.log"; fail "offline generate (--network none)"; }
sed 's/^/  /' "$WORK/offline.log"
step "offline generate OK (--network none)"

# 5. run: published on loopback only; /health, HEALTHCHECK, uid, then SMOKE_CMD
HOST_PORT=$(free_port)
step "docker run $IMAGE on 127.0.0.1:$HOST_PORT"
r0=$(now)
docker run -d --name "$NAME" -p "127.0.0.1:$HOST_PORT:$APP_PORT" "$IMAGE" >/dev/null
READY_S= HEALTHY_S=
deadline=$(( $(date +%s) + READY_TIMEOUT_S ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  if [ -z "$READY_S" ] && curl -sf "http://127.0.0.1:$HOST_PORT/health" >/dev/null; then
    READY_S=$(secs "$r0" "$(now)")
  fi
  if [ "$(docker inspect --format '{{.State.Health.Status}}' "$NAME")" = healthy ]; then
    HEALTHY_S=$(secs "$r0" "$(now)"); break
  fi
  [ "$(docker inspect --format '{{.State.Running}}' "$NAME")" = true ] || break
  sleep 0.2
done
[ -n "$HEALTHY_S" ] || { docker logs "$NAME" 2>&1 | tail -30; fail "container never became healthy"; }
echo "  /health: $(curl -sf "http://127.0.0.1:$HOST_PORT/health")"
UID_IN=$(docker exec "$NAME" id -u)
[ "$UID_IN" != 0 ] || fail "container runs as root"
step "container up: /health 200 after ${READY_S:-?}s, HEALTHCHECK healthy after ${HEALTHY_S}s, uid $UID_IN"
if [ "${EXPECT_NATIVE_KERNELS:-1}" = 1 ]; then
  KERNELS_LOG=$(docker logs "$NAME" 2>&1 | grep -m1 -E 'native CPU kernels: variant [a-z0-9_]+' || true)
  [ -n "$KERNELS_LOG" ] || { docker logs "$NAME" 2>&1 | tail -30; fail "the log names no native kernel variant (torch fallback?)"; }
  echo "  ${KERNELS_LOG#* INFO }"
  echo "  /version: $(curl -sf "http://127.0.0.1:$HOST_PORT/version")"
  step "native kernels in use"
fi
if [ -n "${SMOKE_CMD:-}" ]; then
  step "SMOKE_CMD: $SMOKE_CMD"
  URL="http://127.0.0.1:$HOST_PORT" bash -c "$SMOKE_CMD" || { docker logs "$NAME" 2>&1 | tail -30; fail "SMOKE_CMD"; }
fi
echo "docker-smoke: OK image=$IMAGE size=$SIZE build=${BUILD_S}s ready=${READY_S:-?}s healthy=${HEALTHY_S}s total=$(secs "$t0" "$(now)")s"
