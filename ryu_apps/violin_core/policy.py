"""The seam between forwarding and snapshots: the outer tag's VIDs and the fabric's policy.

The fabric derives every flow from what it knows; where a frame's colour and the
cut rules come in, it asks its policy (``FabricPolicy``). Without snapshots the
policy is neutral: every frame carries the neutral VID and no extra rule exists.
The snapshot coordinator is the other policy. ``Vids`` is the one place that
says which VIDs the product uses.
"""

from typing import List

from . import of

VID_MAX = 4094  # 0 and 4095 are reserved by 802.1Q


class Vids:
    """The outer tag's VIDs: ``neutral`` for frames without a snapshot colour, then one per
    colour (epoch parity: one snapshot runs at a time, so two colours tell pre from post)."""

    COLOURS = 2
    MAX_BASE = VID_MAX - COLOURS

    def __init__(self, neutral: int):
        if not 1 <= neutral <= self.MAX_BASE:
            raise ValueError("the neutral VID must be from 1 to %d, got %d" % (self.MAX_BASE, neutral))
        self.neutral = neutral

    def colour(self, epoch: int) -> int:
        return self.neutral + 1 + epoch % self.COLOURS

    def all(self) -> List[int]:
        return [self.neutral] + [self.colour(e) for e in range(self.COLOURS)]


class FabricPolicy:
    """What the fabric asks while deriving flows. The neutral answers are the defaults."""

    def __init__(self, vids: Vids):
        self.vids = vids

    def ingress_vid(self, mac: str) -> int:
        """The VID pushed on frames from host ``mac`` at its ingress edge."""
        return self.vids.neutral

    def ingress_entries(self, dpid: int, mac: str, port_no: int) -> List[of.FlowEntry]:
        """Extra ingress rules for a local host (e.g. a quarantine)."""
        return []

    def cut_entries(self, dpid: int, mac: str, port_no: int) -> List[of.FlowEntry]:
        """Extra egress rules toward a local host (hold, record)."""
        return []

    def flood_entries(self, fabric, dpid: int, now: float, tree) -> List[of.FlowEntry]:
        """Extra flood rules (per-colour floods while epochs are mixed)."""
        return []
