"""The CRIU post-dump hand-over (criu.PostDumpHook) and the datapath purge on ovs-vswitchd's control
socket (ovs.Unixctl), without CRIU or Open vSwitch: the hook script is run as CRIU runs it."""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from hostside import ovs
from hostside.backends import criu


def run_script(hook, action="post-dump"):
    return subprocess.run([hook.script], env=dict(os.environ, CRTOOLS_SCRIPT_ACTION=action), timeout=20).returncode


def test_the_hook_runs_on_frozen_and_answers_ok():
    ran = []
    with criu.PostDumpHook(lambda: ran.append(True)) as hook:
        assert run_script(hook, "pre-dump") == 0 and not ran  # other actions pass straight through
        assert run_script(hook) == 0
    assert ran == [True] and hook.fired and hook.error is None and hook.hook_ms >= 0
    assert not os.path.exists(hook.control)


def test_a_failing_on_frozen_fails_the_script_and_is_kept():
    def refuse():
        raise RuntimeError("controller refused the cut")
    with criu.PostDumpHook(refuse) as hook:
        assert run_script(hook) == 1
    assert isinstance(hook.error, RuntimeError) and "refused" in str(hook.error)


def test_a_hook_that_never_fires_releases_its_reader():
    with criu.PostDumpHook(lambda: None) as hook:
        pass
    assert not hook.fired and not hook.waiter.is_alive()


def test_the_script_gives_up_when_nobody_answers(tmp_path):
    # A helper that died: nobody reads the request or writes the reply; read -t ends the wait.
    request, reply = tmp_path / "request", tmp_path / "reply"
    os.mkfifo(request)
    os.mkfifo(reply)
    script = tmp_path / "hook.sh"
    script.write_text(criu.HOOK.format(request=request, reply=reply, timeout=1))
    script.chmod(0o755)
    result = subprocess.run([str(script)], env=dict(os.environ, CRTOOLS_SCRIPT_ACTION="post-dump"), timeout=20)
    assert result.returncode == 1


class FakeVswitchd:
    """A unix socket answering ovs-appctl's JSON-RPC like ovs-vswitchd (one connection at a time)."""

    def __init__(self, rundir, error=None):
        self.calls, self.error = [], error
        with open(os.path.join(rundir, "ovs-vswitchd.pid"), "w") as handle:
            handle.write("4242\n")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(os.path.join(rundir, "ovs-vswitchd.4242.ctl"))
        self.server.listen(4)
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                decoder, data = json.JSONDecoder(), b""
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                    try:
                        request, end = decoder.raw_decode(data.decode())
                    except ValueError:
                        continue
                    data = data[end:]
                    self.calls.append(request["method"])
                    conn.sendall(json.dumps({"id": request["id"], "result": "" if not self.error else None,
                                             "error": self.error}).encode())


def test_unixctl_purges_on_one_kept_connection(tmp_path):
    daemon = FakeVswitchd(str(tmp_path))
    client = ovs.Unixctl(str(tmp_path))
    assert client.call("revalidator/purge") and client.call("revalidator/purge")
    assert daemon.calls == ["revalidator/purge"] * 2
    assert ovs.wait_datapath(unixctl=client) == "purge"


def test_unixctl_says_no_when_refused_or_absent(tmp_path):
    FakeVswitchd(str(tmp_path), error="unknown command")
    assert ovs.Unixctl(str(tmp_path)).call("revalidator/purge") is False
    assert ovs.Unixctl(str(tmp_path / "none")).call("revalidator/purge", timeout=0.2) is False


@pytest.mark.parametrize("slots", ["1", "3"])
def test_freeze_slots_come_from_the_environment(slots):
    code = "from hostside.backends import criu; print(criu.FREEZE_SLOTS, criu.SNAPSHOT_NETWORK_LOCK)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, VIOLIN_CRIU_FREEZES=slots),
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [slots, "nftables"], out.stderr


def test_one_member_is_frozen_at_a_time_by_default_and_0_lifts_the_bound():
    code = "from hostside.backends import criu; print(criu.FREEZE_SLOTS)"
    env = {k: v for k, v in os.environ.items() if k != "VIOLIN_CRIU_FREEZES"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1", out.stderr
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, VIOLIN_CRIU_FREEZES="0"),
                         capture_output=True, text=True, timeout=60)
    assert int(out.stdout) >= 1024, out.stderr


