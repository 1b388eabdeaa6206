#!/usr/bin/env bash
# make image-check: the deployment checked for real, with docker or podman (whichever runs here).
#
#  1. base    python:3.11-slim from the local store, else from the registry, else (no registry,
#             as on an offline or Docker-less build host) a stand-in: Debian bookworm with
#             python3.11, debootstrapped, carrying this host's CA bundle (a TLS-inspecting proxy
#             must be trusted by the build's downloads), imported under that name.
#  2. build   the default image (GPU and CPU hosts) and the DEVICE=cpu image, from a staged copy
#             of the working tree (git's tracked and unignored files), then once more after a
#             code-only change to time the cached rebuild.
#  3. run     each image with a key on a loopback port: user 10001, /readyz, the image's own
#             HEALTHCHECK, 401 without a key, 200 for one upload.
#  3c offline the CPU image saved to a file and loaded where no image was ever pulled (podman: an
#             empty image store of its own; docker: the tag removed and loaded back), then run.
#  3d rootless (IMAGE_CHECK_ROOTLESS_USER=<user>, podman run as root only): the CPU image loaded
#             into that user's own store and run as the README says (folders handed over with
#             `podman unshare chown`, a port >= 1024): ready, a job with its results and
#             quarantine on the host, the container killed and brought back, the job still there.
#  4. compose the cpu profile on a small job, the container killed (SIGKILL) mid-job and brought
#             back with `up`: the job finishes with every file once (no lost, no duplicate row).
#
# It removes what it started (containers, the compose project's volume and network, the
# rebuild's image) by id or by its own project name, on success and on failure; it keeps the
# base and the two tagged images (IMAGE_CHECK_RMI=1 removes those it built too).
# Settings (environment): IMAGE_CHECK_ENGINE=docker|podman, IMAGE_CHECK_NO_CACHE=1 (time a full
# build), IMAGE_CHECK_JOB_FILES (default 240), IMAGE_CHECK_PORT (default 18000; 18001 for compose).
# podman needs podman-compose >= 1.1 (--profile); without it on PATH one is installed from PyPI
# into .cache/image-check/compose-venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
WORK=${IMAGE_CHECK_DIR:-$REPO/.cache/image-check}
TAG=${IMAGE_CHECK_TAG:-cervixqc:image-check}
TAG_CPU=$TAG-cpu
PORT=${IMAGE_CHECK_PORT:-18000}
COMPOSE_PORT=$((PORT + 1))
PROJECT=cervixqc-image-check
JOB_FILES=${IMAGE_CHECK_JOB_FILES:-240}
KEY=image-check-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
BASE=python:3.11-slim

