"""Snapshot coordination in the network (Mattern's algorithm): the pure core.

Every member has an epoch. Snapshot ``k`` moves each participant from ``k-1``
to ``k`` at its cut (the helper's cut call, while the member is paused). Frames
carry their sender's colour (epoch parity) in the outer tag pushed at ingress;
at the receiver's egress edge:

  same colour          delivered by the switch (fast path)
  post -> pre receiver HELD at the controller, released in arrival order
                       right after the receiver flips (``ROLE_HOLD``)
  pre -> post receiver sent to the controller, recorded as the snapshot's
                       channel state (in order) and then delivered (``ROLE_RECORD``):
                       a frame is delivered only if it was recorded, so a
                       packet-in the switch drops is a network loss, never a
                       hole in the channel state

Floods while epochs are mixed go to the controller only for the ports whose
receivers need a cut rule, and are replicated per destination under the same
rules (``ROLE_FLOOD_CUT``). Frames of non-members, and of members outside the
snapshot's subset, carry the neutral colour and are always delivered.

An asynchronous cut (``prepare(divert=True)``) lets a member run on before its
flip, its frames coloured by the switch itself: from its prepare, its port's
ingress rule also looks up ``LEARNED_TABLE`` (``resubmit``), and its marker rule
carries a ``learn`` action that adds there, as the switch takes the marker, a flow
giving its port the new colour. The switch takes a port's frames in order, so
every frame the member sent before its marker keeps the old colour and every
frame after it gets the new one; the helper lets the member resume once the
marker came back down its link and the local datapath's cached flows are purged
(a cached flow would still apply the old colour). Its frames keep the fast path:
no packet-in for any of them. Once the member runs again the helper asks for its
flip in band: a cut request frame down the same link (``take_cut_requests``),
after the marker in that stream; the controller flips every request waiting at
that moment together, and the learned flow goes after the rules that consult it.

The coordinator is the ``FabricPolicy`` the ``Fabric`` consults when it derives flows; its
handlers take times and events and return OpenFlow messages. Blocking work
(barriers, flow statistics, helpers) is the caller's (``controller.py``).
"""

import os
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Deque, Dict, Iterable, List, Optional, Set, Tuple

from . import of
from .errors import Refused
from .fabric import EGRESS_TABLE, FLOOD_TABLE, FORWARD_TABLE, INGRESS_TABLE, LEARNED_TABLE, TAG_PRESENT, Fabric
from .members import Member, MemberRegistry
from .packets import MARKER_DST, PROBE_ETH_TYPE, parse_cut_request, parse_eth, parse_marker, strip_outer_tag
from .policy import FabricPolicy, Vids


class State(str, Enum):
    """A state or phase name: compares, formats and serialises as its plain string."""

    def __str__(self) -> str:
        return self.value


class SnapshotState(State):
    RUNNING = "running"
    COMPLETE = "complete"
    ABORTED = "aborted"


class SnapshotPhase(State):
    CUTTING = "cutting"
    DRAINING = "draining"
    COMPLETE = "complete"
    ABORTED = "aborted"


class CutState(State):
    """A participant's progress: pending -> (prepared ->) cut -> done; flipped when aborted before its cut."""
    PENDING = "pending"
    PREPARED = "prepared"
    CUT = "cut"
    DONE = "done"
    FLIPPED = "flipped"


@dataclass(frozen=True)
class SnapshotSettings:
    hold_bytes_per_receiver: int = 8 * 1024 * 1024  # held frames beyond this are dropped, counted
    max_channel_bytes: int = 256 * 1024 * 1024  # recorded channel state beyond this aborts
    timeout: float = 120.0  # a snapshot not complete by then is aborted
    marker_timeout: float = 5.0  # a cut waits this long for the member's marker frame
    barrier_timeout: float = 5.0
    drain_poll: float = 0.05  # seconds between flow-statistics polls while draining
    drain_min: float = 0.2  # never complete sooner than this after the last flip
    drain_timeout: float = 2.0  # fall back to completing on time (said in the manifest)


