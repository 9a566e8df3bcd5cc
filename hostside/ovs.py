"""Local Open vSwitch facts a helper needs (the member's edge switch runs on the helper's host)."""

import subprocess
import time


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
