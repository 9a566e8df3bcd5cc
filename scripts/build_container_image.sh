#!/usr/bin/env bash
# Build the violin container base image from Debian packages only (no registry is reachable here):
# mmdebstrap makes a minbase Debian 12 root filesystem with python3, iproute2, procps and iputils-ping
# (enough for workloads/seqstream.py, workloads/mandelbrot.py and the oracle's member), `podman import`
# turns its tar into an image.
#
#   scripts/build_container_image.sh        # image localhost/violin-container:<stamp>, also tagged :latest
#
# Idempotent: the tag is a hash of this script (its package list and options) and the machine's apt
# sources; when that image exists nothing is done (about 1 s: podman itself). A build takes about 40 s here (the
# packages come from the machine's Debian mirror). The workloads are not baked in: containers mount
# the repository's workloads/ read-only (lab/containers.py), so changing them needs no rebuild.
#
# Environment: VIOLIN_CONTAINER_IMAGE (repository name, default localhost/violin-container),
# VIOLIN_CONTAINER_SUITE (default: the machine's codename, bookworm).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${VIOLIN_CONTAINER_IMAGE:-localhost/violin-container}"
PACKAGES="python3,iproute2,procps,iputils-ping"
start=$(date +%s.%N)

say() { echo "[build_container_image] $*"; }
die() { echo "[build_container_image] ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

command -v podman >/dev/null || die "podman is not installed (scripts/setup.sh installs it)"
command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (scripts/setup.sh installs it)"
SUITE="${VIOLIN_CONTAINER_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"

stamp=$( {
    cat "${BASH_SOURCE[0]}"
    echo "$SUITE $PACKAGES"
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null || true
} | sha256sum | cut -c1-12)
TAG="$IMAGE:$stamp"

mkdir -p /run/lock
exec 9>/run/lock/violin-container-image.lock
flock 9  # one build at a time
if podman image exists "$TAG"; then
    podman tag "$TAG" "$IMAGE:latest"
    say "$TAG up to date ($(elapsed) s)"
    exit 0
fi

work=$(mktemp -d /var/tmp/violin-container-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
say "building $TAG (mmdebstrap $SUITE: $PACKAGES)"
# No documentation, manuals or locales: a smaller image (about half the size), same programs.
mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    "$SUITE" "$work/rootfs.tar" >"$work/mmdebstrap.log" 2>&1 || { tail -20 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
podman import --quiet --change 'CMD ["/bin/sh"]' "$work/rootfs.tar" "$TAG" >/dev/null
podman tag "$TAG" "$IMAGE:latest"
podman run --rm --runtime runc --network none --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 "$TAG" \
    python3 -c "import json, mmap, select, socket, struct, zlib, argparse" || die "the image's python3 is incomplete"
say "built $TAG, $(podman image inspect --format '{{.Size}}' "$TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }') ($(elapsed) s)"
