"""A small, library-free model of the OpenFlow 1.3 messages the core emits.

The pure core never imports ryu: it returns these value objects and the RyuApp
shim translates them into ``OFPFlowMod``/``OFPPacketOut``/``OFPBarrierRequest``.
Tests apply them to a simulated flow table instead (``tests/fakeoftable.py``).

Matches use OF1.3 OXM field names as ryu's ``OFPMatch(**kwargs)`` expects them
(``in_port``, ``eth_src``, ``eth_dst``, ``eth_type``, ``vlan_vid``); a masked
field is a ``(value, mask)`` tuple.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

# Reserved port numbers and constants of OpenFlow 1.3 (ofp_port_no, ofp_vlan_id).
OFPP_MAX = 0xFFFFFF00
OFPP_IN_PORT = 0xFFFFFFF8
OFPP_TABLE = 0xFFFFFFF9
OFPP_FLOOD = 0xFFFFFFFB
OFPP_ALL = 0xFFFFFFFC
OFPP_CONTROLLER = 0xFFFFFFFD
OFPP_LOCAL = 0xFFFFFFFE
OFPP_ANY = 0xFFFFFFFF
OFPVID_PRESENT = 0x1000
OFPCML_NO_BUFFER = 0xFFFF

ETH_TYPE_VLAN = 0x8100


def is_physical_port(port_no: int) -> bool:
    """True for a real switch port (not LOCAL, CONTROLLER, ...)."""
    return 0 < port_no <= OFPP_MAX


# --- actions -----------------------------------------------------------------

@dataclass(frozen=True)
class Output:
    port: int
    max_len: int = OFPCML_NO_BUFFER


@dataclass(frozen=True)
class PushVlan:
    ethertype: int = ETH_TYPE_VLAN


@dataclass(frozen=True)
class PopVlan:
    pass


@dataclass(frozen=True)
class SetField:
    name: str
    value: int


@dataclass(frozen=True)
class Resubmit:
    """Open vSwitch's ``resubmit(,table_id)``: look the packet up in that table too, apply what
    matches (nothing, on a miss) and go on with the rest of the actions."""

    table_id: int


@dataclass(frozen=True)
class LearnVid:
    """Open vSwitch's ``learn``: the switch itself adds, in ``table_id``, a flow matching this packet's
    ``in_port`` and ``reg0`` whose action sets the outer tag's VID (12 bits) to ``vid``; its cookie
    carries ``role``. It is added while the packet is looked up, before the packet's own outputs go
    out. OVS may add it again after it was deleted (a cached flow that learned it refreshes it): what
    consults it sets ``reg0`` to a tag of its own, so a stale one never answers a later lookup."""

    table_id: int
    priority: int
    vid: int
    role: int


Action = Union[Output, PushVlan, PopVlan, SetField, Resubmit, LearnVid]
MatchValue = Union[int, str, Tuple[int, int]]
Match = Tuple[Tuple[str, MatchValue], ...]


def match(**fields: MatchValue) -> Match:
    """Build a canonical (sorted, hashable) match from OXM field names."""
    return tuple(sorted(fields.items()))


# --- messages ----------------------------------------------------------------

# Roles, carried in the low 32 bits of every flow's cookie (the high 32 bits mark
# the app): packet-ins name the rule that sent them, flow stats filter by role.
ROLE_FORWARD = 0
ROLE_LEARN = 1  # table-miss at ingress: unknown source
ROLE_PROBE = 2  # link-discovery probes
ROLE_MARKER = 3  # a member's cut marker
ROLE_HOLD = 4  # post-snapshot frame for a pre-snapshot receiver
ROLE_RECORD = 5  # pre-snapshot frame delivered to a post-snapshot receiver
ROLE_FLOOD_CUT = 6  # a flood some of whose receivers need the cut rules
ROLE_LEARNED = 8  # a colour the switch learned from a member's marker (asynchronous cut)


@dataclass(frozen=True)
class FlowEntry:
    """A flow the core wants in a switch table. ``goto`` is a GotoTable id.

    A ``learned`` flow is one the switch may have added itself (``LearnVid``): it is never sent,
    only deleted once no longer wanted."""

    table_id: int
    priority: int
    match: Match
    actions: Tuple[Action, ...] = ()
    goto: Optional[int] = None
    role: int = ROLE_FORWARD
    learned: bool = False

    @property
    def key(self):
        """OpenFlow identifies a flow by table, priority and exact match."""
        return (self.table_id, self.priority, self.match)


@dataclass(frozen=True)
class FlowMod:
    dpid: int
    command: str  # 'add', 'delete_strict', 'delete' (every flow the entry's match covers) or 'delete_all'
    entry: Optional[FlowEntry] = None


@dataclass(frozen=True)
class PacketOut:
    dpid: int
    in_port: int
    actions: Tuple[Action, ...]
    data: bytes = field(repr=False, default=b"")


@dataclass(frozen=True)
class Barrier:
    dpid: int


Message = Union[FlowMod, PacketOut, Barrier]


def add_flow(dpid: int, entry: FlowEntry) -> FlowMod:
    return FlowMod(dpid, "add", entry)


def _identity(entry: FlowEntry) -> FlowEntry:
    """What a delete carries of ``entry``: table, priority, match, role. A switch ignores a delete's
    actions, and without them deletes repeat from snapshot to snapshot and are encoded once (an
    asynchronous cut's ingress rules name their snapshot's epoch: 4 deletes per member at each flip,
    encoded afresh, held 64 members' flip 30 ms)."""
    return FlowEntry(entry.table_id, entry.priority, entry.match, role=entry.role, learned=entry.learned)


def delete_flow(dpid: int, entry: FlowEntry) -> FlowMod:
    return FlowMod(dpid, "delete_strict", _identity(entry))


def delete_covered_flows(dpid: int, entry: FlowEntry) -> FlowMod:
    """Delete every flow of the entry's table and role whose match includes the entry's (any priority)."""
    return FlowMod(dpid, "delete", _identity(entry))


def delete_all_flows(dpid: int) -> FlowMod:
    return FlowMod(dpid, "delete_all")
