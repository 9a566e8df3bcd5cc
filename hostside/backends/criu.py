"""CRIU backend: a member is a process tree in a network namespace, plus its working directory.

Snapshot is a live dump (``criu dump --leave-running --tcp-established``) run
inside the member's network namespace. CRIU freezes the tree, dumps it, then
runs the ``post-dump`` action script while the tasks are still frozen; our
script hands control back to the helper (two FIFOs), which copies the working
directory (the member's files belong to the same instant), sends the cut
marker, calls the controller's cut endpoint and only then lets CRIU resume the
tasks. Restore puts the working directory back and runs ``criu restore``
inside the namespace (restored sockets land in the namespace CRIU runs in).

``CriuBackend`` (registered as ``criu``) is the helper's side of it: the
marker socket opened in the member's namespace before the snapshot begins,
dumps retried while no cut was taken (``DUMP_ATTEMPTS``), and on restore the
old tree killed and reaped (the helper is a subreaper), its orphan TCP
sockets destroyed and, away from home, the member's MAC and address put on
the interface here.
"""

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from hostside.backends.base import Backend, ImageReport, Restored, register
from violin_core.packets import build_marker
from violin_core.schema import Field, Schema, positive, unicast_mac

CRIU = os.environ.get("VIOLIN_CRIU", "/usr/local/sbin/criu")
WORKDIR_ARCHIVE = "workdir.tar"
HOOK_TIMEOUT_S = 10  # a helper that died must not leave the member frozen: CRIU then fails and resumes it
NETWORK_LOCK = "nftables"  # blocks a member's TCP connections during dump/restore; iptables execs per connection
HOOK = """#!/bin/sh
# violin-snapshot: on post-dump (tasks still frozen), hand over to the helper and wait for it.
[ "$CRTOOLS_SCRIPT_ACTION" = "post-dump" ] || exit 0
timeout {timeout} sh -c 'echo frozen > "$1"' sh "{request}" || exit 1
answer=$(timeout {timeout} cat "{reply}")
[ "$answer" = "ok" ]
"""


class CriuError(RuntimeError):
    """A dump or restore failed; the message carries the tail of CRIU's log."""


@dataclass
class ProcessMember:
    name: str
    netns: str  # path of the network namespace, e.g. /proc/<pid>/ns/net or /run/netns/<name>
    pid: int  # root of the member's process tree
    workdir: Optional[str] = None  # the member's files, captured at the cut
    mntns: Optional[str] = None  # its mount namespace, if not the helper's (Mininet hosts have their own)


@dataclass
class DumpReport:
    images: str
    frozen_ms: Optional[float]  # how long the member's tasks were frozen, as CRIU measured it (stats-dump)
    hook_ms: float  # of that, the time our post-dump hook held them (copy, marker, cut)
    dump_ms: float  # the whole criu dump command
    bytes: int


def _varint(data: bytes, offset: int):
    value, shift = 0, 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def read_dump_stats(images: str) -> dict:
    """CRIU's own timings of a dump (stats-dump: StatsEntry.dump), in microseconds."""
    names = {1: "freezing_time", 2: "frozen_time", 3: "memdump_time", 4: "memwrite_time"}
    with open(os.path.join(images, "stats-dump"), "rb") as handle:
        data = handle.read()
    size = int.from_bytes(data[8:12], "little")
    entry, stats, offset = data[12:12 + size], {}, 0
    while offset < len(entry):  # StatsEntry: field 1 (dump) is a nested message
        key, offset = _varint(entry, offset)
        length, offset = _varint(entry, offset)
        if key == (1 << 3 | 2):
            inner, position = entry[offset:offset + length], 0
            while position < len(inner):
                field_key, position = _varint(inner, position)
                if field_key & 7 != 0:
                    break
                value, position = _varint(inner, position)
                if field_key >> 3 in names:
                    stats[names[field_key >> 3]] = value
        offset += length
    return stats