def test_on_resumed_runs_once_after_the_answer_and_its_error_is_raised_after_the_block():
    events = []
    with criu.PostDumpHook(lambda: events.append("frozen"), on_resumed=lambda: events.append("resumed"),
                           watch_pid=os.getpid()) as hook:  # untraced: it runs again at once
        assert run_script(hook) == 0
        hook.waiter.join(5)
    assert events == ["frozen", "resumed"] and hook.resumed_after_ms is not None

    def refuse():
        raise RuntimeError("the cut was refused")
    with criu.PostDumpHook(lambda: None, on_resumed=refuse) as hook:
        assert run_script(hook) == 0  # the member is running again: nothing to undo in CRIU
    assert isinstance(hook.resumed_error, RuntimeError)


def test_on_resumed_never_runs_when_the_cut_failed_or_never_came():
    called = []

    def refuse():
        raise RuntimeError("no marker")
    with criu.PostDumpHook(refuse, on_resumed=lambda: called.append(True)) as hook:
        assert run_script(hook) == 1
    with criu.PostDumpHook(lambda: None, on_resumed=lambda: called.append(True)):
        pass
    assert called == []


def test_tracer_of_reads_the_tracer_and_says_none_for_a_gone_process():
    assert criu.tracer_of(os.getpid()) == 0
    child = subprocess.Popen(["true"])
    child.wait()
    assert criu.tracer_of(child.pid) is None


class FakePacketSocket:
    """What MarkerLink needs of an AF_PACKET socket: ``before`` is queued already (recv drains it),
    ``after`` comes in once a frame was sent, as (frame, pkttype)."""

    def __init__(self, before=(), after=()):
        self.sent, self.before, self.after = [], list(before), list(after)

    def setblocking(self, _flag):
        pass

    def settimeout(self, _timeout):
        pass

    def recv(self, _size):
        if self.before:
            return self.before.pop(0)
        raise BlockingIOError()

    def recvfrom(self, _size):
        if not self.sent or not self.after:
            raise socket.timeout()
        data, kind = self.after.pop(0)
        return data, ("veth0", 0x88B5, kind, 1, b"")

    def send(self, frame):
        self.sent.append(frame)


def test_a_confirmed_marker_waits_for_its_own_frame_to_come_back():
    marker = b"M" * 60
    sock = FakePacketSocket(before=[marker], after=[(b"probe" * 12, 0), (marker, socket.PACKET_OUTGOING),
                                                    (marker + b"\0" * 4, 0), (b"later", 0)])
    link = criu.MarkerLink(sock, marker, timeout=1.0)
    link.prove(confirm=True)  # the stale copy before it was sent, a probe and its own send are not the answer
    assert sock.sent == [marker] and sock.before == [] and sock.after == [(b"later", 0)]
    assert link.confirm_ms is not None
    with pytest.raises(criu.CriuError, match="did not send the cut marker back"):
        criu.MarkerLink(FakePacketSocket(), marker, timeout=0.05).prove(confirm=True)
    plain = FakePacketSocket(after=[(marker, 0)])
    criu.MarkerLink(plain, marker).prove()  # the synchronous cut only sends it
    assert plain.sent == [marker] and plain.after == [(marker, 0)]


def test_the_link_asks_for_the_flip_in_band_without_waiting():
    from violin_core.packets import build_cut_request, build_marker, parse_cut_request, parse_marker
    marker, request = build_marker("00:00:00:00:00:0a", "snap-0001-abcdef", "m1"), \
        build_cut_request("00:00:00:00:00:0a", "snap-0001-abcdef", "m1")
    assert parse_cut_request(request) == ("00:00:00:00:00:0a", "snap-0001-abcdef", "m1") and parse_marker(request) is None
    assert parse_marker(marker) is not None and parse_cut_request(marker) is None
    sock = FakePacketSocket()
    link = criu.MarkerLink(sock, marker, cut_request=request)
    link()  # the proof is the link itself: sends the marker
    link.request_cut()
    assert sock.sent == [marker, request] and sock.after == []


