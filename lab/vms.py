"""VM members on a Mininet topology: small QEMU guests under libvirt, NICs on the topology's switches.

Each guest gets a persistent tap (created here, so it outlives the QEMU
process: a restored VM comes back on the same switch port) added to one of
the topology's Open vSwitch bridges, and boots the project's guest image
(scripts/build_guest.sh) with its address and its program on the kernel
command line. Everything is named with the run's prefix and removed by name
at the end (domain, tap, console log).
"""

import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional
from xml.sax.saxutils import escape

GUEST_DIR = os.environ.get("VIOLIN_GUEST_DIR", "/var/lib/libvirt/images/violin-guest")
RUN_DIR = os.environ.get("VIOLIN_VM_RUN_DIR", "/var/lib/libvirt/images/violin-run")
READY_LINE = "violin-guest: ready"
URI = "qemu:///system"
# The QEMU the guests run under: scripts/install_qemu.sh's build (Debian's QEMU 7.2 with the fix that
# makes live migration under TCG keep every guest write; see hostside/backends/libvirt.py), or VIOLIN_QEMU.
EMULATOR = os.environ.get("VIOLIN_QEMU", "/usr/local/lib/violin-qemu/bin/qemu-system-x86_64")


class VmLabError(RuntimeError):
    pass


@dataclass
class Guest:
    """One VM of a test slice."""

    name: str  # libvirt domain name (also used for the tap: <name> shortened)
    ip: str  # with prefix length, e.g. 10.0.0.101/8
    mac: str
    switch: str  # the OVS bridge its tap joins
    run: List[str] = field(default_factory=list)  # the guest's program and its arguments
    memory_mib: int = 128
    tap: str = ""
    emulator: str = ""  # default EMULATOR
    disks: List[str] = field(default_factory=list)  # qcow2 files, attached as vda, vdb, ... (virtio)
    modules: List[str] = field(default_factory=list)  # extra kernel modules for the guest (violin.modules=)

    def __post_init__(self):
        self.tap = self.tap or ("t" + self.name)[-15:]

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]

    @property
    def console_log(self) -> str:
        return os.path.join(RUN_DIR, self.name + ".console")


def image_paths(guest_dir: str = GUEST_DIR) -> Dict[str, str]:
    paths = {"kernel": os.path.join(guest_dir, "vmlinuz"), "initrd": os.path.join(guest_dir, "initramfs.cpio.gz")}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise VmLabError("guest image missing (%s): run scripts/build_guest.sh" % ", ".join(missing))
    return paths


def domain_xml(guest: Guest, guest_dir: str = GUEST_DIR) -> str:
    """A transient TCG domain booting the guest image directly, its NIC on an existing tap."""
    paths = image_paths(guest_dir)
    cmdline = "console=ttyS0 quiet violin.ip=%s violin.run=%s" % (guest.ip, ",".join(guest.run))
    if guest.modules:
        cmdline += " violin.modules=" + ",".join(guest.modules)
    disks = "".join("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/>"
                    "<target dev='vd%s' bus='virtio'/></disk>" % (escape(path), "abcdefghij"[i])
                    for i, path in enumerate(guest.disks))
    return """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>{disks}
    <interface type='ethernet'>
      <mac address='{mac}'/><target dev='{tap}' managed='no'/><model type='virtio'/>
    </interface>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>""".format(name=escape(guest.name), memory=guest.memory_mib, kernel=escape(paths["kernel"]),
                    initrd=escape(paths["initrd"]), cmdline=escape(cmdline), mac=guest.mac, tap=guest.tap,
                    console=escape(guest.console_log), emulator=escape(guest.emulator or EMULATOR), disks=disks)


def _run(*argv):
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise VmLabError("%s: %s" % (" ".join(argv), result.stderr.strip()))
    return result.stdout


def add_tap(guest: Guest) -> None:
    subprocess.run(["ip", "link", "del", guest.tap], capture_output=True)  # a leftover of ours, by name
    _run("ip", "tuntap", "add", "dev", guest.tap, "mode", "tap")
    _run("ip", "link", "set", guest.tap, "up")
    _run("ovs-vsctl", "--may-exist", "add-port", guest.switch, guest.tap)


def remove_tap(guest: Guest) -> None:
    subprocess.run(["ovs-vsctl", "--if-exists", "del-port", guest.switch, guest.tap], capture_output=True)
    subprocess.run(["ip", "link", "del", guest.tap], capture_output=True)


