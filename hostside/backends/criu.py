"""CRIU backend: a member is a process tree in a network namespace, plus its working directory.

Snapshot is a live dump (``criu dump --leave-running --tcp-established``) run
inside the member's network namespace. CRIU freezes the tree, dumps it, then
runs the ``post-dump`` action script while the tasks are still frozen; our
script hands control back to the helper (two FIFOs), which takes the working
directory (the member's files belong to the same instant) and sends the cut
marker. In an asynchronous cut (the default) it waits only for the switch to
send the marker back (``MarkerLink``), lets CRIU resume the tasks and calls the
controller's cut endpoint once they run (``PostDumpHook(on_resumed=...)``);
in a synchronous one it calls the cut endpoint before letting CRIU resume them. Restore puts the working directory back and runs ``criu restore``
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
import logging
import os
import shutil
import select
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from hostside import workdir
from hostside.backends.base import Backend, ImageReport, Located, Restored, register
from hostside.store.client import takes_trees
from hostside.store.tree import POINTER
from violin_core.packets import PROBE_ETH_TYPE, build_cut_request, build_marker
from violin_core.schema import Field, Schema, SchemaError

CRIU = os.environ.get("VIOLIN_CRIU", "/usr/local/sbin/criu")
LOG = logging.getLogger("violin-helper.criu")
WORKDIR_ARCHIVE = workdir.ARCHIVE
HOOK_TIMEOUT_S = 10  # a helper that died must not leave the member frozen: CRIU then fails and resumes it
MARKER_CONFIRM_S = 1.0  # an asynchronous cut waits this long, frozen, for its marker to come back (~1 ms)
RESUME_WATCH_S = 10.0  # how long the hand-over watches for CRIU to let the tasks go after the cut
NETWORK_LOCK = "nftables"  # blocks a member's TCP connections during dump/restore; iptables execs per connection
# The helper's own dumps (VIOLIN_CRIU_SNAPSHOT_LOCK). "skip" (the controller's prepare hold as the lock, so
# frames released after the flip are not dropped by CRIU's lock) lost UDP datagrams in the oracle's
# ring-of-3 (2 runs of 2; with nftables 0 gaps, same hour): not understood yet, so CRIU's lock stays.
SNAPSHOT_NETWORK_LOCK = os.environ.get("VIOLIN_CRIU_SNAPSHOT_LOCK", NETWORK_LOCK)
# How many members one helper freezes at once (VIOLIN_CRIU_FREEZES, default 1; 0: no bound), CRIU
# members and containers together (``FREEZE_TURNS``). Dumps at once on a small host compete for the
# cores and inflate each other's pauses: 8 at once on 2 cores paused 5x a bare dump, one at a time
# (and the images stored after the last freeze: hostside/orchestration.py, UploadGate) 1.19x (issue 11,
# scripts/disruption_pause.py). One at a time keeps the slice's epochs mixed for longer, so more frames
# between members already cut and members still waiting pass through the controller; since the
# asynchronous cut colours at the switch the controller keeps up (a bound of 2 once drowned it).
FREEZE_SLOTS = int(os.environ.get("VIOLIN_CRIU_FREEZES", "1") or 0) or 1 << 16
FREEZE_TURNS = threading.BoundedSemaphore(FREEZE_SLOTS)
# Builtins only: nothing is started while the member is frozen but this one shell. Both FIFOs are opened
# read-write, so neither open blocks whoever is (or is not) at the other end, and ``read -t`` bounds the
# wait for an answer: a helper that died does not leave the member frozen.
HOOK = """#!/bin/bash
# violin-snapshot: on pre-dump (tasks running) and post-dump (tasks still frozen), hand over to the
# helper and wait for it.
case "$CRTOOLS_SCRIPT_ACTION" in post-dump) line=frozen ;; pre-dump) line=predump ;; *) exit 0 ;; esac
exec 3<>"{request}" 4<>"{reply}"
echo $line >&3
read -r -t {timeout} answer <&4 || exit 1
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
    resumed_after_ms: Optional[float] = None  # hook answered -> the tasks seen running again
    predump_after_ms: Optional[float] = None  # CRIU started -> its pre-dump (just before the freeze)
    freezing_ms: Optional[float] = None  # CRIU seizing and stopping the tasks (before frozen_ms starts)


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


class _NoCapture(workdir.Capture):
    """For ``dump``: the caller takes the directory itself (or there is none)."""

    def at_freeze(self) -> None:
        pass


_NO_CAPTURE = _NoCapture("")


