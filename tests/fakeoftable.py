"""A simulated OpenFlow 1.3 network for unit tests of the pure core.

``FakeNetwork`` applies the core's flow-mods to per-switch tables and walks a
real frame (bytes) through them: ingress table 0, goto-table instructions,
apply-actions (push/pop VLAN, set vlan_vid, output), across links to other
switches. A test asks where a frame went: which edge ports received which
bytes, and what reached the controller. Like OVS, output to the in_port is
suppressed and OFPP_TABLE re-runs the pipeline for a packet-out.
"""

import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from violin_core import of
from violin_core.packets import mac_to_str

VLAN_TYPES = (0x8100, 0x88A8)


def frame_fields(frame: bytes, in_port: int) -> Dict[str, int]:
    """OXM fields of a frame as OVS (vlan-limit 1) would see them."""
    fields = {"in_port": in_port, "eth_dst": mac_to_str(frame[0:6]), "eth_src": mac_to_str(frame[6:12])}
    (eth_type,) = struct.unpack_from("!H", frame, 12)
    if eth_type in VLAN_TYPES:
        (tci,) = struct.unpack_from("!H", frame, 14)
        fields["vlan_vid"] = (tci & 0x0FFF) | of.OFPVID_PRESENT
        (eth_type,) = struct.unpack_from("!H", frame, 16)
    else:
        fields["vlan_vid"] = 0
    fields["eth_type"] = eth_type
    return fields


def field_matches(value, wanted) -> bool:
    if isinstance(wanted, tuple):
        want, mask = wanted
        if isinstance(value, str):
            raise NotImplementedError("masked MAC matches are not simulated")
        return (value & mask) == (want & mask)
    return value == wanted


def push_vlan(frame: bytes, ethertype: int) -> bytes:
    return frame[:12] + struct.pack("!HH", ethertype, 0) + frame[12:]


def pop_vlan(frame: bytes) -> bytes:
    return frame[:12] + frame[16:]


def set_vid(frame: bytes, vid: int) -> bytes:
    (tci,) = struct.unpack_from("!H", frame, 14)
    tci = (tci & 0xF000) | (vid & 0x0FFF)
    return frame[:14] + struct.pack("!H", tci) + frame[16:]


def check_consistent(entry: of.FlowEntry) -> None:
    """Refuse what OVS refuses (OFPBAC_MATCH_INCONSISTENT): pop_vlan with no tag implied."""
    tagged = dict(entry.match).get("vlan_vid") not in (None, 0)
    for action in entry.actions:
        if isinstance(action, of.PushVlan):
            tagged = True
        elif isinstance(action, of.PopVlan):
            assert tagged, "pop_vlan without a VLAN match: OVS rejects %r" % (entry,)
            tagged = False


@dataclass
class FakeSwitch:
    dpid: int
    tables: Dict[int, Dict[tuple, of.FlowEntry]] = field(default_factory=dict)
    packet_count: Dict[tuple, int] = field(default_factory=dict)

    def apply(self, mod: of.FlowMod) -> None:
        if mod.command == "delete_all":
            self.tables.clear()
            return
        check_consistent(mod.entry)
        assert not (mod.entry.learned and mod.command == "add"), "a learned flow is the switch's to add: %r" % (mod,)
        table = self.tables.setdefault(mod.entry.table_id, {})
        key = (mod.entry.priority, mod.entry.match)
        if mod.command == "add":
            if table.get(key) != mod.entry:  # a replaced flow starts counting again, as in OVS
                self.packet_count.pop((mod.entry.table_id, mod.entry.key), None)
            table[key] = mod.entry
        elif mod.command == "delete_strict":
            table.pop(key, None)
        elif mod.command == "delete":  # OFPFC_DELETE: every flow of the role whose match covers the entry's
            for other_key, other in list(table.items()):
                if other.role == mod.entry.role and set(mod.entry.match) <= set(other.match):
                    del table[other_key]
        else:
            raise ValueError(mod.command)

    def lookup(self, table_id: int, fields: Dict[str, int]) -> Optional[of.FlowEntry]:
        best = None
        for entry in self.tables.get(table_id, {}).values():
            if all(field_matches(fields.get(name), want) for name, want in entry.match):
                if best is None or entry.priority > best.priority:
                    best = entry
        return best

    def flow_count(self) -> int:
        return sum(len(t) for t in self.tables.values())


@dataclass
class Outcome:
    delivered: List[Tuple[int, int, bytes]] = field(default_factory=list)  # (dpid, port, frame)
    to_controller: List[Tuple[int, int, bytes, int]] = field(default_factory=list)  # (dpid, in_port, frame, role)
    dropped: int = 0

    def ports(self):
        return sorted((d, p) for d, p, _ in self.delivered)


