"""The forwarding core against a simulated OF1.3 network (no switch, no root)."""

import pytest

from violin_core import of
from violin_core.fabric import EGRESS_TABLE, FabricSettings, INGRESS_TABLE
from violin_core.packets import build_probe

from harness import Harness, assert_only, eth_frame, line_topology, ring_topology

def _tmp():
    import tempfile
    return tempfile.mkdtemp(prefix="violin-test-")


A, B, C = "00:00:00:00:00:0a", "00:00:00:00:00:0b", "00:00:00:00:00:0c"
BCAST = "ff:ff:ff:ff:ff:ff"


def started(ports, links, **settings):
    harness = Harness(ports, links, FabricSettings(**settings), state_dir=_tmp())
    harness.start()
    return harness


def test_discovery_finds_every_link_and_settles():
    h = started(*ring_topology(4))
    assert len(h.fabric.links) == 8  # 4 links, both directions
    assert h.fabric.settled(h.now)
    assert h.fabric.edge_ports(1, h.now) == [1]


def test_ports_are_not_edges_before_settle_time():
    ports, links = line_topology(2)
    h = Harness(ports, links, FabricSettings(settle_time=0.5), state_dir=_tmp())
    for dpid in (1, 2):
        h.run(h.controller.switch_up(dpid, [(p, "", True) for p in ports[dpid]]))
    assert not h.fabric.settled(h.now)
    # A host frame on a pending port is neither learned nor flooded.
    out = h.send(1, 1, eth_frame(BCAST, A))
    assert out.delivered == [] and A not in h.fabric.hosts
    h.advance(0.6)
    assert h.fabric.settled(h.now)


def test_an_edge_port_that_flaps_serves_again_at_once():
    """A restored VM's tap goes down and up: its first frames must not die in the settle time."""
    h = started(*line_topology(2), settle_time=0.5)
    h.send(1, 1, eth_frame(BCAST, A))
    h.run(h.controller.port_changed(1, 1, "tap", False, False))
    assert A not in h.fabric.hosts and not h.fabric.is_edge(1, 1, h.now)
    h.run(h.controller.port_changed(1, 1, "tap", True, False))
    assert h.fabric.is_edge(1, 1, h.now)
    out = h.send(1, 1, eth_frame(BCAST, A))
    assert A in h.fabric.hosts and out.delivered


@pytest.mark.parametrize("topology", [line_topology(3), ring_topology(3), ring_topology(5)])
def test_broadcast_reaches_every_other_host_exactly_once(topology):
    h = started(*topology)
    n = len(topology[0])
    frame = eth_frame(BCAST, A, 0x0806)
    out = h.send(1, 1, frame)
    assert_only(out, [(d, 1) for d in range(2, n + 1)])
    assert all(data == frame for _, _, data in out.delivered)


def test_learned_unicast_follows_one_path_and_is_unchanged():
    h = started(*ring_topology(4))
    h.send(3, 1, eth_frame(BCAST, C))  # C announces itself at s3
    frame = eth_frame(C, A, 0x86DD, b"ipv6" * 20)
    out = h.send(1, 1, frame)
    assert_only(out, [(3, 1)])
    assert out.delivered[0][2] == frame
    # Second frame: A is known now, no controller involvement.
    before = len(h.controller_log)
    out = h.send(1, 1, frame)
    assert_only(out, [(3, 1)]) and len(h.controller_log) == before


def test_inner_vlan_tag_and_unknown_ethertype_pass_byte_for_byte():
    h = started(*line_topology(3))
    h.send(3, 1, eth_frame(BCAST, C))
    for frame in (eth_frame(C, A, 0x0800, b"tagged" * 10, vlan=100),
                  eth_frame(C, A, 0x88B6, b"\x01\x02" * 30),
                  eth_frame(BCAST, A, 0x88B6, b"odd" * 20, vlan=4094)):
        out = h.send(1, 1, frame)
        assert out.delivered and all(data == frame for _, _, data in out.delivered)


