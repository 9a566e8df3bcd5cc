#!/usr/bin/env bash
# Build the violin VM guest image from Debian packages only: Debian's kernel (linux-image-amd64) and an
# initramfs holding busybox-static, the kernel modules of a virtio-net NIC, guest/init as /init, and
# every guest/*.c compiled into a static binary of the same name in /bin (gcc -static -O2
# -ffp-contract=off, so floating-point results do not depend on FMA contraction).
#
#   scripts/build_guest.sh            # output in $VIOLIN_GUEST_DIR (default /var/lib/libvirt/images/violin-guest)
#
# Output: vmlinuz (a copy of /boot/vmlinuz-<version>), initramfs.cpio.gz, manifest.txt. Idempotent: the
# stamp is a hash of every input (this script, guest/*, busybox, kernel, modules, compiler and flags);
# when it matches, nothing is done (about 0.1 s). Files are replaced atomically (rename), under a lock,
# so running guests and concurrent builds are safe. The kernel command line the image understands is
# documented at the top of guest/init. Boot it with direct kernel boot (<kernel>, <initrd>, <cmdline>),
# <domain type='qemu'> (TCG), 128 MiB, a virtio NIC, console=ttyS0.
#
# Environment: VIOLIN_GUEST_DIR (output), VIOLIN_GUEST_KERNEL (a version in /lib/modules; default the
# newest one with a /boot/vmlinuz-<version>), VIOLIN_GUEST_EXTRA_MODULES (default "8021q virtio_blk"), CC.
#
# Permissions, as checked with libvirt 9.0 on Debian 12 (QEMU runs as user libvirt-qemu):
#  - the output directory is 0755 and its files 0644, and /var/lib/libvirt/images is 0711: QEMU can read
#    them whatever their owner. libvirt's DAC driver also chowns <kernel>/<initrd> to libvirt-qemu while a
#    domain runs and back afterwards (dynamic_ownership); it does not open parent directories for you, so
#    a VIOLIN_GUEST_DIR under a 0700 directory (e.g. /root) does not work.
#  - a persistent tap made by root (`ip tuntap add dev T mode tap`, no user/group) works with
#    <interface type='ethernet'><target dev='T' managed='no'/>: libvirtd (root) opens it and hands
#    QEMU the file descriptor, so no "user libvirt-qemu" on the tap is needed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${VIOLIN_GUEST_DIR:-/var/lib/libvirt/images/violin-guest}"
EXTRA_MODULES="${VIOLIN_GUEST_EXTRA_MODULES-8021q virtio_blk}"
NIC_MODULES="virtio_pci virtio_net"  # the PCI transport (pc and q35 machines) and the NIC driver
CC="${CC:-gcc}"
CFLAGS=(-static -O2 -ffp-contract=off -Wall -s)
LDLIBS=(-lm)
BUSYBOX=/bin/busybox
start=$(date +%s.%N)

say() { echo "[build_guest] $*"; }
die() { echo "[build_guest] ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

[[ -x $BUSYBOX ]] || BUSYBOX=$(command -v busybox) || die "busybox-static is not installed"
readelf -l "$BUSYBOX" | grep -q INTERP && die "$BUSYBOX is dynamically linked (install busybox-static)"
if command -v cpio >/dev/null; then CPIO=(cpio -o -H newc -R 0:0 --quiet); else CPIO=("$BUSYBOX" cpio -o -H newc -R 0:0); fi

# The kernel: the newest version that has both /boot/vmlinuz-<v> and /lib/modules/<v>/modules.dep.
KVER="${VIOLIN_GUEST_KERNEL:-}"
if [[ -z $KVER ]]; then
    for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's,^/boot/vmlinuz-,,' | sort -V); do
        [[ -f /lib/modules/$k/modules.dep ]] && KVER=$k
    done
fi
[[ -n $KVER && -f /boot/vmlinuz-$KVER ]] || die "no Debian kernel with modules found (install linux-image-amd64)"
MODDIR=/lib/modules/$KVER
[[ -r /boot/vmlinuz-$KVER ]] || die "/boot/vmlinuz-$KVER is not readable (run as root)"

# Modules with their dependencies, dependencies first (modules.dep lists all of them, transitively).
# Prints the module files in load order; names missing from modules.dep must be built in.
resolve_modules() {
    awk -v want="$*" '
        function key(path) { sub(/.*\//, "", path); sub(/\.ko.*/, "", path); gsub(/-/, "_", path); return path }
        function add(name,    n, deps, i) {
            if (name in seen) return
            seen[name] = 1
            if (!(name in file)) { missing = missing " " name; return }
            n = split(dep[name], deps, " ")
            for (i = 1; i <= n; i++) add(key(deps[i]))
            print file[name]
        }
        { f = $1; sub(/:$/, "", f); file[key(f)] = f; d = $0; sub(/^[^:]*:/, "", d); dep[key(f)] = d }
        END { n = split(want, w, " "); for (i = 1; i <= n; i++) add(key(w[i])); if (missing) print "MISSING" missing }
    ' "$MODDIR/modules.dep"
}
ORDER=()
for m in $(resolve_modules $NIC_MODULES $EXTRA_MODULES); do
    case $m in
        MISSING) missing=1 ;;
        *) if [[ -n ${missing:-} ]]; then
               grep -q "/${m}.ko" "$MODDIR/modules.builtin" 2>/dev/null || grep -q "/${m//_/-}.ko" "$MODDIR/modules.builtin" ||
                   die "module $m is neither in $MODDIR/modules.dep nor built in"
           else
               ORDER+=("$m")
           fi ;;
    esac
