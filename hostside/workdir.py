"""A member's working directory as it was at its cut, without copying it while the member is frozen.

A member's files belong to the same instant as its memory (CRIU checks the size
of open files at restore). Archiving the directory while the tasks are frozen
made the pause grow with the directory (0.26-0.66 s for 128 MiB). Two ways
round it, chosen per directory by ``capture_for``:

``CloneCapture`` (copy-on-write: the directory is on btrfs or XFS with reflink)
    At the freeze the directory is cloned: a btrfs subvolume snapshot when the
    directory is a subvolume of its own with more than ``REFLINK_MAX_FILES``
    files (one ioctl whatever its size, but a transaction commit), else
    every file reflinked (``FICLONE``: the extents are shared, nothing is
    copied; one ioctl per file). The clone is a sibling
    ``.violin-cut-<member>-<random>`` on the same filesystem.
``PrecopyCapture`` (any other filesystem)
    Before the freeze, while the member runs: a full copy into the image
    directory, then rounds that copy only what changed since the round before,
    until the last round's delta is small. At the freeze only the final delta
    is copied. A file changed in place is copied whole; a file that only grew
    is copied from where the last round stopped, but only when every open
    description the (frozen) member's tree holds on it for writing is
    ``O_APPEND`` and none maps it shared and writable (then the kernel lets its
    writes land only at the end: the bytes already copied cannot have
    changed), and the last ``CANARY`` bytes copied still match (which catches a
    truncate followed by a regrow). A file the tree maps shared and writable is
    copied whole at every round and at the freeze (stores through a mapping need
    not change its timestamps), and so is a file whose timestamps were within
    ``RACY_NS`` of the last scan (a write in the same timestamp tick would not
    show). What this cannot see: a process that
    opened the file without ``O_APPEND``, wrote inside it and closed it
    between two scans, or a process outside the member's tree writing into
    its directory. Put such members on btrfs or XFS (the clone has no such
    limit).

Either way, after the member runs again ``finish`` writes the captured
directory as ``workdir.tar`` into the member's image (what the snapshot server
stores and ``criu.restore`` puts back) and removes the capture. The planning
(what to copy) is pure: ``plan_delta`` on two ``scan`` results.
"""

import ctypes
import fcntl
import os
import shutil
import stat
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

ARCHIVE = "workdir.tar"
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417  # _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2), 4096 bytes
BTRFS_IOC_SNAP_DESTROY = 0x5000940F  # _IOW(0x94, 15, struct btrfs_ioctl_vol_args), 4096 bytes
BTRFS_SUPER_MAGIC, XFS_SUPER_MAGIC = 0x9123683E, 0x58465342
BTRFS_FIRST_FREE_OBJECTID = 256  # the root directory of every btrfs subvolume has this inode number
O_APPEND = os.O_APPEND
CANARY = 4096  # bytes before a grown file's old end compared before copying only its tail
PRECOPY_ROUNDS = 4  # rounds after the full copy, at most
PRECOPY_SMALL = 1 << 20  # a round that copied fewer bytes than this is the last one before the freeze
RACY_NS = 20_000_000  # timestamps tick coarser than ns (jiffies): within this of a scan, not trusted
REFLINK_MAX_FILES = 32  # a btrfs subvolume with more files than this is snapshotted rather than reflinked


class WorkdirError(RuntimeError):
    """The directory could not be captured (the message says which file and why)."""


# --- what is where ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One path of a scanned directory: kind "file", "dir" or "link"."""
    kind: str
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    ino: int = 0
    mode: int = 0
    target: str = ""  # a link's target


