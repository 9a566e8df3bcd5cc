"""libvirt/QEMU backend: a VM's "fake live migration" to a snapshot server, and its restore.

Snapshot (QEMU 7.2 under libvirt, driven over QMP through libvirt-qemu):

  1. ``migrate`` with capability ``pause-before-switchover`` to an ``fd:`` URI:
     a pipe whose other end the helper streams to a snapshot server while the
     guest runs on (live pre-copy). The stream starts with libvirt's save
     header and the domain's migratable XML, so the stored image is a file
     ``virsh restore`` takes as it is;
  2. on MIGRATION status ``pre-switchover`` QEMU has stopped the guest: the
     cut instant. Each writable disk is switched (``blockdev-snapshot-sync``)
     to a new qcow2 overlay made beforehand, so its image keeps the disk as
     it is at the cut. Then ``on_paused`` runs beside ``migrate-continue`` (the
     asynchronous cut: the helper writes the VM's marker into its tap and waits
     for the switch's copy, ``vm_cut_proof``; the synchronous one: it proves the
     tap drained into the switch and calls the controller's cut); once the
     stream is complete and the hook answered, ``cont``, then ``resumed``
     (the helper's cut request, already written behind the marker at the cut
     unless the controller takes the cut call instead). The helper then copies each frozen image (with its backing chain) into a
     standalone qcow2 and stores it beside the RAM image (``disk-<target>.qcow2``);
  3. any failure (the VM vanishes, the stream is refused, the hook fails)
     cancels the migration and leaves the guest running.

Restore: ``virDomainRestoreFlags`` of the staged save file, paused, after the
running domain of the same name (if any) is destroyed (``kill_qemu`` first), its disks on the
staged disk images (moved next to the disks they replace); ``resume`` later.
Only local file disks can be captured: a domain with another writable disk
(block device, network) is refused rather than snapshotted without it.
Each snapshot leaves one more overlay in the running guest's backing chain.

``LibvirtBackend`` (registered as ``libvirt``) is the helper's side of it: one
libvirt connection opened when the first VM needs it, the VM's marker written
into its tap at the cut (or, where QEMU's tap cannot be borrowed, the tap-drain
proof and a synchronous cut) and the disks stored beside the RAM image
(``vm.save``).
"""

import contextlib
import json
import logging
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from hostside.backends.base import Backend, ImageReport, Located, Restored, register
from violin_core.schema import Field, Schema

LOG = logging.getLogger("violin-helper.libvirt")

SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_VERSION = 2
SAVE_HEADER = struct.Struct("<16s5I14I")  # magic, version, data_len, was_running, format, cookieOffset, unused
FD_NAME = "violin-snapshot"
CHUNK = 1 << 20


class VmError(RuntimeError):
    """A VM operation failed; the message says which and why."""


def _image_filename(inserted: dict) -> str:
    """The file of a block node as QMP's query-block shows it (a plain path, or libvirt's json: form)."""
    name = inserted.get("file", "")
    if name.startswith("json:"):
        spec = json.loads(name[5:])
        while isinstance(spec.get("file"), dict):
            spec = spec["file"]
        name = spec.get("filename", "")
    if not name.startswith("/"):
        raise VmError("cannot tell the image file of block node %s (%r)" % (inserted.get("node-name"), name))
    return name


def _close_quietly(handle) -> None:
    try:
        handle.close()
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def save_header(domain_xml: str, was_running: bool = False) -> bytes:
    """libvirt's save-file header (version 2, raw format, no cookie) followed by the XML and its NUL."""
    data = domain_xml.encode() + b"\0"
    return SAVE_HEADER.pack(SAVE_MAGIC, SAVE_VERSION, len(data), int(was_running), 0, 0, *([0] * 14)) + data


def read_save_header(head: bytes) -> str:
    """The domain XML of a save file's first bytes; raises VmError if it is not one."""
    if len(head) < SAVE_HEADER.size:
        raise VmError("not a libvirt save file: %d bytes" % len(head))
    fields = SAVE_HEADER.unpack_from(head)
    if fields[0] != SAVE_MAGIC or fields[1] != SAVE_VERSION:
        raise VmError("not a libvirt save file (magic %r, version %r)" % (fields[0], fields[1]))
    xml = head[SAVE_HEADER.size:SAVE_HEADER.size + fields[2]]
    if len(xml) != fields[2]:
        raise VmError("truncated libvirt save file header")
    return xml.rstrip(b"\0").decode()


# QEMU < 9.0 under TCG loses guest writes in live migration: the fast path of the dirty-bitmap sync
# does not re-arm the vCPUs' TLB, so a page written after it was sent is not sent again and the image
# holds a stale page (restored guests crash). Fixed upstream in 9.0 (commit 03bfc2188f); the build of
# scripts/install_qemu.sh carries the fix and says so in its package version.
TCG_MIGRATION_FIXED_IN = (9, 0)
TCG_MIGRATION_FIX_MARK = "violin TCG dirty-bitmap fix"


def precopy_loses_writes(kvm_enabled: bool, version: dict) -> Optional[str]:
    """Why a live pre-copy of a guest would store stale pages, or None if the QEMU tracks writes.

    ``kvm_enabled`` and ``version`` are QMP ``query-kvm``'s ``enabled`` and ``query-version``'s answer."""
    if kvm_enabled:
        return None  # KVM tracks dirty pages in the kernel
    qemu = version.get("qemu") or {}
    if (qemu.get("major", 0), qemu.get("minor", 0)) >= TCG_MIGRATION_FIXED_IN:
        return None
    if TCG_MIGRATION_FIX_MARK in (version.get("package") or ""):
        return None
    return ("QEMU %s.%s.%s%s under TCG loses guest writes in live migration (stale pages in the image; "
            "fixed in QEMU 9.0): run the guest under the QEMU of scripts/install_qemu.sh, a QEMU >= 9.0, or KVM"
            % (qemu.get("major", "?"), qemu.get("minor", "?"), qemu.get("micro", "?"),
               " (%s)" % version["package"].strip() if (version.get("package") or "").strip() else ""))


DISK_IMAGE = "disk-%s.qcow2"  # a writable disk's content at the cut, standalone, stored beside the RAM image


def _writable_disk_elements(domain_xml: str):
    """(target name, <disk> element) of each writable disk of the domain XML."""
    root = ElementTree.fromstring(domain_xml)
    return [((d.find("target").get("dev") if d.find("target") is not None else "?"), d)
            for d in root.findall("./devices/disk")
            if d.get("device", "disk") == "disk" and d.find("readonly") is None]


def writable_disks(domain_xml: str):
    """Target names of the domain's writable disks."""
    return [target for target, _disk in _writable_disk_elements(domain_xml)]


def uncapturable_disks(domain_xml: str):
    """Writable disks whose state a snapshot cannot take (not a local file): "<target> (type <type>)"."""
    return ["%s (type %s)" % (target, disk.get("type", "file")) for target, disk in _writable_disk_elements(domain_xml)
            if disk.get("type", "file") != "file"]


def retarget_disks(domain_xml: str, files: Dict[str, str]) -> str:
    """The domain XML with each disk of ``files`` (target -> standalone qcow2 file) on that file."""
    root = ElementTree.fromstring(domain_xml)
    found = set()
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is None or target.get("dev") not in files:
            continue
        found.add(target.get("dev"))
        source = disk.find("source")
        if source is None:
            source = ElementTree.SubElement(disk, "source")
        source.attrib.clear()
        source.set("file", files[target.get("dev")])
        driver = disk.find("driver")
        if driver is None:
            driver = ElementTree.SubElement(disk, "driver", name="qemu")
        driver.set("type", "qcow2")
        for chain in disk.findall("backingStore"):
            disk.remove(chain)
        ElementTree.SubElement(disk, "backingStore")  # standalone: no backing file to look for
    missing = sorted(set(files) - found)
    if missing:
        raise VmError("the saved domain has no disk %s" % ", ".join(missing))
    return ElementTree.tostring(root, encoding="unicode")


def disk_sources(domain_xml: str) -> Dict[str, str]:
    """Target -> source file of the domain's writable file disks."""
    return {target: disk.find("source").get("file") for target, disk in _writable_disk_elements(domain_xml)
            if disk.find("source") is not None and disk.find("source").get("file")}


