"""Topologies are plain Topo classes: check their shape without root."""

import pytest

from topologies.common import TrunkLink, VioHost, VioSwitch
from topologies.lan import LanTopo
from topologies.ring import RingTopo
from topologies.tree import LineTopo, TreeTopo
from topologies.twosite import TwoSiteTopo
from topologies.violin_demo import MEMBERS, SNAPSHOT_SERVERS, ViolinDemoTopo


def trunks(topo):
    switches = set(topo.switches())
    return [(a, b) for a, b in topo.links() if a in switches and b in switches]


@pytest.mark.parametrize("topo,hosts,switches,links", [
    (LanTopo(5), 5, 1, 0),
    (LineTopo(4), 4, 4, 3),
    (LineTopo(2, 3), 6, 2, 1),
    (TreeTopo(2, 3), 9, 4, 3),
    (RingTopo(5), 5, 5, 5),
    (TwoSiteTopo(3, 5), 6, 2, 1),
    (ViolinDemoTopo(), 6, 2, 1),
])
def test_shapes(topo, hosts, switches, links):
    assert (len(topo.hosts()), len(topo.switches()), len(trunks(topo))) == (hosts, switches, links)


def test_nodes_use_netdev_switches_offload_off_hosts_and_trunk_links():
    topo = RingTopo(3)
    assert all(topo.nodeInfo(s)["cls"] is VioSwitch for s in topo.switches())
    assert all(topo.nodeInfo(h)["cls"] is VioHost for h in topo.hosts())
    assert all(topo.linkInfo(a, b)["cls"] is TrunkLink for a, b in trunks(topo))
    assert len({topo.nodeInfo(s)["dpid"] for s in topo.switches()}) == 3


def test_prefix_names_every_node_and_is_validated():
    topo = LineTopo(2, prefix="vab")
    assert all(n.startswith("vab") for n in topo.nodes())
    with pytest.raises(ValueError):
        LanTopo(2, prefix="toolong")
    with pytest.raises(ValueError):
        LanTopo(2, prefix="v1")


def test_demo_has_four_members_and_two_snapshot_servers():
    topo = ViolinDemoTopo()
    assert sorted(topo.hosts()) == sorted(MEMBERS + SNAPSHOT_SERVERS)


def test_twosite_wan_link_is_shaped():
    topo = TwoSiteTopo(1, 7)
    (a, b), = trunks(topo)
    assert topo.linkInfo(a, b)["bw"] == 7


def test_ring_needs_three_switches():
    with pytest.raises(ValueError):
        RingTopo(2)


def test_topologies_register_for_mn_custom():
    import topologies.lan, topologies.ring, topologies.tree, topologies.twosite, topologies.violin_demo  # noqa
    names = set()
    for module in (topologies.lan, topologies.ring, topologies.tree, topologies.twosite, topologies.violin_demo):
        names |= set(module.topos)
    assert names == {"lan", "ring", "line", "tree", "twosite", "violin"}


def test_topologies_hold_only_topos_and_import_no_test_code():
    """``mn --custom topologies/<file>.py`` loads a file with only the repository root to find imports:
    the test lab (lab/) and the workloads (workloads/) stay out of it."""
    import ast
    import glob
    import os
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "topologies")
    for path in glob.glob(os.path.join(folder, "*.py")):
        with open(path) as handle:
            tree = ast.parse(handle.read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {name for name in imported if name.split(".")[0] in ("lab", "workloads", "hostside")}, path