def test_host_move_updates_every_switch():
    h = started(*line_topology(3))
    h.send(1, 1, eth_frame(BCAST, A))
    h.send(3, 1, eth_frame(BCAST, B))
    assert_only(h.send(3, 1, eth_frame(A, B)), [(1, 1)])
    h.send(2, 1, eth_frame(BCAST, A))  # A moved to s2
    assert h.fabric.hosts[A] == (2, 1) and h.fabric.counters["moved"] == 1
    assert_only(h.send(3, 1, eth_frame(A, B)), [(2, 1)])


def test_link_down_reroutes_around_the_ring():
    h = started(*ring_topology(4))
    h.send(1, 1, eth_frame(BCAST, A))
    h.send(2, 1, eth_frame(BCAST, B))
    # Cut s1-s2 (s1 port 3 <-> s2 port 2); the flood tree and paths must heal.
    h.run(h.fabric.port_changed(h.now, 1, 3, "", up=False))
    h.run(h.fabric.port_changed(h.now, 2, 2, "", up=False))
    del h.net.links[(1, 3)], h.net.links[(2, 2)]
    assert_only(h.send(2, 1, eth_frame(A, B)), [(1, 1)])
    assert_only(h.send(1, 1, eth_frame(BCAST, A)), [(2, 1), (3, 1), (4, 1)])


def test_switch_down_forgets_its_hosts_and_links():
    h = started(*line_topology(3))
    h.send(3, 1, eth_frame(BCAST, C))
    h.run(h.fabric.switch_down(h.now, 3))
    assert C not in h.fabric.hosts and (2, 3) not in h.fabric.links


def test_links_expire_when_probes_stop_arriving():
    h = started(*line_topology(2), probe_interval=1.0, link_timeout=3.5)
    del h.net.links[(1, 3)], h.net.links[(2, 2)]  # cable pulled, ports stay "up"
    for _ in range(5):
        h.advance(1.0)
    assert h.fabric.links == {}


def test_reconcile_is_idempotent_and_minimal():
    h = started(*ring_topology(3))
    h.send(1, 1, eth_frame(BCAST, A))
    assert h.fabric.reconcile(h.now) == []
    # Learning one host touches only flows about that host.
    messages = h.fabric.packet_in(h.now, 2, 1, eth_frame(BCAST, B))
    mods = [m for m in messages if isinstance(m, of.FlowMod)]
    assert mods and all(B in repr(m.entry.match) for m in mods)


def test_probes_from_another_controller_are_ignored():
    h = started(*line_topology(2))
    foreign = build_probe(b"othernon", 9, 9)
    assert h.fabric.packet_in(h.now, 1, 1, foreign) == []
    assert (1, 1) not in h.fabric.links


def test_multicast_source_is_never_learned():
    h = started(*line_topology(2))
    h.send(1, 1, eth_frame(BCAST, "01:00:5e:00:00:01"))
    assert h.fabric.hosts == {}


def test_max_hosts_is_enforced_and_counted():
    h = started(*line_topology(2), max_hosts=1)
    h.send(1, 1, eth_frame(BCAST, A))
    h.send(2, 1, eth_frame(BCAST, B))
    assert list(h.fabric.hosts) == [A] and h.fabric.counters["hosts_over_limit"] == 1


def test_egress_pops_the_outer_tag_and_ingress_pushes_it():
    h = started(*line_topology(1))
    h.send(1, 1, eth_frame(BCAST, A))
    flows = h.fabric.installed[1]
    ingress = [e for e in flows.values() if e.table_id == INGRESS_TABLE and ("eth_src", A) in e.match]
    egress = [e for e in flows.values() if e.table_id == EGRESS_TABLE and ("eth_dst", A) in e.match]
    assert ingress[0].actions[0] == of.PushVlan()
    assert egress[0].actions[0] == of.PopVlan()

