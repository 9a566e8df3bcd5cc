"""Members named as users know them: the pure parsing behind ``locate`` (/proc, ip -j, domain XML) and the
backends' locate over injected scans, no root."""

import os
import subprocess
import sys

import pytest

from hostside.backends import criu, libvirt
from hostside.backends.base import HostSettings

P = criu.Proc
NS_H1, NS_H2, NS_ROOT = "net:[4026532001]", "net:[4026532002]", "net:[4026531833]"


def test_cmdline_stat_and_pidfile_parsing():
    assert criu.parse_cmdline(b"python3\0/srv/seqstream.py\0--id\0001\0") == ["python3", "/srv/seqstream.py", "--id", "1"]
    assert criu.parse_cmdline(b"") == []  # kernel threads, zombies
    assert criu.parse_stat("42 (a (weird) name) T 7 42 42 0 -1") == ("T", 7)
    assert criu.parse_pidfile("1234\n") == 1234 and criu.parse_pidfile("  77  \nextra\n") == 77
    for bad in ("", "x", "-3", "0", "12 34"):
        with pytest.raises(ValueError):
            criu.parse_pidfile(bad)


SHELL_H1 = P(100, 1, "S", ["bash", "--norc", "--noediting", "-is", "mininet:h1"], NS_H1)
SHELL_H2 = P(200, 1, "S", ["/bin/bash", "--norc", "--noediting", "-is", "mininet:h2"], NS_H2)


def test_a_pidfile_must_be_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero", str(tmp_path)):
        with pytest.raises((ValueError, OSError)):
            criu.read_pidfile(path)  # never blocks, never reads for ever
    (tmp_path / "ok.pid").write_text("42\n")
    assert criu.read_pidfile(str(tmp_path / "ok.pid")) == 42


def test_the_mininet_shell_is_found_by_its_host_name():
    procs = [SHELL_H1, SHELL_H2, P(300, 1, "S", ["grep", "mininet:h1"], NS_ROOT),
             P(301, 1, "S", ["bash", "-is", "mininet:h11"], NS_ROOT), P(302, 1, "Z", ["bash", "-is", "mininet:h3"])]
    assert criu.mininet_shell("h1", procs) is SHELL_H1 and criu.mininet_shell("h2", procs) is SHELL_H2
    with pytest.raises(LookupError, match="no Mininet host h3"):
        criu.mininet_shell("h3", procs)  # its shell is a zombie
    with pytest.raises(LookupError, match="2 Mininet hosts are named h1"):
        criu.mininet_shell("h1", procs + [P(400, 1, "S", ["bash", "-is", "mininet:h1"])])


def test_the_member_process_is_the_root_of_the_one_matching_tree():
    procs = [P(10, 1, "S", ["python3", "/srv/seqstream.py", "--id", "1"]),
             P(11, 10, "S", ["python3", "/srv/seqstream.py", "--id", "1"]),  # a child of the tree: same member
             P(12, 1, "S", ["python3", "-m", "hostside.marker", "serve"]),
             P(13, 1, "Z", ["python3", "/srv/seqstream.py", "--id", "9"])]  # a zombie is no member
    assert criu.match_process("seqstream.py", procs) == 10
    assert criu.match_process("seqstream.py --id 1", procs) == 10
    assert criu.match_process("mandelbrot", procs) is None
    assert criu.match_process("seqstream.py", procs, exclude={10, 11}) is None
    stopped = [P(20, 999, "T", ["python3", "/srv/seqstream.py"])]  # restored, left stopped, re-parented
    assert criu.match_process("seqstream", stopped) == 20
    with pytest.raises(LookupError, match="2 processes match 'python3'"):
        criu.match_process("python3", procs)


def test_the_member_interface_is_the_one_besides_lo():
    lo = {"ifindex": 1, "ifname": "lo", "link_type": "loopback", "address": "00:00:00:00:00:00"}
    eth = {"ifindex": 5, "ifname": "h1-eth0", "link_type": "ether", "address": "00:00:00:00:00:01",
           "addr_info": [{"family": "inet6", "local": "fe80::1", "prefixlen": 64},
                         {"family": "inet", "local": "10.0.0.1", "prefixlen": 8}]}
    oob = {"ifindex": 3, "ifname": "h1-eth1", "link_type": "ether", "address": "00:00:00:00:00:02"}
    assert criu.pick_interface([lo, eth]) is eth and criu.pick_interface([lo, oob, eth]) is eth
    assert criu.pick_interface([lo, oob, dict(eth, ifname="x")])["ifindex"] == 3
    assert criu.ipv4_of(eth) == "10.0.0.1/8" and criu.ipv4_of(oob) is None
    with pytest.raises(LookupError):
        criu.pick_interface([lo])


LINKS = [{"ifindex": 1, "ifname": "lo", "link_type": "loopback"},
         {"ifindex": 7, "ifname": "h1-eth0", "link_type": "ether", "address": "00:00:00:00:00:0A",
          "addr_info": [{"family": "inet", "local": "10.0.0.1", "prefixlen": 8}]}]


def backend(tmp_path, procs, links=LINKS, real=False):
    b = criu.CriuBackend(HostSettings(str(tmp_path)))
    b.links = lambda netns: links
    if not real:
        b.scan = lambda: procs
        b.procs_in = lambda netns: [p for p in procs if p.netns == netns]
        b.read = lambda pid: next((p for p in procs if p.pid == pid), None)
    return b


