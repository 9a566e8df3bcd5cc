"""The GENI-VIOLIN demo shape: 4 member hosts and 2 snapshot servers on one LAN.

    h1   h2   ss1          h3   h4   ss2
      \\  |   /              \\  |   /
         s1 ---------------- s2

Members h1..h4 run the experiment; ss1 and ss2 store snapshot images. The LAN
spans two switches so every snapshot crosses a trunk.

``mn --custom topologies/violin_demo.py --topo violin --controller remote,port=6653``
"""

try:
    from topologies.common import VioTopo
except ImportError:  # run by `mn --custom` (Debian's python, no __file__)
    import inspect, os, sys  # noqa: E401
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(inspect.currentframe().f_code.co_filename))))
    from topologies.common import VioTopo

MEMBERS = ("h1", "h2", "h3", "h4")
SNAPSHOT_SERVERS = ("ss1", "ss2")


class ViolinDemoTopo(VioTopo):
    def build(self):
        s1, s2 = self.switch("s1"), self.switch("s2")
        for name, switch in (("h1", s1), ("h2", s1), ("ss1", s1), ("h3", s2), ("h4", s2), ("ss2", s2)):
            self.edge(self.host(name), switch)
        self.trunk(s1, s2)


topos = {"violin": ViolinDemoTopo}
