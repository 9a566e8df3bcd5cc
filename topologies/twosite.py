"""Two sites, each a switch with N hosts, joined by a slow WAN link (htb, ``bw`` Mbit/s).

    a1 .. aN                 b1 .. bN
       \\ |                    | /
        sa1 ===== WAN ===== sb1
              (bw Mbit/s)

``mn --custom topologies/twosite.py --topo twosite,2,10 --controller remote,port=6653``
(netem delays do not work on this kernel; only the bandwidth is shaped.)
"""

try:
    from topologies.common import VioTopo
except ImportError:  # run by `mn --custom` (Debian's python, no __file__)
    import inspect, os, sys  # noqa: E401
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(inspect.currentframe().f_code.co_filename))))
    from topologies.common import VioTopo


class TwoSiteTopo(VioTopo):
    def build(self, n=2, bw=10):
        site_a, site_b = self.switch("sa1"), self.switch("sb1")
        for i in range(1, n + 1):
            self.edge(self.host("a%d" % i), site_a)
            self.edge(self.host("b%d" % i), site_b)
        self.trunk(site_a, site_b, bw=bw)


topos = {"twosite": TwoSiteTopo}
