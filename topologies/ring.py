"""A ring of N switches (a loop the flood tree must break), hosts on each.

    h1        h2
    |         |
    s1 ------ s2
    |          |
    sN - ... - s3 -- h3

``mn --custom topologies/ring.py --topo ring,4 --controller remote,port=6653``
"""

try:
    from topologies.common import VioTopo
except ImportError:  # run by `mn --custom` (Debian's python, no __file__)
    import inspect, os, sys  # noqa: E401
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(inspect.currentframe().f_code.co_filename))))
    from topologies.common import VioTopo


class RingTopo(VioTopo):
    def build(self, n=4, hosts_per_switch=1):
        if n < 3:
            raise ValueError("a ring needs at least 3 switches")
        switches = [self.switch("s%d" % i) for i in range(1, n + 1)]
        count = 0
        for switch in switches:
            for _ in range(hosts_per_switch):
                count += 1
                self.edge(self.host("h%d" % count), switch)
        for a, b in zip(switches, switches[1:] + switches[:1]):
            self.trunk(a, b)


topos = {"ring": RingTopo}