def _nsenter(member: ProcessMember):
    """CRIU runs in the member's namespaces: restored sockets land where CRIU runs."""
    return ["nsenter", "--net=%s" % member.netns] + (["--mount=%s" % member.mntns] if member.mntns else [])


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def dump(member: ProcessMember, images: str, on_frozen: Callable[[], None], timeout: float = 60.0) -> DumpReport:
    """Live-dump ``member`` into ``images``; ``on_frozen`` runs while its tasks are frozen.

    If ``on_frozen`` raises, CRIU is told to fail: the tasks resume unharmed and
    the error is raised here.
    """
    os.makedirs(images, exist_ok=True)
    control = tempfile.mkdtemp(prefix="violin-criu-")
    request, reply = os.path.join(control, "request"), os.path.join(control, "reply")
    os.mkfifo(request)
    os.mkfifo(reply)
    script = os.path.join(control, "hook.sh")
    with open(script, "w") as handle:
        handle.write(HOOK.format(request=request, reply=reply, timeout=HOOK_TIMEOUT_S))
    os.chmod(script, 0o755)
    outcome = {}

    def hand_over():
        with open(request) as fifo:  # blocks until the hook fires (or the dump ends: EOF)
            if not fifo.read():
                return
        frozen_at = time.monotonic()
        try:
            if member.workdir:
                with tarfile.open(os.path.join(images, WORKDIR_ARCHIVE), "w") as archive:
                    archive.add(member.workdir, arcname=".")
            on_frozen()
            answer = "ok"
        except BaseException as error:  # reported below; CRIU must still be answered
            outcome["error"] = error
            answer = "fail"
        outcome["hook_ms"] = (time.monotonic() - frozen_at) * 1000
        with open(reply, "w") as fifo:
            fifo.write(answer + "\n")

    waiter = threading.Thread(target=hand_over, daemon=True)
    waiter.start()
    log = os.path.join(images, "dump.log")
    started = time.monotonic()
    try:
        result = subprocess.run(
            _nsenter(member) + [CRIU, "dump", "-t", str(member.pid), "-D", images, "-o", "dump.log", "-v2",
                                "--leave-running", "--tcp-established", "--file-locks", "--network-lock", NETWORK_LOCK,
                                "--action-script", script],
            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result = None
    finally:
        if waiter.is_alive():  # the hook never fired: release the reader
            try:
                fd = os.open(request, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError:
                pass
        waiter.join(5)
        shutil.rmtree(control, ignore_errors=True)
    dump_ms = (time.monotonic() - started) * 1000
    if "error" in outcome:
        raise outcome["error"]
    if result is None or result.returncode != 0:
        raise CriuError("criu dump of %s failed%s:\n%s" % (
            member.name, "" if result else " (timed out)", _log_tail(log)))
    try:
        frozen_ms = read_dump_stats(images).get("frozen_time", 0) / 1000.0
    except (OSError, IndexError, ValueError):
        frozen_ms = None
    return DumpReport(images, frozen_ms, outcome.get("hook_ms", 0.0), dump_ms, _dir_bytes(images))


def restore(member: ProcessMember, images: str, timeout: float = 60.0, leave_stopped: bool = False) -> float:
    """Put back the working directory and restore the tree detached; returns milliseconds.

    With ``leave_stopped`` the restored tasks stay stopped until sent SIGCONT (a
    whole-slice restore resumes every member together)."""
    started = time.monotonic()
    archive = os.path.join(images, WORKDIR_ARCHIVE)
    if member.workdir and os.path.exists(archive):
        shutil.rmtree(member.workdir, ignore_errors=True)
        os.makedirs(member.workdir)
        with tarfile.open(archive) as tar:
            tar.extractall(member.workdir, filter="fully_trusted") if sys.version_info >= (3, 12) \
                else tar.extractall(member.workdir)
    log = "restore.log"
    result = subprocess.run(
        _nsenter(member) + [CRIU, "restore", "-D", images, "-o", log, "-v2", "-d",
                            "--tcp-established", "--file-locks", "--network-lock", NETWORK_LOCK] + (["--leave-stopped"] if leave_stopped else []),
        # not pipes of ours: a helper that dies mid-restore must not kill CRIU with SIGPIPE (its log has it all)
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    if result.returncode != 0:
        raise CriuError("criu restore of %s failed:\n%s" % (member.name, _log_tail(os.path.join(images, log))))
    return (time.monotonic() - started) * 1000


# --- the helper's CRIU backend -------------------------------------------------------------

CLONE_NEWNET = 0x40000000
DUMP_ATTEMPTS = 3  # CRIU dumps of one member per snapshot, while no cut was taken
PR_SET_CHILD_SUBREAPER = 36


@dataclass
class CriuMember:
    """A CRIU member of the helper config (``ProcessMember`` plus its link)."""
    name: str
    pid: int
    netns: str
    iface: str  # the member's interface in ``netns`` (a veth whose peer is a switch port)
    mac: str
    workdir: Optional[str] = None
    mntns: Optional[str] = None
    ip: Optional[str] = None  # address/prefix to put on ``iface`` when restored here


def open_marker_socket(netns: str, iface: str) -> socket.socket:
    """An AF_PACKET socket on ``iface`` of another network namespace (opened in a thread there)."""
    result = {}

    def inside():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(netns) as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns %s" % netns)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            sock.bind((iface, 0))
            result["socket"] = sock
        except OSError as error:
            result["error"] = error

    thread = threading.Thread(target=inside)  # the thread's namespace dies with it; the socket stays
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["socket"]


def become_subreaper() -> None:
    """Restored trees (criu restore -d) are re-parented to us, so we can reap them when replaced."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def stop_tree(pid: int, timeout: float = 5.0) -> None:
    """Kill a member's process group and wait until its PID is free (reaped, if it is our child)."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
            break
        except ProcessLookupError:
            return
        except PermissionError:
            continue
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not ours: wait for its parent to reap it
            if not os.path.exists("/proc/%d" % pid):
                return
        time.sleep(0.01)
    raise RuntimeError("member process %d did not go away (a zombie nobody reaps keeps its PID)" % pid)


def clear_orphan_sockets(netns: str) -> None:
    """Destroy the TCP sockets the killed member left behind (TIME-WAIT, FIN-WAIT...).

    They hold the very address pairs its restored connections need: CRIU's
    connect-back would fail with EADDRNOTAVAIL. The member's namespace holds
    only the member, so every TCP socket left in it is an orphan.
    """
    subprocess.run(["nsenter", "--net=%s" % netns, "ss", "-K", "-t", "state", "all"],
                   capture_output=True, timeout=10)


def in_netns(netns: str, *argv: str) -> str:
    result = subprocess.run(["nsenter", "--net=%s" % netns, *argv], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError("%s in %s: %s" % (" ".join(argv), netns, result.stderr.strip()))
    return result.stdout


def take_identity(member: CriuMember) -> None:
    """Give the member's interface here its MAC and address (a member restored away from home).

    CRIU restores sockets bound to the member's address, and its peers know it
    by its MAC: both must be on this host's interface before the restore.
    """
    current = json.loads(in_netns(member.netns, "ip", "-j", "addr", "show", "dev", member.iface) or "[]")
    link = current[0] if current else {}
    addresses = {"%s/%s" % (a["local"], a["prefixlen"]) for a in link.get("addr_info", []) if a.get("family") == "inet"}
    if link.get("address", "").lower() == member.mac.lower() and addresses == {member.ip} and \
            "UP" in link.get("flags", []):
        return
    in_netns(member.netns, "ip", "link", "set", member.iface, "down")
    in_netns(member.netns, "ip", "link", "set", member.iface, "address", member.mac)
    in_netns(member.netns, "ip", "-4", "addr", "flush", "dev", member.iface)
    in_netns(member.netns, "ip", "addr", "add", member.ip, "dev", member.iface)
    in_netns(member.netns, "ip", "link", "set", member.iface, "up")


def forget_unresolved_neighbours(member: CriuMember) -> None:
    """Drop neighbour entries still unresolved in the member's namespace before it resumes.

    The ARP requests made while the member was restored (CRIU's TCP probes; on a
    new host its neighbour table starts empty) died in the quarantine, and the
    kernel asks again only a second later, queueing the member's sends in the
    meantime: kernel state no snapshot holds. Forgotten entries are resolved at
    once by the first packet after the resume.
    """
    for state in ("incomplete", "failed"):
        subprocess.run(["nsenter", "--net=%s" % member.netns, "ip", "neigh", "flush", "dev", member.iface,
                        "nud", state], capture_output=True, timeout=10)


def switch_port_of(member: CriuMember) -> Optional[str]:
    """The switch's name for the port the member's interface (a veth in its namespace) plugs into;
    None when that cannot be told (then the controller finds the member when it next speaks)."""
    try:
        links = json.loads(in_netns(member.netns, "ip", "-j", "link", "show", "dev", member.iface) or "[]")
        peer = links[0].get("link_index") if links else None
        return socket.if_indextoname(peer) if peer else None
    except (RuntimeError, ValueError, OSError):
        return None


@register
class CriuBackend(Backend):
    """Process trees in their own network namespace, live-dumped by CRIU."""
    name = "criu"
    sends_marker = True  # the marker goes down the member's veth while its tasks are frozen
    restores_paused = False  # restored stopped (SIGSTOP), its clock runs on
    Spec = CriuMember
    SCHEMA = Schema({
        "pid": Field(int, check=positive, help="root of the member's process tree"),
        "netns": Field(str, help="its network namespace, e.g. /proc/PID/ns/net"),
        "iface": Field(str, help="its interface in that namespace"),
        "mac": Field(str, check=unicast_mac, help="its MAC address"),
        "workdir": Field((str, type(None)), None, help="its files, captured at the cut"),
        "mntns": Field((str, type(None)), None, help="its mount namespace, if not the helper's"),
        "ip": Field((str, type(None)), None, help="address/prefix to put on iface when restored here"),
    }, allow_none=False)
    retry_delay = 0.05

    def start(self) -> None:
        become_subreaper()

    @contextlib.contextmanager
    def quiet_proof(self, member: CriuMember, snapshot: str):
        marker = open_marker_socket(member.netns, member.iface)  # before any pause: sending is one send()
        try:
            yield lambda: marker.send(build_marker(member.mac, snapshot, member.name))
        finally:
            marker.close()

    def snapshot(self, member: CriuMember, sink, at_cut, prepare=None) -> ImageReport:
        images = os.path.join(self.settings.work_dir, sink.snapshot, member.name)
        cut_called = []

        def on_frozen():
            cut_called.append(True)
            at_cut()

        try:
            for attempt in range(1, DUMP_ATTEMPTS + 1):
                try:
                    report = dump(member, images, on_frozen)
                    break
                except CriuError:
                    # A dump that failed before its cut left the member running and its frames held:
                    # try again (e.g. TCP data still in the kernel's backlog on a loaded host changed a
                    # socket's queue while CRIU read it), but never after the cut was taken.
                    if cut_called or attempt == DUMP_ATTEMPTS:
                        raise
                    shutil.rmtree(images, ignore_errors=True)
                    time.sleep(self.retry_delay)
            stored = sink.put_dir(images)
        finally:
            shutil.rmtree(images, ignore_errors=True)
        return ImageReport(
            pause_ms=round(report.frozen_ms if report.frozen_ms is not None else report.hook_ms, 3),
            bytes=report.bytes, files=stored,
            details={"dump_ms": round(report.dump_ms, 1), "hook_ms": round(report.hook_ms, 3)})

    def restore(self, member: CriuMember, directory: str) -> Restored:
        stop_tree(member.pid)
        clear_orphan_sockets(member.netns)
        if member.ip:
            take_identity(member)
        restore_ms = restore(member, directory, leave_stopped=True)
        return Restored(restore_ms, switch_port_of(member), {"pid": member.pid})

    def resume(self, member: CriuMember) -> None:
        forget_unresolved_neighbours(member)
        try:
            os.killpg(member.pid, signal.SIGCONT)
        except ProcessLookupError:
            raise RuntimeError("member %s (pid %d) is not running" % (member.name, member.pid)) from None

    def stop(self, member: CriuMember) -> None:
        stop_tree(member.pid)
        clear_orphan_sockets(member.netns)
        in_netns(member.netns, "ip", "link", "set", member.iface, "down")  # its MAC and IP live elsewhere now