@dataclass
class MemberCut:
    name: str
    state: CutState = CutState.PENDING
    marker_seen: bool = False
    diverted: bool = False  # an asynchronous cut: the switch colours its frames by its marker (learned flow)
    cut_time: Optional[float] = None  # wall clock when its rules were in force
    requested: Optional[float] = None  # wall clock when its in-band cut request reached the controller
    flip_ms: Optional[float] = None  # cut request -> barrier replies
    prepared_at: Optional[float] = None  # monotonic: its prepare began, every frame for it held from then on
    held_ms: Optional[float] = None  # deaf time: prepare -> its cut's rules confirmed and its frames released
    report: dict = field(default_factory=dict)  # what the helper said at done


@dataclass
class Snapshot:
    id: str
    epoch: int
    participants: Tuple[str, ...]
    label: str
    created: float  # wall clock
    timeout: float
    deadline: float  # monotonic
    state: SnapshotState = SnapshotState.RUNNING
    phase: SnapshotPhase = SnapshotPhase.CUTTING
    reason: Optional[str] = None
    completed: Optional[float] = None
    cuts: Dict[str, MemberCut] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("held", "released", "recorded", "recorded_bytes", "dropped", "late_released"), 0))
    drain: dict = field(default_factory=dict)
    last_flip: Optional[float] = None  # monotonic

    def manifest(self) -> dict:
        return {
            "id": self.id, "epoch": self.epoch, "label": self.label, "state": self.state,
            "phase": self.phase, "reason": self.reason, "created": self.created, "completed": self.completed,
            "restorable": self.state == SnapshotState.COMPLETE,
            "members": [dict(name=c.name, state=c.state, cut_time=c.cut_time, flip_ms=c.flip_ms, held_ms=c.held_ms,
                             marker=c.marker_seen, cut_requested=c.requested, **c.report)
                        for c in self.cuts.values()],
            "counts": dict(self.counts), "drain": dict(self.drain),
        }


@dataclass
class Recorded:
    receiver: str
    time: float  # wall clock of the packet-in
    frame: bytes  # the guest frame as delivered (outer tag removed)


