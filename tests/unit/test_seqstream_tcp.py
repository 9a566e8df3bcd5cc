"""Two real seqstream members on loopback (127.0.0.1 and 127.0.0.2): UDP and TCP streams, then the oracle."""

import json
import os
import signal
import socket
import subprocess
import struct
import sys
import time

import pytest

from workloads import oracle, seqstream

RATE = 200


def start(tmp_path, ident, address, peer, peer_address, *extra):
    directory = tmp_path / ("m%d" % ident)
    directory.mkdir()
    (directory / "member.id").write_text(json.dumps([ident, [peer]]))
    process = subprocess.Popen(
        [sys.executable, seqstream.__file__, "--id", str(ident), "--bind", address, "--peers",
         "%d=%s" % (peer, peer_address), "--rate", str(RATE), "--progress", str(directory / "member.progress"),
         "--log", str(directory / "member.log")] + list(extra), stdin=subprocess.DEVNULL)
    return process, str(directory)


def wait_sending(directory, peer, timeout=15.0):
    """Until the member has sent to ``peer`` (its SIGTERM handler is in place by then; a busy host is slow)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if seqstream.read_progress(os.path.join(directory, "member.progress"), [peer])[peer][1] > 0:
                return
        except (OSError, ValueError, KeyError, IndexError, struct.error):
            pass
        time.sleep(0.05)
    raise AssertionError("member in %s sent nothing in %.0f s" % (directory, timeout))


def stop(processes):
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        assert process.wait(10) == 0


@pytest.fixture
def loopback_ports_free():
    for address in ("127.0.0.1", "127.0.0.2"):
        for kind, port in ((socket.SOCK_DGRAM, seqstream.PORT), (socket.SOCK_STREAM, seqstream.TCP_PORT)):
            with socket.socket(socket.AF_INET, kind) as probe:
                try:
                    probe.bind((address, port))
                except OSError as error:
                    pytest.skip("%s:%d is taken: %s" % (address, port, error))


def test_udp_and_tcp_streams_on_loopback_are_exactly_once(tmp_path, loopback_ports_free):
    first, dir1 = start(tmp_path, 1, "127.0.0.1", 2, "127.0.0.2")
    time.sleep(0.3)  # member 1 tries to connect to 2 before 2 listens: it retries until 2 is up
    second, dir2 = start(tmp_path, 2, "127.0.0.2", 1, "127.0.0.1")
    progress, deadline = os.path.join(dir1, "member.progress"), time.monotonic() + 15
    while time.monotonic() < deadline:  # until over a second's worth went each way (slower on a busy host)
        time.sleep(0.25)
        try:
            if seqstream.read_progress(progress, [2], tcp=True)[2][1] > RATE + RATE // 4:
                break
        except (OSError, ValueError, KeyError, IndexError, struct.error):
            pass
    wait_sending(dir2, 1)
    time.sleep(0.3)
    stop([first, second])
    result = oracle.load([dir1, dir2], margin=RATE // 4)
    assert result["totals"]["streams"] == 4 and result["totals"]["tcp"]["streams"] == 2, result["totals"]
    assert result["consistent"] and result["totals"]["tcp"]["max_behind_udp"] < RATE, result
    for stream in ("1->2/tcp", "2->1/tcp"):
        assert result["streams"][stream]["judged_from"] == 1 and result["streams"][stream]["judged_upto"] > RATE // 2
    about, last = seqstream.read_progress(os.path.join(dir1, "member.progress"), [2], tcp=True)[2]
    assert about >= last > RATE
    tcp = seqstream.parse_log(os.path.join(dir2, "member.log"), tcp=True)
    assert [seq for _sender, seq, _t in tcp] == list(range(1, len(tcp) + 1))  # in order, from 1
    assert {sender for sender, _seq, _t in tcp} == {1}
    assert subprocess.run([sys.executable, "-m", "workloads.oracle", dir1, dir2],
                          cwd=os.path.dirname(os.path.dirname(oracle.__file__))).returncode == 0


def test_no_tcp_keeps_a_member_udp_only(tmp_path, loopback_ports_free):
    first, dir1 = start(tmp_path, 1, "127.0.0.1", 2, "127.0.0.2", "--no-tcp")
    second, dir2 = start(tmp_path, 2, "127.0.0.2", 1, "127.0.0.1", "--no-tcp")
    wait_sending(dir1, 2)
    wait_sending(dir2, 1)
    time.sleep(0.8)
    stop([first, second])
    result = oracle.load([dir1, dir2], margin=RATE // 4)
    assert result["totals"]["streams"] == 2 and result["totals"]["tcp"]["streams"] == 0 and result["consistent"]
    assert os.path.getsize(os.path.join(dir1, "member.progress")) == seqstream.SLOT.size
    assert seqstream.parse_log(os.path.join(dir1, "member.log"), tcp=True) == []
