"""Local Open vSwitch facts a helper needs (the member's edge switch runs on the helper's host)."""

import subprocess
import time


def wait_datapath(timeout: float = 1.0, grace: float = 0.01) -> str:
    """Wait until ovs-vswitchd has revalidated its datapath flows after a rule change.

    An OpenFlow barrier reply says the flow tables changed; the datapath's cached
    flows follow a moment later (revalidator threads). ``ovs-appctl
    revalidator/wait`` returns after a full revalidation pass. If it cannot be
    used (no local OVS, several datapath types), sleep ``grace`` instead.
    Returns "revalidator" or "grace".
    """
    try:
        result = subprocess.run(["ovs-appctl", "-T", str(max(1, int(timeout + 0.999))), "revalidator/wait"],
                                capture_output=True, timeout=timeout + 1)
        if result.returncode == 0:
            return "revalidator"
    except (OSError, subprocess.TimeoutExpired):
        pass
    time.sleep(grace)
    return "grace"
