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


def test_freeze_slots_are_unbounded_by_default():
    code = "from hostside.backends import criu; print(criu.FREEZE_SLOTS >= 1024)"
    env = {k: v for k, v in os.environ.items() if k != "VIOLIN_CRIU_FREEZES"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
