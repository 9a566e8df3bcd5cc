#!/usr/bin/env bash
# Set up everything violin-snapshot needs on a fresh Debian 12 machine, idempotently:
# Debian packages, CRIU 4.2.1 and a patched QEMU 7.2 (built from Debian's sources), a virtual environment with
# the pinned Python dependencies and the project, and the Open vSwitch daemons.
# A second run checks each step and changes nothing. Must run as root.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VIOLIN_VENV:-$REPO/.venv}"
PYTHON="${VIOLIN_PYTHON:-python3}"
STAMP="$VENV/.violin-setup-stamp"
start=$SECONDS

APT_PACKAGES=(
    openvswitch-switch mininet iputils-ping iproute2 ethtool iperf3 tcpdump procps psmisc
    qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-dev pkg-config busybox-static
    linux-image-amd64 python3-venv build-essential openssl
    podman runc mmdebstrap
    btrfs-progs  # mkfs.btrfs: the copy-on-write workdir path in a loop file (tests, benchmarks)
    tini  # reaps the QEMUs libvirtd starts (step 5)
)

TOOL=setup
LOG=/tmp/violin-apt.log
# shellcheck source=lib/debsrc.sh
source "$REPO/scripts/lib/debsrc.sh"  # say, die, install_missing

((EUID == 0)) || die "run as root (it installs Debian packages and starts Open vSwitch)"

# 1. Debian packages: install only what is missing (apt's output in $LOG).
: >"$LOG"
install_missing "${APT_PACKAGES[@]}"

# 2. CRIU 4.2.1 (Debian 12's 3.17 and 4.1.1 cannot dump processes with inet sockets here), and
#    Debian's QEMU 7.2 rebuilt with the fix that makes live migration under TCG keep every guest
#    write (about 3 minutes the first time; the VM members run under it).
bash "$REPO/scripts/install_criu.sh"
bash "$REPO/scripts/install_qemu.sh"

# 3. Python virtual environment, pinned; reinstalled only when the pins or packaging change.
want="$(cat "$REPO/requirements.txt" "$REPO/setup.cfg" "$REPO/setup.py" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -x $VENV/bin/python && -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
    say "virtual environment $VENV up to date"
