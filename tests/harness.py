"""Drive the whole pure core (``ViolinController``) against ``FakeNetwork``: no ryu, no switch.

Time is simulated (``now``, advanced by hand or by the core's own sleeps);
``FakeIO`` plays the eventlet side: barriers succeed once messages are applied,
flow statistics are read from the simulated tables, spawned work is queued
until ``run_spawned``.
"""

import struct

from violin_core import of
from violin_core.config import Config
from violin_core.controller import ControllerIO, ViolinController
from violin_core.fabric import FabricSettings
from violin_core.packets import mac_to_bytes
from violin_core.coordinator import SnapshotSettings

from fakeoftable import FakeNetwork, Outcome

WALL_OFFSET = 1_700_000_000.0


def eth_frame(dst: str, src: str, eth_type: int = 0x0800, payload: bytes = b"x" * 46,
              vlan: int = None) -> bytes:
    header = mac_to_bytes(dst) + mac_to_bytes(src)
    if vlan is not None:
        header += struct.pack("!HH", 0x8100, vlan)
    return header + struct.pack("!H", eth_type) + payload


class FakeIO(ControllerIO):
    def __init__(self, harness):
        self.harness = harness
        self.spawned = []
        self.posts = []
        self.barrier_ok = True
        self.post_status = 200
        self.answers = {}  # URL -> the helper's answer (default {})
        self.gathered = []  # how many calls each gather ran at once

    def send(self, messages):
        self.harness.run(messages)

    def send_and_barrier(self, messages, dpids, timeout):
        self.harness.run(messages)
        return self.barrier_ok

    def flow_stats(self, dpids, role, timeout):
        total = 0
        for dpid in dpids:
            switch = self.harness.net.switch(dpid)
            for table_id, table in switch.tables.items():
                for entry in table.values():
                    if entry.role == role:
                        total += switch.packet_count.get((table_id, entry.key), 0)
        return total

    def wait_until(self, predicate, timeout):
        if not predicate():
            self.harness.now += timeout
        return predicate()

    def sleep(self, seconds):
        self.harness.now += seconds

    def spawn(self, function, *args):
        self.spawned.append((function, args))

    def gather(self, functions):
        self.gathered.append(len(functions))
        results = []
        for function in functions:
            try:
                results.append(function())
            except Exception as error:
                results.append(error)
        return results

    def post_json(self, url, body, timeout, token=None, method="POST"):
        self.posts.append((url, body) if method == "POST" else (method + " " + url, body))
        return self.post_status, self.answers.get(url, {})


class Harness:
    """A controller driving a simulated network; ``now`` is advanced by hand."""

    def __init__(self, switch_ports, links, settings=FabricSettings(), snapshot=SnapshotSettings(),
                 state_dir="/nonexistent", members=(), metrics=None):
        self.now = 0.0
        self.io = FakeIO(self)
        config = Config(settings, "token", state_dir, snapshot, tuple(members), advertise_url="http://ctl:8080/")
        self.controller = ViolinController(config, lambda: self.now, lambda: WALL_OFFSET + self.now, self.io,
                                           metrics=metrics)
        self.fabric = self.controller.fabric
        self.fabric.nonce = b"testnonc"
        self.coordinator = self.controller.coordinator
        self.net = FakeNetwork(links)
        self.switch_ports = switch_ports
        self.controller_log = []
        self.deliveries = []  # every (dpid, port, frame) delivered to an edge port, in order
        self.drop_roles = set()  # packet-ins of these roles are lost on the way to the controller

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
                for dpid, port, frame, role in outcome.to_controller:
                    pending += self._packet_in(dpid, port, frame, role)
        self.deliveries += total.delivered
        return total

    def _packet_in(self, dpid, port, frame, role):
        if port is None or role in self.drop_roles:
            return []
        self.controller_log.append((dpid, port, frame, role))
        return self.controller.packet_in(dpid, port, frame, role)

    def start(self):
        for dpid, ports in sorted(self.switch_ports.items()):
            self.run(self.controller.switch_up(dpid, [(p, "s%d-eth%d" % (dpid, p), True) for p in ports]))
        self.advance(1.0)

    def advance(self, seconds):
        self.now += seconds
        self.run(self.controller.tick())

    def run_spawned(self):
        while self.io.spawned:
            function, args = self.io.spawned.pop(0)
            function(*args)

    def send(self, dpid, port, frame) -> Outcome:
        """A host frame entering at an edge port, with the controller in the loop."""
        outcome = self.net.send(dpid, port, frame)
        self.deliveries += outcome.delivered
        result = Outcome(list(outcome.delivered), [], outcome.dropped)
        for sw, in_port, data, role in outcome.to_controller:
            result.to_controller.append((sw, in_port, data, role))
            done = self.run(self._packet_in(sw, in_port, data, role))
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
