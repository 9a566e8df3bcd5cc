"""A btrfs or XFS filesystem in a loop file, for the copy-on-write workdir path (tests, benchmarks).

``with loop_filesystem(directory, "btrfs", size_mib=512) as mountpoint:`` makes a sparse file in
``directory``, a loop device for it (``losetup --find --show``: its name is kept and only that one is
detached), the filesystem, and mounts it under ``directory``; on exit it unmounts, detaches and
deletes, whatever happened. ``available(kind)`` says why it cannot be made here, or None.
"""

import os
import shutil
import subprocess
from contextlib import contextmanager

MKFS = {"btrfs": ["mkfs.btrfs", "-q", "-f"], "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]}


def available(kind: str = "btrfs"):
    if os.geteuid() != 0:
        return "loop filesystems need root"
    if shutil.which(MKFS[kind][0]) is None:
        return "%s is not installed (scripts/setup.sh installs btrfs-progs)" % MKFS[kind][0]
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    return None


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(argv), result.stderr.strip() or result.stdout.strip()))
    return result.stdout.strip()


@contextmanager
def loop_filesystem(directory: str, kind: str = "btrfs", size_mib: int = 512):
    image, mountpoint = os.path.join(directory, "%s.img" % kind), os.path.join(directory, "mnt")
    os.makedirs(mountpoint, exist_ok=True)
    with open(image, "wb") as handle:
        handle.truncate(size_mib << 20)
    device = None
    mounted = False
    try:
        device = _run("losetup", "--find", "--show", image)
        _run(*MKFS[kind], device)
        _run("mount", device, mountpoint)
        mounted = True
        yield mountpoint
    finally:
        if mounted:
            subprocess.run(["umount", mountpoint], capture_output=True, timeout=60)
        if device:
            subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60)
        os.unlink(image)