class Coordinator(FabricPolicy):
    """Members' epochs and the one running snapshot; the fabric's colouring policy."""

    def __init__(self, fabric: Fabric, vids: Vids, settings: SnapshotSettings = SnapshotSettings()):
        super().__init__(vids)
        self.fabric = fabric
        self.settings = settings
        self.members = MemberRegistry()
        self.current: Optional[Snapshot] = None  # running, or the last one until the next starts
        self.last_epoch = 0
        self.holds: Dict[str, Deque[Tuple[int, int, bytes, int]]] = {}  # receiver -> (dpid, port, frame, colour)
        self.held_bytes: Dict[str, int] = {}
        self.recorded: List[Recorded] = []
        self.overflowed = False  # channel state over max_channel_bytes: the snapshot must abort
        self.quarantined: Set[str] = set()  # members being replaced by a restore
        self.cut_requests: List[str] = []  # in-band cut requests not yet taken (take_cut_requests)

    # --- membership ---------------------------------------------------------------

    def add_member(self, member: Member) -> Member:
        """Register ``member``; it joins at the latest epoch (in no snapshot until the next)."""
        member.epoch = self.last_epoch
        return self.members.add(member)

    def put_member(self, member: Member) -> Tuple[bool, Member]:
        """Register ``member`` or update the one of that name (idempotent: a helper registers its members
        at every start and after a restore); (created, the member). A member in the running snapshot or
        in a restore's quarantine is not changed meanwhile (409: ask again after it); a MAC of another
        member is a 409 too."""
        current = self.members.find(member.name)
        if current is None:
            return True, self.add_member(member)
        if current.same_as(member):
            return False, current
        busy = ("running snapshot %s" % self.current.id if self.running() and member.name in self.current.participants
                else "a restore" if member.name in self.quarantined else None)
        if busy:
            raise Refused(409, "member %s takes part in %s; update it after" % (member.name, busy))
        return False, self.members.update(member)

    def remove_member(self, name: str) -> Member:
        self.members.get(name)
        if self.running() and name in self.current.participants:
            raise Refused(409, "member %s takes part in running snapshot %s" % (name, self.current.id))
        return self.members.pop(name)

    def running(self) -> bool:
        return self.current is not None and self.current.state == SnapshotState.RUNNING

    def participant(self, mac: str) -> Optional[Member]:
        member = self.members.by_mac(mac)
        if member is not None and self.running() and member.name in self.current.participants:
            return member
        return None

    # --- colours and cut rules (the fabric asks) -----------------------------------

    def colour(self, epoch: int) -> int:
        return self.vids.colour(epoch)

    def ingress_vid(self, mac: str) -> int:
        member = self.members.by_mac(mac)
        if member is None or (self.running() and member.name not in self.current.participants):
            return self.vids.neutral
        return self.colour(member.epoch)

    def is_post(self, member: Member) -> bool:
        return member.epoch >= self.current.epoch

    def quarantined_member(self, mac: str) -> Optional[Member]:
        member = self.members.by_mac(mac)
        return member if member is not None and member.name in self.quarantined else None

    def ingress_entries(self, dpid: int, mac: str, port_no: int) -> List[of.FlowEntry]:
        """While a restore replaces a member, nothing it (or its dying predecessor) sends gets in; while
        a member's cut is asynchronous, its port learns the new colour from its marker (above its plain
        ingress rule, below the marker and probe rules)."""
        if self.quarantined_member(mac) is not None:
            return [of.FlowEntry(INGRESS_TABLE, 600, of.match(in_port=port_no, eth_src=mac))]
        member = self.participant(mac)
        if member is None or not self.diverting(member):
            return []
        old = self.colour(member.epoch) | of.OFPVID_PRESENT
        new = self.colour(self.current.epoch)
        # This snapshot's tag: a learned flow OVS re-adds after an earlier flip (of.LearnVid) has an
        # earlier one, so it never colours this snapshot's frames (colours repeat every other epoch).
        tag = of.SetField("reg0", self.current.epoch & 0xFFFFFFFF)
        return [
            of.FlowEntry(INGRESS_TABLE, 510, of.match(in_port=port_no, eth_src=mac),
                         (of.PushVlan(), of.SetField("vlan_vid", old), tag, of.Resubmit(LEARNED_TABLE)),
                         goto=FORWARD_TABLE),
            of.FlowEntry(INGRESS_TABLE, 1001, of.match(in_port=port_no, eth_type=PROBE_ETH_TYPE, eth_dst=MARKER_DST),
                         (tag, of.LearnVid(LEARNED_TABLE, 100, new, of.ROLE_LEARNED), of.Output(of.OFPP_CONTROLLER),
                          of.Output(of.OFPP_IN_PORT)), role=of.ROLE_MARKER),
            # What the switch learns, as the fabric knows it: deleted, with any stale copy, at the flip.
            of.FlowEntry(LEARNED_TABLE, 100, of.match(in_port=port_no),
                         (of.SetField("vlan_vid", new | of.OFPVID_PRESENT),), role=of.ROLE_LEARNED, learned=True),
        ]

    def diverting(self, member: Member) -> bool:
        """Whether the member's cut is asynchronous and its flip still to come."""
        cut = self.current.cuts[member.name]
        return cut.diverted and cut.state == CutState.PREPARED

    def cut_entries(self, dpid: int, mac: str, port_no: int) -> List[of.FlowEntry]:
        if self.quarantined_member(mac) is not None:  # ... and nothing reaches it
            return [of.FlowEntry(EGRESS_TABLE, 530, of.match(eth_dst=mac, vlan_vid=TAG_PRESENT))]
        member = self.participant(mac)
        if member is None:
            return []
        k = self.current.epoch
        if self.is_post(member):  # pre-colour frames arriving now were in flight at its cut
            # The controller records and then delivers them: what it did not record never arrives.
            return [of.FlowEntry(EGRESS_TABLE, 510, of.match(eth_dst=mac, vlan_vid=self.colour(k - 1) | of.OFPVID_PRESENT),
                                 (of.Output(of.OFPP_CONTROLLER),), role=of.ROLE_RECORD)]
        if self.current.cuts[member.name].state == CutState.PREPARED:  # about to pause: nothing may reach it
            return [of.FlowEntry(EGRESS_TABLE, 520, of.match(eth_dst=mac, vlan_vid=TAG_PRESENT),
                                 (of.Output(of.OFPP_CONTROLLER),), role=of.ROLE_HOLD)]
        return [of.FlowEntry(EGRESS_TABLE, 510, of.match(eth_dst=mac, vlan_vid=self.colour(k) | of.OFPVID_PRESENT),
                             (of.Output(of.OFPP_CONTROLLER),), role=of.ROLE_HOLD)]

    def _participants_on(self, dpid: int, port_no: int) -> List[Member]:
        found = {}
        for mac in self.fabric.hosts_on(dpid, port_no):
            member = self.participant(mac)
            if member is not None:
                found[member.name] = member
        return list(found.values())

    def _cut_action(self, member: Member, colour: int) -> Optional[str]:
        """'hold', 'record' or None for a frame of ``colour`` reaching a participant."""
        k = self.current.epoch
        if not self.is_post(member) and (colour == self.colour(k) or self.current.cuts[member.name].state == CutState.PREPARED):
            return "hold"
        if colour == self.colour(k - 1) and self.is_post(member):
            return "record"
        return None

    def flood_entries(self, fabric: Fabric, dpid: int, now: float, tree) -> List[of.FlowEntry]:
        """Per-colour floods while a snapshot runs: ports of participants are served by the controller.

        All of them, not only those needing a cut rule right now: a packet-in then
        never leaves a port in doubt about whether the switch already delivered.
        """
        if not self.running():
            return []
        entries = []
        trunks = sorted(p for (d, p) in tree if d == dpid)
        edges = fabric.edge_ports(dpid, now)
        served = {p for mac, (d, p) in fabric.hosts.items() if d == dpid and self.participant(mac) is not None}
        special = [p for p in edges if p in served]  # one pass over the hosts, not one per port
        direct = [p for p in edges if p not in special]
        for epoch in (self.current.epoch - 1, self.current.epoch):
            colour = self.colour(epoch)
            actions: List[of.Action] = [of.Output(p) for p in trunks]
            if special:
                actions.append(of.Output(of.OFPP_CONTROLLER))
            if direct:
                actions.append(of.PopVlan())
                actions.extend(of.Output(p) for p in direct)
            entries.append(of.FlowEntry(FLOOD_TABLE, 2, of.match(vlan_vid=colour | of.OFPVID_PRESENT),
                                        tuple(actions), role=of.ROLE_FLOOD_CUT if special else of.ROLE_FORWARD))
        return entries

    # --- the snapshot's life ----------------------------------------------------------

    def quarantine(self, now: float, names: Iterable[str]) -> List[of.Message]:
        """Cut the members off the network (both ways) while a restore replaces them."""
        if self.running():
            raise Refused(409, "snapshot %s is running; restore after it ends" % self.current.id)
        for name in names:
            self.members.get(name)
        self.quarantined = set(names)
        return self.fabric.reconcile(now)

    def restored(self, now: float, epoch: int, names: Iterable[str], frames) -> Tuple[List[of.Message], List[of.Message]]:
        """Members are back from a snapshot of ``epoch``: reset their epochs, lift the quarantine.

        Returns (rule changes, re-injections): the snapshot's channel state, each frame
        sent to its receiver's port in recorded order.
        """
        for name in names:
            self.members[name].epoch = epoch
        self.last_epoch = max(self.last_epoch, epoch)
        self.quarantined = set()
        self.holds, self.held_bytes = {}, {}
        injections = []
        for item in frames:
            member = self.members.get(item.receiver)
            where = self.fabric.hosts.get(member.macs[0]) if member else None
            if where is None:
                raise Refused(409, "cannot re-inject channel state: receiver %s is not on the network"
                                    % item.receiver)
            injections.append(_packet_out(where, item.frame))
        return self.fabric.reconcile(now), injections

    def lift_quarantine(self, now: float) -> List[of.Message]:
        self.quarantined = set()
        return self.fabric.reconcile(now)

    def start(self, now: float, wall: float, names: Optional[Iterable[str]] = None, label: str = "",
              timeout: Optional[float] = None) -> Tuple[Snapshot, List[of.Message]]:
        """Begin snapshot k: participants normalised to epoch k-1, hold rules everywhere."""
        if self.quarantined:
            raise Refused(409, "a restore is replacing %s" % ", ".join(sorted(self.quarantined)))
        if self.running():
            raise Refused(409, "snapshot %s is still running (one at a time)" % self.current.id)
        names = list(self.members) if names is None else list(dict.fromkeys(names))
        if not names:
            raise Refused(409 if not self.members else 400, "no members to snapshot")
        for name in names:
            member = self.members.get(name)
            missing = [mac for mac in member.macs if mac not in self.fabric.hosts]
            if missing:
                raise Refused(409, "member %s is not located on the network yet (MAC %s not seen); "
                                         "let it send a frame first" % (name, missing[0]))
        timeout = self.settings.timeout if timeout is None else timeout
        epoch = self.last_epoch + 1
        self.last_epoch = epoch
        for name in names:
            self.members[name].epoch = epoch - 1
        snapshot = Snapshot("snap-%04d-%s" % (epoch, os.urandom(3).hex()), epoch, tuple(names), label, wall,
                            timeout, now + timeout)
        snapshot.cuts = {name: MemberCut(name) for name in names}
        self.current = snapshot
        self.cut_requests = []
        self.holds, self.held_bytes, self.recorded, self.overflowed = {}, {}, [], False
        return snapshot, self.fabric.reconcile(now)

    def require(self, snapshot_id: str, name: Optional[str] = None) -> Tuple[Snapshot, Optional[MemberCut]]:
        """The running snapshot (and a participant's cut), or the right HTTP error."""
        if self.current is None or self.current.id != snapshot_id:
            raise Refused(404, "no running snapshot %s" % snapshot_id)
        if self.current.state != SnapshotState.RUNNING:
            raise Refused(409, "snapshot %s is %s%s" % (snapshot_id, self.current.state,
                                                             ": " + self.current.reason if self.current.reason else ""))
        if name is None:
            return self.current, None
        if name not in self.current.cuts:
            raise Refused(404, "%s takes no part in snapshot %s" % (name, snapshot_id))
        return self.current, self.current.cuts[name]

    def prepare(self, now: float, snapshot_id: str, name: str, divert: bool = False) -> List[of.Message]:
        """The helper is about to pause the member: hold every frame for it until its flip.

        Frames that reach a paused member's link are not in its image (they wait in
        a tap or socket queue), so none may arrive between its pause and its flip;
        the pre-snapshot ones among them become channel state at the flip. With
        ``divert`` the switch colours its own frames by its marker (``ingress_entries``):
        the member may then run on before its flip.
        """
        _, cut = self.require(snapshot_id, name)
        if cut.state != CutState.PENDING:
            raise Refused(409, "%s is %s in snapshot %s, not pending" % (name, cut.state, snapshot_id))
        member = self.members[name]
        # One marker speaks for one port: a member on several ports is cut while it is paused.
        ports = {self.fabric.hosts.get(mac) for mac in member.macs}
        cut.state, cut.prepared_at, cut.diverted = CutState.PREPARED, now, bool(divert) and len(ports) == 1
        return self.fabric.reconcile(now, self.switches_of(member), member.macs)

    def marker_in(self, dpid: int, in_port: int, frame: bytes, wall: Optional[float] = None) -> None:
        """A member's marker came in on its own link: every earlier frame of it has passed ingress.

        A cut request (``build_cut_request``) on a diverted member's link after its marker asks for its
        flip: it is queued for ``take_cut_requests``."""
        parsed = parse_marker(frame)
        is_marker = parsed is not None
        if not is_marker:
            parsed = parse_cut_request(frame)
        if parsed is None or not self.running():
            return
        src, snapshot_id, name = parsed
        member = self.members.get(name)
        cut = self.current.cuts.get(name)
        if not (snapshot_id == self.current.id and member is not None and cut is not None and src in member.macs
                and self.fabric.hosts.get(src) == (dpid, in_port)):
            return
        if is_marker:
            cut.marker_seen = True
        elif (cut.diverted and cut.marker_seen and cut.state == CutState.PREPARED
              and name not in self.cut_requests):  # repeated or early requests mean nothing
            self.cut_requests.append(name)
            cut.requested = wall

    def take_cut_requests(self) -> List[str]:
        """The members whose in-band cut request came in since the last call, in arrival order."""
        requests, self.cut_requests = self.cut_requests, []
        return requests

    def flip(self, now: float, snapshot_id: str, name: str,
             wall: float = 0.0) -> Tuple[List[of.Message], List[of.Message], List[of.Message]]:
        """Move a paused member to the new epoch (``flip_many`` of one)."""
        return self.flip_many(now, snapshot_id, [name], wall)

    def flip_many(self, now: float, snapshot_id: str, names: List[str],
                  wall: float = 0.0) -> Tuple[List[of.Message], List[of.Message], List[of.Message]]:
        """Move paused members to the new epoch, in one flow-table pass over their switches.

        Returns (rule changes, releases, tidying). The pre-snapshot frames held for each (while
        it was prepared) are recorded now; the caller sends the rule changes, waits
        for the barrier, lets the members resume and then sends the releases, so the
        pause does not grow with the backlog. Released frames may therefore reach
        a member after newer ones the switch delivers directly. The tidying comes after them,
        with no barrier: the ingress rules of members cut asynchronously, whose frames already
        take the new colour from the flow learned from their marker.
        """
        snapshot = self.require(snapshot_id)[0]
        for name in names:
            cut = self.require(snapshot_id, name)[1]
            if cut.state not in (CutState.PENDING, CutState.PREPARED):
                raise Refused(409, "%s was already cut in snapshot %s" % (name, snapshot_id))
        learned = [self.members[n] for n in names if self.diverting(self.members[n]) and snapshot.cuts[n].marker_seen]
        releases, switches, flipped = [], set(), set()
        for name in names:
            member = self.members[name]
            member.epoch = snapshot.epoch
            snapshot.cuts[name].state = CutState.CUT
            releases += self._release_queue(name, record_colour=self.colour(snapshot.epoch - 1), wall=wall)
            switches |= self.switches_of(member)
            flipped.update(member.macs)
        snapshot.last_flip = now
        rules = self.fabric.reconcile(now, switches, flipped)
        macs = {mac for member in learned for mac in member.macs}
        ports = {self.fabric.hosts[mac] for mac in macs if mac in self.fabric.hosts}

        def tidying(message: of.Message) -> bool:
            entry = message.entry if isinstance(message, of.FlowMod) else None
            fields = dict(entry.match) if entry is not None else {}
            if (message.dpid, fields.get("in_port")) not in ports:
                return False
            return entry.table_id == LEARNED_TABLE or entry.table_id == INGRESS_TABLE and (
                fields.get("eth_src") in macs or fields.get("eth_dst") == MARKER_DST)
        return [m for m in rules if not tidying(m)], releases, [m for m in rules if tidying(m)]

    def cut_done(self, wall: float, snapshot_id: str, name: str, flip_ms: float,
                 released: Optional[float] = None) -> MemberCut:
        """The member's cut rules are in force (``wall``); ``released`` (monotonic) is when its held
        frames were sent on: a prepared member was deaf from its prepare until then (``held_ms``)."""
        cut = self.current.cuts[name]
        cut.cut_time, cut.flip_ms = wall, round(flip_ms, 3)
        if cut.prepared_at is not None and released is not None:
            cut.held_ms = round((released - cut.prepared_at) * 1000.0, 3)
        return cut

    def done(self, snapshot_id: str, name: str, report: dict) -> bool:
        """The helper has stored the member's image; True when every participant is done."""
        snapshot, cut = self.require(snapshot_id, name)
        if cut.state in (CutState.PENDING, CutState.PREPARED):
            raise Refused(409, "%s reported done before its cut" % name)
        if cut.state == CutState.DONE:
            raise Refused(409, "%s already reported done" % name)
        cut.report = dict(report)
        cut.state = CutState.DONE
        done = all(c.state == CutState.DONE for c in snapshot.cuts.values())
        if done:
            snapshot.phase = SnapshotPhase.DRAINING
        return done

    def complete(self, now: float, wall: float, drain: dict) -> List[of.Message]:
        snapshot = self.current
        snapshot.state, snapshot.phase = SnapshotState.COMPLETE, SnapshotPhase.COMPLETE
        snapshot.completed, snapshot.drain = wall, drain
        return self.fabric.reconcile(now)

    def abort(self, now: float, wall: float, reason: str) -> List[of.Message]:
        """Flip the rest without snapshotting them, release every held frame, drop the channel state."""
        snapshot = self.current
        if snapshot is None or snapshot.state != SnapshotState.RUNNING:
            return []
        snapshot.state, snapshot.phase = SnapshotState.ABORTED, SnapshotPhase.ABORTED
        snapshot.reason, snapshot.completed = reason, wall
        for name, cut in snapshot.cuts.items():
            member = self.members.get(name)
            if member is not None and member.epoch < snapshot.epoch:
                member.epoch = snapshot.epoch
                cut.state = CutState.FLIPPED
        messages: List[of.Message] = []
        for name in list(self.holds):
            messages += self._release_queue(name)
        self.recorded = []
        return messages + self.fabric.reconcile(now)

    def tick(self, now: float, wall: float) -> List[of.Message]:
        """Abort on timeout or when a participant has left the network."""
        if not self.running():
            return []
        snapshot = self.current
        if self.overflowed:
            return self.abort(now, wall, "channel state exceeded max_channel_bytes (%d)" % self.settings.max_channel_bytes)
        if now >= snapshot.deadline:
            waiting = sorted(n for n, c in snapshot.cuts.items() if c.state != CutState.DONE)
            return self.abort(now, wall, "timed out after %.0f s waiting for %s" % (snapshot.timeout, ", ".join(waiting)))
        for name in snapshot.participants:
            member = self.members.get(name)
            if member is None or any(mac not in self.fabric.hosts for mac in member.macs):
                return self.abort(now, wall, "member %s disappeared from the network" % name)
        return []

    # --- packet-ins of the cut rules ------------------------------------------------------

    def packet_in(self, now: float, wall: float, dpid: int, in_port: int, frame: bytes,
                  role: int) -> List[of.Message]:
        if role == of.ROLE_MARKER:
            self.marker_in(dpid, in_port, frame, wall)
            return []
        if not self.running():
            # A late hold/flood packet-in after completion or abort: deliver, never lose it.
            return self._deliver_late(now, dpid, in_port, frame, role)
        header = parse_eth(frame)
        if header is None or not header.vlan_ids:
            return []
        colour, guest = header.vlan_ids[0], strip_outer_tag(frame)
        if role in (of.ROLE_HOLD, of.ROLE_RECORD):
            receiver = self.participant(header.dst)
            where = self.fabric.hosts.get(header.dst)
            if receiver is None or where is None:
                return []
            return self._apply_cut(wall, receiver, where, colour, guest)
        if role == of.ROLE_FLOOD_CUT:
            messages = []
            for port_no in self.fabric.edge_ports(dpid, now):
                receivers = self._participants_on(dpid, port_no) if port_no != in_port else []
                if receivers:  # the first participant on a shared port decides for the port
                    messages += self._apply_cut(wall, receivers[0], (dpid, port_no), colour, guest, flood=True)
            return messages
        return []

    def _record(self, receiver: str, wall: float, guest: bytes) -> None:
        snapshot = self.current
        self.recorded.append(Recorded(receiver, wall, guest))
        snapshot.counts["recorded"] += 1
        snapshot.counts["recorded_bytes"] += len(guest)
        if snapshot.counts["recorded_bytes"] > self.settings.max_channel_bytes:
            self.overflowed = True

    def _apply_cut(self, wall, receiver: Member, where, colour, guest, flood=False) -> List[of.Message]:
        action = self._cut_action(receiver, colour)
        snapshot = self.current
        if action == "hold":
            queue = self.holds.setdefault(receiver.name, deque())
            if self.held_bytes.get(receiver.name, 0) + len(guest) > self.settings.hold_bytes_per_receiver:
                snapshot.counts["dropped"] += 1
                return []
            queue.append((where[0], where[1], guest, colour))
            self.held_bytes[receiver.name] = self.held_bytes.get(receiver.name, 0) + len(guest)
            snapshot.counts["held"] += 1
            return []
        if action == "record":
            self._record(receiver.name, wall, guest)
            return [_packet_out(where, guest)]
        if not flood:  # the receiver flipped while this held frame was on its way to us
            snapshot.counts["late_released"] += 1
        return [_packet_out(where, guest)]

    def _deliver_late(self, now: float, dpid: int, in_port: int, frame: bytes, role: int) -> List[of.Message]:
        """Hold and flood-cut copies the switch did not deliver itself: deliver them now."""
        header = parse_eth(frame)
        if header is None or not header.vlan_ids or self.current is None:
            return []
        guest = strip_outer_tag(frame)
        if role in (of.ROLE_HOLD, of.ROLE_RECORD) and header.dst in self.fabric.hosts:
            return [_packet_out(self.fabric.hosts[header.dst], guest)]
        if role == of.ROLE_FLOOD_CUT:
            macs = {mac for name in self.current.participants if name in self.members
                    for mac in self.members[name].macs}
            return [_packet_out((dpid, port_no), guest) for port_no in self.fabric.edge_ports(dpid, now)
                    if port_no != in_port and macs & set(self.fabric.hosts_on(dpid, port_no))]
        return []

    def _release_queue(self, name: str, record_colour: Optional[int] = None, wall: float = 0.0) -> List[of.Message]:
        queue = self.holds.pop(name, None)
        self.held_bytes.pop(name, None)
        if not queue:
            return []
        self.current.counts["released"] += len(queue)
        if record_colour is not None:
            for _dpid, _port, frame, colour in queue:
                if colour == record_colour:
                    self._record(name, wall, frame)
        return [_packet_out((dpid, port), frame) for dpid, port, frame, _colour in queue]

    def switches_of(self, member: Member) -> Set[int]:
        return {self.fabric.hosts[mac][0] for mac in member.macs if mac in self.fabric.hosts}

    def participant_switches(self) -> Set[int]:
        found = set()
        if self.current is not None:
            for name in self.current.participants:
                if name in self.members:
                    found |= self.switches_of(self.members[name])
        return found


def _packet_out(where: Tuple[int, int], frame: bytes) -> of.PacketOut:
    return of.PacketOut(where[0], of.OFPP_CONTROLLER, (of.Output(where[1]),), frame)