else
    say "building virtual environment $VENV"
    [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
    pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
    "${pip[@]}" install setuptools==65.5.0 pbr==7.1.3 wheel 2>&1 | grep -v "^WARNING: Location" || true
    "${pip[@]}" install --no-build-isolation -r "$REPO/requirements.txt" 2>&1 | grep -v "^WARNING: Location" || true
    "${pip[@]}" install --no-build-isolation --no-deps -e "$REPO" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import ryu, networkx, libvirt, pytest, violin_core, violin_client, hostside.backends, hostside.store" ||
        die "the virtual environment is incomplete (see pip's output above)"
    echo "$want" >"$STAMP"
fi
# A side environment: built from REQS (pinned) when its stamp differs, then checked with CHECK.
side_venv() {
    local what=$1 dir=$2 reqs=$3 check=$4 want
    want="$(sha256sum <"$reqs" | cut -d' ' -f1)"
    if [[ -x $dir/bin/python && -f $dir/.violin-setup-stamp && $(cat "$dir/.violin-setup-stamp") == "$want" ]]; then
        say "$what environment $dir up to date"
        return
    fi
    say "building $what environment $dir"
    [[ -x $dir/bin/python ]] || "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip -q --disable-pip-version-check install -r "$reqs" 2>&1 | grep -v "^WARNING: Location" || true
    "$dir/bin/python" -c "$check" || die "the $what environment is incomplete (see pip's output above)"
    echo "$want" >"$dir/.violin-setup-stamp"
}
# 3b. A second environment with os-ken (Ryu's maintained fork) instead of Ryu: the app runs on both.
OSKEN_VENV="${VIOLIN_OSKEN_VENV:-$REPO/.venv-osken}"
side_venv os-ken "$OSKEN_VENV" "$REPO/requirements-osken.txt" "import os_ken.base.app_manager, networkx, webob"
# 3c. The API fuzzer (schemathesis) in its own environment: its dependencies need newer packages than
#     the Ryu pins above. tests/integration/test_api_fuzz.py runs its CLI against the real servers.
FUZZ_VENV="${VIOLIN_FUZZ_VENV:-$REPO/.venv-fuzz}"
side_venv fuzz "$FUZZ_VENV" "$REPO/requirements-fuzz.txt" "import schemathesis"
# The project's modules, from this checkout (no install needed for a second framework).
osken_site="$("$OSKEN_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n%s\n' "$REPO/ryu_apps" "$REPO" >"$osken_site/violin-snapshot.pth"

site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Debian's mininet 2.3.0 (just that package, not all of dist-packages).
ln -sfn /usr/lib/python3/dist-packages/mininet "$site/mininet"
# Stock ryu-manager imports a name newer eventlet lacks; see ryu_apps/violin_ryu_compat.py.
echo "import violin_ryu_compat; violin_ryu_compat.install()" >"$site/violin_ryu_compat.pth"
"$VENV/bin/python" -c "import mininet.net, ryu.app.wsgi" || die "mininet or ryu.app.wsgi does not import"

# 4. Open vSwitch daemons (no systemd here; userspace datapath only).
if ovs-vsctl --timeout=3 show >/dev/null 2>&1; then
    say "Open vSwitch running"
else
    say "starting Open vSwitch"
    /usr/share/openvswitch/scripts/ovs-ctl start --system-id=random >/tmp/violin-ovs.log 2>&1 || true
    ovs-vsctl --timeout=5 show >/dev/null 2>&1 || { cat /tmp/violin-ovs.log >&2; die "Open vSwitch did not start"; }
fi
# The userspace datapath reads each port through an AF_PACKET socket with the default receive
# buffer, net.core.rmem_default: 212992 bytes, about 50 frames (each costs ~4 KiB). Whenever
# ovs-vswitchd falls behind (2 busy cores, a snapshot's packet-ins and releases), the kernel drops
# what does not fit, and no OVS counter shows it (`ss -0 -m`: skmem d<N>): UDP loss the oracle saw
# under load. 8 MiB holds ~2000 frames; it applies to ports created afterwards. Never lowered.
RMEM_WANTED=$((8 * 1024 * 1024))
if (( $(sysctl -n net.core.rmem_default) < RMEM_WANTED )); then
    say "raising net.core.rmem_default to $RMEM_WANTED (OVS userspace datapath port sockets)"
    if sysctl -qw net.core.rmem_default=$RMEM_WANTED; then
        mkdir -p /etc/sysctl.d && echo "net.core.rmem_default = $RMEM_WANTED" >/etc/sysctl.d/60-violin-snapshot.conf || true
    else
        say "could not raise net.core.rmem_default: a busy host may drop frames at OVS's ports (README, Topologies)"
    fi
fi

# CRIU keeps its kernel-features cache only on a tmpfs (scripts/install_criu.sh): without one every
# dump and restore probes the kernel first (~60 ms, frames held meanwhile). The helper mounts it too.
PYTHONPATH="$REPO:$REPO/ryu_apps" "$VENV/bin/python" -c 'from hostside.backends import criu; print("[setup] CRIU kdat cache: " + criu.ensure_kdat_cache())' || true

# 5. libvirt's daemons (no systemd: started by hand, each only if its pid file names no live process)
#    and the VM guest image (scripts/build_guest.sh: nothing to do, ~0.1 s, when it is up to date).
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive /run/virtlogd.pid || { say "starting virtlogd"; virtlogd -d; }
# libvirtd runs under `tini -s`, a subreaper: the QEMUs it daemonizes are re-parented to tini, which reaps
# them as they exit. Re-parented to this machine's PID 1 (not an init that reaps at once), an exited QEMU
# stayed a zombie for 1.1-1.7 s, and libvirt's destroy, which every VM restore makes, waited for it.
alive /run/libvirtd.pid || {
    say "starting libvirtd (under tini -s)"
    setsid tini -s -- libvirtd </dev/null >>/var/log/violin-libvirtd.log 2>&1 &
}
for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd does not answer at qemu:///system"
bash "$REPO/scripts/build_guest.sh"

# 5b. Podman (container members, hostside/backends/podman.py): Debian 12's podman 4.3.1 under runc 1.1.5, which
#     runs our CRIU 4.2.1 (the backend passes --runtime-flag criu=/usr/local/sbin/criu; Debian's criu package,
#     a recommendation of podman's, is not installed: --no-install-recommends). crun 1.8.1 is not used: it
#     cannot start containers on this cgroup layout ("cgroups in hybrid mode not supported"). Then the
#     containers' base image from Debian packages (scripts/build_container_image.sh: ~0.1 s when up to date).
bash "$REPO/scripts/build_container_image.sh"

# 6. The demo's TLS pair: a small lab CA and a server certificate for 127.0.0.1, localhost and the demo's
#    snapshot-server addresses (scripts/make_tls.sh: kept when it is up to date).
TLS_DIR="${VIOLIN_TLS_DIR:-/var/lib/violin-snapshot/tls}"
bash "$REPO/scripts/make_tls.sh" "$TLS_DIR" 169.254.1.1 169.254.2.1 | sed "s/^make_tls.sh: /[setup] /"

say "ready in $((SECONDS - start)) s (venv: $VENV)"