class PostDumpHook:
    """CRIU's ``post-dump`` action script handing over to this process while the tasks are frozen.

    ``with PostDumpHook(on_frozen) as hook:`` run CRIU (any CRIU client: ``criu dump``, or a container
    runtime's checkpoint) with ``--action-script hook.script``; when CRIU runs the script, ``on_frozen()``
    runs here and its outcome answers the script (``ok``: CRIU goes on and lets the tasks run; an
    exception: the script fails, CRIU fails the dump and resumes the tasks). After the block,
    ``hook.error`` is what ``on_frozen`` raised (None if nothing), ``hook.fired`` whether it ran and
    ``hook.hook_ms`` how long it held the tasks. Two FIFOs in a private directory carry it.

    CRIU runs the script at ``pre-dump`` too, just before it freezes the tasks: ``on_predump()`` (if
    given) runs then, while they still run (the UDP drain; for containers the controller's prepare
    first); if it raises, CRIU fails the dump before freezing anything.
    """

    def __init__(self, on_frozen: Callable[[], None], timeout: float = HOOK_TIMEOUT_S,
                 on_resumed: Optional[Callable[[], None]] = None, watch_pid: Optional[int] = None,
                 on_predump: Optional[Callable[[], None]] = None):
        self.on_frozen, self.timeout = on_frozen, timeout
        self.on_resumed, self.watch_pid, self.on_predump = on_resumed, watch_pid, on_predump
        self.predump_error: Optional[BaseException] = None
        self.closing = False
        self.error: Optional[BaseException] = None
        self.fired, self.hook_ms = False, 0.0
        self.resumed_lock = threading.Lock()
        self.resumed_ran = False
        self.resumed_error: Optional[BaseException] = None
        self.resumed_after_ms: Optional[float] = None  # hook answered -> CRIU let the tasks go (as watched)

    def __enter__(self) -> "PostDumpHook":
        self.control = tempfile.mkdtemp(prefix="violin-criu-")
        self.request, self.reply = os.path.join(self.control, "request"), os.path.join(self.control, "reply")
        os.mkfifo(self.request)
        os.mkfifo(self.reply)
        self.script = os.path.join(self.control, "hook.sh")
        with open(self.script, "w") as handle:
            handle.write(HOOK.format(request=self.request, reply=self.reply, timeout=int(self.timeout)))
        os.chmod(self.script, 0o755)
        self.waiter = threading.Thread(target=self._hand_over, daemon=True)
        self.waiter.start()
        return self

    def _hand_over(self) -> None:
        while True:
            with open(self.request) as fifo:  # blocks until a hook writes (or __exit__ opens it: EOF)
                line = fifo.readline().strip()
            if not line:  # a hook that has answered went away, or __exit__
                if self.closing:
                    return
                continue
            if line == "predump":
                answer = "ok"
                if self.on_predump is not None:
                    try:
                        self.on_predump()
                    except BaseException as error:  # noqa: B902 - CRIU fails the dump; the caller raises it
                        self.predump_error, answer = error, "fail"
                with open(self.reply, "w") as reply:  # the hook holds it open: never blocks
                    reply.write(answer + "\n")
                continue
            break
        frozen_at = time.monotonic()
        self.fired = True
        try:
            self.on_frozen()
            answer = "ok"
        except BaseException as error:  # reported by the caller; CRIU must still be answered
            self.error = error
            answer = "fail"
        self.hook_ms = (time.monotonic() - frozen_at) * 1000
        with open(self.reply, "w") as fifo:  # the hook holds it open: never blocks
            fifo.write(answer + "\n")
        if answer == "ok" and self.on_resumed is not None:
            answered = time.monotonic()
            if self.watch_pid:  # CRIU unlocks the network, then lets the tasks go (ptrace detach)
                deadline = answered + RESUME_WATCH_S
                while tracer_of(self.watch_pid) not in (0, None) and time.monotonic() < deadline:
                    time.sleep(0.001)  # not faster: this thread would take CPU from CRIU, which still has the tasks
            self.resumed_after_ms = (time.monotonic() - answered) * 1000
            self.run_resumed()

    def run_resumed(self) -> None:
        """``on_resumed()``, once (from the watch, or by the caller once CRIU has returned); its error is
        kept in ``resumed_error``."""
        with self.resumed_lock:
            if self.resumed_ran or self.on_resumed is None or not self.fired or self.error is not None:
                return
            self.resumed_ran = True
            try:
                self.on_resumed()
            except BaseException as error:  # noqa: B902 - the caller raises it
                self.resumed_error = error

    def __exit__(self, *_exc) -> None:
        self.closing = True
        deadline = time.monotonic() + 5
        while self.waiter.is_alive() and not self.fired and time.monotonic() < deadline:
            try:  # the hook never fired: release the reader (an EOF), once it has the FIFO open
                os.close(os.open(self.request, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: not opened for reading yet
                pass
            self.waiter.join(0.001)
        self.waiter.join(5 + (RESUME_WATCH_S if self.on_resumed is not None else 0))
        self.run_resumed()  # CRIU has returned: the tasks run (or are gone) whatever the watch saw
        shutil.rmtree(self.control, ignore_errors=True)


# When a CRIU member's prepare (frames for it held from then on) is made (VIOLIN_CRIU_PREPARE):
# "predump" (default), at CRIU's pre-dump, just before it freezes the tasks; "before", before CRIU starts.
# CRIU takes 11-16 ms from its start to its pre-dump here, all of it deaf time with "before": deaf time
# minus the pause 7.7-8.5 ms p50 at 1-2 members against 19.6-22.6 ms, the pause no longer (issue 11,
# goal 3; two runs each, interleaved).
PREPARE_WHEN = os.environ.get("VIOLIN_CRIU_PREPARE", "predump")
if PREPARE_WHEN not in ("predump", "before"):
    LOG.warning("VIOLIN_CRIU_PREPARE=%r is neither predump nor before: predump", PREPARE_WHEN)
    PREPARE_WHEN = "predump"


def side_by_side(take_files: Callable[[], None], cut: Callable[[], None]) -> None:
    """While the member is frozen: its files and its cut (marker, datapath purge) do not wait for
    each other, so it stays frozen for the longer of the two (about 2 ms each), not their sum.
    ``cut`` runs in a thread beside ``take_files``; the first error of either is raised once both end."""
    failed = []

    def run_cut():
        try:
            cut()
        except BaseException as error:  # noqa: BLE001 - raised below, in the hook's thread
            failed.append(error)
    beside = threading.Thread(target=run_cut, name="cut-beside-files", daemon=True)
    beside.start()
    try:
        take_files()
    finally:
        beside.join()
    if failed:
        raise failed[0]


def dump(member: ProcessMember, images: str, on_frozen: Callable[[], None], timeout: float = 60.0,
         network_lock: str = NETWORK_LOCK, capture: Optional["workdir.Capture"] = None,
         on_resumed: Optional[Callable[[], None]] = None,
         on_predump: Optional[Callable[[], None]] = None) -> DumpReport:
    """Live-dump ``member`` into ``images``; ``on_predump`` (if given) runs just before CRIU freezes its
    tasks, ``on_frozen`` while they are frozen, ``on_resumed`` (if given) once CRIU has let them run
    again (``frozen_hand_over``).

    If ``on_frozen`` raises, CRIU is told to fail: the tasks resume unharmed and
    the error is raised here. The member's ``workdir`` is taken at the freeze by
    ``capture`` (hostside/workdir.py; by default the best one for the directory,
    its pre-copy, if any, done here before CRIU starts) and archived into the
    image after the tasks run again. ``network_lock`` is CRIU's: keep the
    default unless something else keeps every frame away from the member while
    it is dumped (the helper's snapshots: the controller's prepare hold).
    """
    os.makedirs(images, exist_ok=True)
    own_capture = capture is None and bool(member.workdir)
    if own_capture:
        capture = workdir.capture_for(member.workdir, lambda: workdir.tree_pids(member.pid))
        capture.prepare()

    def frozen():
        if capture is None or isinstance(capture, _NoCapture):
            return on_frozen()
        side_by_side(capture.at_freeze, on_frozen)

    log = os.path.join(images, "dump.log")
    started = time.monotonic()
    predump_at = []

    def predump():
        predump_at.append(time.monotonic())
        if on_predump is not None:
            on_predump()
    try:
        from hostside.backends.handover import frozen_hand_over  # it builds on PostDumpHook, here

        # The compiled hook where a C compiler is at hand: CRIU runs the script at three actions
        # inside the freeze, and bash's start was most of each (issue 11's pause; see handover.py).
        with frozen_hand_over(frozen, on_resumed=on_resumed, watch_pid=member.pid, on_predump=predump) as hook:
            try:
                result = subprocess.run(
                    _nsenter(member) + [CRIU, "dump", "-t", str(member.pid), "-D", images, "-o", "dump.log", "-v2",
                                        "--leave-running", "--tcp-established", "--file-locks",
                                        "--network-lock", network_lock, "--action-script", hook.script],
                    capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                result = None
        dump_ms = (time.monotonic() - started) * 1000
        hook.raise_error()
        if result is None or result.returncode != 0:
            raise CriuError("criu dump of %s failed%s:\n%s" % (
                member.name, "" if result else " (timed out)", _log_tail(log)))
        if own_capture:
            capture.finish(images)
    finally:
        if own_capture:
            capture.discard()
    try:
        stats = read_dump_stats(images)
        frozen_ms, freezing_ms = stats.get("frozen_time", 0) / 1000.0, stats.get("freezing_time", 0) / 1000.0
    except (OSError, IndexError, ValueError):
        frozen_ms = freezing_ms = None
    return DumpReport(images, frozen_ms, hook.outcome.get("hook_ms", 0.0), dump_ms, _dir_bytes(images),
                      hook.outcome.get("resumed_after_ms"),
                      round((predump_at[0] - started) * 1000, 3) if predump_at else None, freezing_ms)


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
# How long a dump waits for the images' filesystem to take what is waiting to be written (settle_disk)
SETTLE_TIMEOUT_S = float(os.environ.get("VIOLIN_CRIU_SETTLE_S", "1.0") or 0)


def syncfs(path: str) -> None:
    """syncfs(2) of the filesystem holding ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, "syncfs %s: %s" % (path, os.strerror(error)))
    finally:
        os.close(fd)


def settle_disk(path: str, timeout: float = SETTLE_TIMEOUT_S, flush: Callable[[str], None] = syncfs) -> Tuple[float, bool]:
    """Before a freeze: write out what waits on the filesystem the images go to, waiting at most
    ``timeout``; (ms waited, whether it was all written). Left waiting there (the last snapshot's
    images, a member's pre-copy), it was written back and its journal committed while CRIU filled
    the page cache with the frozen member's pages, and CRIU waited on it: flushed first (~7 ms), the
    pause of 1 / 2 / 8 members per helper went 47.6 / 45.5 / 66.4 -> 35.3 / 35.8 / 48.4 ms p50 over
    two runs each, alternated (issue 11). A flush that takes longer goes on beside the dump; an
    error is logged and the dump goes ahead."""
    if timeout <= 0:
        return 0.0, False
    began, outcome = time.monotonic(), []

    def run():
        try:
            flush(path)
            outcome.append(True)
        except OSError as error:
            LOG.warning("flushing %s before a freeze failed: %s", path, error)
            outcome.append(False)
    flusher = threading.Thread(target=run, name="settle-disk", daemon=True)
    flusher.start()
    flusher.join(timeout)
    return round((time.monotonic() - began) * 1000, 3), bool(outcome and outcome[0])
PR_SET_CHILD_SUBREAPER = 36


@dataclass
class CriuMember:
    """A CRIU member of the helper config, named as users know it: by pidfile, or by its Mininet host
    and command line. Its pid, namespaces, interface and MAC are found by ``CriuBackend.locate``."""
    name: str
    pidfile: Optional[str] = None  # a file holding the pid of the tree's root
    mininet_host: Optional[str] = None  # the Mininet host it runs in (its shell: bash ... mininet:<host>)
    command: Optional[str] = None  # a part of its command line (with mininet_host)
    workdir: Optional[str] = None
    ip: Optional[str] = None  # address/prefix to put on its interface when restored here (default: the image's)

    def __post_init__(self):
        if bool(self.pidfile) == bool(self.mininet_host):
            raise SchemaError("", "name the member's process by pidfile, or by mininet_host and command")
        if self.mininet_host and not self.command:
            raise SchemaError("command", "required with mininet_host (a part of the member's command line)")
        if self.pidfile and self.command:
            raise SchemaError("command", "goes with mininet_host, not with pidfile")

    def describe(self) -> str:
        """How users know it (the registration's ``handle``)."""
        return "pidfile %s" % self.pidfile if self.pidfile else "%s: %s" % (self.mininet_host, self.command)


# --- finding a member's process (pure parsing of /proc, then the scan) -------------------------------

@dataclass
class Proc:
    pid: int
    ppid: int
    state: str  # R, S, T (stopped), Z (zombie)...
    argv: List[str]
    netns: Optional[str] = None  # readlink of /proc/PID/ns/net, e.g. "net:[4026532281]"
    mntns: Optional[str] = None  # readlink of /proc/PID/ns/mnt


def parse_cmdline(data: bytes) -> List[str]:
    """/proc/PID/cmdline: NUL-separated arguments (empty for kernel threads and zombies)."""
    return [part.decode("utf-8", "replace") for part in data.split(b"\0") if part] if data else []


def parse_stat(text: str) -> Tuple[str, int]:
    """(state, ppid) of a /proc/PID/stat line; the command name may hold spaces and parentheses."""
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def parse_pidfile(text: str) -> int:
    """The pid a pidfile holds (a positive number on its first line)."""
    first = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
    if not first.isdigit() or int(first) <= 0:
        raise ValueError("holds no pid (%r)" % text[:40])
    return int(first)


def read_pidfile(path: str) -> int:
    """The pid in the file ``path``: a regular file (never a FIFO or device that could block or never
    end), its first bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        return parse_pidfile(os.read(fd, 64).decode("utf-8", "replace"))
    finally:
        os.close(fd)


def mininet_shell(host: str, procs: Iterable[Proc]) -> Proc:
    """The shell Mininet keeps in ``host`` (``bash --norc --noediting -is mininet:<host>``)."""
    found = [p for p in procs if p.state != "Z" and len(p.argv) >= 2 and p.argv[-1] == "mininet:" + host
             and os.path.basename(p.argv[0]) == "bash"]
    if not found:
        raise LookupError("no Mininet host %s here (no shell 'bash ... mininet:%s')" % (host, host))
    if len(found) > 1:
        raise LookupError("%d Mininet hosts are named %s here (pids %s)" % (
            len(found), host, ", ".join(str(p.pid) for p in found)))
    return found[0]


def match_process(command: str, procs: Iterable[Proc], exclude: Iterable[int] = ()) -> Optional[int]:
    """The root of the one process tree whose command line holds ``command``, among ``procs`` (those of
    the member's namespace); None if none matches. Zombies and stopped-for-good are no match; a match
    whose parent matches too is part of its parent's tree."""
    excluded = set(exclude)
    matching = {p.pid: p for p in procs if p.pid not in excluded and p.state not in ("Z", "X")
                and p.argv and command in " ".join(p.argv)}
    roots = sorted(pid for pid, p in matching.items() if p.ppid not in matching)
    if len(roots) > 1:
        raise LookupError("%d processes match %r (pids %s): name it by more of its command line" % (
            len(roots), command, ", ".join(map(str, roots))))
    return roots[0] if roots else None


def pick_interface(links: List[dict]) -> dict:
    """The member's link among ``ip -j addr`` entries of its namespace: the only one that is not
    loopback, else the ``*-eth0`` one (Mininet's first), else the one with the lowest index."""
    candidates = [l for l in links if l.get("ifname") != "lo" and l.get("link_type", "ether") == "ether"]
    if not candidates:
        raise LookupError("no network interface besides lo")
    if len(candidates) == 1:
        return candidates[0]
    eth0 = [l for l in candidates if str(l.get("ifname", "")).endswith("-eth0")]
    return eth0[0] if eth0 else min(candidates, key=lambda l: l.get("ifindex", 0))


def ipv4_of(link: dict) -> Optional[str]:
    """The first IPv4 address/prefix of an ``ip -j addr`` entry."""
    for entry in link.get("addr_info", []):
        if entry.get("family") == "inet":
            return "%s/%s" % (entry["local"], entry["prefixlen"])
    return None


def read_proc(pid: int, root: str = "/proc") -> Optional[Proc]:
    try:
        with open("%s/%d/stat" % (root, pid)) as handle:
            state, ppid = parse_stat(handle.read())
        with open("%s/%d/cmdline" % (root, pid), "rb") as handle:
            argv = parse_cmdline(handle.read())
        namespaces = []
        for kind in ("net", "mnt"):
            try:
                namespaces.append(os.readlink("%s/%d/ns/%s" % (root, pid, kind)))
            except OSError:
                namespaces.append(None)
        return Proc(pid, ppid, state, argv, *namespaces)
    except (OSError, ValueError, IndexError):
        return None  # gone meanwhile


def scan_proc(root: str = "/proc") -> List[Proc]:
    return [p for p in (read_proc(int(n), root) for n in os.listdir(root) if n.isdigit()) if p is not None]


def procs_in_netns(netns_id: str, root: str = "/proc") -> List[Proc]:
    """The processes whose network namespace is ``netns_id`` (one readlink per process, then only those
    read in full: a locate costs little on a busy host, where the helper's other jobs need its GIL)."""
    found = []
    for entry in os.listdir(root):
        if entry.isdigit():
            try:
                if os.readlink("%s/%s/ns/net" % (root, entry)) != netns_id:
                    continue
            except OSError:
                continue
            proc = read_proc(int(entry), root)
            if proc is not None:
                found.append(proc)
    return found


def _same_namespace(a: str, b: str) -> bool:
    try:
        return os.readlink(a) == os.readlink(b)
    except OSError:  # e.g. a bind-mounted /run/netns/NAME is no symlink
        return False


SIOCGIFHWADDR, SIOCGIFADDR, SIOCGIFNETMASK = 0x8927, 0x8915, 0x891B
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772


def links_in_netns(netns: str) -> List[dict]:
    """The interfaces of a network namespace as ``ip -j addr`` entries (ifindex, ifname, link_type, address,
    addr_info with its first IPv4 address), read in-process from a thread that enters it (no fork)."""
    import fcntl
    import struct
    result = {}

    def inside():
        try:
            if not _same_namespace(netns, "/proc/thread-self/ns/net"):  # (entering one's own needs root)
                libc = ctypes.CDLL(None, use_errno=True)
                with open(netns) as handle:
                    if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns %s" % netns)
            links = []
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for index, ifname in socket.if_nameindex():
                    request = struct.pack("256s", ifname.encode()[:15])
                    hw = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, request)
                    family = struct.unpack_from("H", hw, 16)[0]
                    link = {"ifindex": index, "ifname": ifname, "address": ":".join("%02x" % b for b in hw[18:24]),
                            "link_type": {ARPHRD_ETHER: "ether", ARPHRD_LOOPBACK: "loopback"}.get(family, str(family))}
                    try:
                        address = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)[20:24])
                        mask = fcntl.ioctl(sock.fileno(), SIOCGIFNETMASK, request)[20:24]
                        link["addr_info"] = [{"family": "inet", "local": address,
                                              "prefixlen": bin(int.from_bytes(mask, "big")).count("1")}]
                    except OSError:  # no IPv4 address
                        link["addr_info"] = []
                    links.append(link)
            result["links"] = links
        except OSError as error:
            result["error"] = error

    thread = threading.Thread(target=inside)  # the thread's namespace dies with it
    thread.start()
    thread.join()
    if "error" in result:
        raise RuntimeError("interfaces of %s: %s" % (netns, result["error"]))
    return result["links"]


def open_marker_socket(netns: str, iface: str) -> socket.socket:
    """An AF_PACKET socket on ``iface`` of another network namespace (opened in a thread there); it
    receives the frames of the marker's ethertype that come in on that interface (``MarkerLink``)."""
    result = {}

    def inside():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(netns) as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns %s" % netns)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(PROBE_ETH_TYPE))
            sock.bind((iface, PROBE_ETH_TYPE))
            result["socket"] = sock
        except OSError as error:
            result["error"] = error

    thread = threading.Thread(target=inside)  # the thread's namespace dies with it; the socket stays
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["socket"]


class MarkerLink:
    """A member's cut marker, sent down its own link; ``prove(confirm=True)`` also waits until the
    switch sends it back (the controller's marker rule), i.e. until the switch has taken the marker and
    queued its packet-in ahead of anything the member sends after: what an asynchronous cut needs
    before the member may run on. The frames of the same ethertype that come in meanwhile (link
    probes, earlier markers) are skipped.

    ``sock`` sees the link from the member's side (its end of a veth: the switch's copy comes *in*)
    unless ``echo_outgoing`` (a VM's tap seen from the host: the switch's copy goes *out* to the
    guest, and the marker written as the guest's own frame comes in); ``send`` puts a frame on the
    link (default ``sock.send``); a marker that does not come back raises ``error``."""

    def __init__(self, sock: socket.socket, frame: bytes, timeout: float = None, cut_request: bytes = None,
                 send: Optional[Callable[[bytes], Any]] = None, echo_outgoing: bool = False,
                 error: type = None):
        self.sock, self.frame, self.cut_request = sock, frame, cut_request
        self.timeout = MARKER_CONFIRM_S if timeout is None else timeout
        self.confirm_ms: Optional[float] = None
        self.send = send or sock.send
        self.echo_outgoing, self.error = echo_outgoing, error or CriuError

    def __call__(self, confirm: bool = False) -> None:
        self.prove(confirm)

    def request_cut(self) -> None:
        """Ask the controller for the member's flip in band, once it runs again after its marker
        (``build_cut_request``); nothing is waited for: its done report is the fallback."""
        self.send(self.cut_request)

    def prove(self, confirm: bool = False) -> None:
        if confirm:
            self.sock.setblocking(False)
            try:
                while True:  # whatever came in before is not our answer
                    self.sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                pass
        sent = time.monotonic()
        self.send(self.frame)
        if not confirm:
            return
        deadline = sent + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.error("the switch did not send the cut marker back within %.1f s (is the controller's "
                                "marker rule on the member's switch?)" % self.timeout)
            self.sock.settimeout(left)
            try:
                data, address = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            if (address[2] == socket.PACKET_OUTGOING) == self.echo_outgoing and data[:len(self.frame)] == self.frame:
                self.confirm_ms = (time.monotonic() - sent) * 1000
                return

    def close(self) -> None:
        self.sock.close()


UDP_DRAIN_S = float(os.environ.get("VIOLIN_UDP_DRAIN_S", "0.25"))  # how long a prepared member may take to read
# what its UDP sockets hold before CRIU freezes it (CRIU drops a datagram socket's read queue)


def udp_queued(pid: int, root: str = "/proc") -> int:
    """Bytes waiting in the receive queues of the UDP sockets of ``pid``'s network namespace."""
    total = 0
    for name in ("udp", "udp6", "udplite", "udplite6"):
        try:
            with open("%s/%d/net/%s" % (root, pid, name)) as handle:
                next(handle, None)  # the header
                for line in handle:
                    fields = line.split()
                    if len(fields) > 4 and ":" in fields[4]:
                        total += int(fields[4].split(":")[1], 16)
        except (OSError, ValueError):
            continue
    return total


def wait_udp_drained(pid: int, timeout: float = None, clock=time.monotonic, sleep=time.sleep,
                     queued=udp_queued) -> Tuple[float, int]:
    """Wait (bounded) until the member has read what its UDP sockets hold; (ms waited, bytes left).

    CRIU does not dump a datagram socket's read queue ("Read queue is dropped"): a datagram the
    kernel took for a member before the controller's prepare held its frames, but that the member
    had not read when CRIU froze it, would be in no image and no channel state, lost to a restore.
    With the prepare in force nothing new arrives, so a member that reads empties them."""
    timeout = UDP_DRAIN_S if timeout is None else timeout
    began = clock()
    left = queued(pid)
    while left and clock() - began < timeout:
        sleep(0.001)
        left = queued(pid)
    return (clock() - began) * 1000, left


def dropped_read_queues(images: str) -> int:
    """How many datagram sockets' read queues CRIU dropped in this dump (its log says so, one line each)."""
    try:
        with open(os.path.join(images, "dump.log"), "rb") as handle:
            return handle.read().count(b"Read queue is dropped for socket")
    except OSError:
        return 0


def tracer_of(pid: int) -> Optional[int]:
    """The pid tracing ``pid`` (0: none), None when it is gone."""
    try:
        with open("/proc/%d/status" % pid, "rb") as handle:
            for line in handle:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


KDAT_DIR = "/run/criu-kdat"  # CRIU's RUNDIR (scripts/install_criu.sh): where it keeps criu.kdat
TMPFS_MAGIC = 0x01021994


def ensure_kdat_cache(directory: str = KDAT_DIR) -> str:
    """Give CRIU a tmpfs to keep its kernel-features cache in (it writes ``criu.kdat`` only to one).

    Without it every dump and restore probes the kernel again first: ~60 ms on this kind of
    machine, while the member's frames are already held. Mounts a 1 MiB tmpfs on ``directory``
    unless it already is one; returns "tmpfs", "mounted" or why not (nothing fails for it)."""
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if _fs_type(directory) == TMPFS_MAGIC:
            return "tmpfs"
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "violin-criu-kdat", directory],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return "not mounted: %s" % error
    if result.returncode != 0:
        return "not mounted: %s" % (result.stderr.strip() or result.returncode)
    return "mounted"


def _fs_type(path: str) -> int:
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]
    buf = StatFs()
    if ctypes.CDLL(None, use_errno=True).statfs(path.encode(), ctypes.byref(buf)) != 0:
        raise OSError(ctypes.get_errno(), "statfs %s" % path)
    return buf.f_type


def become_subreaper() -> None:
    """Restored trees (criu restore -d) are re-parented to us, so we can reap them when replaced."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def stop_tree(pid: int, timeout: float = 5.0) -> None:
    """Kill a member's process group and wait until its PID is free (reaped, if it is our child)."""
    killed = False
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
            killed = True
            break
        except (ProcessLookupError, PermissionError):  # not a group leader: the process itself, then
            continue
    if not killed and not os.path.exists("/proc/%d" % pid):
        return  # gone already
    deadline = time.monotonic() + timeout
    try:  # readable once it exits: woken then, rather than at a poll's next tick (every restore waits here)
        exited = os.pidfd_open(pid)
    except OSError:
        exited = None
    try:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:  # not ours: wait for its parent to reap it
                if not os.path.exists("/proc/%d" % pid):
                    return
            wait = min(0.01, max(0.0, deadline - time.monotonic()))
            if exited is None:
                time.sleep(wait)
            elif select.select([exited], [], [], wait)[0]:  # exited; its own parent may not have reaped it yet
                os.close(exited)
                exited = None
    finally:
        if exited is not None:
            os.close(exited)
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


def take_identity(where: Located, mac: str, ip: Optional[str]) -> None:
    """Give the member's interface here its MAC and address (a member restored away from home).

    CRIU restores sockets bound to the member's address, and its peers know it
    by its MAC: both must be on this host's interface before the restore.
    """
    current = json.loads(in_netns(where.netns, "ip", "-j", "addr", "show", "dev", where.iface) or "[]")
    link = current[0] if current else {}
    addresses = {"%s/%s" % (a["local"], a["prefixlen"]) for a in link.get("addr_info", []) if a.get("family") == "inet"}
    if link.get("address", "").lower() == mac.lower() and (ip is None or addresses == {ip}) and \
            "UP" in link.get("flags", []):
        return
    in_netns(where.netns, "ip", "link", "set", where.iface, "down")
    in_netns(where.netns, "ip", "link", "set", where.iface, "address", mac)
    if ip:
        in_netns(where.netns, "ip", "-4", "addr", "flush", "dev", where.iface)
        in_netns(where.netns, "ip", "addr", "add", ip, "dev", where.iface)
    in_netns(where.netns, "ip", "link", "set", where.iface, "up")


def forget_unresolved_neighbours(where: Located) -> None:
    """Drop neighbour entries still unresolved in the member's namespace before it resumes.

    The ARP requests made while the member was restored (CRIU's TCP probes; on a
    new host its neighbour table starts empty) died in the quarantine, and the
    kernel asks again only a second later, queueing the member's sends in the
    meantime: kernel state no snapshot holds. Forgotten entries are resolved at
    once by the first packet after the resume.
    """
    subprocess.run(["nsenter", "--net=%s" % where.netns, "ip", "neigh", "flush", "dev", where.iface,
                    "nud", "incomplete", "nud", "failed"], capture_output=True, timeout=10)  # one spawn: both


def switch_port_of(where: Located) -> Optional[str]:
    """The switch's name for the port the member's interface (a veth in its namespace) plugs into;
    None when that cannot be told (then the controller finds the member when it next speaks)."""
    try:
        links = json.loads(in_netns(where.netns, "ip", "-j", "link", "show", "dev", where.iface) or "[]")
        peer = links[0].get("link_index") if links else None
        return socket.if_indextoname(peer) if peer else None
    except (RuntimeError, ValueError, OSError):
        return None


IDENTITY = "identity.json"  # the member's MAC, interface and address at the cut, stored with its image


def own_namespace(kind: str) -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/%s" % kind)
    except OSError:
        return None


class Kept:
    """Namespaces of pidfile members, held open: when the process is gone (killed, to be restored),
    its namespaces live on and are still found (as ``/proc/<helper>/fd/<n>``)."""

    def __init__(self):
        self.fds: Dict[Tuple[str, str], Tuple[str, int]] = {}  # (member, kind) -> (ns id, fd)
        self.lock = threading.Lock()

    def keep(self, member: str, kind: str, path: str) -> str:
        ident = os.readlink(path)
        with self.lock:
            held = self.fds.get((member, kind))
            if held is None or held[0] != ident:
                if held is not None:
                    os.close(held[1])
                self.fds[(member, kind)] = (ident, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            return "/proc/%d/fd/%d" % (os.getpid(), self.fds[(member, kind)][1])

    def kept(self, member: str, kind: str) -> Optional[str]:
        with self.lock:
            held = self.fds.get((member, kind))
        return "/proc/%d/fd/%d" % (os.getpid(), held[1]) if held else None

    def forget(self, member: str) -> None:
        with self.lock:
            for key in [k for k in self.fds if k[0] == member]:
                os.close(self.fds.pop(key)[1])


@register
class CriuBackend(Backend):
    """Process trees in their own network namespace, live-dumped by CRIU."""
    name = "criu"
    sends_marker = True  # the marker goes down the member's veth while its tasks are frozen
    cuts_async = True  # the marker confirmed (sent back by the switch), the tasks run on before the flip
    restores_paused = False  # restored stopped (SIGSTOP), its clock runs on
    Spec = CriuMember
    SCHEMA = Schema({
        "pidfile": Field((str, type(None)), None, help="a file holding the pid of the member's process (its tree's root)"),
        "mininet_host": Field((str, type(None)), None, help="or: the Mininet host it runs in..."),
        "command": Field((str, type(None)), None, help="... and a part of its command line there"),
        "workdir": Field((str, type(None)), None, help="its files, captured at the cut"),
        "ip": Field((str, type(None)), None, help="address/prefix to put on its interface when restored here "
                                                  "(default: the one it had at the snapshot)"),
    }, allow_none=False)
    retry_delay = 0.05
    prepares_itself = True  # prepare at CRIU's pre-dump, once it holds a freeze slot (PREPARE_WHEN)
    workdir_mode = os.environ.get("VIOLIN_WORKDIR_CAPTURE", "auto")  # auto, clone or precopy (hostside/workdir.py)

    def __init__(self, settings):
        super().__init__(settings)
        self.freezes = FREEZE_TURNS  # shared with the podman backend: one bound for the helper
        self.kept = Kept()
        self.proving: Dict[str, Located] = {}  # member -> where its open quiet proof located it
        self.restored: Dict[str, Located] = {}  # member -> where its restore left it, stopped, until its resume
        self.scan, self.procs_in, self.read = scan_proc, procs_in_netns, read_proc  # seams for unit tests
        self.links = links_in_netns
        self.shells: Dict[str, int] = {}  # Mininet host -> its shell's pid, checked at every use

    def _shell(self, host: str) -> Proc:
        """The host's shell: the one seen last if it still is that shell, else found by a scan of /proc."""
        known = self.shells.get(host)
        proc = self.read(known) if known else None
        if proc is None or proc.state == "Z" or not proc.argv or proc.argv[-1] != "mininet:" + host:
            proc = mininet_shell(host, self.scan())
            self.shells[host] = proc.pid
        return proc

    def start(self) -> None:
        become_subreaper()
        kdat = ensure_kdat_cache()
        if kdat.startswith("not"):
            LOG.warning("CRIU's kernel-features cache (%s): %s; every dump probes the kernel first", KDAT_DIR, kdat)

    # --- where the member is, found afresh for every operation ---------------------------------

    def locate(self, member: CriuMember) -> Located:
        """The member's process (None when it is not running), namespaces, interface and MAC, now.

        By Mininet host: the host's shell gives the namespaces; the process is the root of the one
        tree in that network namespace whose command line holds ``command``. By pidfile: the pid's
        namespaces (held open, so a member killed for a restore is still found)."""
        if member.mininet_host:
            try:
                shell = self._shell(member.mininet_host)
            except LookupError as error:
                raise CriuError("cannot locate %s: %s" % (member.name, error)) from None
            netns, mntns = "/proc/%d/ns/net" % shell.pid, "/proc/%d/ns/mnt" % shell.pid
            try:
                pid = match_process(member.command, self.procs_in(shell.netns), {shell.pid})
            except LookupError as error:
                raise CriuError("cannot locate %s in %s: %s" % (member.name, member.mininet_host, error)) from None
            if shell.mntns is not None and shell.mntns == own_namespace("mnt"):
                mntns = None  # the helper's own
            handle = {"mininet_host": member.mininet_host, "shell": shell.pid}
        else:
            pid = None
            try:
                pid = read_pidfile(member.pidfile)
            except (OSError, ValueError) as error:
                why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                pid, handle = None, {"pidfile": member.pidfile, "problem": "pidfile %s: %s" % (member.pidfile, why)}
            else:
                handle = {"pidfile": member.pidfile}
            proc = self.read(pid) if pid else None
            if proc is None or proc.state in ("Z", "X"):
                pid = None
            try:
                if pid is None:
                    raise OSError()
                netns = self.kept.keep(member.name, "net", "/proc/%d/ns/net" % pid)
                mnt_path = "/proc/%d/ns/mnt" % pid
                mntns = None if os.readlink(mnt_path) == own_namespace("mnt") else self.kept.keep(
                    member.name, "mnt", mnt_path)
            except OSError:
                pid, netns, mntns = None, self.kept.kept(member.name, "net"), self.kept.kept(member.name, "mnt")
                if netns is None:
                    raise CriuError("cannot locate %s: %s names no running process and none was seen here "
                                    "before%s" % (member.name, member.pidfile,
                                                  " (%s)" % handle["problem"] if "problem" in handle else "")) from None
        try:
            link = pick_interface(self.links(netns))
        except (LookupError, RuntimeError, ValueError) as error:
            raise CriuError("cannot locate the interface of %s: %s" % (member.name, error)) from None
        handle.update(ip=ipv4_of(link), handle=member.describe())
        return Located(mac=str(link.get("address", "")).lower() or None, iface=link.get("ifname"), pid=pid,
                       netns=netns, mntns=mntns, details=handle)

    def _process(self, member: CriuMember, where: Located) -> ProcessMember:
        if where.pid is None:
            raise CriuError("member %s is not running (%s)" % (member.name, member.describe()))
        return ProcessMember(member.name, where.netns, where.pid, member.workdir, where.mntns)

    # --- the operations --------------------------------------------------------------------

    @contextlib.contextmanager
    def quiet_proof(self, member: CriuMember, snapshot: str):
        where = self.locate(member)
        marker = MarkerLink(open_marker_socket(where.netns, where.iface),  # before any pause: one send()
                            build_marker(where.mac, snapshot, member.name),
                            cut_request=build_cut_request(where.mac, snapshot, member.name))
        self.proving[member.name] = where  # the snapshot inside this proof dumps what the marker speaks for
        try:
            yield marker
        finally:
            self.proving.pop(member.name, None)
            marker.close()

    def snapshot(self, member: CriuMember, sink, at_cut, prepare=lambda: None, resumed=None) -> ImageReport:
        """Holding one of the helper's ``FREEZE_SLOTS``: pre-copy the member's directory while it runs,
        dump, with the prepare (frames for it held from then on) at CRIU's pre-dump; then, once the
        helper's other members are through their freezes (``sink.settle()``), the image goes to ``sink``.

        The dump takes CRIU's network lock as ``SNAPSHOT_NETWORK_LOCK`` says (default
        ``nftables``). ``skip`` would leave the lock's job to the controller's prepare hold
        (nothing reaches the member from its prepare, before CRIU starts, to its flip) so that
        the frames released to it after the flip reach its kernel at once instead of meeting the
        lock's drop rules until CRIU unlocks (issue 11, goal 4). It is not safe: the oracle's
        ring-of-3 saw UDP duplicates with it, with no frame dropped anywhere (README, Host side).
        CRIU keeps the method in the image and restores with it.
        """
        where = self.proving.get(member.name) or self.locate(member)
        process = self._process(member, where)
        images = os.path.join(self.settings.work_dir, sink.snapshot, member.name)
        cut_called = []
        capture = None
        timings = {}

        def on_frozen():
            cut_called.append(True)
            began = time.monotonic()
            at_cut()  # (it prepares first if CRIU did not run the hook at pre-dump)
            timings["cut_ms"] = round((time.monotonic() - began) * 1000, 3)

        def timed_prepare():  # at CRIU's pre-dump (PREPARE_WHEN)
            began = time.monotonic()
            prepare()
            timings.setdefault("prepare_ms", round((time.monotonic() - began) * 1000, 3))

        def at_predump():  # the tasks still run and are frozen right after
            timed_prepare()  # (once: a dump tried again, or made with PREPARE_WHEN "before", is prepared)
            drained_ms, left = wait_udp_drained(process.pid)
            timings["udp_drain_ms"] = round(drained_ms, 3)
            if left:
                timings["udp_unread_bytes"] = left
                LOG.warning("%s: %d bytes still unread in its UDP sockets after %.0f ms; CRIU drops them",
                            member.name, left, drained_ms)

        try:
            with self.freezes:  # the pre-copy too: it would compete with the freeze of the member before
                if member.workdir:
                    capture = workdir.capture_for(member.workdir, lambda: workdir.tree_pids(process.pid),
                                                  self.workdir_mode, images + ".workdir")
                    capture.prepare()  # while the member runs and its frames flow
                os.makedirs(self.settings.work_dir, exist_ok=True)
                settled_ms, settled = settle_disk(self.settings.work_dir)  # not while the member is frozen
                timings["disk_settle_ms"] = settled_ms
                if not settled:
                    timings["disk_settled"] = False
                for attempt in range(1, DUMP_ATTEMPTS + 1):
                    try:
                        if PREPARE_WHEN == "before":
                            timed_prepare()
                        report = dump(process, images, on_frozen, network_lock=SNAPSHOT_NETWORK_LOCK,
                                      capture=capture or _NO_CAPTURE, on_resumed=resumed, on_predump=at_predump)
                        break
                    except CriuError:
                        # A dump that failed before its cut left the member running and its frames held:
                        # try again (e.g. TCP data still in the kernel's backlog on a loaded host changed
                        # a socket's queue while CRIU read it), but never after the cut was taken.
                        if cut_called or attempt == DUMP_ATTEMPTS:
                            raise
                        shutil.rmtree(images, ignore_errors=True)
                        time.sleep(self.retry_delay)
            sink.settle()  # it runs again: its image is stored once the helper's other members are through
            dropped = dropped_read_queues(images)
            if dropped:  # datagrams the member had not read at the freeze: in no image, no channel state
                timings["criu_dropped_udp_queues"] = dropped
                LOG.warning("%s: CRIU dropped the read queues of %d UDP sockets (unread at the freeze)",
                            member.name, dropped)
            with open(os.path.join(images, IDENTITY), "w") as handle:  # who it is on the LAN, for a restore elsewhere
                json.dump({"mac": where.mac, "iface": where.iface, "ip": where.details.get("ip")}, handle)
            if capture is not None:  # a snapshot server's client stores the capture as the tar, unwritten
                capture.finish_tree(images) if takes_trees(sink) else capture.finish(images)
            stored = sink.put_dir(images)
            # Kept here (moved away, with the copy of its directory a tree pointer names) for a restore on
            # this host, or removed below; a btrfs subvolume snapshot is not moved (it is deleted as one).
            sink.keep(images, stored, {workdir.ARCHIVE: capture.captured()} if capture is not None
                      and os.path.exists(os.path.join(images, workdir.ARCHIVE + POINTER))
                      and not getattr(capture, "subvolume", False) else None)
        finally:
            if capture is not None:
                capture.discard()
            shutil.rmtree(images, ignore_errors=True)
        details = {"dump_ms": round(report.dump_ms, 1), "hook_ms": round(report.hook_ms, 3), **timings}
        for key in ("resumed_after_ms", "predump_after_ms", "freezing_ms"):
            if getattr(report, key) is not None:
                details[key] = getattr(report, key)
        if capture is not None:
            details["workdir"] = capture.details()
        return ImageReport(
            pause_ms=round(report.frozen_ms if report.frozen_ms is not None else report.hook_ms, 3),
            bytes=report.bytes, files=stored, details=details)

    def restore(self, member: CriuMember, directory: str) -> Restored:
        where = self.locate(member)
        if where.pid is not None:
            stop_tree(where.pid)
        clear_orphan_sockets(where.netns)
        identity = {}
        try:
            with open(os.path.join(directory, IDENTITY)) as handle:
                identity = json.load(handle)
        except (OSError, ValueError):
            pass
        mac, ip = identity.get("mac") or where.mac, member.ip or identity.get("ip")
        if mac and (mac != where.mac or (member.ip and member.ip != where.details.get("ip"))):
            take_identity(where, mac, ip)  # restored away from home: its MAC and address come along
        restore_ms = restore(ProcessMember(member.name, where.netns, where.pid or 0, member.workdir, where.mntns), directory,
                             leave_stopped=True)
        now = self.locate(member)
        self.restored[member.name] = now
        return Restored(restore_ms, switch_port_of(now), {"pid": now.pid})

    def resume(self, member: CriuMember) -> None:
        where = self.restored.pop(member.name, None)  # as its restore left it: found again only if it
        proc = self.read(where.pid) if where is not None and where.pid else None  # is no longer stopped there
        if proc is None or proc.state not in ("T", "t"):  # (the whole slice resumes at once: a /proc scan each)
            where = self.locate(member)
        forget_unresolved_neighbours(where)
        if where.pid is None:
            raise RuntimeError("member %s is not running (%s)" % (member.name, member.describe()))
        try:
            os.killpg(where.pid, signal.SIGCONT)
        except ProcessLookupError:
            raise RuntimeError("member %s (pid %d) is not running" % (member.name, where.pid)) from None

    def stop(self, member: CriuMember) -> None:
        where = self.locate(member)
        if where.pid is not None:
            stop_tree(where.pid)
        clear_orphan_sockets(where.netns)
        in_netns(where.netns, "ip", "link", "set", where.iface, "down")  # its MAC and IP live elsewhere now

    def forget(self, member: CriuMember) -> None:
        """The member was removed from this helper."""
        self.kept.forget(member.name)
