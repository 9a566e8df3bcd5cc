#!/usr/bin/env bash
# Install CRIU 4.2.1 to /usr/local/sbin/criu, built from Debian's `sid` source package.
#
# Why: Debian 12's criu 3.17 fails on this kernel, and 4.1.1 cannot dump processes holding
# AF_INET sockets (see /work/shared/ENVIRONMENT.md, section "CRIU").
#
# - Build dependencies come from the machine's own (bookworm) sources.
# - The source tarball is fetched through a PRIVATE apt configuration (own sources list,
#   lists and cache dirs) holding a single `deb-src ... sid main` line; the mirror URI is
#   taken from the machine's apt configuration. sid is never added to the system sources.
# - Only the `criu` make target is built (no docs, no plugins, no libcriu).
#
# - Our patches in scripts/criu-patches/ are applied (see each file's comment for why).
# - CRIU keeps its kernel-features cache (criu.kdat) in RUNDIR, and only on a tmpfs: where /run is
#   not one (this machine's is ext4), every dump and restore probed the kernel again, ~60 ms before
#   the member even stopped (held frames, restore time). We build with RUNDIR=/run/criu-kdat, a
#   1 MiB tmpfs that scripts/setup.sh (and the helper, at start) mounts when /run is not a tmpfs.
#
# Idempotent: exits at once if /usr/local/sbin/criu already reports version 4.2.1 and was
# built with the current patches (their sha256 is kept next to the binary).
# Environment overrides: CRIU_BUILD_ROOT (default /var/cache/violin-snapshot/criu-build).
set -euo pipefail

readonly CRIU_VERSION=4.2.1
readonly ORIG_TAR="criu_${CRIU_VERSION}.orig.tar.xz"
readonly ORIG_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
readonly SRC_SUITE=sid
readonly CRIU_BIN=/usr/local/sbin/criu
readonly BUILD_ROOT="${CRIU_BUILD_ROOT:-/var/cache/violin-snapshot/criu-build}"
readonly LOG="$BUILD_ROOT/build.log"
readonly PATCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/criu-patches"
readonly PATCH_STAMP=/usr/local/sbin/.criu-violin-patches
readonly KDAT_RUNDIR=/run/criu-kdat  # hostside/backends/criu.py KDAT_DIR says the same
patches_sum() { { cat "$PATCH_DIR"/*.patch 2>/dev/null; echo "RUNDIR=$KDAT_RUNDIR"; } | sha256sum | awk '{ print $1 }'; }
readonly BUILD_DEPS=(
    libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
    libnl-3-dev libnet1-dev libcap-dev libaio-dev libbsd-dev libgnutls28-dev
    libnftables-dev uuid-dev python3-protobuf pkg-config build-essential xz-utils dpkg-dev
)

TOOL=install_criu
# shellcheck source=lib/debsrc.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/debsrc.sh"

# `criu --version` prints "Version: 4.2.1" (plus "GitID: ..." for git builds).
installed_version() {
    [[ -x $CRIU_BIN ]] || return 0
    "$CRIU_BIN" --version 2>/dev/null | awk '$1 == "Version:" { print $2; exit }' || true
}

# ---------------------------------------------------------------------------------------

have="$(installed_version)"
if [[ $have == "$CRIU_VERSION" && -f $PATCH_STAMP && $(cat "$PATCH_STAMP") == "$(patches_sum)" ]]; then
    say "CRIU $CRIU_VERSION (with our patches) already present at $CRIU_BIN; nothing to do."
    exit 0
fi
((EUID == 0)) || die "must run as root"
[[ -n $have ]] && say "found CRIU $have at $CRIU_BIN; replacing it with $CRIU_VERSION"

mkdir -p "$BUILD_ROOT"
chmod 0755 "$BUILD_ROOT"
: >"$LOG"
say "build root $BUILD_ROOT, log $LOG"
export DEBIAN_FRONTEND=noninteractive

# 1. Build dependencies (machine's own sources only).
install_missing "${BUILD_DEPS[@]}"

# 2. Source tarball from sid via a private apt configuration.
tarball="$BUILD_ROOT/$ORIG_TAR"
if [[ -f $tarball && $(sha256_of "$tarball") == "$ORIG_SHA256" ]]; then
    say "using cached $ORIG_TAR"
else
    rm -f "$tarball"
    say "fetching criu source from suite '$SRC_SUITE' (private apt config)"
    private_apt "$BUILD_ROOT/apt" "$SRC_SUITE=$(machine_codename)"

    sid_version=$(apt-cache "${PRIVATE_APT[@]}" showsrc criu 2>>"$LOG" |
        awk '$1 == "Version:" { print $2 }' | sort -V | tail -n 1)
    [[ -n $sid_version ]] || die "no 'criu' source package found in $SRC_SUITE (see $LOG)"
    upstream=${sid_version#*:}
    upstream=${upstream%-*}
    if [[ $upstream != "$CRIU_VERSION" ]]; then
        die "suite '$SRC_SUITE' now has criu $sid_version, not $CRIU_VERSION; $ORIG_TAR is" \
            "no longer available there. Update CRIU_VERSION/ORIG_SHA256 in $0 after checking the new version."
    fi
    say "$SRC_SUITE has criu $sid_version"

    (cd "$DOWNLOAD_DIR" && run apt-get "${PRIVATE_APT[@]}" source --download-only --tar-only criu)
    [[ -f $DOWNLOAD_DIR/$ORIG_TAR ]] ||
        die "apt-get source did not produce $ORIG_TAR (see $LOG)"
    mv "$DOWNLOAD_DIR/$ORIG_TAR" "$tarball"
    chown root: "$tarball"
    rm -rf "$BUILD_ROOT/apt"

    actual=$(sha256_of "$tarball")
    if [[ $actual != "$ORIG_SHA256" ]]; then
        rm -f "$tarball"
        die "sha256 mismatch for $ORIG_TAR: expected $ORIG_SHA256, got $actual"
    fi
    say "sha256 of $ORIG_TAR verified"
fi

# 3. Build only the criu binary.
srcdir="$BUILD_ROOT/criu-$CRIU_VERSION"
rm -rf "$srcdir"
run tar -C "$BUILD_ROOT" -xf "$tarball"
[[ -f $srcdir/Makefile ]] || die "unexpected tarball layout: $srcdir/Makefile missing"
for p in "$PATCH_DIR"/*.patch; do
    [[ -f $p ]] || continue
    say "applying $(basename "$p")"
    run patch -d "$srcdir" -p1 --forward --quiet -i "$p"
done
say "building (make -j2 criu), about a minute"
start=$SECONDS
run make -C "$srcdir" -j2 RUNDIR="$KDAT_RUNDIR" criu
say "build done in $((SECONDS - start)) s"

# 4. Install.
run install -D -m 0755 "$srcdir/criu/criu" "$CRIU_BIN"
have="$(installed_version)"
[[ $have == "$CRIU_VERSION" ]] ||
    die "installed $CRIU_BIN reports version '${have:-?}', expected $CRIU_VERSION"
patches_sum >"$PATCH_STAMP"
say "installed CRIU $have at $CRIU_BIN"