def staged_disks(directory: str) -> Dict[str, str]:
    """Target -> path of the disk images (``DISK_IMAGE``) among a staged member image's files."""
    prefix, suffix = DISK_IMAGE.split("%s")
    return {name[len(prefix):-len(suffix)]: os.path.join(directory, name) for name in os.listdir(directory)
            if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix)}


def flatten_disk(top: str, out: str) -> None:
    """Write the content of the image ``top`` (with its backing chain) as a standalone qcow2 ``out``."""
    result = subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", top, out], capture_output=True, text=True)
    if result.returncode != 0:
        raise VmError("copying the disk state %s: %s" % (top, result.stderr.strip()))


def retarget_nic(domain_xml: str, mac: Optional[str], tap: str) -> str:
    """The domain XML with the NIC of ``mac`` (or the only NIC) on tap ``tap``."""
    root = ElementTree.fromstring(domain_xml)
    nics = root.findall("./devices/interface")
    if mac:
        nics = [n for n in nics if (n.find("mac") is not None and n.find("mac").get("address", "").lower()
                                    == mac.lower())]
    if len(nics) != 1:
        raise VmError("cannot tell which NIC to put on %s (%d candidates)" % (tap, len(nics)))
    target = nics[0].find("target")
    if target is not None and target.get("dev") == tap:
        return domain_xml
    if target is None:
        target = ElementTree.SubElement(nics[0], "target")
    target.set("dev", tap)
    target.set("managed", "no")
    return ElementTree.tostring(root, encoding="unicode")


def packet_socket_backlog(ifindex: int, path: str = "/proc/net/packet", exclude: Sequence[int] = ()) -> Optional[int]:
    """Bytes waiting in the receive queues of the AF_PACKET sockets bound to ``ifindex``
    (None if no socket reads it), leaving out the sockets of inode ``exclude`` (our own).

    Open vSwitch's userspace datapath reads a system port (a VM's tap)
    through such a socket: when they are empty, every frame the guest wrote
    to its tap has passed the switch's ingress.
    """
    total = None
    with open(path) as handle:
        next(handle)
        for line in handle:
            parts = line.split()  # sk RefCnt Type Proto Iface R Rmem User Inode
            if len(parts) >= 9 and int(parts[4]) == ifindex and int(parts[8]) not in exclude:
                total = (total or 0) + int(parts[6])
    return total


def wait_tap_drained(iface: str, timeout: float = 1.0, exclude: Sequence[int] = ()) -> float:
    """Wait until the switch has read every frame the (paused) guest sent; returns ms waited."""
    with open("/sys/class/net/%s/ifindex" % iface) as handle:
        ifindex = int(handle.read())
    began = time.monotonic()
    deadline = began + timeout
    if packet_socket_backlog(ifindex, exclude=exclude) is None:
        raise VmError("no switch reads %s (is the VM's tap on an Open vSwitch netdev bridge?)" % iface)
    while packet_socket_backlog(ifindex, exclude=exclude):
        if time.monotonic() > deadline:
            raise VmError("frames from %s still wait for the switch after %.1f s" % (iface, timeout))
        time.sleep(0.0002)
    return (time.monotonic() - began) * 1000


# --- a VM's marker: written into its tap as the guest's own frame ------------------------------
#
# A paused guest sends nothing, but the frames it sent are in the order QEMU wrote them to its tap,
# and a frame written to the same tap file after them follows them: a tap's write hands the frame to
# the host's receive path in the writer's own system call (``netif_receive_skb``, no queue, with no
# receive steering on the tap), so by the time QEMU stopped the guest every frame it sent is in the
# switch's socket, and the marker written then is behind all of them. The helper borrows QEMU's tap
# descriptor (``pidfd_getfd``), writes the marker with the header the tap expects (``tun_pi``, the
# virtio-net header), and watches the tap from the host for the switch's copy going out to the guest
# (QEMU, paused, does not read it; the guest gets it, and drops it, once it runs). That makes a VM's
# cut asynchronous like a CRIU member's: the switch colours the VM's frames by the flow it learned
# from the marker, the guest runs on without waiting for the controller, and the cut request frame
# written the same way once it runs asks for its flip.

SYS_PIDFD_GETFD = 438  # the same number on every architecture (the generic syscall table)
TUNGETIFF, TUNGETVNETHDRSZ = 0x800454D2, 0x800454D7  # _IOR('T', 210, unsigned int), _IOR('T', 215, int)
IFF_NO_PI, IFF_VNET_HDR = 0x1000, 0x4000
IFF_NAPI, IFF_NAPI_FRAGS = 0x0010, 0x0020  # the tap's frames go through a NAPI queue, not the writer's own call


def tun_fds(pid: int, tap: str, proc: str = "/proc") -> List[int]:
    """``pid``'s file descriptors on the tap device ``tap`` (a tun descriptor's fdinfo names it)."""
    found = []
    base = "%s/%d/fdinfo" % (proc, pid)
    for name in os.listdir(base):
        try:
            with open(os.path.join(base, name)) as handle:
                text = handle.read()
        except OSError:
            continue
        if "iff:\t" + tap in text.splitlines():
            found.append(int(name))
    return sorted(found)


def borrow_fd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of ``pid``'s descriptor ``fd`` (``pidfd_getfd``, Linux 5.6)."""
    import ctypes
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        copied = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copied < 0:
            error = ctypes.get_errno()
            raise OSError(error, "pidfd_getfd of fd %d of pid %d: %s" % (fd, pid, os.strerror(error)))
        return int(copied)
    finally:
        os.close(pidfd)


def tun_write_prefix(flags: int, vnet_header_size: int) -> bytes:
    """What a tap file with ``flags`` wants before each frame written to it: a ``tun_pi`` (unless
    IFF_NO_PI), then a virtio-net header of ``vnet_header_size`` bytes (if IFF_VNET_HDR); all zero:
    no checksum offload, no segmentation."""
    return (b"" if flags & IFF_NO_PI else bytes(4)) + (bytes(vnet_header_size) if flags & IFF_VNET_HDR else b"")


class TapWriter:
    """Writes frames into ``tap`` as the guest's, through a copy of QEMU's descriptor ``fd`` on it,
    borrowed for each write (some tens of microseconds) and given back at once: a copy held longer
    would keep a gone VM's tap up."""

    def __init__(self, pid: int, fd: int, tap: str):
        self.pid, self.number, self.tap = pid, fd, tap

    def write(self, frame: bytes) -> None:
        fd = borrow_fd(self.pid, self.number)
        try:
            flags, size = self._headers(fd)
            os.write(fd, tun_write_prefix(flags, size) + frame)
        finally:
            os.close(fd)

    def check(self) -> Optional[str]:
        """Why frames written here could overtake the guest's (None: they cannot)."""
        fd = borrow_fd(self.pid, self.number)
        try:
            flags, _size = self._headers(fd)
        finally:
            os.close(fd)
        return ("the tap takes frames through NAPI (IFF_NAPI)" if flags & (IFF_NAPI | IFF_NAPI_FRAGS) else None)

    def _headers(self, fd: int):
        """The tap file's flags and virtio-net header size, after checking it is still on our tap."""
        import fcntl
        request = fcntl.ioctl(fd, TUNGETIFF, bytes(40))  # struct ifreq: the name, then ifr_flags
        name = request[:16].split(b"\0", 1)[0].decode(errors="replace")
        if name != self.tap:
            raise VmError("QEMU's descriptor %d is on %s now, not on %s" % (self.number, name, self.tap))
        flags = struct.unpack_from("=H", request, 16)[0]
        size = struct.unpack("=i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4)))[0] if flags & IFF_VNET_HDR else 0
        return flags, size


def receive_steered(tap: str, sys_net: str = "/sys/class/net") -> bool:
    """Whether the host may hand the tap's frames to other CPUs' queues (RPS or RFS on any of its
    receive queues): then a frame written later could overtake an earlier one."""
    base = os.path.join(sys_net, tap, "queues")
    for queue_name in os.listdir(base):
        if not queue_name.startswith("rx-"):
            continue
        for knob in ("rps_cpus", "rps_flow_cnt"):
            try:
                with open(os.path.join(base, queue_name, knob)) as handle:
                    value = handle.read().strip().replace(",", "")
            except OSError:
                continue
            if value and int(value, 16 if knob == "rps_cpus" else 10):
                return True
    return False


def open_tap_watch(tap: str):
    """An AF_PACKET socket on ``tap`` in the host's namespace that gets only frames of the marker's
    ethertype (a classic BPF filter, attached before it is bound: it copies none of the guest's traffic),
    both those the switch sends out to the guest and those written in as the guest's."""
    import ctypes
    import socket
    from violin_core.packets import PROBE_ETH_TYPE
    ETH_P_ALL, SO_ATTACH_FILTER = 0x0003, 26
    program = [(0x28, 0, 0, 12),  # ldh [12]: the ethertype
               (0x15, 0, 1, PROBE_ETH_TYPE),  # jeq: accept, else drop
               (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *insn) for insn in program))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing until bound
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("=HxxxxxxQ", len(program),
                                                                         ctypes.addressof(code)))
        sock.bind((tap, ETH_P_ALL))
    except OSError:
        sock.close()
        raise
    return sock


