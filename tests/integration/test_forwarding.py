"""The forwarding pipeline on real OVS (userspace datapath) with real Mininet hosts."""

import hashlib
import os
import subprocess
import time

import pytest

from lab import lab
from topologies.lan import LanTopo
from topologies.ring import RingTopo
from topologies.tree import LineTopo, TreeTopo
from topologies.twosite import TwoSiteTopo
from topologies.violin_demo import ViolinDemoTopo

RAWFRAME = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "rawframe.py")

TOPOLOGIES = {
    "single": lambda p: LanTopo(4, prefix=p),
    "line": lambda p: LineTopo(3, prefix=p),
    "tree": lambda p: TreeTopo(2, 2, prefix=p),
    "ring": lambda p: RingTopo(4, prefix=p),
    "twosite": lambda p: TwoSiteTopo(2, 20, prefix=p),
    "demo": lambda p: ViolinDemoTopo(prefix=p),
}


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_pingall_without_loss(controller, name):
    with lab.network(TOPOLOGIES[name](lab.run_prefix()), controller) as net:
        assert net.pingAll(timeout=2) == 0.0
        status, health = controller.get("/violin/health")
        assert status == 200 and health["hosts"] == len(net.hosts)
        assert health["switch_errors"] == 0


def test_tcp_transfer_across_the_ring_is_intact(controller):
    """5 MB over TCP through the looped topology arrive byte-for-byte."""
    with lab.network(RingTopo(4, prefix=lab.run_prefix()), controller) as net:
        sender, receiver = net.hosts[0], net.hosts[2]
        payload = os.urandom(5 * 1024 * 1024)
        digest = hashlib.sha256(payload).hexdigest()
        source = "/tmp/%s-payload" % sender.name
        with open(source, "wb") as handle:
            handle.write(payload)
        try:
            server = receiver.popen(["python3", "-c", _TCP_SINK, receiver.IP()], stdout=subprocess.PIPE)
            time.sleep(0.5)
            sender.cmd("python3 -c %s %s %s" % (_shell(_TCP_SOURCE), receiver.IP(), source))
            out, _ = server.communicate(timeout=60)
            assert out.decode().split() == [digest, str(len(payload))]
        finally:
            os.unlink(source)


def test_full_size_and_ipv6_frames_cross_switches(controller):
    with lab.network(LineTopo(3, prefix=lab.run_prefix()), controller) as net:
        first, last = net.hosts[0], net.hosts[-1]
        assert " 0% packet loss" in first.cmd("ping -c 3 -W 2 -s 1472 -M do %s" % last.IP())
        target = last.cmd("ip -6 addr show dev %s scope link | awk '/inet6/{print $2}'" % last.defaultIntf()).strip()
        assert target, "no IPv6 link-local address on %s" % last
        address = target.split("/")[0]
        out = first.cmd("ping -6 -c 3 -W 2 %s%%%s" % (address, first.defaultIntf()))
        assert " 0% packet loss" in out, out


@pytest.mark.parametrize("kind", ["inner-vlan", "unknown-ethertype", "inner-vlan-broadcast"])
def test_guest_frames_arrive_byte_for_byte(controller, kind):
    """Crafted frames (the host kernel has no VLAN devices) cross 3 switches unchanged."""
    with lab.network(LineTopo(3, prefix=lab.run_prefix()), controller) as net:
        net.pingAll(timeout=2)  # hosts learned
        sender, receiver = net.hosts[0], net.hosts[-1]
        dst = "ff:ff:ff:ff:ff:ff" if kind.endswith("broadcast") else receiver.MAC()
        args = {"inner-vlan": "--vlan 100 --ethertype 0x0800",
                "unknown-ethertype": "--ethertype 0x88b6",
                "inner-vlan-broadcast": "--vlan 4000 --ethertype 0x88b6"}[kind]
        listener = receiver.popen(["python3", RAWFRAME, "recv", "--iface", str(receiver.defaultIntf()),
                                   "--src", sender.MAC(), "--count", "5", "--timeout", "10"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)
        sent = sender.cmd("python3 %s send --iface %s --src %s --dst %s %s --count 5"
                          % (RAWFRAME, sender.defaultIntf(), sender.MAC(), dst, args)).split()
        out, err = listener.communicate(timeout=20)
        received = out.decode().split()
        assert len(sent) == 5, sent
        assert received == sent, (received, sent, err.decode())


def test_controller_restart_relearns_the_network(lab_ready):
    """Switches reconnect to a new controller and the LAN comes back by itself."""
    first = lab.ControllerProcess().start()
    second = None
    try:
        with lab.network(RingTopo(3, prefix=lab.run_prefix()), first) as net:
            assert net.pingAll(timeout=2) == 0.0
            port = first.of_port
            first.stop()
            second = lab.ControllerProcess()
            second.of_port = port
            second.start()
            lab.wait_settled(second, 3, 3, timeout=30)
            # Hosts keep their ARP entries, so their first frames reach a controller that has
            # not learned them yet; give it one round, then every pair must get through.
            net.pingAll(timeout=2)
            assert net.pingAll(timeout=2) == 0.0
    finally:
        first.stop()
        if second:
            second.stop()


def _shell(code):
    return "'" + code.replace("'", "'\"'\"'") + "'"


_TCP_SINK = """
import hashlib, socket, sys
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], 5001)); server.listen(1); server.settimeout(30)
conn, _ = server.accept(); digest = hashlib.sha256(); size = 0
while True:
    chunk = conn.recv(65536)
    if not chunk: break
    digest.update(chunk); size += len(chunk)
print(digest.hexdigest(), size)
"""

_TCP_SOURCE = """
import socket, sys
conn = socket.create_connection((sys.argv[1], 5001), timeout=30)
conn.sendall(open(sys.argv[2], 'rb').read()); conn.close()
"""