def console_text(guest: Guest) -> str:
    try:
        with open(guest.console_log, errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def wait_ready(guests: List[Guest], timeout: float = 90.0) -> None:
    """Wait for each guest's console to say its network is up."""
    deadline = time.monotonic() + timeout
    waiting = list(guests)
    while waiting and time.monotonic() < deadline:
        waiting = [g for g in waiting if READY_LINE not in console_text(g)]
        time.sleep(0.2)
    if waiting:
        raise VmLabError("guests not ready after %.0f s: %s; last console lines:\n%s" % (
            timeout, ", ".join(g.name for g in waiting),
            "\n".join(console_text(g)[-800:] for g in waiting)))


@contextmanager
def guests(specs: List[Guest], uri: str = URI, ready_timeout: float = 90.0):
    """Boot ``specs`` on their switches; destroy them and their taps at the end, whatever happens."""
    import libvirt
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    conn = libvirt.open(uri)
    try:
        started: List[Guest] = []
        try:
            for guest in specs:
                _destroy(conn, guest.name)  # a leftover of ours, by name
                if os.path.exists(guest.console_log):
                    os.unlink(guest.console_log)
                add_tap(guest)
                started.append(guest)
                conn.createXML(domain_xml(guest), 0)
            wait_ready(specs, ready_timeout)
            yield specs
        finally:
            for guest in started:
                _destroy(conn, guest.name)
                remove_tap(guest)
                if os.path.exists(guest.console_log):
                    os.unlink(guest.console_log)
    finally:
        conn.close()


def _destroy(conn, name: str) -> None:
    import libvirt
    libvirt.registerErrorHandler(lambda _context, _error: None, None)  # "not found" is fine here
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    try:
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefine()
    except libvirt.libvirtError:
        pass


def libvirt_available(uri: str = URI) -> Optional[str]:
    """None if VMs can run here, else the reason."""
    try:
        import libvirt
    except ImportError:
        return "libvirt-python is not installed (run scripts/setup.sh)"
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError as error:
        return "libvirtd not reachable at %s: %s (run scripts/setup.sh)" % (uri, error)
    try:
        image_paths()
    except VmLabError as error:
        return str(error)
    if not os.access(EMULATOR, os.X_OK):
        return "no QEMU at %s (scripts/install_qemu.sh builds it; VIOLIN_QEMU names another)" % EMULATOR
    return None


def guest_command(host, guest: Guest, command: str, timeout: float = 10.0) -> str:
    """Send a control command to the guest's oracle endpoint from inside Mininet ``host``
    (the guest is reachable on the slice's LAN only)."""
    import shlex
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, %r); from workloads import guestctl; "
            "sys.stdout.write(guestctl.guest_command(%r, %r, timeout=%r))" % (repo, guest.address, command, timeout))
    deadline = time.monotonic() + timeout
    while True:
        output = host.cmd("%s -c %s" % (shlex.quote(sys.executable), shlex.quote(code)))
        if command.strip() != "DUMP" or output.rstrip().endswith("end"):
            return output
        if time.monotonic() > deadline:
            raise VmLabError("no oracle state from %s (domain %s): %s\nconsole: %s" % (
                guest.name, domain_state(guest.name), output[-300:], console_text(guest)[-600:]))
        time.sleep(0.5)


def domain_state(name: str, uri: str = URI) -> str:
    """'running', 'paused', ... or 'gone'."""
    import libvirt
    names = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
             libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_CRASHED: "crashed"}
    conn = libvirt.open(uri)
    try:
        state = conn.lookupByName(name).state()[0]
        return names.get(state, "state %d" % state)
    except libvirt.libvirtError:
        return "gone"
    finally:
        conn.close()


def oracle_member(host, guest: Guest) -> dict:
    """The guest's oracle record in workloads.oracle.check's shape (stop it sending first)."""
    from workloads import guestctl
    return guestctl.oracle_member(guestctl.load_guest_state(guest_command(host, guest, "DUMP")))


def seqstream_guest(name: str, ident: int, ip: str, mac: str, switch: str, peers: Dict[int, str],
                    rate: float = 150.0) -> Guest:
    """A guest running the oracle's endpoint (guest/vseq.c) towards ``peers`` (id -> IP)."""
    peer_list = "+".join("%d=%s" % item for item in sorted(peers.items()))  # no commas on the kernel line
    return Guest(name, ip, mac, switch, ["vseq", "--id", str(ident), "--bind", ip.split("/")[0],
                                         "--peers", peer_list, "--rate", "%g" % rate])
