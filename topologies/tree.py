"""Switches in a line, or a tree, with hosts at every switch.

line,N,K:  s1 -- s2 -- ... -- sN, K hosts on each switch (default 1)

    h1     h2           hN
    |      |            |
    s1 --- s2 --- ... - sN

tree,D,F:  a tree of depth D and fanout F; hosts hang off the leaf switches.

``mn --custom topologies/tree.py --topo line,3 --controller remote,port=6653``
``mn --custom topologies/tree.py --topo tree,2,2 --controller remote,port=6653``
"""

try:
    from topologies.common import VioTopo
except ImportError:  # run by `mn --custom` (Debian's python, no __file__)
    import inspect, os, sys  # noqa: E401
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(inspect.currentframe().f_code.co_filename))))
    from topologies.common import VioTopo


class LineTopo(VioTopo):
    def build(self, n=3, hosts_per_switch=1):
        previous, count = None, 0
        for i in range(1, n + 1):
            switch = self.switch("s%d" % i)
            for _ in range(hosts_per_switch):
                count += 1
                self.edge(self.host("h%d" % count), switch)
            if previous:
                self.trunk(previous, switch)
            previous = switch


class TreeTopo(VioTopo):
    def build(self, depth=2, fanout=2):
        self.switch_count = self.host_count = 0
        self._subtree(depth, fanout)

    def _subtree(self, depth, fanout):
        if depth == 0:
            self.host_count += 1
            return self.host("h%d" % self.host_count)
        self.switch_count += 1
        switch = self.switch("s%d" % self.switch_count)
        for _ in range(fanout):
            child = self._subtree(depth - 1, fanout)
            if depth == 1:
                self.edge(child, switch)
            else:
                self.trunk(switch, child)
        return switch


topos = {"line": LineTopo, "tree": TreeTopo}