done

# The stamp: a hash of every input.
shopt -s nullglob
SOURCES=("$REPO"/guest/*.c)
PROGRAMS=$(for s in "${SOURCES[@]}"; do basename "$s" .c; done | tr '\n' ' ')
INPUTS=("$REPO/scripts/build_guest.sh" "$BUSYBOX" "/boot/vmlinuz-$KVER")
for f in "$REPO"/guest/*; do [[ -f $f ]] && INPUTS+=("$f"); done
for m in "${ORDER[@]}"; do INPUTS+=("$MODDIR/$m"); done
stamp=$( {
    sha256sum "${INPUTS[@]}" | sed "s,  $REPO/,  ,"
    echo "$KVER ${ORDER[*]} $CC ${CFLAGS[*]} ${LDLIBS[*]} ${NIC_MODULES} ${EXTRA_MODULES}"
    "$CC" --version | head -n 1
} | sha256sum | cut -d' ' -f1)

mkdir -p "$OUT"
chmod 0755 "$OUT"
exec 9>"$OUT/.lock"
flock 9  # one build at a time; readers see old or new files, never half-written ones
if [[ -f $OUT/.stamp && $(cat "$OUT/.stamp") == "$stamp" && -f $OUT/vmlinuz && -f $OUT/initramfs.cpio.gz ]]; then
    say "up to date in $OUT ($(elapsed) s)"
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/violin-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,run,etc,root,usr,lib/modules/$KVER}
ln -s bin "$ROOT/sbin"
ln -s ../bin "$ROOT/usr/bin"
ln -s ../bin "$ROOT/usr/sbin"

# Static binaries, compiled in parallel; each guest/NAME.c becomes /bin/NAME.
pids=()
for src in "${SOURCES[@]}"; do
    name=$(basename "$src" .c)
    "$CC" "${CFLAGS[@]}" -o "$ROOT/bin/$name" "$src" "${LDLIBS[@]}" 2>"$WORK/$name.err" &
    pids+=("$!:$name")
done

# busybox and its applet links (a program of guest/ wins over an applet of the same name).
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [[ -e $ROOT/bin/$applet || -L $ROOT/bin/$applet ]] || ln -s busybox "$ROOT/bin/$applet"
done

# Modules (decompressed: busybox modprobe takes plain .ko) and a modules.dep for just them.
for m in "${ORDER[@]}"; do
    dest="$ROOT/lib/modules/$KVER/${m%.ko*}.ko"
    mkdir -p "$(dirname "$dest")"
    case $m in
        *.ko) cp "$MODDIR/$m" "$dest" ;;
        *.ko.xz) xz -dc "$MODDIR/$m" >"$dest" ;;
        *.ko.zst) zstd -q -dc "$MODDIR/$m" >"$dest" ;;
        *.ko.gz) gzip -dc "$MODDIR/$m" >"$dest" ;;
        *) die "unknown module format: $m" ;;
    esac
done
for m in "${ORDER[@]}"; do
    grep "^$m:" "$MODDIR/modules.dep" | sed -E 's/\.ko\.(xz|zst|gz)/.ko/g'
done >"$ROOT/lib/modules/$KVER/modules.dep"

install -m 0755 "$REPO/guest/init" "$ROOT/init"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"
# The kernel gives /init this console as stdio (/init also reopens it once devtmpfs is mounted).
mknod -m 0600 "$ROOT/dev/console" c 5 1 || say "warning: cannot create dev/console (not root?)"

failed=0
for entry in "${pids[@]}"; do
    wait "${entry%%:*}" || { failed=1; say "compiling guest/${entry#*:}.c failed:"; cat "$WORK/${entry#*:}.err" >&2; }
done
((failed == 0)) || die "compilation failed"
for entry in "${pids[@]}"; do
    [[ -s $WORK/${entry#*:}.err ]] && { say "warnings in guest/${entry#*:}.c:"; cat "$WORK/${entry#*:}.err" >&2; }
done

# Pack (owned by root, sorted for a stable archive) and install atomically.
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | "${CPIO[@]}") | gzip -6 -n >"$WORK/initramfs.cpio.gz"
cp "/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
{
    echo "kernel $KVER"
    echo "modules ${ORDER[*]}"
    echo "programs $PROGRAMS"
    echo "busybox $("$BUSYBOX" | head -n 1)"
    echo "stamp $stamp"
} >"$WORK/manifest.txt"
for f in vmlinuz initramfs.cpio.gz manifest.txt; do
    chmod 0644 "$WORK/$f"
    cp "$WORK/$f" "$OUT/.$f.new"
    mv -f "$OUT/.$f.new" "$OUT/$f"
done
echo "$stamp" >"$OUT/.stamp"
say "built $OUT (kernel $KVER, initramfs $(du -k "$OUT/initramfs.cpio.gz" | cut -f1) KiB, programs: ${PROGRAMS% }) in $(elapsed) s"
