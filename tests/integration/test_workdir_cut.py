"""A member's directory taken at its cut without copying it while frozen (issue 11, goal 2), on real CRIU.

A database-like member (workloads/appender.py: numbered records appended to a file, its count in memory
only) is dumped live with its directory captured by each path: copy-on-write on a btrfs filesystem in a
loop file (reflinks in a plain directory, a snapshot of a subvolume) and the iterative pre-copy on the
ordinary filesystem. Then it is killed, restored (directory and memory) and left to run: its file must
hold every record exactly once. A directory taken later than the memory repeats records, an earlier one
leaves a gap.
"""

import os
import subprocess
import sys
import threading
import time

import pytest

from hostside import workdir
from hostside.backends import criu
from lab import lab, loopfs
from workloads import appender

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def netns(lab_ready):
    name = lab.run_prefix() + "wd"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    yield "/run/netns/" + name
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@pytest.fixture
def btrfs(lab_ready, tmp_path):
    reason = loopfs.available("btrfs")
    if reason:
        if os.environ.get("CI"):
            pytest.fail("CI must test the copy-on-write path: " + reason)
        pytest.skip(reason)
    with loopfs.loop_filesystem(str(tmp_path), "btrfs", 256) as mountpoint:
        yield mountpoint


def start_member(netns, directory):
    return subprocess.Popen(
        ["nsenter", "--net=" + netns, "setsid", sys.executable, "-m", "workloads.appender", "--dir", directory,
         "--prefill-mib", "16", "--record-bytes", "256", "--rate", "500"],
        cwd=directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=ROOT))


def wait_gone(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.01)


def cut_and_restore(netns, directory, images, mode):
    """Dump the member with ``mode``'s capture, kill it, restore it; the capture and the file's check."""
    process = start_member(netns, directory)
    try:
        time.sleep(1.0)
        member = criu.ProcessMember("wd", netns, process.pid, directory)
        capture = workdir.capture_for(directory, lambda: workdir.tree_pids(process.pid), mode, images + ".stage")
        capture.prepare()
        report = criu.dump(member, images, lambda: None, network_lock=criu.SNAPSHOT_NETWORK_LOCK, capture=capture)
        capture.finish(images)
        assert report.frozen_ms is not None and os.path.exists(os.path.join(images, workdir.ARCHIVE))
        time.sleep(0.4)  # it writes on: records the restored member must not see in its file
        process.kill()
        process.wait(5)
        wait_gone(process.pid)
        criu.restore(member, images)
        time.sleep(0.5)  # the restored member appends on from its own count
        os.kill(process.pid, 9)
        wait_gone(process.pid)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    return capture, appender.check(os.path.join(directory, appender.NAME))


@pytest.fixture
def criu_ready():
    if not os.path.exists(criu.CRIU):
        if os.environ.get("CI"):
            pytest.fail("CI must test CRIU: %s is missing" % criu.CRIU)
        pytest.skip("CRIU 4.2.1 not installed (scripts/setup.sh)")


def test_copy_on_write_on_btrfs_reflinks_and_subvolume_snapshot(criu_ready, netns, btrfs, tmp_path):
    plain = os.path.join(btrfs, "plain")
    os.makedirs(plain)
    subvolume = os.path.join(btrfs, "subvolume")
    subprocess.run(["btrfs", "subvolume", "create", subvolume], check=True, capture_output=True)
    for index in range(workdir.REFLINK_MAX_FILES + 1):  # enough files for a snapshot to beat reflinks
        with open(os.path.join(subvolume, "table-%d" % index), "w") as handle:
            handle.write("row %d\n" % index)
    for directory, method in ((plain, "reflink"), (subvolume, "btrfs-snapshot")):
        capture, (records, problems) = cut_and_restore(netns, directory, str(tmp_path / method), "clone")
        assert capture.method == method
        assert problems == [] and records > 200, (method, records, problems)
        assert not os.path.exists(capture.captured())  # the clone is gone once archived
    assert sorted(os.listdir(btrfs)) == ["plain", "subvolume"]


def test_precopy_copies_only_the_final_delta_while_frozen(criu_ready, netns, tmp_path):
    directory = str(tmp_path / "member")
    os.makedirs(directory)
    capture, (records, problems) = cut_and_restore(netns, directory, str(tmp_path / "images"), "precopy")
    assert capture.method == "precopy" and problems == [] and records > 200, (records, problems)
    assert capture.frozen_bytes < (1 << 20)  # the tail appended since the last round, not the 16 MiB
    assert capture.round_bytes[0] > (16 << 20)


def test_the_files_and_the_cut_are_taken_side_by_side_and_a_failing_cut_fails_the_dump(criu_ready, netns, tmp_path):
    """While frozen, the directory's capture and the cut (marker, purge) run at once, not one after the
    other; a cut that fails still fails the dump (CRIU lets the member go, unharmed, with no image)."""
    directory = str(tmp_path / "member")
    os.makedirs(directory)
    process = start_member(netns, directory)
    try:
        time.sleep(1.0)
        member = criu.ProcessMember("wd", netns, process.pid, directory)
        for attempt in ("together", "failing"):
            capture = workdir.capture_for(directory, lambda: workdir.tree_pids(process.pid), "precopy",
                                          str(tmp_path / (attempt + ".stage")))
            capture.prepare()
            cut_started, seen = threading.Event(), []
            take_files = capture.at_freeze
            # One after the other, the files would wait here for a cut that has not begun.
            capture.at_freeze = lambda: (seen.append(cut_started.wait(5.0)), take_files())

            def at_cut():
                cut_started.set()
                if attempt == "failing":
                    raise RuntimeError("no marker echo")
            images = str(tmp_path / attempt)
            if attempt == "together":
                criu.dump(member, images, at_cut, network_lock=criu.SNAPSHOT_NETWORK_LOCK, capture=capture)
                capture.finish(images)
                assert os.path.exists(os.path.join(images, workdir.ARCHIVE))
            else:
                with pytest.raises(RuntimeError, match="no marker echo"):
                    criu.dump(member, images, at_cut, network_lock=criu.SNAPSHOT_NETWORK_LOCK, capture=capture)
            capture.discard()
            assert seen == [True], attempt
        size = os.path.getsize(os.path.join(directory, appender.NAME))
        time.sleep(0.3)
        assert process.poll() is None and os.path.getsize(os.path.join(directory, appender.NAME)) > size  # runs on
    finally:
        process.kill()
        process.wait(5)