class VmCutProof:
    """What proves a VM's cut while QEMU has it stopped (``quiet_proof``): ``proof()`` waits until the
    switch has read every frame the guest sent (the tap drained: the synchronous cut);
    ``proof(confirm=True)`` writes the VM's marker into its tap and waits for the switch's copy (the
    asynchronous cut, ``marks``); ``request_cut()`` writes the cut request behind it (at the cut: the
    backend ``flips_stopped``)."""

    def __init__(self, tap: str, link=None, why_not: Optional[str] = None):
        self.tap, self.link, self.why_not = tap, link, why_not
        self.marks = link is not None

    def __call__(self, confirm: bool = False) -> float:
        if confirm:
            if self.link is None:
                raise VmError("no marker can be written into %s: %s" % (self.tap, self.why_not))
            self.link.prove(confirm=True)
            return self.link.confirm_ms or 0.0  # the report's drain_ms: the marker's round trip through the switch
        exclude = (os.fstat(self.link.sock.fileno()).st_ino,) if self.link is not None else ()
        return wait_tap_drained(self.tap, exclude=exclude)

    def request_cut(self) -> None:
        self.link.request_cut()


@contextlib.contextmanager
def vm_cut_proof(domain: str, tap: str, mac: Optional[str], snapshot: str, member: str):
    """A ``VmCutProof`` for ``domain``'s tap: with a marker link if QEMU has a descriptor on the tap to
    borrow at the cut and frames written to it keep their order (else the reason is ``why_not`` and the
    cut is synchronous)."""
    from hostside.backends.criu import MarkerLink
    from violin_core.packets import build_cut_request, build_marker
    pid, why_not, fds, sock = _qemu_pid(domain), None, [], None
    try:
        if not mac:
            why_not = "the VM's NIC has no MAC address in its XML"
        elif pid is None or not _is_qemu_of(pid, domain):
            why_not = "QEMU's process for %s is not found" % domain
        elif receive_steered(tap):
            why_not = "receive packet steering is on for %s (a marker could overtake the guest's frames)" % tap
        else:
            fds = tun_fds(pid, tap)
            why_not = TapWriter(pid, fds[0], tap).check() if fds else "QEMU holds no descriptor on %s" % tap
            if why_not is None:
                sock = open_tap_watch(tap)
    except (OSError, VmError) as error:
        why_not = "%s: %s" % (tap, error)
    if why_not is not None:
        LOG.info("the cut of %s is synchronous: %s", member, why_not)
        yield VmCutProof(tap, why_not=why_not)
        return
    link = MarkerLink(sock, build_marker(mac, snapshot, member), cut_request=build_cut_request(mac, snapshot, member),
                      send=TapWriter(pid, fds[0], tap).write, echo_outgoing=True, error=VmError)
    try:
        yield VmCutProof(tap, link)
    finally:
        sock.close()


# --- holding a VM's frames only around its switchover ------------------------------------------
#
# Frames that reach a VM's tap while QEMU has the guest stopped wait in the tap's queue (QEMU reads
# its tap only while the guest runs) and would reach the guest after its cut without being in the
# image: so every frame for the VM must be held by the controller from before the guest stops. Holding
# from before the migration starts makes the VM deaf for its whole pre-copy. Instead the helper lets
# the pre-copy run with nothing held and holds only around the switchover:
#
#   1. QEMU migrates as it would without the hook (same downtime limit): it stops the guest itself
#      when what remains of its pass fits in the downtime limit (``ram.remaining`` under bandwidth x
#      limit, here at the end of the first pass).
#   2. The helper polls ``query-migrate`` (every 2-15 ms: each poll costs QEMU and libvirt CPU); when
#      the pass is projected to reach QEMU's stopping point (its threshold: the stream's bandwidth times
#      the limit, none before its first 100 ms) within a few poll latencies it stops reading QEMU's pipe
#      (the gate): QEMU's migration thread blocks in its next write and cannot decide to stop.
#   3. It calls the controller's prepare (every frame for the VM held from now on), then checks that the
#      guest still runs: that proves QEMU stopped it, if at all, after the hold was in force. If the
#      guest is already stopped, QEMU got there first and the snapshot fails with the reason (nothing
#      is taken; the migration is cancelled and the guest runs on).
#      (``HoldTooLate``: the backend then takes the snapshot again with frames held from the start.)
#   4. It waits until QEMU has read every frame that reached the tap before the hold (the tap's queue:
#      frames the switch sent into it minus those QEMU read or the tap dropped), opens the gate, and
#      QEMU finishes its pass and stops the guest itself: the guest's pause is the mechanism's own.
#      The VM is deaf for the prepare, the rest of the pass (the poll's lead), any further rounds QEMU
#      needs (a guest dirtying more than the limit allows) and its pause. (Stopping the guest from the
#      helper instead, when QEMU had not within two downtime limits, was measured: it did so in 21 of 24
#      snapshots on a loaded machine and made the pause 4.7-7.3x the bare mechanism's, as the final stage
#      then sent what further rounds would have sent live.)
#   5. At the cut (pre-switchover, guest stopped) the tap's queue is checked again: a frame waiting
#      there would be delivered after the cut without being in the image or the channel state, so the
#      snapshot fails instead.
# Any frame that reached the tap while QEMU had the guest stopped therefore either arrived before the
# hold (and was read by QEMU before the stop: step 4 and 5 prove none is left), or was held by the
# controller: pre-cut frames among the held ones become the snapshot's channel state at the flip.


