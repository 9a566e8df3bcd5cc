"""One L2 LAN across any switch topology: discovery, host learning, flow plan.

The pure forwarding core. It keeps what the controller knows (switches, their
ports, links found by probe frames, where each host MAC lives) and from that
*derives* the flows every switch should hold; ``reconcile`` turns the difference
between wanted and installed flows into flow-mods. Handlers take the time and
the event and return the messages to send; nothing here touches a socket.

Pipeline (OpenFlow 1.3), designed so the snapshot cut rules slot in at egress:

  table 0 INGRESS  probes -> controller; trunk ports accept only outer-tagged
                   frames; a learned host's frames get the outer tag (its
                   colour) pushed; unknown sources -> controller (learning)
  table 1 FORWARD  by eth_dst: remote host -> next-hop trunk (tag kept),
                   local host -> EGRESS, anything else -> FLOOD
  table 2 EGRESS   per local host: check the colour, pop the tag, output
  table 3 FLOOD    along a loop-free tree (networkx BFS tree per component):
                   tree trunks tagged, then pop, then local edge ports

Guest frames are never rewritten: the outer tag is pushed at the ingress edge
and popped at the egress edge, so an inner 802.1Q tag passes untouched.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

import networkx as nx

from . import of
from .policy import FabricPolicy, Vids
from .packets import MARKER_DST, PROBE_DST, PROBE_ETH_TYPE, build_probe, is_multicast, parse_eth, parse_probe

INGRESS_TABLE, FORWARD_TABLE, EGRESS_TABLE, FLOOD_TABLE, LEARNED_TABLE = 0, 1, 2, 3, 4
TAG_PRESENT = (of.OFPVID_PRESENT, of.OFPVID_PRESENT)  # OVS refuses pop_vlan unless the match implies a tag

PortRef = Tuple[int, int]  # (dpid, port_no)


@dataclass
class Port:
    number: int
    name: str = ""
    up: bool = True
    probed_at: Optional[float] = None  # first probe sent on it while up
    was_edge: bool = False  # an edge port before it went down (a VM's tap while QEMU restarts)


@dataclass
class Switch:
    dpid: int
    ports: Dict[int, Port] = field(default_factory=dict)


@dataclass(frozen=True)
class FabricSettings:
    """Tunables of discovery and the outer tag; see ``violin_core.config``."""

    probe_interval: float = 1.0  # seconds between probe rounds
    settle_time: float = 0.5  # a port with no link after this long is an edge port
    link_timeout: float = 3.5  # a link not re-seen for this long is gone
    tag_vid: int = 0xF00  # outer tag VID of frames that carry no snapshot colour
    max_hosts: int = 4096  # learned MACs beyond this are not learned (counted)


class Fabric:
    """Topology, hosts and the derived flow plan of every switch."""

    check_partial = False  # tests: every reconcile of some hosts also derives all flows and compares

    def __init__(self, settings: FabricSettings = FabricSettings(), nonce: Optional[bytes] = None,
                 policy: Optional[FabricPolicy] = None):
        self.settings = settings
        self.nonce = nonce if nonce is not None else os.urandom(8)
        self.switches: Dict[int, Switch] = {}
        self.links: Dict[PortRef, PortRef] = {}  # both directions
        self.link_seen: Dict[PortRef, float] = {}
        self.hosts: Dict[str, PortRef] = {}
        self.installed: Dict[int, Dict[tuple, of.FlowEntry]] = {}
        self.last_probe_round: Optional[float] = None
        self.counters = {"packet_in": 0, "learned": 0, "moved": 0, "ignored": 0, "hosts_over_limit": 0}
        self._graph_cache = None
        self._routes_cache: Dict[object, object] = {}  # the flood tree and next hops of the cached graph
        self._plans: Dict[int, tuple] = {}  # dpid -> (switch flows, host -> flows) of its last reconcile
        self.policy = policy or FabricPolicy(Vids(settings.tag_vid))  # colours and cut rules

    def use_policy(self, policy: FabricPolicy) -> None:
        """Derive flows with ``policy`` from now on (the snapshot coordinator)."""
        self.policy = policy

    # --- port classification --------------------------------------------------

    def is_trunk(self, dpid: int, port_no: int) -> bool:
        return (dpid, port_no) in self.links

    def is_edge(self, dpid: int, port_no: int, now: float) -> bool:
        """An up port with no link, probed at least ``settle_time`` ago."""
        port = self.switches[dpid].ports.get(port_no) if dpid in self.switches else None
        if port is None or not port.up or self.is_trunk(dpid, port_no):
            return False
        return port.probed_at is not None and now - port.probed_at >= self.settings.settle_time

    def edge_ports(self, dpid: int, now: float) -> List[int]:
        return sorted(p for p in self.switches[dpid].ports if self.is_edge(dpid, p, now))

    def settled(self, now: float) -> bool:
        """True when every up port is classified and the switches' flows say so."""
        return all(
            self.is_trunk(s.dpid, p.number)
            or (self.is_edge(s.dpid, p.number, now) and self._edge_in_plan(s.dpid, p.number))
            for s in self.switches.values() for p in s.ports.values() if p.up
        )

    # --- topology graph -------------------------------------------------------

    def graph(self) -> nx.Graph:
        """Switch graph; parallel links collapse to the lowest port pair."""
        if self._graph_cache is not None:
            return self._graph_cache
        graph = nx.Graph()
        graph.add_nodes_from(sorted(self.switches))
        for (a, pa), (b, pb) in sorted(self.links.items()):
            if a >= b or a not in self.switches or b not in self.switches:
                continue
            existing = graph.get_edge_data(a, b)
            if existing is None or pa < existing["ports"][a]:
                graph.add_edge(a, b, ports={a: pa, b: pb})
        self._graph_cache = graph
        return graph

    def component_of(self, dpid: int) -> Set[int]:
        """The switches ``dpid`` is connected to (itself included)."""
        graph = self.graph()
        if dpid not in graph:
            return set()
        if ("component", dpid) not in self._routes_cache:
            self._routes_cache[("component", dpid)] = set(nx.node_connected_component(graph, dpid))
        return self._routes_cache[("component", dpid)]

    def tree_ports(self) -> Set[PortRef]:
        """Trunk ports on the flood tree: a BFS tree per component from its lowest dpid."""
        graph = self.graph()
        if "tree" not in self._routes_cache:
            self._routes_cache["tree"] = self._tree_ports(graph)
        return self._routes_cache["tree"]

    @staticmethod
    def _tree_ports(graph: nx.Graph) -> Set[PortRef]:
        ports = set()
        for component in nx.connected_components(graph):
            root = min(component)
            for a, b in nx.bfs_edges(graph, root, sort_neighbors=sorted):
                edge_ports = graph.edges[a, b]["ports"]
                ports.add((a, edge_ports[a]))
                ports.add((b, edge_ports[b]))
        return ports

    def next_hops(self, target: int) -> Dict[int, int]:
        """For every switch that can reach ``target``, its output port toward it."""
        graph = self.graph()
        if ("hops", target) not in self._routes_cache:
            self._routes_cache[("hops", target)] = self._next_hops(graph, target)
        return self._routes_cache[("hops", target)]

    @staticmethod
    def _next_hops(graph: nx.Graph, target: int) -> Dict[int, int]:
        if target not in graph:
            return {}
        hops = {}
        for source, path in nx.single_target_shortest_path(graph, target).items():
            if len(path) > 1:
                hops[source] = graph.edges[source, path[1]]["ports"][source]
        return hops

    def _topology_changed(self) -> None:
        self._graph_cache = None
        self._routes_cache = {}
        self._plans = {}

    # --- the flow plan --------------------------------------------------------

    def host_vid(self, mac: str) -> int:
        """The outer tag VID a host's frames carry (its snapshot colour, if a member)."""
        return self.policy.ingress_vid(mac)

    def egress_entries(self, dpid: int, mac: str, port_no: int) -> List[of.FlowEntry]:
        """Deliver to a local host: any colour, plus the cut rules of a running snapshot."""
        entries = [of.FlowEntry(EGRESS_TABLE, 500, of.match(eth_dst=mac, vlan_vid=TAG_PRESENT),
                                (of.PopVlan(), of.Output(port_no)))]
        return entries + self.policy.cut_entries(dpid, mac, port_no)

    def has_port(self, ref: PortRef) -> bool:
        """Whether switch ``ref[0]`` of this fabric has port ``ref[1]`` (names repeat across hosts;
        a (dpid, port_no) pair does not)."""
        switch = self.switches.get(ref[0])
        return switch is not None and ref[1] in switch.ports

    def place_host(self, mac: str, ref: PortRef) -> None:
        """Locate ``mac`` behind ``ref`` now (a member restored on another host), not when it next speaks."""
        self.hosts[mac.lower()] = ref

    def hosts_on(self, dpid: int, port_no: int) -> List[str]:
        return sorted(mac for mac, where in self.hosts.items() if where == (dpid, port_no))

    def flood_actions(self, dpid: int, now: float, tree: Set[PortRef]) -> Tuple[of.Action, ...]:
        trunks = sorted(p for (d, p) in tree if d == dpid)
        edges = self.edge_ports(dpid, now)
        actions: List[of.Action] = [of.Output(p) for p in trunks]
        if edges:
            actions.append(of.PopVlan())
            actions.extend(of.Output(p) for p in edges)
        return tuple(actions)

    def switch_flows(self, dpid: int, now: float, tree: Set[PortRef]) -> List[of.FlowEntry]:
        """The flows of ``dpid`` that belong to no one host: discovery, defaults, floods, its ports."""
        switch = self.switches[dpid]
        entries = [
            of.FlowEntry(INGRESS_TABLE, 1000, of.match(eth_type=PROBE_ETH_TYPE, eth_dst=PROBE_DST),
                         (of.Output(of.OFPP_CONTROLLER),), role=of.ROLE_PROBE),
            # A marker goes to the controller and back down its own link: a helper that sees it come
            # back knows the switch has taken it, and its packet-in, before anything the member sends next.
            of.FlowEntry(INGRESS_TABLE, 1000, of.match(eth_type=PROBE_ETH_TYPE, eth_dst=MARKER_DST),
                         (of.Output(of.OFPP_CONTROLLER), of.Output(of.OFPP_IN_PORT)), role=of.ROLE_MARKER),
            of.FlowEntry(INGRESS_TABLE, 0, of.match(), (of.Output(of.OFPP_CONTROLLER),), role=of.ROLE_LEARN),
            of.FlowEntry(FORWARD_TABLE, 0, of.match(), goto=FLOOD_TABLE),
            of.FlowEntry(EGRESS_TABLE, 0, of.match()),
            of.FlowEntry(FLOOD_TABLE, 1, of.match(vlan_vid=TAG_PRESENT), self.flood_actions(dpid, now, tree)),
            *self.policy.flood_entries(self, dpid, now, tree),
            of.FlowEntry(FLOOD_TABLE, 0, of.match()),
        ]
        for port_no, port in sorted(switch.ports.items()):
            if not port.up:
                continue
            if self.is_trunk(dpid, port_no):
                entries.append(of.FlowEntry(INGRESS_TABLE, 900,
                                            of.match(in_port=port_no, vlan_vid=TAG_PRESENT),
                                            goto=FORWARD_TABLE))
                entries.append(of.FlowEntry(INGRESS_TABLE, 890, of.match(in_port=port_no)))
                if (dpid, port_no) not in tree:
                    entries.append(of.FlowEntry(FLOOD_TABLE, 500, of.match(in_port=port_no)))
            elif not self.is_edge(dpid, port_no, now):
                # Not yet classified: carry nothing until discovery has had its chance.
                entries.append(of.FlowEntry(INGRESS_TABLE, 100, of.match(in_port=port_no)))
        return entries

    def host_flows(self, dpid: int, mac: str, hops: Dict[int, Dict[int, int]]) -> List[of.FlowEntry]:
        """The flows of ``dpid`` for one host: its ingress, delivery and cut rules, or the way to it."""
        host_dpid, host_port = self.hosts[mac]
        if host_dpid == dpid:
            return [*self.policy.ingress_entries(dpid, mac, host_port),
                    of.FlowEntry(INGRESS_TABLE, 500, of.match(in_port=host_port, eth_src=mac),
                                 (of.PushVlan(), of.SetField("vlan_vid", self.host_vid(mac) | of.OFPVID_PRESENT)),
                                 goto=FORWARD_TABLE),
                    of.FlowEntry(FORWARD_TABLE, 500, of.match(eth_dst=mac), goto=EGRESS_TABLE),
                    *self.egress_entries(dpid, mac, host_port)]
        if dpid in hops.get(host_dpid, {}):
            return [of.FlowEntry(FORWARD_TABLE, 500, of.match(eth_dst=mac), (of.Output(hops[host_dpid][dpid]),))]
        return []

    def desired_flows(self, dpid: int, now: float, tree: Set[PortRef],
                      hops: Dict[int, Dict[int, int]]) -> Dict[tuple, of.FlowEntry]:
        """Every flow ``dpid`` should hold, by key."""
        return self._merge(self._plan_switch(dpid, now, tree, hops, None))

    def _plan_switch(self, dpid: int, now: float, tree: Set[PortRef], hops: Dict[int, Dict[int, int]],
                     hosts: Optional[Set[str]]) -> Tuple[List[of.FlowEntry], Dict[str, List[of.FlowEntry]]]:
        """(switch flows, host -> its flows) of ``dpid``, kept for the next reconcile; with ``hosts``,
        only those hosts' flows are derived again and the others' are the ones kept."""
        kept = self._plans.get(dpid)
        if hosts is None or kept is None or kept[1].keys() != self.hosts.keys():
            per_host = {mac: self.host_flows(dpid, mac, hops) for mac in sorted(self.hosts)}
        else:  # the same hosts as then, in the same order: only the named ones' flows change
            per_host = dict(kept[1])
            for mac in hosts & per_host.keys():
                per_host[mac] = self.host_flows(dpid, mac, hops)
        plan = (self.switch_flows(dpid, now, tree), per_host)
        self._plans[dpid] = plan
        return plan

    @staticmethod
    def _merge(plan) -> Dict[tuple, of.FlowEntry]:
        common, per_host = plan
        entries = list(common)
        for flows in per_host.values():
            entries.extend(flows)
        return {entry.key: entry for entry in entries}

    def reconcile(self, now: float, dpids: Optional[Iterable[int]] = None,
                  hosts: Optional[Iterable[str]] = None) -> List[of.Message]:
        """Flow-mods that turn each switch's installed flows into the wanted ones.

        ``hosts``: only these hosts' flows (and no one host's, such as the floods) may have changed
        since the last reconcile, as at a member's prepare or flip: the other hosts' flows are the
        ones derived then. A flip of one member on a switch of 16 hosts then derives 6 flows, not
        150 (``check_partial`` makes every such reconcile derive everything too and compare)."""
        tree = self.tree_ports()
        host_switches = {d for d, _ in self.hosts.values()}
        hops = {d: self.next_hops(d) for d in host_switches}
        only = None if hosts is None else {mac.lower() for mac in hosts}
        messages: List[of.Message] = []
        for dpid in sorted(self.switches if dpids is None else dpids):
            if dpid not in self.switches:
                continue
            wanted = self._merge(self._plan_switch(dpid, now, tree, hops, only))
            if only is not None and self.check_partial:
                full = self.desired_flows(dpid, now, tree, hops)
                assert list(full.items()) == list(wanted.items()), "a partial reconcile of %s missed flows" % only
            installed = self.installed.setdefault(dpid, {})
            # Adds before deletes: a switch applies them one by one, and packets between
            # two flow-mods must never meet a table more permissive than before and after
            # (e.g. a hold rule deleted before its replacement record rule is in).
            # Learned flows (the switch adds them) are never sent, and are deleted last: the flows that
            # consult them go first, so no packet meets a table that has lost the learned answer early.
            for key, entry in wanted.items():
                current = installed.get(key)
                if current is not entry and current != entry and not entry.learned:
                    messages.append(of.add_flow(dpid, entry))
            # A learned flow goes with every stale copy of it the switch may have re-added (of.LearnVid).
            gone = [entry for key, entry in installed.items() if key not in wanted]
            for entry in sorted(gone, key=lambda e: e.learned):
                messages.append(of.delete_covered_flows(dpid, entry) if entry.learned else of.delete_flow(dpid, entry))
            self.installed[dpid] = wanted
        return messages

    # --- event handlers -------------------------------------------------------

    def switch_up(self, now: float, dpid: int, ports: Iterable[Tuple[int, str, bool]]) -> List[of.Message]:
        """A switch connected (or reconnected); ``ports`` are (number, name, up)."""
        self.switch_down(now, dpid)
        switch = Switch(dpid)
        for number, name, up in ports:
            if of.is_physical_port(number):
                switch.ports[number] = Port(number, name, up)
        self.switches[dpid] = switch
        self.installed[dpid] = {}
        self._topology_changed()
        messages: List[of.Message] = [of.delete_all_flows(dpid)]
        messages += self.reconcile(now, [dpid])
        messages += self._probe(now, dpid, list(switch.ports))
        return messages

    def switch_down(self, now: float, dpid: int) -> List[of.Message]:
        if dpid not in self.switches:
            return []
        del self.switches[dpid]
        self.installed.pop(dpid, None)
        for ref in [r for r in self.links if r[0] == dpid]:
            self._drop_link(ref)
        for mac in [m for m, (d, _) in self.hosts.items() if d == dpid]:
            del self.hosts[mac]
        self._topology_changed()
        return self.reconcile(now)

    def port_changed(self, now: float, dpid: int, port_no: int, name: str, up: bool,
                     deleted: bool = False) -> List[of.Message]:
        switch = self.switches.get(dpid)
        if switch is None or not of.is_physical_port(port_no):
            return []
        port = switch.ports.get(port_no)
        was_up = port is not None and port.up
        if was_up and (deleted or not up) and self.is_edge(dpid, port_no, now):
            port.was_edge = True
        if deleted:
            switch.ports.pop(port_no, None)
        elif port is None:
            port = switch.ports[port_no] = Port(port_no, name, up)
        else:
            port.up = up
        messages: List[of.Message] = []
        if was_up and (deleted or not up):
            self._forget_port(dpid, port_no)
        elif not was_up and up and not deleted:
            # A port that was an edge port serves again at once (a restored VM must not lose its first
            # frames to the settle time); the probe still finds it if it now leads to a switch.
            port.probed_at = now - self.settings.settle_time if port.was_edge else None
            messages += self._probe(now, dpid, [port_no])
        return self.reconcile(now) + messages

    def packet_in(self, now: float, dpid: int, in_port: int, data: bytes) -> List[of.Message]:
        """A frame the switch sent up: a probe (link found) or an unknown source."""
        self.counters["packet_in"] += 1
        if dpid not in self.switches:
            return []
        origin = parse_probe(data, self.nonce)
        if origin is not None:
            return self._link_seen(now, origin, (dpid, in_port))
        header = parse_eth(data)
        if (header is None or is_multicast(header.src) or header.dst in (PROBE_DST, MARKER_DST)
                or not self.is_edge(dpid, in_port, now)):
            self.counters["ignored"] += 1
            return []
        if self.hosts.get(header.src) != (dpid, in_port):
            if header.src not in self.hosts and len(self.hosts) >= self.settings.max_hosts:
                self.counters["hosts_over_limit"] += 1
                return []
            self.counters["moved" if header.src in self.hosts else "learned"] += 1
            self.hosts[header.src] = (dpid, in_port)
        messages = self.reconcile(now)
        # Send the frame through the pipeline again now that its source is known.
        messages.append(of.Barrier(dpid))
        messages.append(of.PacketOut(dpid, in_port, (of.Output(of.OFPP_TABLE),), data))
        return messages

    def tick(self, now: float) -> List[of.Message]:
        """Periodic work: probe rounds, link expiry, ports whose settle time passed."""
        messages: List[of.Message] = []
        changed = False
        for ref, seen in list(self.link_seen.items()):
            if now - seen > self.settings.link_timeout and ref in self.links:
                self._drop_link(ref)
                changed = True
        if self.last_probe_round is None or now - self.last_probe_round >= self.settings.probe_interval:
            self.last_probe_round = now
            for dpid, switch in sorted(self.switches.items()):
                messages += self._probe(now, dpid, [p for p, port in sorted(switch.ports.items()) if port.up])
        changed = changed or any(
            port.probed_at is not None and port.up and not self.is_trunk(s.dpid, port.number)
            and now - port.probed_at >= self.settings.settle_time
            and not self._edge_in_plan(s.dpid, port.number)
            for s in self.switches.values() for port in s.ports.values())
        if changed:
            self._topology_changed()
            messages = self.reconcile(now) + messages
        return messages

    # --- internals -----------------------------------------------------------

    def _edge_in_plan(self, dpid: int, port_no: int) -> bool:
        """Whether the installed plan already treats the port as an edge port."""
        pending_drop = (INGRESS_TABLE, 100, of.match(in_port=port_no))
        return pending_drop not in self.installed.get(dpid, {})

    def _probe(self, now: float, dpid: int, port_numbers: List[int]) -> List[of.Message]:
        switch = self.switches[dpid]
        messages = []
        for number in port_numbers:
            port = switch.ports[number]
            if port.probed_at is None:
                port.probed_at = now
            messages.append(of.PacketOut(dpid, of.OFPP_CONTROLLER, (of.Output(number),),
                                         build_probe(self.nonce, dpid, number)))
        return messages

    def _link_seen(self, now: float, a: PortRef, b: PortRef) -> List[of.Message]:
        if a[0] not in self.switches or a[1] not in self.switches[a[0]].ports:
            return []
        self.link_seen[a] = self.link_seen[b] = now
        if self.links.get(a) == b:
            return []
        for ref in (a, b):
            if ref in self.links:
                self._drop_link(ref)
            self._forget_hosts_on(ref)
            self.switches[ref[0]].ports[ref[1]].was_edge = False
        self.links[a], self.links[b] = b, a
        self._topology_changed()
        return self.reconcile(now)

    def _drop_link(self, ref: PortRef) -> None:
        peer = self.links.pop(ref, None)
        self.link_seen.pop(ref, None)
        if peer is not None:
            self.links.pop(peer, None)
            self.link_seen.pop(peer, None)
        self._topology_changed()

    def _forget_hosts_on(self, ref: PortRef) -> None:
        for mac in [m for m, where in self.hosts.items() if where == ref]:
            del self.hosts[mac]

    def _forget_port(self, dpid: int, port_no: int) -> None:
        self._drop_link((dpid, port_no))
        self._forget_hosts_on((dpid, port_no))

    # --- views -----------------------------------------------------------------

    def describe(self, now: float) -> dict:
        """A JSON-ready view of the topology for REST."""
        return {
            "switches": [
                {"dpid": "%016x" % dpid,
                 "ports": [{"port": p.number, "name": p.name, "up": p.up,
                            "role": "trunk" if self.is_trunk(dpid, p.number)
                            else "edge" if self.is_edge(dpid, p.number, now) else
                            ("down" if not p.up else "pending")}
                           for p in sorted(s.ports.values(), key=lambda p: p.number)]}
                for dpid, s in sorted(self.switches.items())],
            "links": [{"a": {"dpid": "%016x" % a, "port": pa}, "b": {"dpid": "%016x" % b, "port": pb}}
                      for (a, pa), (b, pb) in sorted(self.links.items()) if (a, pa) < (b, pb)],
            "hosts": [{"mac": mac, "dpid": "%016x" % d, "port": p} for mac, (d, p) in sorted(self.hosts.items())],
            "settled": self.settled(now),
        }
