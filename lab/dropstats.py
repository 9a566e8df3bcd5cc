"""Where a lab network dropped frames: the evidence an oracle failure needs.

A UDP gap after a restore is either the snapshot's fault (a frame neither delivered nor
recorded) or plain loss that any network under overload has: Open vSwitch's userspace
datapath dropping on a full port queue, the packet-in queue toward the controller
overflowing, a member's socket buffer overflowing while it is starved of CPU. These
counters say which, so that a failure is diagnosed from its message, not re-run.

``sample(net)`` reads them (as root, once per call: no daemon left behind) and
``delta(before, after)`` keeps what grew.
"""

import re
import subprocess
from typing import Dict

# ovs-vswitchd's coverage counters that mean a frame was lost somewhere OVS knows of.
OVS_COUNTERS = ("packet_in_overflow", "rconn_overflow", "datapath_drop_upcall_error", "datapath_drop_lock_error",
                "datapath_drop_rx_invalid_packet", "datapath_drop_invalid_port", "datapath_drop_tunnel_push_error",
                "netdev_sent_drop", "upcall_flow_limit_hit", "dpif_netdev_drop")
SNMP_FIELDS = ("InErrors", "RcvbufErrors", "SndbufErrors", "NoPorts")
_COVERAGE = re.compile(r"^(\S+)\s+.*total:\s+(\d+)\s*$")
_PORT = re.compile(r"port\s+(\S+):\s+rx pkts=\d+, bytes=\d+, drop=(\d+), errs=(\d+).*?\n\s+tx pkts=\d+, bytes=\d+, "
                   r"drop=(\d+), errs=(\d+)", re.S)


def _run(argv) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def ovs_coverage() -> Dict[str, int]:
    found = {}
    for line in _run(["ovs-appctl", "coverage/show"]).splitlines():
        match = _COVERAGE.match(line)
        if match and match.group(1) in OVS_COUNTERS:
            found[match.group(1)] = int(match.group(2))
    return found


def switch_ports(bridge: str) -> Dict[str, int]:
    """rx/tx drops and errors per port of ``bridge`` (``ovs-ofctl dump-ports``)."""
    found = {}
    for port, rx_drop, rx_err, tx_drop, tx_err in _PORT.findall(_run(["ovs-ofctl", "-O", "OpenFlow13", "dump-ports",
                                                                       bridge])):
        for key, value in (("rx_drop", rx_drop), ("rx_err", rx_err), ("tx_drop", tx_drop), ("tx_err", tx_err)):
            if int(value):
                found["%s/%s/%s" % (bridge, port.strip('"'), key)] = int(value)
    return found


_PACKET_SOCKET = re.compile(r"^p_raw\s+\d+\s+\d+\s+\*:(\S+)\s.*ovs-vswitchd.*skmem:\(.*,d(\d+)\)")


def ovs_port_sockets(interfaces) -> Dict[str, int]:
    """Frames dropped by the kernel because ovs-vswitchd fell behind reading a port: the userspace
    datapath reads each port through an AF_PACKET socket whose receive buffer is
    ``net.core.rmem_default`` (212992 bytes, about 50 frames, unless set-up raised it). OVS's
    own port counters do not see these drops; ``ss`` does."""
    wanted, found = set(interfaces), {}
    for line in _run(["ss", "-0", "-m", "-p"]).splitlines():
        match = _PACKET_SOCKET.match(line)
        if match and match.group(1) in wanted and int(match.group(2)):
            found["%s/socket_drop" % match.group(1)] = int(match.group(2))
    return found


def host_udp(host) -> Dict[str, int]:
    """UDP error counters of a Mininet host's network namespace (/proc/net/snmp)."""
    lines = [line.split() for line in host.cmd("cat /proc/net/snmp").splitlines() if line.startswith("Udp:")]
    if len(lines) < 2:
        return {}
    table = dict(zip(lines[0][1:], lines[1][1:]))
    return {"%s/udp/%s" % (host.name, key): int(table[key]) for key in SNMP_FIELDS if key in table}


def host_links(host) -> Dict[str, int]:
    """Receive and transmit drops of a Mininet host's interfaces (/proc/net/dev in its namespace).
    rx_drop also counts frames of protocols the host does not speak (the same few hundred at every
    host of a run: broadcasts such as the controller's link discovery), so only a difference between
    hosts, or a tx_drop, points at loss."""
    found = {}
    for line in host.cmd("cat /proc/net/dev").splitlines()[2:]:
        name, _, fields = line.partition(":")
        values = fields.split()
        if len(values) >= 12 and name.strip() != "lo":
            for key, value in (("rx_drop", values[3]), ("tx_drop", values[11])):
                if int(value):
                    found["%s/%s/%s" % (host.name, name.strip(), key)] = int(value)
    return found


def softnet_dropped() -> int:
    """Frames the kernel dropped for a full per-CPU backlog (netdev_max_backlog), all CPUs."""
    try:
        with open("/proc/net/softnet_stat") as handle:
            return sum(int(line.split()[1], 16) for line in handle if line.strip())
    except OSError:
        return 0


def sample(net) -> Dict[str, int]:
    counters = {"ovs/" + k: v for k, v in ovs_coverage().items()}
    counters["kernel/softnet_dropped"] = softnet_dropped()
    for switch in net.switches:
        counters.update(switch_ports(switch.name))
    counters.update(ovs_port_sockets(intf.name for switch in net.switches for intf in switch.intfList()
                                     if intf.name != "lo"))
    for host in net.hosts:
        counters.update(host_udp(host))
        counters.update(host_links(host))
    return counters


def delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    """Counters that grew between two samples (ovs/ counters are daemon-wide: other runs count too)."""
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0) > 0}