def scan(root: str) -> Dict[str, Entry]:
    """Every path under ``root`` (relative, "." excluded) with what says whether it changed."""
    found: Dict[str, Entry] = {}
    for directory, dirs, files in os.walk(root):
        relative = os.path.relpath(directory, root)
        for name in dirs + files:
            rel = os.path.normpath(os.path.join(relative, name))
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:  # removed while we looked: absent
                continue
            if stat.S_ISLNK(info.st_mode):
                found[rel] = Entry("link", target=os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = Entry("dir", mode=stat.S_IMODE(info.st_mode))
            elif stat.S_ISREG(info.st_mode):
                found[rel] = Entry("file", info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino,
                                   stat.S_IMODE(info.st_mode))
            # sockets, FIFOs, devices: not data; CRIU handles what the member has open
    return found


@dataclass
class Delta:
    """What makes a copy of ``before`` into one of ``now``."""
    dirs: List[str] = field(default_factory=list)  # to create (parents first)
    whole: List[str] = field(default_factory=list)  # files to copy whole
    tails: List[Tuple[str, int]] = field(default_factory=list)  # (file, offset): copy from offset on
    links: List[str] = field(default_factory=list)
    remove: List[str] = field(default_factory=list)  # gone (children before parents)

    def bytes(self, now: Dict[str, Entry]) -> int:
        return sum(now[p].size for p in self.whole) + sum(now[p].size - offset for p, offset in self.tails)

    def empty(self) -> bool:
        return not (self.dirs or self.whole or self.tails or self.links or self.remove)


def plan_delta(before: Dict[str, Entry], now: Dict[str, Entry], append_only: Set[str] = frozenset(),
               always: Set[str] = frozenset(), racy_since: Optional[int] = None) -> Delta:
    """The copy work that turns a copy of ``before`` into one of ``now`` (pure).

    ``append_only``: files whose every writer can only append (see the module
    doc); only those may be copied from their old end on, and only if they
    kept their inode and did not shrink. Anything else that changed is copied whole. ``always``:
    files copied whole even if they look unchanged (mapped shared and writable: stores through a
    mapping need not touch the timestamps). ``racy_since``: when ``before`` was scanned (ns, the
    timestamps' clock); a file whose mtime (every write sets it) was not older than that may have changed again
    within the same timestamp tick, so it counts as changed (git's "racily clean" entries).
    """
    delta = Delta()
    for rel in sorted(now, key=lambda p: (p.count(os.sep), p)):
        entry, old = now[rel], before.get(rel)
        if old is not None and old.kind != entry.kind:
            delta.remove.append(rel)
            old = None
        if entry.kind == "dir":
            if old is None or old.mode != entry.mode:
                delta.dirs.append(rel)
        elif entry.kind == "link":
            if old is None or old.target != entry.target:
                delta.links.append(rel)
        elif old is None or old.ino != entry.ino or old.mode != entry.mode:
            delta.whole.append(rel)
        elif rel in always:
            delta.whole.append(rel)
        elif (old.size, old.mtime_ns, old.ctime_ns) != (entry.size, entry.mtime_ns, entry.ctime_ns):
            if rel in append_only and entry.size > old.size:
                delta.tails.append((rel, old.size))
            else:
                delta.whole.append(rel)
        elif racy_since is not None and old.mtime_ns >= racy_since - RACY_NS \
                and rel not in append_only:  # (appending writers only: the same size means no write)
            delta.whole.append(rel)
    gone = [rel for rel in before if rel not in now]
    delta.remove += sorted(gone, key=lambda p: (-p.count(os.sep), p))
    return delta


def writers(pids: Iterable[int], root: str) -> Tuple[Set[Tuple[int, int]], Set[Tuple[int, int]], Set[Tuple[int, int]]]:
    """(append-only writers, other writers, shared writable mappings) of files: sets of (st_dev,
    st_ino) the processes ``pids`` hold (a mapped file is among the other writers too).

    Read from /proc/PID/fd (what each descriptor is), /proc/PID/fdinfo (its
    flags) and /proc/PID/maps (shared writable mappings count as other writers).
    By device and inode, so the member's own mount namespace does not matter.
    """
    append, other, mapped = set(), set(), set()
    for pid in pids:
        fd_dir = "/proc/%d/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                info = os.stat(os.path.join(fd_dir, fd))
                if not stat.S_ISREG(info.st_mode):
                    continue
                with open("/proc/%d/fdinfo/%s" % (pid, fd)) as handle:
                    flags = next(int(line.split()[1], 8) for line in handle if line.startswith("flags:"))
            except (OSError, StopIteration, ValueError):
                continue
            if flags & 3 in (os.O_WRONLY, os.O_RDWR):
                (append if flags & O_APPEND else other).add((info.st_dev, info.st_ino))
        try:
            with open("/proc/%d/maps" % pid) as handle:
                for line in handle:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and "w" in parts[1] and "s" in parts[1] and parts[4] != "0":
                        major, minor = (int(x, 16) for x in parts[3].split(":"))
                        other.add((os.makedev(major, minor), int(parts[4])))
                        mapped.add((os.makedev(major, minor), int(parts[4])))
        except OSError:
            continue
    return append - other, other, mapped


def tree_pids(root_pid: int) -> List[int]:
    """``root_pid`` and every descendant (through /proc/PID/task/TID/children)."""
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for tid in tids:
            try:
                with open("/proc/%d/task/%s/children" % (pid, tid)) as handle:
                    todo += [int(c) for c in handle.read().split()]
            except OSError:
                continue
    return found


def append_only_files(scanned: Dict[str, Entry], root: str, pids: Iterable[int]) -> Set[str]:
    """The files of ``scanned`` that the member's tree writes only through O_APPEND descriptors."""
    return classify(scanned, root, pids)[0]


def classify(scanned: Dict[str, Entry], root: str, pids: Iterable[int]) -> Tuple[Set[str], Set[str]]:
    """(append-only files, files mapped shared and writable) of ``scanned``, by the member's tree."""
    append, _other, mapped = writers(pids, root)
    try:
        device = os.stat(root).st_dev
    except OSError:
        return set(), set()
    files = {rel: (device, entry.ino) for rel, entry in scanned.items() if entry.kind == "file"}
    return {rel for rel, key in files.items() if key in append}, {rel for rel, key in files.items() if key in mapped}


# --- copying ---------------------------------------------------------------------------------

def _copy_range(source: str, target: str, offset: int, size: int) -> None:
    with open(source, "rb") as src, open(target, "r+b" if offset else "wb") as dst:
        if offset:
            dst.truncate(offset)
        position = offset
        while position < size:
            sent = os.copy_file_range(src.fileno(), dst.fileno(), size - position, position, position)
            if sent == 0:  # the file shrank under us: copy what there is, the next scan sees the rest
                break
            position += sent


def _same_canary(source: str, target: str, offset: int) -> bool:
    start = max(0, offset - CANARY)
    try:
        with open(source, "rb") as src, open(target, "rb") as dst:
            return os.pread(src.fileno(), offset - start, start) == os.pread(dst.fileno(), offset - start, start)
    except OSError:
        return False


def apply_delta(delta: Delta, now: Dict[str, Entry], source: str, target: str) -> int:
    """Make ``target`` (a copy of the earlier scan) a copy of ``now``; the bytes copied."""
    copied = 0
    for rel in delta.remove:
        path = os.path.join(target, rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
    for rel in delta.dirs:
        os.makedirs(os.path.join(target, rel), exist_ok=True)
        os.chmod(os.path.join(target, rel), now[rel].mode)
    for rel in delta.links:
        path = os.path.join(target, rel)
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(now[rel].target, path)
    tails = []
    for rel, offset in delta.tails:
        if _same_canary(os.path.join(source, rel), os.path.join(target, rel), offset):
            tails.append((rel, offset))
        else:
            delta.whole.append(rel)  # truncated and regrown, or our copy is not what we think: all of it
    # A copy keeps the mtime the scan saw (what the member's file had when its bytes were taken), as
    # a clone does: the tar records the member's mtimes, and the store's stat cache (hostside.store.tree)
    # can tell a file the member left alone from one it wrote since the last snapshot.
    for rel in delta.whole:
        try:
            _copy_range(os.path.join(source, rel), os.path.join(target, rel), 0, now[rel].size)
            os.chmod(os.path.join(target, rel), now[rel].mode)
            os.utime(os.path.join(target, rel), ns=(now[rel].mtime_ns, now[rel].mtime_ns))
        except FileNotFoundError:  # removed since the scan: the next scan removes it
            continue
        copied += now[rel].size
    for rel, offset in tails:
        _copy_range(os.path.join(source, rel), os.path.join(target, rel), offset, now[rel].size)
        os.utime(os.path.join(target, rel), ns=(now[rel].mtime_ns, now[rel].mtime_ns))
        copied += now[rel].size - offset
    return copied


# --- copy-on-write ---------------------------------------------------------------------------

class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def fs_type(path: str) -> int:
    """The filesystem magic of ``path`` (statfs f_type), 0 if unknown."""
    buf = _Statfs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return 0
    return buf.f_type & 0xFFFFFFFF


def reflink(source: str, target: str) -> None:
    """``target`` becomes a copy-on-write clone of ``source`` (sharing its extents); OSError if the
    filesystem cannot (EOPNOTSUPP, EXDEV, EINVAL)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
    shutil.copystat(source, target)


def can_reflink(directory: str) -> bool:
    """Whether files in ``directory`` can be reflinked into a sibling of it (tried, not guessed)."""
    probe = os.path.join(os.path.dirname(os.path.abspath(directory)), ".violin-probe-%s" % uuid.uuid4().hex[:8])
    try:
        with open(probe, "wb") as handle:
            handle.write(b"violin")
        reflink(probe, probe + ".clone")
        return True
    except OSError:
        return False
    finally:
        for path in (probe, probe + ".clone"):
            try:
                os.unlink(path)
            except OSError:
                pass


def is_btrfs_subvolume(path: str) -> bool:
    try:
        return fs_type(path) == BTRFS_SUPER_MAGIC and os.stat(path).st_ino == BTRFS_FIRST_FREE_OBJECTID
    except OSError:
        return False


def _vol_args(fd: int, name: str, v2: bool) -> bytes:
    encoded = name.encode()
    if v2:  # struct btrfs_ioctl_vol_args_v2: fd, transid, flags, 4 x u64, name[4040]
        return fd.to_bytes(8, "little", signed=True) + bytes(8 + 8 + 32) + encoded.ljust(4040, b"\0")
    return fd.to_bytes(8, "little", signed=True) + encoded.ljust(4088, b"\0")  # btrfs_ioctl_vol_args


def snapshot_subvolume(source: str, target: str) -> None:
    """A (writable) btrfs snapshot of subvolume ``source`` at ``target`` (same filesystem): one ioctl."""
    parent, name = os.path.split(os.path.abspath(target))
    src = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    dst = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(dst, BTRFS_IOC_SNAP_CREATE_V2, bytearray(_vol_args(src, name, True)), True)
    finally:
        os.close(src)
        os.close(dst)


def delete_subvolume(path: str) -> None:
    parent, name = os.path.split(os.path.abspath(path))
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_SNAP_DESTROY, bytearray(_vol_args(0, name, False)), True)
    finally:
        os.close(fd)


# --- the captures ----------------------------------------------------------------------------

class Capture:
    """One member's directory at one cut: ``prepare`` (member running), ``at_freeze`` (frozen),
    ``finish`` (running again: the archive into the image), ``discard`` (on failure)."""
    method = "none"

    def __init__(self, workdir: str, pids=lambda: []):
        self.workdir, self.pids = workdir, pids
        self.timings: Dict[str, float] = {}
        self.frozen_bytes = 0  # what was copied while the member was frozen

    def prepare(self) -> None:
        pass

    def at_freeze(self) -> None:
        raise NotImplementedError

    def captured(self) -> str:
        raise NotImplementedError

    def finish(self, images: str) -> str:
        """Write the captured directory as ``images/workdir.tar``; its path."""
        began = time.monotonic()
        path = os.path.join(images, ARCHIVE)
        with tarfile.open(path, "w") as archive:
            archive.add(self.captured(), arcname=".")
        self.timings["archive_ms"] = round((time.monotonic() - began) * 1000, 1)
        self.discard()
        return path

    def finish_tree(self, images: str) -> str:
        """Instead of writing the tar, point the image at the captured directory (``images/workdir.tar.tree``)
        for a snapshot server's client to store as that tar without writing it (``hostside.store.tree``);
        the capture is kept until ``discard``, which must come after the upload. Its path."""
        from hostside.store import tree  # noqa: PLC0415 - the store's client, only on this path
        self.timings["archive_ms"] = 0.0
        return tree.write_pointer(images, ARCHIVE, self.captured(), clone=True)

    def discard(self) -> None:
        pass

    def details(self) -> dict:
        return dict(self.timings, method=self.method, frozen_bytes=self.frozen_bytes)


def _more_files_than(root: str, limit: int) -> bool:
    count = 0
    for _directory, _dirs, files in os.walk(root):
        count += len(files)
        if count > limit:
            return True
    return False


class CloneCapture(Capture):
    """Copy-on-write: a btrfs subvolume snapshot, or every file reflinked, at the freeze."""

    def __init__(self, workdir: str, pids=lambda: [], subvolume: Optional[bool] = None):
        super().__init__(workdir, pids)
        parent = os.path.dirname(os.path.abspath(workdir))
        self.clone = os.path.join(parent, ".violin-cut-%s-%s" % (os.path.basename(workdir), uuid.uuid4().hex[:8]))
        if subvolume is None:  # a snapshot commits a btrfs transaction (~10 ms): for a few files reflinks win
            subvolume = is_btrfs_subvolume(workdir) and _more_files_than(workdir, REFLINK_MAX_FILES)
        self.subvolume = subvolume
        self.method = "btrfs-snapshot" if self.subvolume else "reflink"

    def prepare(self) -> None:
        """Write the directory's dirty data back while the member runs: a clone (and a subvolume
        snapshot) first flushes what is dirty, so at the freeze only what was written since is left."""
        began = time.monotonic()
        if self.subvolume:
            fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                ctypes.CDLL(None, use_errno=True).syncfs(fd)
            finally:
                os.close(fd)
        else:
            for directory, _dirs, files in os.walk(self.workdir):
                for name in files:
                    try:
                        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW)
                    except OSError:
                        continue
                    try:
                        os.fdatasync(fd)
                    except OSError:
                        pass
                    finally:
                        os.close(fd)
        self.timings["flush_ms"] = round((time.monotonic() - began) * 1000, 1)

    def at_freeze(self) -> None:
        began = time.monotonic()
        if self.subvolume:
            snapshot_subvolume(self.workdir, self.clone)
        else:
            self._reflink_tree()
        self.timings["freeze_ms"] = round((time.monotonic() - began) * 1000, 3)

    def _reflink_tree(self) -> None:
        os.makedirs(self.clone)
        for directory, dirs, files in os.walk(self.workdir):
            here = os.path.join(self.clone, os.path.relpath(directory, self.workdir))
            for name in dirs:
                source = os.path.join(directory, name)
                if os.path.islink(source):
                    os.symlink(os.readlink(source), os.path.join(here, name))
                else:
                    os.makedirs(os.path.join(here, name), exist_ok=True)
            for name in files:
                source, target = os.path.join(directory, name), os.path.join(here, name)
                try:
                    info = os.lstat(source)
                    if stat.S_ISLNK(info.st_mode):
                        os.symlink(os.readlink(source), target)
                    elif stat.S_ISREG(info.st_mode):
                        reflink(source, target)
                except FileNotFoundError:
                    continue
                except OSError as error:
                    raise WorkdirError("cannot clone %s: %s" % (source, error.strerror or error)) from None

    def captured(self) -> str:
        return self.clone

    def discard(self) -> None:
        if not os.path.lexists(self.clone):
            return
        if self.subvolume:
            try:
                delete_subvolume(self.clone)
                return
            except OSError:
                pass
        shutil.rmtree(self.clone, ignore_errors=True)


class PrecopyCapture(Capture):
    """Iterative pre-copy while the member runs, only the final delta while it is frozen."""
    method = "precopy"

    def __init__(self, workdir: str, pids=lambda: [], stage: Optional[str] = None,
                 rounds: int = PRECOPY_ROUNDS, small: int = PRECOPY_SMALL):
        super().__init__(workdir, pids)
        self.stage = stage or os.path.join(os.path.dirname(os.path.abspath(workdir)),
                                           ".violin-copy-%s-%s" % (os.path.basename(workdir), uuid.uuid4().hex[:8]))
        self.rounds, self.small = rounds, small
        self.copied: Dict[str, Entry] = {}
        self.scanned_at: Optional[int] = None
        self.round_bytes: List[int] = []

    def _round(self) -> int:
        scanned_at = time.time_ns()
        now = scan(self.workdir)
        append_only, mapped = classify(now, self.workdir, self.pids()) if self.copied else (set(), set())
        delta = plan_delta(self.copied, now, append_only, mapped, self.scanned_at)
        copied = apply_delta(delta, now, self.workdir, self.stage)
        self.copied, self.scanned_at = now, scanned_at
        return copied

    def prepare(self) -> None:
        began = time.monotonic()
        shutil.rmtree(self.stage, ignore_errors=True)
        os.makedirs(self.stage)
        self.copied, self.scanned_at = {}, None
        self.round_bytes = [self._round()]
        while len(self.round_bytes) <= self.rounds and self.round_bytes[-1] >= self.small:
            self.round_bytes.append(self._round())
        self.timings["precopy_ms"] = round((time.monotonic() - began) * 1000, 1)

    def at_freeze(self) -> None:
        began = time.monotonic()
        if not os.path.isdir(self.stage):  # no pre-copy (prepare not called): all of it now
            os.makedirs(self.stage)
        self.frozen_bytes = self._round()
        self.timings["freeze_ms"] = round((time.monotonic() - began) * 1000, 3)

    def captured(self) -> str:
        return self.stage

    def details(self) -> dict:
        return dict(super().details(), precopy_rounds=self.round_bytes)

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


def capture_for(workdir: str, pids=lambda: [], mode: str = "auto", stage: Optional[str] = None) -> Capture:
    """The capture for ``workdir``: ``mode`` "auto" (copy-on-write where the filesystem can, else
    pre-copy), "clone" (copy-on-write or an error saying why not) or "precopy". ``pids()``: the
    member's processes (for the pre-copy's append-only rule); ``stage``: where a pre-copy goes
    (default: a sibling of ``workdir``). A clone is always a sibling (the same filesystem), so
    ``workdir`` must be a directory inside the btrfs/XFS filesystem, not its mount point."""
    if mode not in ("auto", "clone", "precopy"):
        raise ValueError("workdir capture mode is auto, clone or precopy, not %r" % mode)
    if not os.path.isdir(workdir):
        raise WorkdirError("the member's workdir %s is not a directory" % workdir)
    if mode != "precopy":
        if is_btrfs_subvolume(workdir) or can_reflink(workdir):
            return CloneCapture(workdir, pids)
        if mode == "clone":
            raise WorkdirError("%s is not on a filesystem with reflinks (btrfs or XFS with reflink=1): "
                               "cannot clone it" % workdir)
    return PrecopyCapture(workdir, pids, stage)


__all__ = ["ARCHIVE", "Capture", "CloneCapture", "Delta", "Entry", "PrecopyCapture", "WorkdirError",
           "append_only_files", "apply_delta", "can_reflink", "capture_for", "fs_type", "plan_delta", "scan",
           "tree_pids", "writers"]
