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
     it is at the cut. Then ``on_paused`` runs (the helper proves the VM's tap
     is drained into the switch, calls the controller's cut, waits for the
     answer), then ``migrate-continue``; once the stream is complete, ``cont``.
     The helper then copies each frozen image (with its backing chain) into a
     standalone qcow2 and stores it beside the RAM image (``disk-<target>.qcow2``);
  3. any failure (the VM vanishes, the stream is refused, the hook fails)
     cancels the migration and leaves the guest running.

Restore: ``virDomainRestoreFlags`` of the staged save file, paused, after the
running domain of the same name (if any) is destroyed, its disks on the
staged disk images (moved next to the disks they replace); ``resume`` later.
Only local file disks can be captured: a domain with another writable disk
(block device, network) is refused rather than snapshotted without it.
Each snapshot leaves one more overlay in the running guest's backing chain.

``LibvirtBackend`` (registered as ``libvirt``) is the helper's side of it: one
libvirt connection opened when the first VM needs it, the tap-drain proof at
the cut (a paused VM cannot send a marker) and the disks stored beside the
RAM image (``vm.save``).
"""

import contextlib
import json
import os
import queue
import shutil
import struct
import subprocess
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from hostside.backends.base import Backend, ImageReport, Located, Restored, register
from violin_core.schema import Field, Schema

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


def packet_socket_backlog(ifindex: int, path: str = "/proc/net/packet") -> Optional[int]:
    """Bytes waiting in the receive queues of the AF_PACKET sockets bound to ``ifindex``
    (None if no socket reads it).

    Open vSwitch's userspace datapath reads a system port (a VM's tap)
    through such a socket: when they are empty, every frame the guest wrote
    to its tap has passed the switch's ingress.
    """
    total = None
    with open(path) as handle:
        next(handle)
        for line in handle:
            parts = line.split()  # sk RefCnt Type Proto Iface R Rmem User Inode
            if len(parts) >= 7 and int(parts[4]) == ifindex:
                total = (total or 0) + int(parts[6])
    return total


def wait_tap_drained(iface: str, timeout: float = 1.0) -> float:
    """Wait until the switch has read every frame the (paused) guest sent; returns ms waited."""
    with open("/sys/class/net/%s/ifindex" % iface) as handle:
        ifindex = int(handle.read())
    began = time.monotonic()
    deadline = began + timeout
    if packet_socket_backlog(ifindex) is None:
        raise VmError("no switch reads %s (is the VM's tap on an Open vSwitch netdev bridge?)" % iface)
    while packet_socket_backlog(ifindex):
        if time.monotonic() > deadline:
            raise VmError("frames from %s still wait for the switch after %.1f s" % (iface, timeout))
        time.sleep(0.0002)
    return (time.monotonic() - began) * 1000


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

    def exists(self, name: str) -> bool:
        try:
            self.conn.lookupByName(name)
            return True
        except self.libvirt.libvirtError:
            return False

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

    # --- snapshot ------------------------------------------------------------

    def migrate_out(self, name: str, sink: Callable, on_paused: Callable[[], float],
                    timeout: float = 120.0, max_bandwidth: int = 4 << 30,
                    downtime_limit_ms: int = 20) -> MigrationReport:
        """Live-migrate ``name`` into ``sink(reader) -> stored`` and run ``on_paused`` at the cut.

        ``sink`` runs in a thread and must read the stream to its end (it is
        a libvirt save file); ``on_paused`` returns the ms it spent proving the
        tap drained. On any failure the migration is cancelled and the guest
        left running.
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

        def pump():
            """Drain QEMU's pipe at once (into a bounded spool): a sink stalled by disk or network must
            never stall QEMU's final writes, which it makes with the guest paused."""
            try:
                for chunk in iter(lambda: os.read(reader_fd, CHUNK), b""):
                    buffered.put(chunk)
            finally:
                buffered.put(b"")
                os.close(reader_fd)

        class Reader:
            """The image as the sink reads it: our header, then QEMU's stream; checksummed on the way."""

            def __init__(self):
                self.rest, self.ended = b"", False

            def read(self, size=CHUNK):
                if not self.rest and not self.ended:
                    self.rest = buffered.get()
                    self.ended = not self.rest
                data, self.rest = self.rest[:size], self.rest[size:]
                digest.update(data)
                counted[0] += len(data)
                return data

        def consume():
            try:
                outcome["stored"] = sink(Reader())
            except Exception as error:  # reported to the migrating thread below
                outcome["error"] = error
                events.put(("sink", str(error)))

        began = time.monotonic()
        paused = resumed = None
        hook_ms = drain_ms = disk_ms = 0.0
        sink_thread = None
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
            self._wait_status(dom, events, "pre-switchover", began + timeout)
            paused = time.monotonic()
            for disk in disks:  # the disks' state at the cut: their images take no more writes
                self.qmp(dom, "blockdev-snapshot-sync", {
                    "node-name": disk["node"], "snapshot-file": disk["overlay"],
                    "snapshot-node-name": disk["new_node"], "mode": "existing", "format": "qcow2"})
                disk["switched"] = True
            disk_ms = (time.monotonic() - paused) * 1000
            hook_began = time.monotonic()
            drain_ms = on_paused() or 0.0
            hook_ms = (time.monotonic() - hook_began) * 1000
            self.qmp(dom, "migrate-continue", {"state": "pre-switchover"})
            switchover = time.monotonic()
            self._wait_status(dom, events, "completed", began + timeout)
            self.qmp(dom, "cont")
            resumed = time.monotonic()
            info = self.qmp(dom, "query-migrate") or {}
            sink_thread.join(max(1.0, began + timeout - time.monotonic()))
            if sink_thread.is_alive():
                raise VmError("the image of %s did not finish storing in time" % name)
            if "error" in outcome:
                raise VmError("storing the image of %s failed: %s" % (name, outcome["error"]))
        except BaseException:
            if sink_thread is None:
                os.close(reader_fd)
            self._recover(dom, name)
            for disk in disks:
                if not disk.get("switched"):
                    _unlink_quietly(disk["overlay"])
            if sink_thread is not None:
                sink_thread.join(5.0)
            raise
        finally:
            with self.events_lock:
                self.listeners.pop(name, None)
        time.sleep(0.01)  # let the RESUME events arrive
        qemu_pause = (stamps["RESUME"] - stamps["STOP"]) * 1000 if {"RESUME", "STOP"} <= set(stamps) else None
        libvirt_pause = ((stamps["resumed"] - stamps["suspended"]) * 1000
                         if {"resumed", "suspended"} <= set(stamps) else None)
        return MigrationReport(
            pause_ms=(resumed - paused) * 1000, hook_ms=hook_ms, drain_ms=drain_ms,
            precopy_ms=(paused - began) * 1000, switchover_ms=(resumed - switchover) * 1000, total_ms=(time.monotonic() - began) * 1000,
            bytes=counted[0], sha256=digest.hexdigest(), qemu_pause_ms=qemu_pause,
            qemu_downtime_ms=info.get("downtime"), libvirt_pause_ms=libvirt_pause, disk_ms=disk_ms,
            disks=[{"target": d["target"], "frozen": d["top"], "overlay": d["overlay"]} for d in disks],
            stored=outcome.get("stored") or {})

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
        if not self.exists(name):
            return False
        try:
            self.domain(name).destroy()  # a transient domain is gone; a persistent one keeps its definition
        except self.libvirt.libvirtError as error:
            if error.get_error_code() != self.libvirt.VIR_ERR_OPERATION_INVALID:  # i.e. not "not running"
                raise VmError("stopping %s: %s" % (name, error)) from None
        return True

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
    sends_marker = False  # paused by QEMU: its tap is proven drained instead
    restores_paused = True  # comes back paused, its clock stopped until resume
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
        yield lambda: wait_tap_drained(where.iface)

    def snapshot(self, member: VmMember, sink, at_cut, prepare=None) -> ImageReport:
        report = self.libvirt.migrate_out(member.domain, lambda reader: sink.put_stream(VM_IMAGE, reader), at_cut,
                                          max_bandwidth=self.settings.vm_max_bandwidth)
        details = report.as_dict()
        stored = details.pop("stored")
        details.pop("sha256")
        files = [{"name": VM_IMAGE, "bytes": stored["bytes"], "sha256": stored["sha256"]}]
        files += self._store_disks(sink, member, report.disks)
        return ImageReport(
            # The guest's pause as QEMU stamps it (STOP -> RESUME); ours also counts libvirt's reply to cont.
            pause_ms=round(report.qemu_pause_ms if report.qemu_pause_ms is not None else report.pause_ms, 3),
            bytes=report.bytes + sum(f["bytes"] for f in files[1:]), files=files,
            details=dict(details, domain=member.domain))

    def _store_disks(self, sink, member: VmMember, disks: list) -> list:
        """Each disk's image as it was at the cut (frozen: the guest writes to an overlay since),
        copied standalone and stored beside the RAM image; the guest runs on meanwhile."""
        files = []
        scratch = os.path.join(self.settings.work_dir, "disks", sink.snapshot)
        os.makedirs(scratch, exist_ok=True)
        try:
            for disk in disks:
                name = DISK_IMAGE % disk["target"]
                copy = os.path.join(scratch, "%s-%s" % (member.name, name))
                flatten_disk(disk["frozen"], copy)
                with open(copy, "rb") as reader:
                    files.append(sink.put_stream(name, reader))
        finally:
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