class FakeNetwork:
    """Switches joined by links; edge ports deliver frames to the outside."""

    def __init__(self, links: List[Tuple[Tuple[int, int], Tuple[int, int]]] = ()):
        self.switches: Dict[int, FakeSwitch] = {}
        self.links: Dict[Tuple[int, int], Tuple[int, int]] = {}
        for a, b in links:
            self.links[a], self.links[b] = b, a
        self.packet_outs: List[of.PacketOut] = []

    def switch(self, dpid: int) -> FakeSwitch:
        return self.switches.setdefault(dpid, FakeSwitch(dpid))

    def apply(self, messages: List[of.Message]) -> List[of.PacketOut]:
        """Apply flow-mods; return the packet-outs (in order) for the test to route."""
        outs = []
        for message in messages:
            if isinstance(message, of.FlowMod):
                self.switch(message.dpid).apply(message)
            elif isinstance(message, of.PacketOut):
                outs.append(message)
        self.packet_outs.extend(outs)
        return outs

    def send(self, dpid: int, in_port: int, frame: bytes, max_hops: int = 64) -> Outcome:
        """Inject a frame arriving at (dpid, in_port) and follow it everywhere."""
        outcome = Outcome()
        queue = deque([(dpid, in_port, frame, 0)])
        while queue:
            sw, port, data, hops = queue.popleft()
            if hops > max_hops:
                raise AssertionError("forwarding loop: frame exceeded %d hops" % max_hops)
            for out_port, out_frame in self._pipeline(sw, port, data, outcome):
                self._emit(sw, out_port, out_frame, hops, queue, outcome)
        return outcome

    def packet_out(self, message: of.PacketOut) -> Outcome:
        """Execute a packet-out as the switch would."""
        outcome = Outcome()
        queue = deque()
        port = message.in_port
        frame = message.data
        results = []
        for action in message.actions:
            if isinstance(action, of.Output) and action.port == of.OFPP_TABLE:
                results.extend(self._pipeline(message.dpid, port, frame, outcome))
            else:
                frame, outs = self._act(action, frame, port)
                results.extend(outs)
        for out_port, out_frame in results:
            self._emit(message.dpid, out_port, out_frame, 0, queue, outcome)
        while queue:
            sw, p, data, hops = queue.popleft()
            if hops > 64:
                raise AssertionError("forwarding loop")
            for out_port, out_frame in self._pipeline(sw, p, data, outcome):
                self._emit(sw, out_port, out_frame, hops, queue, outcome)
        return outcome

    def _emit(self, dpid, port, frame, hops, queue, outcome):
        if port == of.OFPP_CONTROLLER:
            outcome.to_controller.append((dpid, None, frame, None))
        elif (dpid, port) in self.links:
            peer = self.links[(dpid, port)]
            queue.append((peer[0], peer[1], frame, hops + 1))
        else:
            outcome.delivered.append((dpid, port, frame))

    def _act(self, action, frame, in_port, dpid=None, regs=None):
        outs = []
        regs = {} if regs is None else regs  # the packet's registers: zero at ingress, kept across tables
        if isinstance(action, of.Resubmit):  # a miss applies nothing; what matches cannot goto on
            entry = self.switch(dpid).lookup(action.table_id, {**frame_fields(frame, in_port), **regs})
            for inner in entry.actions if entry is not None else ():
                assert not isinstance(inner, (of.Resubmit, of.LearnVid)), "nested resubmit/learn not modelled"
                frame, more = self._act(inner, frame, in_port, dpid, regs)
                outs.extend(more)
            return frame, outs
        if isinstance(action, of.LearnVid):  # OVS adds the flow while it looks the packet up
            self.switch(dpid).apply(of.add_flow(dpid, of.FlowEntry(
                action.table_id, action.priority, of.match(in_port=in_port, reg0=regs.get("reg0", 0)),
                (of.SetField("vlan_vid", action.vid | of.OFPVID_PRESENT),), role=action.role)))
            return frame, outs
        if isinstance(action, of.SetField) and action.name.startswith("reg"):
            regs[action.name] = action.value
            return frame, outs
        if isinstance(action, of.Output):
            if action.port == of.OFPP_IN_PORT:
                outs.append((in_port, frame))
            elif action.port != in_port:
                outs.append((action.port, frame))
        elif isinstance(action, of.PushVlan):
            frame = push_vlan(frame, action.ethertype)
        elif isinstance(action, of.PopVlan):
            frame = pop_vlan(frame)
        elif isinstance(action, of.SetField) and action.name == "vlan_vid":
            frame = set_vid(frame, action.value)
        else:
            raise NotImplementedError(action)
        return frame, outs

    def _pipeline(self, dpid: int, in_port: int, frame: bytes, outcome: Outcome):
        switch = self.switch(dpid)
        table_id, outputs, regs = 0, [], {"reg0": 0}
        while table_id is not None:
            entry = switch.lookup(table_id, {**frame_fields(frame, in_port), **regs})
            if entry is None:
                outcome.dropped += 1
                return outputs
            switch.packet_count[(table_id, entry.key)] = switch.packet_count.get((table_id, entry.key), 0) + 1
            for action in entry.actions:
                if isinstance(action, of.Output) and action.port == of.OFPP_CONTROLLER:
                    outcome.to_controller.append((dpid, in_port, frame, entry.role))
                    continue
                frame, outs = self._act(action, frame, in_port, dpid, regs)
                outputs.extend(outs)
            if not entry.actions and entry.goto is None:
                outcome.dropped += 1
            table_id = entry.goto
        return outputs
