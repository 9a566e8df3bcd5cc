"""Local Open vSwitch facts a helper needs (the member's edge switch runs on the helper's host)."""

import json
import os
import socket
import subprocess
import threading
import time
from typing import Callable, Optional

RUNDIR = os.environ.get("OVS_RUNDIR", "/var/run/openvswitch")


def _appctl(command: str, timeout: float) -> bool:
    try:
        result = subprocess.run(["ovs-appctl", "-T", str(max(1, int(timeout + 0.999))), command],
                                capture_output=True, timeout=timeout + 1)
        return result.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Unixctl:
    """``ovs-appctl`` without a process: JSON-RPC on ovs-vswitchd's control socket, kept open.

    A purge sits on a member's frozen path twice per snapshot; spawning
    ``ovs-appctl`` costs a fork, an exec and a Python-free but still whole
    process start on a busy 2-core host (measured in scripts/disruption_pause.py).
    The socket is ``RUNDIR/ovs-vswitchd.<pid>.ctl`` of the pid in
    ``ovs-vswitchd.pid``, as ovs-appctl finds it; a broken connection (ovs-vswitchd
    restarted) is reopened once per call. Thread-safe: one request at a time.
    """

    def __init__(self, rundir: str = RUNDIR, target: str = "ovs-vswitchd"):
        self.rundir, self.target = rundir, target
        self.sock: Optional[socket.socket] = None
        self.lock = threading.Lock()
        self.next_id = 0

    def _path(self) -> str:
        with open(os.path.join(self.rundir, "%s.pid" % self.target)) as handle:
            return os.path.join(self.rundir, "%s.%d.ctl" % (self.target, int(handle.read().strip())))

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self._path())
        return sock

    def _exchange(self, sock: socket.socket, method: str, params) -> dict:
        self.next_id += 1
        sock.sendall(json.dumps({"method": method, "params": list(params), "id": self.next_id}).encode())
        decoder, text = json.JSONDecoder(), ""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("ovs-vswitchd closed its control socket")
            text += chunk.decode("utf-8")
            while text.strip():
                try:
                    answer, end = decoder.raw_decode(text.lstrip())
                except ValueError:
                    break  # not complete yet
                text = text.lstrip()[end:]
                if answer.get("id") == self.next_id:
                    return answer  # (an earlier call's late answer is skipped)

    def call(self, method: str, *params: str, timeout: float = 1.0) -> bool:
        """Whether ``method`` ran and answered without an error (False: no daemon, refused, timed out)."""
        with self.lock:
            for _attempt in range(2):
                try:
                    if self.sock is None:
                        self.sock = self._connect(timeout)
                    self.sock.settimeout(timeout)
                    return self._exchange(self.sock, method, params).get("error") is None
                except (OSError, ValueError, ConnectionError):
                    if self.sock is not None:
                        self.sock.close()
                    self.sock = None
            return False


_UNIXCTL = Unixctl()


def wait_datapath(timeout: float = 1.0, grace: float = 0.01, unixctl: Optional[Unixctl] = None) -> str:
    """Make sure the local datapath forwards by the flow tables as they are now.

    An OpenFlow barrier reply says the flow tables changed; the datapath's cached
    flows follow a moment later, when revalidator threads get to them. ``ovs-appctl
    revalidator/purge`` deletes the cached flows synchronously, so every packet
    after it is looked up in the new tables (all bridges of this ovs-vswitchd pay
    one upcall per flow for it). It is sent on the daemon's control socket
    (``Unixctl``, no process spawned); if that fails, through ``ovs-appctl``; then
    ``revalidator/wait`` (a full revalidation pass, up to ``max-revalidator`` ms,
    500 by default), and failing that a ``grace`` sleep. Returns "purge",
    "revalidator" or "grace".
    """
    if (unixctl or _UNIXCTL).call("revalidator/purge", timeout=timeout):
        return "purge"
    if _appctl("revalidator/purge", timeout):
        return "purge"
    if _appctl("revalidator/wait", timeout):
        return "revalidator"
    time.sleep(grace)
    return "grace"


def _vsctl(*argv: str) -> Optional[str]:
    try:
        result = subprocess.run(["ovs-vsctl", "--timeout=5", *argv], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def attachment(port: Optional[str], vsctl: Callable[..., Optional[str]] = _vsctl) -> Optional[dict]:
    """Where the switch port named ``port`` is: ``{"dpid": 16 lowercase hex digits, "port": ofport}``,
    or None when this host's Open vSwitch cannot tell (no such port, not attached yet).

    Port names repeat across hosts; (datapath id, OpenFlow port number) does not.
    ``vsctl(*argv)`` runs ``ovs-vsctl`` and returns its output, None on failure. One run asks for all
    of it (bridge, ofport, every bridge's datapath id): each run costs ~6 ms, at every member's restore."""
    if not port:
        return None
    answer = vsctl("--bare", "--", "iface-to-br", port, "--", "get", "Interface", port, "ofport",
                   "--", "--columns=name,datapath_id", "list", "Bridge")
    lines = (answer or "").split("\n")
    if len(lines) < 2 or not lines[0].strip():
        return None
    bridge, ofport = lines[0].strip(), lines[1].strip()
    records = [r.split("\n") for r in "\n".join(lines[2:]).strip().split("\n\n")]
    dpid = next((r[1].strip().strip('"').lower() for r in records if len(r) == 2 and r[0].strip() == bridge), "")
    if len(dpid) != 16 or any(c not in "0123456789abcdef" for c in dpid):
        return None
    try:
        number = int(ofport)
    except ValueError:
        return None
    if number <= 0:  # -1: the port failed, [] / 0: not attached yet
        return None
    return {"dpid": dpid, "port": number}