T0=$(date +%s)
declare -a SUMMARY=() CONTAINERS=() IMAGES_TO_REMOVE=()
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
say() { printf '[%4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
record() { SUMMARY+=("$*"); say "$*"; }
fail() { say "FAIL: $*"; exit 1; }
jfield() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

# --- the engine --------------------------------------------------------------------------------
ENGINE=${IMAGE_CHECK_ENGINE:-}
if [ -z "$ENGINE" ]; then
    if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v podman >/dev/null; then ENGINE=podman
    else fail "neither a running Docker engine nor podman (Debian/Ubuntu: apt install podman; RHEL: dnf install podman)"; fi
fi
# one that does not answer (IMAGE_CHECK_ENGINE=docker without its daemon) failed later, at the
# disk check, as "df: ''$'\n''/var/lib': No such file or directory" (an audit)
timeout 60 "$ENGINE" info >/dev/null 2>&1 || fail "$ENGINE is installed but does not answer ('$ENGINE info' failed: \
is its daemon running, and may this user use it?)"
mkdir -p "$WORK"  # after the refusals above: one left an empty folder behind
BUILD_FLAGS=()
if [ "$ENGINE" = podman ]; then
    BUILD_FLAGS=(--format docker --layers)  # podman's default OCI format drops HEALTHCHECK
    if [ -z "${CONTAINERS_CONF:-}" ]; then
        # What this host needs beyond podman's defaults, in a private containers.conf (the host's
        # own /etc/containers is left alone): runc where cgroups v1 and v2 are mixed (crun refuses),
        # and ulimits no higher than this process's hard limits (raising them needs CAP_SYS_RESOURCE).
        conf=()
        if [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ] && command -v runc >/dev/null; then
            conf+=("[engine]" 'runtime = "runc"')
        fi
        nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
        if [ "$nofile" != unlimited ] && [ "$nofile" -lt 1048576 ] || { [ "$nproc" != unlimited ] && [ "$nproc" -lt 4194304 ]; }; then
            { [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ]; } && nproc=4096
            [ "$nofile" = unlimited ] && nofile=1048576
            conf=("[containers]" "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]" "${conf[@]}")
            BUILD_FLAGS+=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")  # RUN steps too
        fi
        if [ ${#conf[@]} -gt 0 ]; then
            printf '%s\n' "${conf[@]}" > "$WORK/containers.conf"
            export CONTAINERS_CONF=$WORK/containers.conf
            say "podman: private $CONTAINERS_CONF: $(grep -v '^\[' "$CONTAINERS_CONF" | tr '\n' ' ')"
        fi
    fi
    if [ "$(id -u)" != 0 ]; then ROOTLESS=1; else ROOTLESS=0; fi
fi
# podman without systemd cannot schedule HEALTHCHECK timers and says so on every run; the check
# runs the healthcheck itself (podman healthcheck run), so that one message is filtered out
E() { "$ENGINE" "$@" 2> >(grep -v 'systemd connection' >&2); }
record "engine: $ENGINE $(E --version | head -1 | sed 's/^.*version //I')${ROOTLESS:+ (rootless=$ROOTLESS)}"

cleanup() {
    local rc=$?
    set +e
    if [ -n "${COMPOSE_CMD:-}" ] && [ -f "$WORK/compose/docker-compose.yml" ]; then
        (cd "$WORK/compose" && compose down -v >/dev/null 2>&1)
    fi
    for c in "${CONTAINERS[@]}"; do E rm -f "$c" >/dev/null 2>&1; done
    for i in "${IMAGES_TO_REMOVE[@]}"; do E rmi -f "$i" >/dev/null 2>&1; done
    [ -n "${ROOTLESS_CLEANUP:-}" ] && eval "$ROOTLESS_CLEANUP"
    if [ -n "${OFFLINE_STORE:-}" ]; then
        podman --root "$OFFLINE_STORE/root" --runroot "$OFFLINE_STORE/run" rm -af >/dev/null 2>&1
        podman --root "$OFFLINE_STORE/root" --runroot "$OFFLINE_STORE/run" rmi -af >/dev/null 2>&1
        rm -rf "$OFFLINE_STORE" "$WORK/offline.tar"
    fi
    if [ "$rc" = 0 ]; then
        echo; echo "image-check: all checks passed in $(($(date +%s) - T0)) s"
        printf '  %s\n' "${SUMMARY[@]}"
    else
        echo "image-check: FAILED (exit $rc) after $(($(date +%s) - T0)) s; what was started is removed"
    fi
}
trap cleanup EXIT

# --- 0. room on disk: each build leaves its build stage (~12 GB as listed, mostly shared) as the
# layer cache the next run reuses; a full disk fails mid-build with a less helpful message. 40 GB:
# two runs with 27-28 GB free failed when a new uv.lock rebuilt the dependency layer
STORE=$(E info -f '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib)
FREE_GB=$(df -Pk "$STORE" "${TMPDIR:-/var/tmp}" | awk 'NR>1 {print int($4/1048576)}' | sort -n | head -1)
[ "$FREE_GB" -ge "${IMAGE_CHECK_MIN_FREE_GB:-40}" ] || fail "only $FREE_GB GB free for $STORE and ${TMPDIR:-/var/tmp} \
(need ${IMAGE_CHECK_MIN_FREE_GB:-40}): '$ENGINE images -f dangling=true' lists old build caches; '$ENGINE image prune' removes them (all of this host's)"
record "disk: $FREE_GB GB free"

# --- 1. the base image -------------------------------------------------------------------------
image_exists() { E image inspect "$1" >/dev/null 2>&1; }
if image_exists "$BASE" || image_exists "docker.io/library/$BASE"; then
    say "base: $BASE present$(E image inspect -f '{{index .Config.Labels "org.cervixqc.stand-in"}}' "docker.io/library/$BASE" 2>/dev/null | sed 's/^./ (stand-in: &/;s/.$/&)/')"
elif timeout 120 "$ENGINE" pull "docker.io/library/$BASE" >/dev/null 2>&1; then
    say "base: $BASE pulled from the registry"
else
    say "base: no $BASE and no registry: building a stand-in (debootstrap, Debian bookworm, python3.11)"
    command -v debootstrap >/dev/null || fail "debootstrap is needed for the stand-in base (apt install debootstrap)"
    [ "$(id -u)" = 0 ] || fail "the stand-in base is built as root (debootstrap); or load $BASE: docker save | docker load"
    t=$(date +%s)
    rootfs=$WORK/base-rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils,python-is-python3,ca-certificates \
        bookworm "$rootfs" "${IMAGE_CHECK_DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$WORK/debootstrap.log" 2>&1 \
        || fail "debootstrap failed, see $WORK/debootstrap.log"
    # this host's CAs (a site's TLS-inspecting proxy) join the base's trust store
    mkdir -p "$rootfs/usr/local/share/ca-certificates/host"
    awk -v dir="$rootfs/usr/local/share/ca-certificates/host" \
        '/BEGIN CERT/{n++; f=sprintf("%s/host-%04d.crt", dir, n)} f{print > f} /END CERT/{close(f); f=""}' \
        /etc/ssl/certs/ca-certificates.crt
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || fail "update-ca-certificates in the stand-in"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | E import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change "LABEL org.cervixqc.stand-in=debootstrap-bookworm-$(date +%F)" \
        --change 'CMD ["python3"]' - "docker.io/library/$BASE" >/dev/null
    rm -rf "$rootfs"
    record "base: stand-in docker.io/library/$BASE built in $(($(date +%s) - t)) s, $(E image inspect -f '{{.Size}}' "docker.io/library/$BASE" | awk '{printf "%.0f MB", $1/1e6}')"
fi

# --- 2. build ----------------------------------------------------------------------------------
CTX=$WORK/context
rm -rf "$CTX" && mkdir -p "$CTX"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar -c --null -T - | tar -x -C "$CTX"
build() {  # tag, extra args...
    local tag=$1; shift
    E build "${BUILD_FLAGS[@]}" "$@" -t "$tag" "$CTX" > "$WORK/build-${tag//[:\/]/_}.log" 2>&1 \
        || { tail -30 "$WORK/build-${tag//[:\/]/_}.log"; fail "build of $tag, log: $WORK/build-${tag//[:\/]/_}.log"; }
}
size_of() { E image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1/1e9}'; }
NOCACHE=()
[ "${IMAGE_CHECK_NO_CACHE:-0}" = 1 ] && NOCACHE=(--no-cache)
t=$(date +%s); build "$TAG" "${NOCACHE[@]}"
record "build $TAG (GPU+CPU)${NOCACHE:+ full, --no-cache}: $(($(date +%s) - t)) s, image $(size_of "$TAG")"
t=$(date +%s); build "$TAG_CPU" --build-arg DEVICE=cpu
record "build $TAG_CPU (DEVICE=cpu, dependency layer shared): $(($(date +%s) - t)) s, image $(size_of "$TAG_CPU")"
for tag in "$TAG" "$TAG_CPU"; do
    record "  $tag: /app/.venv $(E run --rm --entrypoint du "$tag" -sh /app/.venv | cut -f1), nvidia/ $(E run --rm --entrypoint sh "$tag" -c 'du -sh /app/.venv/lib/python3.11/site-packages/nvidia | cut -f1'), triton $(E run --rm --entrypoint sh "$tag" -c 'd=/app/.venv/lib/python3.11/site-packages/triton; [ -d $d ] && du -sh $d | cut -f1 || echo none')"
done
echo "# image-check: a code-only change, $(date)" >> "$CTX/service/__init__.py"
t=$(date +%s); build "$TAG-rebuild"
IMAGES_TO_REMOVE+=("$(E image inspect -f '{{.Id}}' "$TAG-rebuild")")
record "cached rebuild after a code-only change (service/__init__.py): $(($(date +%s) - t)) s"
if [ "${IMAGE_CHECK_RMI:-0}" = 1 ]; then
    IMAGES_TO_REMOVE+=("$(E image inspect -f '{{.Id}}' "$TAG")" "$(E image inspect -f '{{.Id}}' "$TAG_CPU")")
fi

# --- 3. run each image -------------------------------------------------------------------------
DATA=$WORK/data
rm -rf "$DATA" && mkdir -p "$DATA/batch"
# test images made by the image's own Python (PIL comes with torchvision): no host packages needed
E run --rm --user 0 --entrypoint python -v "$DATA:/out" "$TAG" -c "
import numpy as np; from PIL import Image
rng = np.random.default_rng(17)
for i in range($JOB_FILES):
    Image.fromarray((rng.random((240, 320, 3)) * 255).astype('uint8')).save(f'/out/batch/img{i:04d}.jpg', quality=80)
" || fail "making test images"
chmod -R a+rX "$DATA"

wait_ready() {  # url, seconds
    local end=$(($(date +%s) + $2))
    while [ "$(date +%s)" -lt "$end" ]; do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$1/readyz")" = 200 ] && return 0
        sleep 0.5
    done
    return 1
}
check_image() {  # tag
    local tag=$1 url=http://127.0.0.1:$PORT cid t code health
    t=$(date +%s.%N)
    cid=$(E run -d -p "127.0.0.1:$PORT:8000" -e CERVIXQC_API_KEYS="$KEY" "$tag")
    CONTAINERS+=("$cid")
    wait_ready "$url" 180 || { E logs "$cid" | tail -20; fail "$tag: /readyz not 200 within 180 s"; }
    record "run $tag: ready (/readyz 200) $(since "$t") s after start"
    [ "$(E exec "$cid" id -u):$(E exec "$cid" id -g)" = 10001:10001 ] || fail "$tag: not running as uid:gid 10001:10001"
    health=$(E image inspect -f '{{json .Config.Healthcheck.Test}}' "$tag")
    [ -n "$health" ] && [ "$health" != null ] || fail "$tag: the image has no HEALTHCHECK (podman: build with --format docker)"
    if [ "$ENGINE" = podman ]; then E healthcheck run "$cid" >/dev/null || fail "$tag: HEALTHCHECK failed"
    else E exec "$cid" sh -c "$(echo "$health" | python3 -c 'import json,sys,shlex; t=json.load(sys.stdin); print(shlex.join(t[1:]) if t[0]=="CMD" else t[1])')" \
        || fail "$tag: HEALTHCHECK command failed"; fi
    code=$(curl -s -o /dev/null -w '%{http_code}' -F "files=@$DATA/batch/img0000.jpg" "$url/v1/qc")
    [ "$code" = 401 ] || fail "$tag: upload without a key gave $code, not 401"
    code=$(curl -s -o "$WORK/upload.json" -w '%{http_code}' -H "X-API-Key: $KEY" \
        -F "files=@$DATA/batch/img0000.jpg" -F "files=@$DATA/batch/img0001.jpg" "$url/v1/qc")
    [ "$code" = 200 ] || { cat "$WORK/upload.json"; fail "$tag: upload gave $code"; }
    record "  $tag: uid:gid 10001:10001, HEALTHCHECK passes, 401 without a key, upload of 2 images 200 ($(head -c 160 "$WORK/upload.json")...)"
    E rm -f "$cid" >/dev/null
}
check_image "$TAG"
check_image "$TAG_CPU"

# --- 3b. new weights without rebuilding: a mounted folder, the cards checked at start ----------
check_mounted_weights() {  # tag
    local tag=$1 url=http://127.0.0.1:$PORT cid t mounted=$WORK/weights-mount broken=$WORK/weights-broken
    rm -rf "$mounted" "$broken" && mkdir -p "$mounted"
    cp "$REPO"/weights/*.json "$REPO"/weights/*.safetensors "$REPO"/weights/*.openvino.* "$mounted"/
    cp -r "$mounted" "$broken"
    python3 - "$broken/deep_sad.json" <<'PY'
import json, sys
card = json.load(open(sys.argv[1])); card["sha256"] = "0" * 64  # a card that no longer matches its file
json.dump(card, open(sys.argv[1], "w"))
PY
    chmod -R a+rX "$mounted" "$broken"
    t=$(date +%s.%N)
    cid=$(E run -d -p "127.0.0.1:$PORT:8000" -e CERVIXQC_API_KEYS="$KEY" -v "$mounted:/app/weights:ro" "$tag")
    CONTAINERS+=("$cid")
    wait_ready "$url" 180 || { E logs "$cid" | tail -20; fail "$tag with mounted weights: not ready"; }
    want=$(python3 -c "import json; print(json.load(open('$mounted/deep_sad.json'))['sha256'])")
    curl -s -H "X-API-Key: $KEY" "$url/v1/models" | python3 -c "
import json, sys; m = {x['name']: x['sha256'] for x in json.load(sys.stdin)['models']}
sys.exit(m.get('deep_sad') != '$want')" || fail "$tag: /v1/models does not show the mounted deep_sad card"
    E rm -f "$cid" >/dev/null
    record "weights mounted at /app/weights (no rebuild): ready in $(since "$t") s, /v1/models shows the mounted cards"
    cid=$(E run -d -p "127.0.0.1:$PORT:8000" -e CERVIXQC_API_KEYS="$KEY" -v "$broken:/app/weights:ro" "$tag")
    CONTAINERS+=("$cid")
    local end=$(($(date +%s) + 180))
    while [ "$(date +%s)" -lt "$end" ] && [ "$(E inspect -f '{{.State.Running}}' "$cid")" = true ]; do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")" = 200 ] && fail "$tag: became ready with a card that does not match its weights"
        sleep 1
    done
    [ "$(E inspect -f '{{.State.Running}}' "$cid")" = false ] || fail "$tag: still running with a broken card after 180 s"
    E logs "$cid" 2>&1 | grep -q "sha256" || { E logs "$cid" | tail -20; fail "$tag: the refusal does not say why (sha256)"; }
    record "  a mounted card whose sha256 does not match its file: the container exits before ready, log says: $(E logs "$cid" 2>&1 | grep -m1 sha256 | cut -c1-140)"
    E rm -f "$cid" >/dev/null
}
check_mounted_weights "$TAG_CPU"

# --- 3c. offline install: save to a file, load where nothing was ever pulled, run ---------------
check_offline_install() {  # tag
    local tag=$1 tar=$WORK/offline.tar url=http://127.0.0.1:$PORT t cid code
    rm -f "$tar"
    t=$(date +%s)
    if [ "$ENGINE" = podman ]; then E save --format docker-archive -o "$tar" "$tag"; else E save -o "$tar" "$tag"; fi
    record "offline install: $ENGINE save $tag -> $(du -h "$tar" | cut -f1) file in $(($(date +%s) - t)) s"
    local -a L=("$ENGINE")
    if [ "$ENGINE" = podman ]; then
        # a store of its own, empty: what a site's server that never reached a registry holds
        OFFLINE_STORE=$WORK/offline-store
        rm -rf "$OFFLINE_STORE"
        L=(podman --root "$OFFLINE_STORE/root" --runroot "$OFFLINE_STORE/run")
        [ -z "$("${L[@]}" images -q)" ] || fail "offline: the private store is not empty"
    else
        E rmi "$tag" >/dev/null || fail "offline: could not remove $tag before loading it back"
    fi
    t=$(date +%s)
    "${L[@]}" load -i "$tar" 2> >(grep -v 'systemd connection' >&2) | tail -1
    record "  $ENGINE load from the file: $(($(date +%s) - t)) s; the store now holds: $("${L[@]}" images --format '{{.Repository}}:{{.Tag}}' | tr '\n' ' ')"
    t=$(date +%s.%N)
    cid=$("${L[@]}" run -d -p "127.0.0.1:$PORT:8000" -e CERVIXQC_API_KEYS="$KEY" "$tag" 2> >(grep -v 'systemd connection' >&2))
    wait_ready "$url" 180 || { "${L[@]}" logs "$cid" | tail -20; "${L[@]}" rm -f "$cid"; fail "offline: the loaded image did not become ready"; }
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $KEY" -F "files=@$DATA/batch/img0000.jpg" "$url/v1/qc")
    "${L[@]}" rm -f "$cid" >/dev/null 2>&1
    [ "$code" = 200 ] || fail "offline: upload to the loaded image gave $code"
    record "  the loaded image runs: ready in $(since "$t") s, upload 200"
    if [ "$ENGINE" = podman ]; then
        "${L[@]}" rmi -af >/dev/null 2>&1; rm -rf "$OFFLINE_STORE"; OFFLINE_STORE=
    fi
    if [ -n "${IMAGE_CHECK_ROOTLESS_USER:-}" ] && [ "$ENGINE" = podman ] && [ "$(id -u)" = 0 ]; then
        check_rootless "$tag" "$tar" "$IMAGE_CHECK_ROOTLESS_USER"
    fi
    rm -f "$tar"
}

# --- 3d. rootless podman, as the README's recipe runs it -----------------------------------------
check_rootless() {  # tag, saved image file, user
    local tag=$1 tar=$2 user=$3 port=$((PORT + 100)) home dir t key job status
    home=$(getent passwd "$user" | cut -d: -f6)
    [ -n "$home" ] && grep -q "^$user:" /etc/subuid || fail "rootless: $user needs a home and /etc/subuid entries"
    as_user() { runuser -u "$user" -- bash -c "cd ~ && $1" 2> >(grep -v 'systemd connection\|syslog\|shared mount' >&2); }
    dir=$home/cervixqc-image-check
    ROOTLESS_CLEANUP="runuser -u $user -- bash -c 'cd $dir 2>/dev/null && CERVIXQC_IMAGE_CPU=$tag ~/.cervixqc-compose/bin/podman-compose --profile cpu down -v; podman rmi -f $tag' >/dev/null 2>&1; rm -rf $dir"
    rm -rf "$dir" && mkdir -p "$dir/data/batch" "$dir/results" "$dir/quarantine" "$dir/secrets"
    cp "$REPO/docker-compose.yml" "$dir/"
    cp "$DATA"/batch/img00[0-1]*.jpg "$dir/data/batch/"
    key=rootless-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
    echo "$key" > "$dir/secrets/api-keys"
    chmod 644 "$tar"; chown -R "$user:" "$dir"
    as_user "[ -x ~/.cervixqc-compose/bin/podman-compose ] || { /usr/bin/python3 -m venv ~/.cervixqc-compose && ~/.cervixqc-compose/bin/pip install -q 'podman-compose>=1.1'; }" \
        || fail "rootless: podman-compose for $user"
    t=$(date +%s)
    as_user "podman load -q -i $tar >/dev/null" || fail "rootless: podman load as $user"
    record "rootless podman as $user ($(as_user 'podman info --format "{{.Store.GraphDriverName}}, {{.Host.OCIRuntime.Name}}"')): image loaded into the user's store in $(($(date +%s) - t)) s"
    local up="cd $dir && CERVIXQC_IMAGE_CPU=$tag CERVIXQC_PUBLISH=$port ~/.cervixqc-compose/bin/podman-compose --profile cpu up -d cervixqc-cpu >/dev/null"
    t=$(date +%s.%N)
    as_user "cd $dir && podman unshare chown 10001 results quarantine && $up" || fail "rootless: compose up"
    wait_ready "http://127.0.0.1:$port" 180 || fail "rootless: not ready on port $port"
    record "  compose --profile cpu up as $user, folders handed over with podman unshare chown: ready in $(since "$t") s"
    job=$(curl -s -H "X-API-Key: $key" -H 'Content-Type: application/json' -d '{"source": "batch", "quarantine": "q"}' \
        "http://127.0.0.1:$port/v1/jobs" | jfield id)
    for _ in $(seq 120); do
        status=$(curl -s -H "X-API-Key: $key" "http://127.0.0.1:$port/v1/jobs/$job" | jfield status)
        [ "$status" = done ] && break; sleep 1
    done
    [ "$status" = done ] || fail "rootless: job $job is $status"
    [ -f "$dir/results/$job/results.csv" ] || fail "rootless: no results.csv in the host folder"
    record "  job done: results.csv on the host owned by uid $(stat -c %u "$dir/results/$job/results.csv") (the container's 10001 in $user's subordinate range), $(find "$dir/quarantine" -type f | wc -l) quarantine copies"
    as_user "podman kill -s KILL \$(podman ps -q --filter label=com.docker.compose.project=cervixqc | head -1) >/dev/null && $up" \
        || fail "rootless: kill and up"
    t=$(date +%s.%N)
    wait_ready "http://127.0.0.1:$port" 180 || fail "rootless: not ready after the kill"
    [ "$(curl -s -H "X-API-Key: $key" "http://127.0.0.1:$port/v1/jobs/$job" | jfield status)" = done ] \
        || fail "rootless: the job is gone after the kill"
    record "  killed with SIGKILL and brought back with up: ready in $(since "$t") s, the job still done (its database in the volume)"
    eval "$ROOTLESS_CLEANUP"; ROOTLESS_CLEANUP=
}
check_offline_install "$TAG_CPU"

# --- 4. compose: the cpu profile, a job, SIGKILL mid-job, up again -------------------------------
if [ "$ENGINE" = docker ]; then
    docker compose version >/dev/null 2>&1 || fail "docker compose (the v2 plugin, >= 2.24) is needed"
    COMPOSE_CMD=(docker compose)
else
    if command -v podman-compose >/dev/null && podman-compose --help 2>&1 | grep -q -- --profile; then
        COMPOSE_CMD=(podman-compose)
    else
        if [ ! -x "$WORK/compose-venv/bin/podman-compose" ]; then
            python3 -m venv "$WORK/compose-venv" && "$WORK/compose-venv/bin/pip" install -q "podman-compose>=1.1" \
                || fail "installing podman-compose >= 1.1 from PyPI"
        fi
        COMPOSE_CMD=("$WORK/compose-venv/bin/podman-compose")
    fi
fi
compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" --profile cpu "$@"; }
record "compose: ${COMPOSE_CMD[*]##*/} $("${COMPOSE_CMD[@]}" version 2>/dev/null | grep -o -E '[0-9]+\.[0-9]+\.[0-9]+' | head -1)"
CDIR=$WORK/compose
rm -rf "$CDIR" && mkdir -p "$CDIR/secrets" "$CDIR/results" "$CDIR/quarantine"
cp docker-compose.yml "$CDIR/"
echo "$KEY" > "$CDIR/secrets/api-keys"
# as the README's recipe: the key file the service's alone (compose mounts it as it is on the host)
if [ "${ROOTLESS:-0}" = 1 ]; then
    podman unshare chown 10001 "$CDIR/results" "$CDIR/quarantine" "$CDIR/secrets/api-keys"
    podman unshare chmod 400 "$CDIR/secrets/api-keys"
else chown 10001 "$CDIR/results" "$CDIR/quarantine" "$CDIR/secrets/api-keys" && chmod 400 "$CDIR/secrets/api-keys"; fi
export CERVIXQC_IMAGE=$TAG CERVIXQC_IMAGE_CPU=$TAG_CPU CERVIXQC_DATA=$DATA \
    CERVIXQC_PUBLISH=127.0.0.1:$COMPOSE_PORT
cd "$CDIR"
curl_api() { curl -s -H "X-API-Key: $KEY" "$@"; }
cpu_container() { E ps -q --filter "label=com.docker.compose.project=$PROJECT" | head -1; }
URL=http://127.0.0.1:$COMPOSE_PORT
t=$(date +%s.%N)
compose up -d cervixqc-cpu > "$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log"; fail "compose up"; }
CID=$(cpu_container); [ -n "$CID" ] || fail "compose started no container"
CONTAINERS+=("$CID")
wait_ready "$URL" 180 || { E logs "$CID" | tail -20; fail "compose: /readyz"; }
record "compose --profile cpu up: ready in $(since "$t") s"
JOB=$(curl_api -H 'Content-Type: application/json' -d '{"source": "/data/batch"}' "$URL/v1/jobs" | jfield id) \
    || fail "compose: job not created"
# kill once a part of the job is done and a part is left
end=$(($(date +%s) + 300))
while :; do
    processed=$(curl_api "$URL/v1/jobs/$JOB" | jfield processed)
    [ "$processed" -ge $((JOB_FILES / 8)) ] && break
    [ "$(date +%s)" -lt "$end" ] || fail "compose: the job made no progress"
    sleep 0.2
done
E kill --signal KILL "$CID" >/dev/null
killed_at=$(curl -s -m 2 -H "X-API-Key: $KEY" "$URL/v1/jobs/$JOB" >/dev/null 2>&1 && echo reachable || echo down)
record "compose: job $JOB: container $(echo "$CID" | cut -c1-12) killed with SIGKILL at $processed/$JOB_FILES processed (service $killed_at)"
t=$(date +%s.%N)
compose up -d cervixqc-cpu >> "$WORK/compose-up.log" 2>&1 || { tail -20 "$WORK/compose-up.log"; fail "compose up after the kill"; }
CID2=$(cpu_container); CONTAINERS+=("$CID2")
wait_ready "$URL" 180 || { E logs "$CID2" | tail -20; fail "compose: /readyz after the kill"; }
record "compose up again: ready in $(since "$t") s (container $(echo "$CID2" | cut -c1-12)$([ "$CID2" = "$CID" ] && echo ', the same one restarted'))"
end=$(($(date +%s) + 600))
while :; do
    status=$(curl_api "$URL/v1/jobs/$JOB" | jfield status)
    [ "$status" = done ] && break
    case $status in failed|cancelled) fail "compose: the job ended $status";; esac
    [ "$(date +%s)" -lt "$end" ] || fail "compose: the job did not finish within 600 s"
    sleep 1
done
curl_api "$URL/v1/jobs/$JOB/results?format=csv" > "$WORK/results.csv"
python3 - "$WORK/results.csv" "$JOB_FILES" <<'EOF' || fail "compose: results after the kill"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
col = next(c for c in ("file", "path", "name", "source") if c in rows[0])
names = [r[col] for r in rows]
want = {f"img{i:04d}.jpg" for i in range(int(sys.argv[2]))}
got = [n.rsplit("/", 1)[-1] for n in names]
dups = len(got) - len(set(got)); lost = want - set(got)
print(f"results: {len(rows)} rows for {len(want)} files, {dups} duplicate, {len(lost)} lost")
sys.exit(1 if dups or lost or len(rows) != len(want) else 0)
EOF
record "compose: job done after the kill: $(python3 -c "import csv,sys; print(sum(1 for _ in csv.DictReader(open('$WORK/results.csv'))))") rows for $JOB_FILES files, none lost, none duplicated; ./results holds $(find "$CDIR/results" -type f | wc -l) files of the job"
