"""Node and link classes every violin-snapshot topology uses.

- ``VioSwitch``: Open vSwitch with the userspace datapath (``datapath_type=netdev``;
  this kernel has no openvswitch module), OpenFlow 1.3 only, fail-mode secure,
  and a deeper packet-in queue toward the controller (held and recorded frames).
- ``VioHost``: a Mininet host with TX checksum offload off on its interfaces
  (TCP over the userspace datapath hangs otherwise).
- ``TrunkLink``: a switch-to-switch link with room for the outer colour tag
  (MTU ``TRUNK_MTU``) and optional htb shaping (``bw=`` in Mbit/s).

Topologies name every node ``<prefix><name>`` so that two runs on one machine
(each with its own prefix) never share a bridge or interface name. Keep the
prefix to 5 letters at most: Linux interface names hold 15 characters.
"""

from mininet.link import TCLink
from mininet.node import Host, OVSSwitch
from mininet.topo import Topo

TRUNK_MTU = 1600  # 1500 guest MTU + Ethernet header + outer tag + any inner tag
MAX_PREFIX = 5


CONTROLLER_QUEUE = 512  # OVS's default of 100 queued packet-ins drops held/recorded frames under load


class VioSwitch(OVSSwitch):
    def __init__(self, name, **params):
        params.setdefault("datapath", "user")
        params.setdefault("protocols", "OpenFlow13")
        params.setdefault("failMode", "secure")
        super().__init__(name, **params)

    def start(self, controllers):
        super().start(controllers)
        if not self.batch:
            self.deepen_controller_queue()

    @classmethod
    def batchStartup(cls, switches, run=None):
        started = super().batchStartup(switches, **({"run": run} if run else {}))
        for switch in switches:
            switch.deepen_controller_queue()
        return started

    def deepen_controller_queue(self):
        uuids = self.cmd("ovs-vsctl get bridge %s controller" % self.name).strip().strip("[]")
        for uuid in filter(None, (u.strip() for u in uuids.split(","))):
            self.cmd("ovs-vsctl set controller %s controller_queue_size=%d" % (uuid, CONTROLLER_QUEUE))


class VioHost(Host):
    def config(self, **params):
        result = super().config(**params)
        for intf in self.intfList():
            if intf.name != "lo":
                self.cmd("ethtool -K %s tx off >/dev/null 2>&1" % intf.name)
        return result


class TrunkLink(TCLink):
    def __init__(self, node1, node2, **params):
        super().__init__(node1, node2, **params)
        for intf in (self.intf1, self.intf2):
            intf.cmd("ip link set dev %s mtu %d" % (intf.name, TRUNK_MTU))


class VioTopo(Topo):
    """Base: prefixed names, explicit dpids, our node and link classes."""

    def __init__(self, *args, prefix="", **params):
        if len(prefix) > MAX_PREFIX or not (prefix.isalpha() or prefix == ""):
            raise ValueError("prefix must be at most %d letters, got %r" % (MAX_PREFIX, prefix))
        self.prefix = prefix
        self._dpids = 0
        super().__init__(*args, **params)

    def switch(self, name):
        self._dpids += 1
        return self.addSwitch(self.prefix + name, cls=VioSwitch, dpid="%016x" % self._dpids)

    def host(self, name, **params):
        return self.addHost(self.prefix + name, cls=VioHost, **params)

    def trunk(self, a, b, **params):
        return self.addLink(a, b, cls=TrunkLink, **params)

    def edge(self, host, switch, **params):
        return self.addLink(host, switch, **params)
