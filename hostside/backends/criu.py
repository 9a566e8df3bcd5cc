"""CRIU backend: a member is a process tree in a network namespace, plus its working directory.

Snapshot is a live dump (``criu dump --leave-running --tcp-established``) run
inside the member's network namespace. CRIU freezes the tree, dumps it, then
runs the ``post-dump`` action script while the tasks are still frozen; our
script hands control back to the helper (two FIFOs), which copies the working
directory (the member's files belong to the same instant), sends the cut
marker, calls the controller's cut endpoint and only then lets CRIU resume the
tasks. Restore puts the working directory back and runs ``criu restore``
inside the namespace (restored sockets land in the namespace CRIU runs in).
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

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
        capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise CriuError("criu restore of %s failed:\n%s" % (member.name, _log_tail(os.path.join(images, log))))
    return (time.monotonic() - started) * 1000
