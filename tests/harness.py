"""Drive the pure core against ``FakeNetwork``: the controller loop without ryu."""

import struct

from violin_core import of
from violin_core.fabric import Fabric, FabricSettings
from violin_core.packets import mac_to_bytes

from fakeoftable import FakeNetwork, Outcome


def eth_frame(dst: str, src: str, eth_type: int = 0x0800, payload: bytes = b"x" * 46,
              vlan: int = None) -> bytes:
    header = mac_to_bytes(dst) + mac_to_bytes(src)
    if vlan is not None:
        header += struct.pack("!HH", 0x8100, vlan)
    return header + struct.pack("!H", eth_type) + payload


class Harness:
    """A fabric controlling a simulated network; ``now`` is advanced by hand."""

    def __init__(self, switch_ports, links, settings=FabricSettings(), fabric=None):
        self.fabric = fabric or Fabric(settings, nonce=b"testnonc")
        self.net = FakeNetwork(links)
        self.now = 0.0
        self.switch_ports = switch_ports
        self.controller_log = []

    def run(self, messages) -> Outcome:
        """Apply messages; run packet-outs; feed what reaches the controller back in."""
        total = Outcome()
        pending = list(messages)
        rounds = 0
        while pending:
            rounds += 1
            assert rounds < 1000, "controller loop does not converge"
            outs = self.net.apply(pending)
            pending = []
            for out in outs:
                outcome = self.net.packet_out(out)
                total.delivered += outcome.delivered
                total.dropped += outcome.dropped
                for dpid, port, frame in outcome.to_controller:
                    pending += self._packet_in(dpid, port, frame, out)
        return total

    def _packet_in(self, dpid, port, frame, out=None):
        if port is None:
            return []
        self.controller_log.append((dpid, port, frame))
        return self.fabric.packet_in(self.now, dpid, port, frame)

    def start(self):
        for dpid, ports in sorted(self.switch_ports.items()):
            self.run(self.fabric.switch_up(self.now, dpid, [(p, "s%d-eth%d" % (dpid, p), True) for p in ports]))
        self.advance(1.0)

    def advance(self, seconds):
        self.now += seconds
        self.run(self.fabric.tick(self.now))

    def send(self, dpid, port, frame) -> Outcome:
        """A host frame entering at an edge port, with the controller in the loop."""
        outcome = self.net.send(dpid, port, frame)
        result = Outcome(list(outcome.delivered), [], outcome.dropped)
        for sw, in_port, data in outcome.to_controller:
            result.to_controller.append((sw, in_port, data))
            more = self._packet_in(sw, in_port, data)
            done = self.run(more)
            result.delivered += done.delivered
        return result


def line_topology(n):
    """s1 - s2 - ... - sn; port 1 of each switch is a host, ports 2/3 are trunks."""
    ports = {d: [1] + ([2] if d > 1 else []) + ([3] if d < n else []) for d in range(1, n + 1)}
    links = [((d, 3), (d + 1, 2)) for d in range(1, n)]
    return ports, links


def ring_topology(n):
    """A ring: the loop the flood tree must break."""
    ports = {d: [1, 2, 3] for d in range(1, n + 1)}
    links = [((d, 3), (d % n + 1, 2)) for d in range(1, n + 1)]
    return ports, links


def assert_only(outcome, expected_ports):
    assert outcome.ports() == sorted(expected_ports), outcome.ports()


__all__ = ["Harness", "eth_frame", "line_topology", "ring_topology", "assert_only", "of"]
