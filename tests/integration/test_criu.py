"""The CRIU backend on real member processes inside Mininet hosts."""

import os
import signal
import time

import pytest

from hostside.backends import criu
from lab import lab
from topologies.lan import LanTopo
from lab.members import ProcessMembers


@pytest.fixture(scope="module")
def criu_ready():
    if not os.path.exists(criu.CRIU):
        if os.environ.get("CI"):
            pytest.fail("CI must test CRIU: %s is missing (scripts/setup.sh builds it)" % criu.CRIU)
        pytest.skip("CRIU 4.2.1 not installed (scripts/setup.sh)")


def wait_gone(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError("process %d still there" % pid)


def test_live_dump_runs_the_hook_while_frozen_and_restore_continues(controller, criu_ready, tmp_path):
    with lab.network(LanTopo(2, prefix=lab.run_prefix()), controller) as net:
        members = ProcessMembers(net.hosts, str(tmp_path / "slice"), rate=200)
        members.start()
        try:
            time.sleep(0.8)
            h1, h2 = net.hosts
            process = members.processes[h1.name]
            member = criu.ProcessMember(h1.name, "/proc/%d/ns/net" % h1.pid, process.pid, members.member_dir(h1),
                                        "/proc/%d/ns/mnt" % h1.pid)
            seen = {}

            def on_frozen():
                with open("/proc/%d/stat" % process.pid) as handle:
                    seen["state"] = handle.read().rsplit(")", 1)[1].split()[0]
                seen["progress"] = members.progress(h1)
                time.sleep(0.05)
                seen["progress_later"] = members.progress(h1)

            report = criu.dump(member, str(tmp_path / "img"), on_frozen)
            assert seen["state"] in ("t", "T", "S", "D")  # CRIU's freezer: traced/stopped, not running
            assert seen["progress"] == seen["progress_later"]  # it sent nothing while frozen
            assert report.bytes > 100_000 and report.hook_ms >= 50
            assert report.frozen_ms >= report.hook_ms  # CRIU's own count of the freeze includes the hook
            assert os.path.exists(tmp_path / "img" / criu.WORKDIR_ARCHIVE)
            time.sleep(0.3)
            progress_at_kill = members.progress(h1)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)
            wait_gone(process.pid)
            elapsed = criu.restore(member, str(tmp_path / "img"))
            assert elapsed < 10_000
            with open("/proc/%d/cmdline" % process.pid) as handle:
                assert "seqstream" in handle.read()
            time.sleep(0.6)
            resumed = members.progress(h1)
            peer = members.ids[h2.name]
            # It continued from the dumped state (seq went back below where the killed one was) and runs on.
            assert seen["progress"][peer][1] < resumed[peer][1]
            assert resumed[peer][1] < progress_at_kill[peer][1] + 0.6 * 200 + 50
            os.kill(process.pid, signal.SIGTERM)
            wait_gone(process.pid)
        finally:
            members.stop()
