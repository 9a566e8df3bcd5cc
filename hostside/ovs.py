"""Local Open vSwitch facts a helper needs (the member's edge switch runs on the helper's host)."""

import subprocess
import time
from typing import Callable, Optional


def _appctl(command: str, timeout: float) -> bool:
    try:
        result = subprocess.run(["ovs-appctl", "-T", str(max(1, int(timeout + 0.999))), command],
                                capture_output=True, timeout=timeout + 1)
        return result.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def wait_datapath(timeout: float = 1.0, grace: float = 0.01) -> str:
    """Make sure the local datapath forwards by the flow tables as they are now.

    An OpenFlow barrier reply says the flow tables changed; the datapath's cached
    flows follow a moment later, when revalidator threads get to them. ``ovs-appctl
    revalidator/purge`` deletes the cached flows synchronously, so every packet
    after it is looked up in the new tables (all bridges of this ovs-vswitchd pay
    one upcall per flow for it). If that is not possible, ``revalidator/wait``
    (a full revalidation pass, up to ``max-revalidator`` ms, 500 by default), and
    failing that a ``grace`` sleep. Returns "purge", "revalidator" or "grace".
    """
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
    ``vsctl(*argv)`` runs ``ovs-vsctl`` and returns its output, None on failure."""
    if not port:
        return None
    bridge = vsctl("iface-to-br", port)
    if not bridge:
        return None
    dpid = (vsctl("get", "Bridge", bridge, "datapath_id") or "").strip().strip('"').lower()
    ofport = (vsctl("get", "Interface", port, "ofport") or "").strip()
    if len(dpid) != 16 or any(c not in "0123456789abcdef" for c in dpid):
        return None
    try:
        number = int(ofport)
    except ValueError:
        return None
    if number <= 0:  # -1: the port failed, [] / 0: not attached yet
        return None
    return {"dpid": dpid, "port": number}