def qdisc_sent_packets(ifindex: int) -> Optional[int]:
    """Packets the root qdisc of ``ifindex`` handed to the device (netlink RTM_GETQDISC), or None."""
    import socket
    RTM_GETQDISC, NLM_F_REQUEST, NLM_F_DUMP, NLMSG_DONE, NLMSG_ERROR = 38, 1, 0x300, 3, 2
    TCA_STATS2, TCA_STATS_BASIC, TC_H_ROOT = 7, 1, 0xFFFFFFFF
    request = struct.pack("=LHHLL", 16 + 20, RTM_GETQDISC, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + \
        struct.pack("=BxxxiLLL", 0, ifindex, 0, 0, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.sendto(request, (0, 0))
        found = None
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=LH", data, offset)
                if length < 16:
                    return found
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    return found
                _family, index, _handle, parent, _info = struct.unpack_from("=BxxxiLLL", data, offset + 16)
                if index == ifindex and parent == TC_H_ROOT:
                    found = _basic_packets(data[offset + 36:offset + length], TCA_STATS2, TCA_STATS_BASIC)
                offset += (length + 3) & ~3


def _basic_packets(attributes: bytes, stats2: int, basic: int) -> Optional[int]:
    """The packet count of a qdisc message's TCA_STATS2 / TCA_STATS_BASIC (struct gnet_stats_basic)."""
    def walk(blob):
        offset = 0
        while offset + 4 <= len(blob):
            length, kind = struct.unpack_from("=HH", blob, offset)
            if length < 4:
                return
            yield kind & 0x3FFF, blob[offset + 4:offset + length]
            offset += (length + 3) & ~3
    for kind, value in walk(attributes):
        if kind == stats2:
            for inner, stats in walk(value):
                if inner == basic and len(stats) >= 12:
                    return struct.unpack_from("=QL", stats)[1]
    return None


def tap_unread(tap: str) -> Optional[int]:
    """Frames the switch sent into ``tap`` that its reader (QEMU) has not read: the root qdisc's sent
    count minus the tap's tx_packets (frames read) and tx_dropped. None if the tap cannot tell (no
    counting qdisc). Offset by a constant the tap's history may add: compare with a floor measured
    while QEMU reads (``unread_floor``)."""
    base = "/sys/class/net/%s/" % tap
    try:
        with open(base + "ifindex") as handle:
            ifindex = int(handle.read())
        sent = qdisc_sent_packets(ifindex)
        if sent is None:
            return None
        with open(base + "statistics/tx_packets") as handle:
            read = int(handle.read())
        with open(base + "statistics/tx_dropped") as handle:
            dropped = int(handle.read())
    except (OSError, ValueError):
        return None
    return sent - read - dropped


def migration_thread_blocked(pid: Optional[int]) -> Optional[bool]:
    """Whether QEMU's migration thread (``live_migration``) sleeps writing to its pipe (None: unknown)."""
    if not pid:
        return None
    try:
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/comm" % (pid, task)) as handle:
                if handle.read().strip() != "live_migration":
                    continue
            with open("/proc/%d/task/%s/wchan" % (pid, task)) as handle:
                return "pipe_write" in handle.read()  # pipe_write, anon_pipe_write (6.x)
    except OSError:
        return None
    return None


class HoldTooLate(VmError):
    """QEMU stopped the guest before frames to it were held: this migration cannot be the snapshot."""


class SwitchoverHold:
    """Steps 2-4 above, with QEMU, the pipe gate, the controller and the clock injected.

    ``migration()`` is query-migrate's answer; ``running()`` whether the guest runs (query-status);
    ``gate(open)`` starts/stops the helper reading QEMU's pipe; ``blocked()`` whether QEMU's migration
    thread waits on that pipe (None: cannot tell); ``prepare()`` the controller's prepare; ``unread()``
    frames waiting in the tap (None: cannot tell); ``check()`` raises if the migration went wrong
    (the VM vanished, the sink failed). The gate shuts when what remains of the pass, beyond what
    QEMU will stop at (``threshold``), is projected to go within ``lead_ms`` plus the last poll's round
    trip and the recent ones' median.

    What the pass leaves falls at 0.4 to 3 MB/ms in one pass (zero pages go fast; 12-03), so a poll
    never sleeps more than ``MAX_POLL_S``: sleeping on the first rate seen slept past the pass's end
    in 2 of 8 snapshots, each then taken again with frames held from the start."""

    MAX_POLL_S = 0.015
    WINDOW_S = 0.1  # QEMU computes its threshold (bandwidth x downtime limit) over windows of 100 ms

    def __init__(self, migration, running, gate, blocked, prepare, unread, check=lambda: None,
                 clock=time.monotonic, sleep=time.sleep, lead_ms: float = 5.0, downtime_limit_ms: float = 20.0,
                 drain_timeout: float = 0.2):
        self.migration, self.running, self.gate, self.blocked = migration, running, gate, blocked
        self.prepare, self.unread, self.check = prepare, unread, check
        self.clock, self.sleep, self.lead, self.drain_timeout = clock, sleep, lead_ms / 1000.0, drain_timeout
        self.limit = downtime_limit_ms / 1000.0
        self.floor: Optional[int] = None  # fewest frames ever seen waiting in the tap: its counters' offset
        self.timings: Dict[str, float] = {}

    def sample_unread(self) -> Optional[int]:
        unread = self.unread()
        if unread is not None and (self.floor is None or unread < self.floor):
            self.floor = unread
        return unread

    def run(self, deadline: float) -> None:
        """Wait for the end of the pre-copy's pass, prepare the hold, and let QEMU stop the guest."""
        began = self.clock()
        first = last = None  # (time, remaining) of the first active poll and of the previous one
        sent = None  # (time, transferred) of the first active poll: the stream's own byte rate
        latencies: List[float] = []  # of the polls so far
        while True:
            if self.clock() > deadline:
                raise VmError("the pre-copy did not come near its end in time")
            self.check()
            asked = self.clock()
            info = self.migration() or {}
            now = self.clock()
            latencies.append(now - asked)
            status = info.get("status")
            if status in ("failed", "cancelled"):
                raise VmError("migration %s: %s" % (status, info.get("error-desc", status)))
            if status not in ("setup", "active", None):
                raise HoldTooLate("QEMU stopped the guest (migration %s) before frames to it were held" % status)
            self.sample_unread()
            ram = info.get("ram") or {}
            remaining = ram.get("remaining")
            if status == "active" and remaining is not None:
                rates = [(a[1] - remaining) / (now - a[0]) for a in (first, last)
                         if a is not None and now > a[0] and a[1] > remaining]
                rate = max(rates) if rates else None  # bytes of the pass per second: overall or lately
                threshold = self.threshold(ram, now, sent, began, remaining, rate)
                # The answer is as old as its poll's round trip at most, and the next poll takes about as
                # long as the recent ones: a round trip can take 50-90 ms when 3 VMs migrate on 2 cores, and
                # three times the slowest one made the gate shut with 60 MB of the pass left (12-03).
                recent = sorted(latencies[-5:])
                lead = self.lead + latencies[-1] + recent[(len(recent) - 1) // 2]
                if remaining == 0 or (rate is not None and remaining <= threshold + rate * lead):
                    break
                first = first or (now, remaining)
                last = (now, remaining)
                if sent is None and ram.get("transferred") is not None:
                    sent = (now, ram["transferred"])
                wait = ((remaining - threshold) / rate - lead) / 3 if rate else 0.01
                self.sleep(min(self.MAX_POLL_S, max(0.002, wait)))
            else:
                self.sleep(0.005)
        self.timings["precopy_ms"] = (self.clock() - began) * 1000
        gated = self.clock()
        self.gate(False)
        try:
            while self.blocked() is False and self.clock() < gated + 0.05:  # QEMU fills the pipe, then waits
                self.sleep(0.0002)
            self.timings["gate_ms"] = (self.clock() - gated) * 1000
            self.prepare()
            self.timings["prepare_ms"] = (self.clock() - gated) * 1000 - self.timings["gate_ms"]
            if not self.running():
                raise HoldTooLate("QEMU stopped the guest before frames to it were held (the pre-copy's pass "
                                  "ended before the helper's gate took hold)")
            drained = self.clock()
            while True:  # frames that reached the tap before the hold: QEMU reads them while the guest runs
                unread = self.sample_unread()
                if unread is None or unread <= self.floor:
                    break
                if self.clock() > drained + self.drain_timeout:
                    raise VmError("%d frames stay unread in the VM's tap" % (unread - self.floor))
                self.sleep(0.0002)
            self.timings["tap_drain_ms"] = (self.clock() - drained) * 1000
        finally:
            self.gate(True)

    def threshold(self, ram: dict, now: float, sent, began: float, remaining: int, rate: Optional[float]) -> float:
        """The bytes left of its pass at which QEMU will stop the guest: its ``threshold_size``, the
        stream's bandwidth over its last 100 ms window (``mbps``) times the downtime limit. Before its
        first window ends (100 ms after ``began``, the migrate command, at the earliest) it has none and
        stops at the pass's end; for a pass that may outlast that window, the stream's byte rate seen so
        far (``transferred``) stands in. A QEMU that reports neither: the pass's own rate times the limit
        (that rate counts zero pages, which the stream hardly does: 2-5x the stream's)."""
        mbps, transferred = ram.get("mbps"), ram.get("transferred")
        if mbps is None and transferred is None:
            return (rate or 0.0) * self.limit
        byte_rate = ((transferred - sent[1]) / (now - sent[0]) if sent is not None and transferred is not None
                     and now > sent[0] else 0.0)
        if not mbps and rate and now + remaining / rate < began + self.WINDOW_S - 3 * self.lead:
            return 0.0  # the pass ends inside QEMU's first window
        return max((mbps or 0.0) * 125000.0, byte_rate) * self.limit

    def verify_at_cut(self) -> None:
        """With the guest stopped: no frame waits in its tap (it would be in neither image nor channel state)."""
        unread = self.unread()
        if unread is not None and self.floor is not None and unread > self.floor:
            raise VmError("%d frames reached the VM's tap but not the guest before it stopped: they would be "
                          "in neither its image nor the channel state; the snapshot is not taken"
                          % (unread - self.floor))


PIPE_SIZE = 1 << 16  # Linux's default pipe size


def _set_pipe_size(fd: int, size: int) -> None:
    import fcntl
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        pass  # more than that waits in the pipe: QEMU blocks a little later


def _nic_taps(domain_xml: str) -> List[str]:
    """The host taps of the domain's NICs (``<target dev=...>``)."""
    root = ElementTree.fromstring(domain_xml)
    return [t.get("dev") for t in root.findall("./devices/interface/target") if t.get("dev")]


def _tap_counter(tap: str, counter: str) -> Optional[int]:
    try:
        with open("/sys/class/net/%s/statistics/%s" % (tap, counter)) as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def _qemu_pid(name: str) -> Optional[int]:
    try:
        with open("/run/libvirt/qemu/%s.pid" % name) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _is_qemu_of(pid: int, name: str) -> bool:
    """Whether ``pid`` runs QEMU for libvirt domain ``name`` (libvirt passes ``-name guest=<name>,...``)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return False
    wanted = ("guest=%s" % name).encode()
    return any(arg == wanted or arg.startswith(wanted + b",") for arg in argv)


def _zombie(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            return handle.read().rsplit(b") ", 1)[1][:1] in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def kill_qemu(name: str, timeout: float = 2.0) -> bool:
    """SIGKILL domain ``name``'s QEMU and wait until it is reaped (at most ``timeout``); whether it was.

    ``virDomainDestroy`` sends SIGTERM, then looks every 200 ms whether QEMU is gone, so a VM thrown
    away (a restore replaces it) cost 200 ms and, under an init that reaps orphans late, 1-1.7 s
    (12-03). A QEMU that is already gone is stopped at once. The pid is checked and signalled
    through a pidfd, so a pid reused meanwhile is never hit."""
    pid = _qemu_pid(name)
    if not pid:
        return False
    try:
        handle = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not _is_qemu_of(pid, name):
            return False
        signal.pidfd_send_signal(handle, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        if not select.select([handle], [], [], timeout)[0]:  # readable once it exited
            return False
        while _zombie(pid):  # exited; libvirt's reaper (its parent) takes it next
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True
    except OSError:
        return False
    finally:
        os.close(handle)


_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop():
    """libvirt delivers events only through a registered event loop, run here in a daemon thread."""
    global _loop_started
    import libvirt
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


@dataclass
class MigrationReport:
    pause_ms: float  # pre-switchover seen -> guest running again (what the guest's peers see)
    hook_ms: float  # the cut hook (drain proof + controller cut)
    drain_ms: float
    precopy_ms: float  # migrate started -> guest paused (the live part)
    switchover_ms: float  # after the cut: QEMU sends the rest and the device state, then the guest runs
    total_ms: float
    bytes: int  # the stored image (header + migration stream)
    sha256: str
    qemu_pause_ms: Optional[float] = None  # QEMU's STOP -> RESUME event timestamps
    qemu_downtime_ms: Optional[float] = None  # QEMU's own "downtime" of the migration
    libvirt_pause_ms: Optional[float] = None  # libvirt's SUSPENDED -> RESUMED lifecycle events
    disk_ms: float = 0.0  # switching the writable disks to new overlays, in the pause
    disks: List[dict] = field(default_factory=list)  # per writable disk: target, frozen (its image at the cut)
    stored: dict = field(default_factory=dict)
    hold: dict = field(default_factory=dict)  # when frames to the VM began to be held, and the steps' ms
    tap_dropped: int = 0  # frames for the guest its tap dropped during the migration (queue full)
    teed: Optional[str] = None  # the file that holds a whole copy of the image (``migrate_out``'s tee)

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class Libvirt:
    """A connection to libvirtd with QMP access to its domains."""

    def __init__(self, uri: str = "qemu:///system"):
        import libvirt
        _ensure_event_loop()
        libvirt.registerErrorHandler(lambda _context, _error: None, None)  # errors reach us as exceptions
        self.libvirt = libvirt
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as error:
            raise VmError("cannot connect to libvirt at %s: %s" % (uri, error)) from None
        self.uri = uri
        # One event registration per connection for every domain, dispatched by name: concurrent
        # per-domain registrations on one connection lose events in libvirt-python.
        self.events_lock = threading.Lock()
        self.files_lock = threading.Lock()
        self.listeners = {}  # domain name -> (events queue, event stamps) of a running migrate_out
        import libvirt_qemu
        libvirt_qemu.qemuMonitorEventRegister(self.conn, None, None, self._on_qmp, None, 0)
        self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    def _listener(self, dom):
        with self.events_lock:
            return self.listeners.get(dom.name(), (None, None))

    def _on_qmp(self, _conn, dom, event, seconds, micros, details, _opaque):
        events, stamps = self._listener(dom)
        if events is None:
            return
        stamp = seconds + micros / 1e6
        if event == "STOP":
            stamps.setdefault("STOP", stamp)
        elif event == "RESUME":
            stamps["RESUME"] = stamp
        elif event == "MIGRATION":
            events.put(("migration", (json.loads(details) if details else {}).get("status")))
        elif event == "SHUTDOWN":
            events.put(("gone", "the guest shut down"))

    def _on_lifecycle(self, _conn, dom, event, _detail, _opaque):
        events, stamps = self._listener(dom)
        if events is None:
            return
        libvirt = self.libvirt
        if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
            stamps.setdefault("suspended", time.monotonic())
        elif event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
            stamps["resumed"] = time.monotonic()
        elif event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            events.put(("gone", "domain %s stopped" % dom.name()))

    def domain(self, name: str):
        try:
            return self.conn.lookupByName(name)
        except self.libvirt.libvirtError:
            raise VmError("no libvirt domain %s" % name) from None

    def qmp(self, dom, command: str, arguments: Optional[dict] = None, files=None):
        import libvirt_qemu
        message = json.dumps({"execute": command, "arguments": arguments or {}})
        try:
            if files:
                # One descriptor-passing command at a time on this connection (cheap, and nothing
                # relies on libvirt keeping concurrent ones apart).
                with self.files_lock:
                    answer, _ = libvirt_qemu.qemuMonitorCommandWithFiles(dom, message, files, 0)
            else:
                answer = libvirt_qemu.qemuMonitorCommand(dom, message, 0)
        except self.libvirt.libvirtError as error:
            raise VmError("QMP %s on %s: %s" % (command, dom.name(), error)) from None
        reply = json.loads(answer)
        if "error" in reply:
            raise VmError("QMP %s on %s: %s" % (command, dom.name(), reply["error"].get("desc", reply["error"])))
        return reply.get("return")

    def _cont_after_migration(self, dom, deadline: float) -> None:
        """``cont`` once QEMU has left its finish-migrate run state. The "completed" migration event comes
        from QEMU's migration thread a moment before its main loop moves to postmigrate, and a ``cont``
        in between is refused ("Migration is not finalized yet", seen 12-02 with two VMs at once)."""
        while True:
            try:
                self.qmp(dom, "cont")
                return
            except VmError as error:
                if "not finalized" not in str(error) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.002)

    # --- snapshot ------------------------------------------------------------

    def migrate_out(self, name: str, sink: Callable, on_paused: Callable[[], float],
                    timeout: float = 120.0, max_bandwidth: int = 4 << 30,
                    downtime_limit_ms: int = 20, prepare: Optional[Callable[[], None]] = None,
                    hold_late: bool = True, tee: Optional[str] = None,
                    resumed: Optional[Callable[[], None]] = None) -> MigrationReport:
        """Live-migrate ``name`` into ``sink(reader) -> stored`` and run ``on_paused`` at the cut.

        ``sink`` runs in a thread and must read the stream to its end (it is
        a libvirt save file); ``on_paused`` returns the ms it spent proving the
        tap drained. ``prepare`` (the controller's hold of frames for the VM) is
        called just before the switchover (``SwitchoverHold``), or before the
        migration starts if the VM's tap cannot show its queue or ``hold_late``
        is False; without it QEMU converges on its own (the bare mechanism).
        On any failure the migration is cancelled and the guest left running
        (``HoldTooLate``: QEMU stopped the guest before the hold). ``tee``: a file the image is also
        written to as the sink reads it (the report's ``teed`` names it if it holds the whole image).
        ``resumed`` runs as soon as the guest runs again (an asynchronous cut asks for its flip then).
        """
        import hashlib
        dom = self.domain(name)
        if not dom.isActive():
            raise VmError("domain %s is not running" % name)
        xml = dom.XMLDesc(self.libvirt.VIR_DOMAIN_XML_MIGRATABLE | self.libvirt.VIR_DOMAIN_XML_SECURE)
        uncapturable = uncapturable_disks(xml)
        if uncapturable:
            raise VmError("domain %s has disks a snapshot cannot take (%s): only local file disks are captured"
                          % (name, ", ".join(uncapturable)))
        unsound = precopy_loses_writes(bool((self.qmp(dom, "query-kvm") or {}).get("enabled")),
                                       self.qmp(dom, "query-version") or {})
        if unsound:
            raise VmError("cannot snapshot %s: %s" % (name, unsound))
        taps = _nic_taps(dom.XMLDesc(0))
        hold = None
        if prepare is not None:
            if hold_late and taps and all(tap_unread(tap) is not None for tap in taps):
                hold = SwitchoverHold(
                    migration=lambda: self.qmp(dom, "query-migrate"),
                    running=lambda: (self.qmp(dom, "query-status") or {}).get("status") == "running",
                    gate=lambda opened: gate(opened), blocked=lambda: migration_thread_blocked(qemu_pid),
                    prepare=prepare, unread=lambda: sum(tap_unread(tap) or 0 for tap in taps),
                    check=lambda: self._check_events(dom, events), downtime_limit_ms=downtime_limit_ms)
            else:
                prepare()  # no proof of the tap's queue: hold for the whole pre-copy, as it always worked
        qemu_pid = _qemu_pid(name)
        dropped_before = sum(_tap_counter(tap, "tx_dropped") or 0 for tap in taps)
        disks = self._disk_plan(dom, name)
        events: "queue.Queue" = queue.Queue()
        stamps = {}
        with self.events_lock:
            self.listeners[name] = (events, stamps)
        reader_fd, writer_fd = os.pipe()
        digest, counted, outcome = hashlib.sha256(), [0], {}
        header = save_header(xml)

        from hostside.store.spool import Spool
        buffered = Spool()  # 32 MiB in memory at most, the rest spooled to a temp file on local disk
        buffered.put(header)
        gate_open = threading.Event()
        gate_open.set()

        def gate(opened: bool) -> None:
            """Stop (and start again) reading QEMU's pipe: a shut gate blocks its migration thread in
            its next write. The pipe shrinks to a page while shut, so that QEMU blocks at once."""
            if opened:
                _set_pipe_size(reader_fd, PIPE_SIZE)
                gate_open.set()
            else:
                gate_open.clear()
                _set_pipe_size(reader_fd, 4096)

        def read_gated():
            gate_open.wait()
            return os.read(reader_fd, CHUNK)

        def pump():
            """Drain QEMU's pipe at once (into a bounded spool): a sink stalled by disk or network must
            never stall QEMU's final writes, which it makes with the guest paused."""
            try:
                for chunk in iter(read_gated, b""):
                    buffered.put(chunk)
            finally:
                buffered.put(b"")
                os.close(reader_fd)

        copy = {"file": open(tee, "wb") if tee else None}  # noqa: SIM115 - closed below, or by its error

        def write_copy(data: bytes) -> None:
            handle = copy.get("file")
            if handle is None:
                return
            try:
                handle.write(data)
            except (OSError, ValueError) as error:  # e.g. the disk is full: the snapshot goes on, not kept
                LOG.warning("the local copy of %s's image stopped: %s", name, error)
                copy.pop("file", None)
                _close_quietly(handle)

        class Reader:
            """The image as the sink reads it: our header, then QEMU's stream; checksummed (and copied to
            ``tee``) on the way."""

            def __init__(self):
                self.rest, self.ended = b"", False

            def read(self, size=CHUNK):
                if not self.rest and not self.ended:
                    self.rest = buffered.get()
                    self.ended = not self.rest
                data, self.rest = self.rest[:size], self.rest[size:]
                digest.update(data)
                counted[0] += len(data)
                if data:
                    write_copy(data)
                return data

        def consume():
            try:
                outcome["stored"] = sink(Reader())
            except Exception as error:  # reported to the migrating thread below
                outcome["error"] = error
                events.put(("sink", str(error)))

        began = time.monotonic()
        paused = resumed_at = None
        hook_ms = drain_ms = disk_ms = 0.0
        sink_thread = hook_thread = None
        try:
            try:
                self.qmp(dom, "getfd", {"fdname": FD_NAME}, files=[writer_fd])
            finally:
                os.close(writer_fd)
            self.qmp(dom, "migrate-set-capabilities",
                     {"capabilities": [{"capability": "pause-before-switchover", "state": True}]})
            self.qmp(dom, "migrate-set-parameters", {"max-bandwidth": max_bandwidth,
                                                     "downtime-limit": downtime_limit_ms})
            threading.Thread(target=pump, name="vm-pipe-%s" % name, daemon=True).start()
            sink_thread = threading.Thread(target=consume, name="vm-image-%s" % name, daemon=True)
            sink_thread.start()
            self.qmp(dom, "migrate", {"uri": "fd:" + FD_NAME})
            if hold is not None:
                hold.run(began + timeout)  # frames are held from now on: the VM is deaf until its cut
            opened = time.monotonic()
            self._wait_status(dom, events, "pre-switchover", began + timeout)
            paused = time.monotonic()
            if hold is not None:
                hold.timings["stop_after_gate_ms"] = (paused - opened) * 1000  # deaf already: the pass's rest
                hold.verify_at_cut()
            for disk in disks:  # the disks' state at the cut: their images take no more writes
                self.qmp(dom, "blockdev-snapshot-sync", {
                    "node-name": disk["node"], "snapshot-file": disk["overlay"],
                    "snapshot-node-name": disk["new_node"], "mode": "existing", "format": "qcow2"})
                disk["switched"] = True
            disk_ms = (time.monotonic() - paused) * 1000
            hook_began = time.monotonic()
            hooked = {}

            def hook():
                try:
                    hooked["drain_ms"] = on_paused() or 0.0
                except BaseException as error:  # noqa: B902 - raised in the migrating thread below
                    hooked["error"] = error
                hooked["ms"] = (time.monotonic() - hook_began) * 1000
            hook_thread = threading.Thread(target=hook, name="vm-cut-%s" % name, daemon=True)
            hook_thread.start()
            # QEMU sends the rest of its stream while the controller cuts: the image is the guest as it
            # stopped, whatever the cut does, and the guest stays stopped until both are done (cont
            # below), so its cut rules are in force before it runs again. The pause is the longer of
            # the two, not their sum.
            self.qmp(dom, "migrate-continue", {"state": "pre-switchover"})
            switchover = time.monotonic()
            self._wait_status(dom, events, "completed", began + timeout)
            hook_thread.join(max(0.0, began + timeout - time.monotonic()))
            if hook_thread.is_alive():
                raise VmError("the cut of %s did not end in time" % name)
            if "error" in hooked:
                raise hooked["error"]
            drain_ms, hook_ms = hooked["drain_ms"], hooked["ms"]
            self._cont_after_migration(dom, began + timeout)
            resumed_at = time.monotonic()
            if resumed is not None:
                try:
                    resumed()
                except Exception as error:  # noqa: BLE001 - its caller asks again once the image is stored
                    LOG.warning("%s runs again, but its flip was not asked for yet: %s", name, error)
            info = self.qmp(dom, "query-migrate") or {}
            sink_thread.join(max(1.0, began + timeout - time.monotonic()))
            if sink_thread.is_alive():
                raise VmError("the image of %s did not finish storing in time" % name)
            if "error" in outcome:
                raise VmError("storing the image of %s failed: %s" % (name, outcome["error"]))
            teed = None
            if copy.get("file") is not None:
                try:
                    copy.pop("file").close()
                    teed = tee
                except OSError as error:
                    LOG.warning("the local copy of %s's image failed: %s", name, error)
        except BaseException:
            if sink_thread is None:
                os.close(reader_fd)
            if hook_thread is not None:
                hook_thread.join(5.0)  # the cut's answer first: the guest runs again only after it
            self._recover(dom, name)
            for disk in disks:
                if not disk.get("switched"):
                    _unlink_quietly(disk["overlay"])
            if sink_thread is not None:
                sink_thread.join(5.0)
            if copy.get("file") is not None:
                _close_quietly(copy.pop("file", None))
            raise
        finally:
            with self.events_lock:
                self.listeners.pop(name, None)
        time.sleep(0.01)  # let the RESUME events arrive
        qemu_pause = (stamps["RESUME"] - stamps["STOP"]) * 1000 if {"RESUME", "STOP"} <= set(stamps) else None
        libvirt_pause = ((stamps["resumed"] - stamps["suspended"]) * 1000
                         if {"resumed", "suspended"} <= set(stamps) else None)
        return MigrationReport(
            pause_ms=(resumed_at - paused) * 1000, hook_ms=hook_ms, drain_ms=drain_ms,
            precopy_ms=(paused - began) * 1000, switchover_ms=(resumed_at - switchover) * 1000,
            total_ms=(time.monotonic() - began) * 1000,
            bytes=counted[0], sha256=digest.hexdigest(), qemu_pause_ms=qemu_pause,
            qemu_downtime_ms=info.get("downtime"), libvirt_pause_ms=libvirt_pause, disk_ms=disk_ms,
            disks=[{"target": d["target"], "frozen": d["top"], "overlay": d["overlay"]} for d in disks],
            stored=outcome.get("stored") or {}, teed=teed,
            hold=(dict({k: round(v, 3) for k, v in hold.timings.items()}, at="switchover") if hold is not None
                  else {"at": "start" if prepare is not None else "none"}),
            # Frames the tap dropped meanwhile (its queue full while the guest was stopped: lost like on any
            # link; a long hold released at once can do it).
            tap_dropped=sum(_tap_counter(tap, "tx_dropped") or 0 for tap in taps) - dropped_before)

    def _disk_plan(self, dom, name: str) -> List[dict]:
        """Each writable disk of the running domain: its block node and top image, and a new qcow2
        overlay on it (made now, owned like the image) that the guest writes to from the cut on,
        so that the image keeps the disk as it was at the cut."""
        aliases = {}  # libvirt's device alias -> disk target
        for disk in ElementTree.fromstring(dom.XMLDesc(0)).findall("./devices/disk"):
            alias, target = disk.find("alias"), disk.find("target")
            if disk.get("device", "disk") == "disk" and alias is not None and target is not None:
                aliases[alias.get("name")] = target.get("dev")
        stamp = "%x" % int(time.time() * 1000)
        plan = []
        for block in self.qmp(dom, "query-block") or []:
            inserted = block.get("inserted")
            target = next((t for a, t in aliases.items() if "/%s/" % a in block.get("qdev", "") + "/"), None)
            if not inserted or inserted.get("ro") or target is None:
                continue
            top = _image_filename(inserted)
            overlay = os.path.join(os.path.dirname(top), "%s-%s.%s.qcow2" % (name, target, stamp))
            result = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", inserted.get("drv", "raw"),
                                     "-b", top, overlay], capture_output=True, text=True)
            if result.returncode != 0:
                for done in plan:
                    _unlink_quietly(done["overlay"])
                raise VmError("cannot make an overlay for disk %s of %s: %s" % (target, name, result.stderr.strip()))
            owner = os.stat(top)
            os.chown(overlay, owner.st_uid, owner.st_gid)
            plan.append({"target": target, "node": inserted["node-name"], "top": top, "overlay": overlay,
                         "new_node": "violin-%s-%s" % (target, stamp)})
        return plan

    @staticmethod
    def _check_events(dom, events) -> None:
        """Raise if the VM vanished or the sink failed; other events stay queued for _wait_status."""
        kept = []
        try:
            while True:
                kind, value = events.get_nowait()
                if kind in ("gone", "sink"):
                    raise VmError("migration of %s stopped: %s" % (dom.name(), value))
                kept.append((kind, value))
        except queue.Empty:
            pass
        finally:
            for event in kept:
                events.put(event)

    def _wait_status(self, dom, events, wanted: str, deadline: float) -> None:
        """Wait for MIGRATION status ``wanted``; events first, query-migrate as a safety net."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmError("migration of %s did not reach %s in time" % (dom.name(), wanted))
            try:
                kind, value = events.get(timeout=min(0.25, remaining))
            except queue.Empty:
                kind, value = "migration", (self.qmp(dom, "query-migrate") or {}).get("status")
            if kind == "migration" and value == wanted:
                return
            if kind == "migration" and value in ("failed", "cancelled"):
                detail = (self.qmp(dom, "query-migrate") or {}).get("error-desc", value)
                raise VmError("migration of %s %s: %s" % (dom.name(), value, detail))
            if kind in ("gone", "sink"):
                raise VmError("migration of %s stopped: %s" % (dom.name(), value))

    def _recover(self, dom, name: str) -> None:
        """After a failed snapshot: cancel the migration and make sure the guest runs."""
        for command in ("migrate_cancel", "cont"):
            try:
                self.qmp(dom, command)
            except VmError:
                pass  # gone, or already running
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                status = (self.qmp(dom, "query-status") or {}).get("status")
            except VmError:
                return  # the domain is gone: nothing to keep running
            if status == "running":
                return
            try:
                self.qmp(dom, "cont")
            except VmError:
                pass
            time.sleep(0.05)

    # --- restore -------------------------------------------------------------

    def destroy(self, name: str) -> bool:
        try:
            dom = self.conn.lookupByName(name)
        except self.libvirt.libvirtError:
            return False
        kill_qemu(name)  # libvirt's own kill polls every 200 ms; a QEMU already gone is stopped at once
        try:
            dom.destroy()  # a transient domain is gone; a persistent one keeps its definition
        except self.libvirt.libvirtError as error:
            # "not running", or libvirt saw QEMU die and removed the transient domain first
            if error.get_error_code() not in (self.libvirt.VIR_ERR_OPERATION_INVALID, self.libvirt.VIR_ERR_NO_DOMAIN):
                raise VmError("stopping %s: %s" % (name, error)) from None
        self._wait_stopped(name)
        return True

    def _wait_stopped(self, name: str, timeout: float = 5.0) -> None:
        """Until libvirt has let go of the stopped domain: a transient one removed, a persistent one
        inactive. libvirt handles QEMU's death in a worker of its own, and a restore under the same name
        meanwhile fails ("domain ... is already being removed", seen 12-03)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                dom = self.conn.lookupByName(name)
                if not dom.isActive() and dom.isPersistent():
                    return
            except self.libvirt.libvirtError:
                return
            if time.monotonic() > deadline:
                raise VmError("libvirt still holds the stopped domain %s after %.0f s" % (name, timeout))
            time.sleep(0.002)

    def restore(self, save_path: str, name: str, tap: Optional[str] = None, mac: Optional[str] = None,
                disks: Optional[Dict[str, str]] = None) -> float:
        """Replace the running domain ``name`` by the one in ``save_path``, left paused; returns ms.

        With ``tap`` the NIC with ``mac`` comes back on that tap (a VM restored on another host).
        ``disks`` (target -> staged standalone image) are moved next to the disks they replace (or
        stay where they were staged if this host has no such directory), and the domain comes back
        on them."""
        began = time.monotonic()
        with open(save_path, "rb") as handle:
            saved = read_save_header(handle.read(1 << 20))
        domain_xml = retarget_nic(saved, mac, tap) if tap else saved
        if disks:
            sources, stamp, placed = disk_sources(saved), "%x" % int(time.time() * 1000), {}
            for target, staged in sorted(disks.items()):
                where = os.path.dirname(sources.get(target) or staged)
                if not os.path.isdir(where):  # restored on a host without that directory
                    where = os.path.dirname(staged)
                placed[target] = os.path.join(where, "%s-%s.restored-%s.qcow2" % (name, target, stamp))
                shutil.move(staged, placed[target])
            domain_xml = retarget_disks(domain_xml, placed)
        if domain_xml == saved:
            domain_xml = None
        self.destroy(name)
        try:
            self.conn.restoreFlags(save_path, domain_xml, self.libvirt.VIR_DOMAIN_SAVE_PAUSED)
        except self.libvirt.libvirtError as error:
            raise VmError("restoring %s from %s: %s" % (name, save_path, error)) from None
        return (time.monotonic() - began) * 1000

    def resume(self, name: str) -> None:
        dom = self.domain(name)
        try:
            dom.resume()
        except self.libvirt.libvirtError as error:
            raise VmError("resuming %s: %s" % (name, error)) from None


# --- the helper's libvirt backend ----------------------------------------------------------

VM_IMAGE = "vm.save"  # a libvirt save file: header, migratable XML, QEMU's migration stream
VM_IMAGES = "vm-images"  # under work_dir: the images being written to be kept (hostside.kept)


@dataclass
class VmMember:
    """A VM member of the helper config, by its libvirt domain name; its tap and MAC come from the
    domain's XML (``LibvirtBackend.locate``)."""
    name: str
    domain: str
    tap: Optional[str] = None  # the tap its NIC goes on when restored on this host (default: the XML's)

    def describe(self) -> str:
        return "domain %s" % self.domain


def nic_of(domain_xml: str) -> tuple:
    """(MAC, tap) of the domain's one network interface, from its XML; VmError unless there is one."""
    nics = ElementTree.fromstring(domain_xml).findall("./devices/interface")
    if len(nics) != 1:
        raise VmError("the domain has %d network interfaces; a member has one" % len(nics))
    mac, target = nics[0].find("mac"), nics[0].find("target")
    if mac is None or not mac.get("address"):
        raise VmError("the domain's network interface has no MAC address")
    return mac.get("address").lower(), (target.get("dev") if target is not None else None)


@register
class LibvirtBackend(Backend):
    """QEMU VMs under libvirt, snapshotted by a fake live migration to the snapshot server."""
    name = "libvirt"
    sends_marker = False  # a synchronous cut proves its tap drained; an asynchronous one writes the marker into it
    cuts_async = True  # the marker written into its tap as the guest's frame (vm_cut_proof), where QEMU's tap allows
    flips_stopped = True  # frames released to a stopped guest wait in its tap (QEMU reads it once the guest runs)
    restores_paused = True  # comes back paused, its clock stopped until resume
    prepares_itself = True  # holds frames only around the switchover, not through the pre-copy (SwitchoverHold)
    Spec = VmMember
    SCHEMA = Schema({
        "domain": Field(str, check=lambda v: None if v else "a libvirt domain name", help="the libvirt domain"),
        "tap": Field((str, type(None)), None, help="the tap its NIC goes on when it is restored on this host "
                                                   "(default: the one in the domain's XML)"),
    }, allow_none=False)

    def __init__(self, settings):
        super().__init__(settings)
        self._lock = threading.Lock()
        self._libvirt: Optional[Libvirt] = None

    def start(self) -> None:
        # What a helper that stopped mid-snapshot left of the images it was writing to keep (never kept:
        # an image is kept by moving it into work_dir/kept, whole, with its file list).
        shutil.rmtree(os.path.join(self.settings.work_dir, VM_IMAGES), ignore_errors=True)

    @property
    def libvirt(self) -> Libvirt:
        """One libvirt connection, opened when the first VM member needs it."""
        with self._lock:
            if self._libvirt is None:
                self._libvirt = Libvirt(self.settings.libvirt_uri)
            return self._libvirt

    def locate(self, member: VmMember) -> Located:
        """The running domain's NIC (MAC and tap, which is also its switch port), from its XML now."""
        dom = self.libvirt.domain(member.domain)
        try:
            mac, tap = nic_of(dom.XMLDesc(0))
            uuid, active = dom.UUIDString(), bool(dom.isActive())
        except self.libvirt.libvirt.libvirtError as error:
            raise VmError("cannot locate %s: %s" % (member.domain, error)) from None
        except VmError as error:
            raise VmError("cannot locate %s: domain %s: %s" % (member.name, member.domain, error)) from None
        return Located(mac=mac, iface=tap, port=tap, pid=None,
                       details={"domain": member.domain, "uuid": uuid, "running": active, "handle": member.describe()})

    @contextlib.contextmanager
    def quiet_proof(self, member: VmMember, snapshot: str):
        where = self.locate(member)
        if not where.iface:
            raise VmError("domain %s has no tap to prove drained" % member.domain)
        with vm_cut_proof(member.domain, where.iface, where.mac, snapshot, member.name) as proof:
            yield proof

    def snapshot(self, member: VmMember, sink, at_cut, prepare=None, resumed=None) -> ImageReport:
        # ``prepare`` (the controller's hold) runs just before QEMU stops the guest; at_cut would run it too.
        # Where the helper keeps images, the stream is also written here as it is uploaded, and the disks'
        # copies are made here: the directory then becomes the kept image (``hostside.kept``).
        local = None
        if getattr(sink, "keeps", False):
            os.makedirs(os.path.join(self.settings.work_dir, VM_IMAGES), exist_ok=True)
            local = tempfile.mkdtemp(prefix="%s-%s-" % (sink.snapshot, member.name),
                                     dir=os.path.join(self.settings.work_dir, VM_IMAGES))
        try:
            report = self._migrate(member.domain, lambda reader: sink.put_stream(VM_IMAGE, reader), at_cut,
                                   prepare or (lambda: None), os.path.join(local, VM_IMAGE) if local else None,
                                   resumed)
            details = report.as_dict()
            stored = details.pop("stored")
            details.pop("sha256")
            details.pop("teed")
            files = [{"name": VM_IMAGE, "bytes": stored["bytes"], "sha256": stored["sha256"]}]
            sink.settle()  # its disks are stored once the helper's other members are through their freezes
            files += self._store_disks(sink, member, report.disks, local)
            if local and report.teed:
                details["kept"] = sink.keep(local, files, private=[f["name"] for f in files[1:]])
        finally:
            if local:  # what keep did not take
                shutil.rmtree(local, ignore_errors=True)
        return ImageReport(
            # The guest's pause as QEMU stamps it (STOP -> RESUME); ours also counts libvirt's reply to cont.
            pause_ms=round(report.qemu_pause_ms if report.qemu_pause_ms is not None else report.pause_ms, 3),
            bytes=report.bytes + sum(f["bytes"] for f in files[1:]), files=files,
            details=dict(details, domain=member.domain))

    def _migrate(self, domain: str, sink, at_cut, prepare, tee: Optional[str] = None,
                 resumed: Optional[Callable[[], None]] = None) -> MigrationReport:
        """The migration with frames held only around its switchover; if QEMU stopped the guest before
        the hold was in force, that migration was cancelled (the guest runs on, nothing of it is used)
        and the snapshot is taken again with frames held from before its pre-copy (the stored image
        is replaced)."""
        try:
            return self.libvirt.migrate_out(domain, sink, at_cut, max_bandwidth=self.settings.vm_max_bandwidth,
                                            prepare=prepare, hold_late=self.settings.vm_hold != "precopy", tee=tee,
                                            resumed=resumed)
        except HoldTooLate as error:
            report = self.libvirt.migrate_out(domain, sink, at_cut, max_bandwidth=self.settings.vm_max_bandwidth,
                                              prepare=prepare, hold_late=False, tee=tee, resumed=resumed)
            report.hold["retried"] = str(error)
            return report

    def _store_disks(self, sink, member: VmMember, disks: list, local: Optional[str] = None) -> list:
        """Each disk's image as it was at the cut (frozen: the guest writes to an overlay since),
        copied standalone (into ``local``, the image kept here, if given) and stored beside the RAM
        image; the guest runs on meanwhile."""
        files = []
        if not disks:
            return files
        # One scratch directory per member: two VMs of one snapshot store at once (after the upload gate),
        # and one removing a shared directory made the other's makedirs fail ("File exists", 12-02).
        scratch = local or os.path.join(self.settings.work_dir, "disks", sink.snapshot, member.name)
        os.makedirs(scratch, exist_ok=True)
        try:
            for disk in disks:
                name = DISK_IMAGE % disk["target"]
                copy = os.path.join(scratch, name)
                flatten_disk(disk["frozen"], copy)
                with open(copy, "rb") as reader:
                    files.append(sink.put_stream(name, reader))
        finally:
            if not local:
                shutil.rmtree(scratch, ignore_errors=True)
        return files

    def restore(self, member: VmMember, directory: str) -> Restored:
        save = os.path.join(directory, VM_IMAGE)
        try:  # the domain running here now, else the one in the image (destroyed, or restored elsewhere)
            where = self.locate(member)
            mac, tap = where.mac, where.iface
        except VmError:
            with open(save, "rb") as handle:
                mac, tap = nic_of(read_save_header(handle.read(1 << 20)))
        tap = member.tap or tap
        restore_ms = self.libvirt.restore(save, member.domain, tap=tap, mac=mac, disks=staged_disks(directory))
        return Restored(restore_ms, tap, {"domain": member.domain})

    def resume(self, member: VmMember) -> None:
        self.libvirt.resume(member.domain)

    def stop(self, member: VmMember) -> None:
        self.libvirt.destroy(member.domain)