def test_the_hook_prepares_at_pre_dump_then_cuts_at_post_dump():
    events = []
    with criu.PostDumpHook(lambda: events.append("frozen"), on_predump=lambda: events.append("prepared")) as hook:
        assert run_script(hook, "network-lock") == 0 and events == []
        assert run_script(hook, "pre-dump") == 0 and events == ["prepared"]
        assert run_script(hook) == 0
    assert events == ["prepared", "frozen"] and hook.predump_error is None

    def refuse():
        raise RuntimeError("prepare refused")
    with criu.PostDumpHook(lambda: events.append("never"), on_predump=refuse) as hook:
        assert run_script(hook, "pre-dump") == 1  # CRIU fails the dump before freezing anything
    assert isinstance(hook.predump_error, RuntimeError) and "never" not in events


def test_the_compiled_hook_prepares_at_pre_dump_too(tmp_path):
    from hostside.backends import handover
    binary = handover.native_hook(cache=str(tmp_path / "cache"))
    if binary is None:
        pytest.skip("no C compiler here")
    events = []
    with handover.frozen_hand_over(lambda: events.append("frozen"), on_predump=lambda: events.append("prepared"),
                                   native=True) as hand:
        for action in ("pre-dump", "network-lock", "post-dump"):
            assert subprocess.run([hand.script], env=dict(os.environ, CRTOOLS_SCRIPT_ACTION=action),
                                  timeout=20).returncode == 0
    assert events == ["prepared", "frozen"]


def test_udp_queued_adds_the_receive_queues_of_the_namespace(tmp_path):
    net = tmp_path / "7" / "net"
    net.mkdir(parents=True)
    (net / "udp").write_text(
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "  1: 0100000A:1F90 00000000:0000 07 00000000:00000200 00:00000000 00000000     0        0 1\n"
        "  2: 0100000A:1F91 00000000:0000 07 00000010:00000000 00:00000000 00000000     0        0 2\n")
    (net / "udp6").write_text("  sl  local_address ...\n  0: 0000:1 0000:0 07 00000000:00000001 00:0 0 0 0 3\n")
    assert criu.udp_queued(7, root=str(tmp_path)) == 0x200 + 1
    assert criu.udp_queued(8, root=str(tmp_path)) == 0  # gone: nothing to wait for


def test_the_drain_waits_until_the_member_read_its_queues_or_the_bound():
    now = [0.0]
    levels = iter([300, 100, 0])
    waited, left = criu.wait_udp_drained(1, timeout=1.0, clock=lambda: now[0],
                                         sleep=lambda s: now.__setitem__(0, now[0] + 0.01), queued=lambda pid: next(levels))
    assert left == 0 and round(waited) == 20
    waited, left = criu.wait_udp_drained(1, timeout=0.05, clock=lambda: now[0],
                                         sleep=lambda s: now.__setitem__(0, now[0] + 0.01), queued=lambda pid: 64)
    assert left == 64 and waited >= 50


def test_stop_tree_kills_the_group_and_reaps_it_as_soon_as_it_exits():
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    criu.stop_tree(child.pid)
    with pytest.raises(ChildProcessError):  # reaped by stop_tree: the pid is free
        os.waitpid(child.pid, os.WNOHANG)


def test_the_disk_is_settled_before_a_freeze_and_a_slow_or_failing_flush_never_holds_the_dump(tmp_path, caplog):
    """settle_disk flushes the images' filesystem (a real syncfs here) and says so; a flush that
    takes longer than its bound, or fails, lets the dump go ahead at once and says it did not."""
    import time
    waited, settled = criu.settle_disk(str(tmp_path), timeout=5.0)
    assert settled and 0 <= waited < 5000
    release = threading.Event()
    began = time.monotonic()
    waited, settled = criu.settle_disk(str(tmp_path), timeout=0.05, flush=lambda path: release.wait(5))
    assert not settled and time.monotonic() - began < 1.0 and waited >= 50
    release.set()

    def failing(path):
        raise OSError(5, "I/O error")
    assert criu.settle_disk(str(tmp_path), timeout=1.0, flush=failing)[1] is False
    assert "flushing" in caplog.text
    assert criu.settle_disk(str(tmp_path), timeout=0) == (0.0, False)  # VIOLIN_CRIU_SETTLE_S=0: off
