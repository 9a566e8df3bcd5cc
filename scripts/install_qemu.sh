#!/usr/bin/env bash
# Install the QEMU the VM members run under: Debian 12's own QEMU 7.2 (qemu-system-x86_64 only),
# rebuilt from Debian's source package with our patches in scripts/qemu-patches/, to
# /usr/local/lib/violin-qemu/bin/qemu-system-x86_64 (lab/vms.py puts it in <emulator>).
#
# Why: live migration under TCG in QEMU < 9.0 loses guest writes (the stored image holds stale
# pages; restored guests crash). See scripts/qemu-patches/tcg-dirty-bitmap-tlb-reset.patch.
# hostside/backends/libvirt.py refuses to snapshot a TCG guest of a QEMU without the fix.
#
# - The source is the one of the installed qemu-system-x86 package (Debian's patches applied by
#   dpkg-source), fetched through a PRIVATE apt configuration holding deb-src lines of the
#   machine's own suites; apt checks it against the signed Sources index.
# - Built: x86_64-softmmu only, no optional features but KVM, seccomp (libvirt's -sandbox) and fdt;
#   firmware comes from Debian's qemu-system-data/seabios/ipxe packages. About 3 minutes on 2 cores.
#   KVM must be in even for TCG guests: where /dev/kvm exists, libvirt takes a binary without it for a
#   stale capabilities cache and probes it again before every domain start (+4 s per start/restore).
# - The Debian package stays installed and untouched (/usr/bin/qemu-system-x86_64).
#
# Idempotent: exits at once if the binary exists and was built from the same source version with
# the current patches and this script (a stamp next to it says which).
# Environment overrides: QEMU_BUILD_ROOT (default /var/cache/violin-snapshot/qemu-build).
set -euo pipefail

readonly QEMU_DIR=/usr/local/lib/violin-qemu
readonly QEMU_BIN=$QEMU_DIR/bin/qemu-system-x86_64
readonly STAMP=$QEMU_DIR/.violin-build
readonly FIX_MARK="violin TCG dirty-bitmap fix"  # in `query-version`'s package: hostside/backends/libvirt.py checks it
readonly BUILD_ROOT="${QEMU_BUILD_ROOT:-/var/cache/violin-snapshot/qemu-build}"
readonly LOG="$BUILD_ROOT/build.log"
readonly PATCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/qemu-patches"
readonly BUILD_DEPS=(
    meson ninja-build libglib2.0-dev libpixman-1-dev zlib1g-dev libseccomp-dev libfdt-dev
    pkg-config python3 build-essential dpkg-dev xz-utils flex bison
)

TOOL=install_qemu
# shellcheck source=lib/debsrc.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/debsrc.sh"

patches_sum() { cat "$PATCH_DIR"/*.patch "${BASH_SOURCE[0]}" | sha256sum | awk '{ print $1 }'; }

# ---------------------------------------------------------------------------------------

version=$(dpkg-query -W -f='${source:Version}' qemu-system-x86 2>/dev/null) ||
    die "qemu-system-x86 is not installed (scripts/setup.sh installs it)"
upstream=${version#*:}
upstream=${upstream%%+*}
[[ $upstream == 7.2* ]] ||
    die "qemu-system-x86 $version is not QEMU 7.2, which scripts/qemu-patches/ are for; QEMU >= 9.0" \
        "has the fix (point VIOLIN_QEMU at /usr/bin/qemu-system-x86_64 instead)"
wanted="$version $(patches_sum)"
if [[ -x $QEMU_BIN && -f $STAMP && $(cat "$STAMP") == "$wanted" ]]; then
    say "QEMU $version with our patches already at $QEMU_BIN; nothing to do."
    exit 0
fi
((EUID == 0)) || die "must run as root"

mkdir -p "$BUILD_ROOT"
chmod 0755 "$BUILD_ROOT"
: >"$LOG"
say "build root $BUILD_ROOT, log $LOG"

# 1. Build dependencies (machine's own sources only).
install_missing "${BUILD_DEPS[@]}"

# 2. Debian's source of the installed version, from the machine's own suites.
codename=$(machine_codename)
srcdir="$BUILD_ROOT/qemu-src"  # no epoch colon: configure refuses one in the path
dsc="$BUILD_ROOT/qemu_${version#*:}.dsc"
if [[ ! -f $dsc ]]; then
    say "fetching qemu $version source (private apt config, suites $codename{,-updates,-security})"
    private_apt "$BUILD_ROOT/apt" "$codename" "$codename-updates" "$codename-security"
    (cd "$DOWNLOAD_DIR" && run apt-get "${PRIVATE_APT[@]}" source --download-only "qemu=$version")
    [[ -f $DOWNLOAD_DIR/$(basename "$dsc") ]] ||
        die "apt-get source did not fetch qemu $version (see $LOG)"
    chown root: "$DOWNLOAD_DIR"/qemu_*
    mv "$DOWNLOAD_DIR"/qemu_* "$BUILD_ROOT/"
    rm -rf "$BUILD_ROOT/apt"
else
    say "using cached source of qemu $version"
fi
rm -rf "$srcdir"
run dpkg-source -x "$dsc" "$srcdir"
for p in "$PATCH_DIR"/*.patch; do
    say "applying $(basename "$p")"
    run patch -d "$srcdir" -p1 --forward --quiet -i "$p"
done

# 3. Configure and build qemu-system-x86_64 only.
say "building qemu-system-x86_64 (about 3 minutes on 2 cores)"
start=$SECONDS
mkdir -p "$srcdir/build"
(cd "$srcdir/build" && run ../configure --target-list=x86_64-softmmu --prefix="$QEMU_DIR" \
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu \
    --without-default-features --enable-kvm --enable-seccomp --enable-fdt=system \
    --disable-docs --disable-user --disable-tools --disable-werror \
    --with-pkgversion="Debian $version + $FIX_MARK")
run ninja -C "$srcdir/build" -j "$(nproc)" qemu-system-x86_64
say "build done in $((SECONDS - start)) s"

# 4. Install (stripped), check, stamp; drop the build tree (the source packages stay cached).
run install -D -s -m 0755 "$srcdir/build/qemu-system-x86_64" "$QEMU_BIN"
"$QEMU_BIN" --version | grep -qF "$FIX_MARK" || die "$QEMU_BIN does not report '$FIX_MARK'"
echo "$wanted" >"$STAMP"
rm -rf "$srcdir"
say "installed $("$QEMU_BIN" --version | head -n 1) at $QEMU_BIN"
