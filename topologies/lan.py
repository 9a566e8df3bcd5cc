"""A single-switch LAN of N hosts.

    h1   h2   ...  hN
      \\  |       /
          s1

``mn --custom topologies/lan.py --topo lan,4 --controller remote,ip=127.0.0.1,port=6653``
"""

try:
    from topologies.common import VioTopo
except ImportError:  # run by `mn --custom` (Debian's python, no __file__)
    import inspect, os, sys  # noqa: E401
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(inspect.currentframe().f_code.co_filename))))
    from topologies.common import VioTopo


class LanTopo(VioTopo):
    def build(self, n=4):
        switch = self.switch("s1")
        for i in range(1, n + 1):
            self.edge(self.host("h%d" % i), switch)


topos = {"lan": LanTopo}