def test_locate_by_mininet_host_finds_namespaces_process_interface_and_mac(tmp_path):
    member = criu.CriuMember("m1", mininet_host="h1", command="seqstream.py", workdir="/srv/m1")
    procs = [SHELL_H1, SHELL_H2, P(150, 100, "S", ["python3", "seqstream.py"], NS_H1),
             P(250, 200, "S", ["python3", "seqstream.py"], NS_H2)]  # h2's own member: not this one
    where = backend(tmp_path, procs).locate(member)
    assert (where.pid, where.netns, where.iface, where.mac) == (150, "/proc/100/ns/net", "h1-eth0", "00:00:00:00:00:0a")
    assert where.details["ip"] == "10.0.0.1/8" and where.details["handle"] == "h1: seqstream.py"
    # Not running (killed before a restore): still located, without a pid.
    gone = backend(tmp_path, [SHELL_H1]).locate(member)
    assert gone.pid is None and gone.netns == "/proc/100/ns/net"
    with pytest.raises(criu.CriuError, match="cannot locate m1: no Mininet host h1"):
        backend(tmp_path, [SHELL_H2]).locate(member)
    # The shell seen last is checked, not searched for again; one that went away is searched for.
    b = backend(tmp_path, procs)
    b.locate(member)
    b.scan = lambda: []
    assert b.locate(member).pid == 150
    b.read = lambda pid: None
    with pytest.raises(criu.CriuError, match="no Mininet host h1"):
        b.locate(member)
    with pytest.raises(criu.CriuError, match="cannot locate the interface of m1"):
        backend(tmp_path, procs, links=LINKS[:1]).locate(member)


def test_locate_by_pidfile_holds_the_namespaces_for_when_the_process_is_gone(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfile = tmp_path / "m.pid"
        pidfile.write_text("%d\n" % child.pid)
        member = criu.CriuMember("m2", pidfile=str(pidfile))
        b = backend(tmp_path, [], real=True)
        where = b.locate(member)
        assert where.pid == child.pid and where.mac == "00:00:00:00:00:0a"
        assert os.readlink(where.netns) == os.readlink("/proc/%d/ns/net" % child.pid)
        assert where.mntns is None  # the helper's own mount namespace
        child.kill()
        child.wait()
        after = b.locate(member)  # the pidfile names a dead process: the kept namespace is still found
        assert after.pid is None and after.netns == where.netns
        b.forget(member)
        with pytest.raises(criu.CriuError, match="names no running process"):
            b.locate(member)
        with pytest.raises(criu.CriuError, match="No such file"):
            b.locate(criu.CriuMember("m3", pidfile=str(tmp_path / "nothing.pid")))
    finally:
        child.kill()
        child.wait()


def test_the_interfaces_of_a_namespace_are_read_in_process():
    links = criu.links_in_netns("/proc/self/ns/net")
    lo = next(l for l in links if l["ifname"] == "lo")
    assert lo["link_type"] == "loopback" and lo["addr_info"][0]["local"] == "127.0.0.1"
    assert lo["addr_info"][0]["prefixlen"] == 8
    with pytest.raises(RuntimeError):
        criu.links_in_netns("/nonexistent/ns/net")
    mine = criu.procs_in_netns(os.readlink("/proc/self/ns/net"))
    assert os.getpid() in [p.pid for p in mine]


def test_criu_member_specs_name_a_process_one_way():
    assert criu.CriuMember("a", pidfile="/run/a.pid").describe() == "pidfile /run/a.pid"
    with pytest.raises(ValueError, match="pidfile, or by mininet_host and command"):
        criu.CriuMember("a")
    with pytest.raises(ValueError, match="command"):
        criu.CriuMember("a", mininet_host="h1")


DOMAIN = """<domain type='qemu'><name>vm1</name><devices>
  <disk type='file' device='disk'><source file='/x.qcow2'/><target dev='vda'/></disk>
  <interface type='ethernet'><mac address='52:54:00:AA:00:01'/><target dev='tvm1' managed='no'/></interface>
</devices></domain>"""


def test_a_vms_mac_and_tap_come_from_its_domain_xml():
    assert libvirt.nic_of(DOMAIN) == ("52:54:00:aa:00:01", "tvm1")
    assert libvirt.nic_of(DOMAIN.replace("<target dev='tvm1' managed='no'/>", "")) == ("52:54:00:aa:00:01", None)
    two = DOMAIN.replace("</devices>", "<interface type='ethernet'><mac address='52:54:00:aa:00:02'/></interface>"
                                      "</devices>")
    with pytest.raises(libvirt.VmError, match="2 network interfaces"):
        libvirt.nic_of(two)
    with pytest.raises(libvirt.VmError, match="0 network interfaces"):
        libvirt.nic_of("<domain><devices/></domain>")
    with pytest.raises(libvirt.VmError, match="no MAC"):
        libvirt.nic_of("<domain><devices><interface type='ethernet'/></devices></domain>")


def test_libvirt_locate_reads_the_running_domain():
    class Dom:
        def XMLDesc(self, flags):
            return DOMAIN

        def UUIDString(self):
            return "u-1"

        def isActive(self):
            return 1

    class Conn:
        class libvirt:
            libvirtError = RuntimeError

        def domain(self, name):
            if name != "vm1":
                raise libvirt.VmError("no libvirt domain %s" % name)
            return Dom()

    b = libvirt.LibvirtBackend(HostSettings())
    b._libvirt = Conn()
    where = b.locate(libvirt.VmMember("vm1", "vm1"))
    assert (where.mac, where.iface, where.port) == ("52:54:00:aa:00:01", "tvm1", "tvm1")
    assert where.details == {"domain": "vm1", "uuid": "u-1", "running": True, "handle": "domain vm1"}
    with pytest.raises(libvirt.VmError, match="no libvirt domain vm9"):
        b.locate(libvirt.VmMember("vm9", "vm9"))
