"""The VM guest image (scripts/build_guest.sh): it builds idempotently, boots under libvirt (TCG) with its
NIC on an Open vSwitch bridge, answers ping, and its C oracle member (guest/vseq.c) exchanges UDP and TCP
with the Python one (workloads/seqstream.py) with no loss or duplicate; workloads.guestctl reads its state.

Everything is named per run and removed by name or pid (domain, tap, bridge, namespace, processes).
Needs root, libvirtd (scripts/setup.sh starts it), Open vSwitch, QEMU; skipped with the reason when they
are missing, except in CI (``CI`` set), where that fails.
"""

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from workloads import guestctl, seqstream
from lab import lab, vms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(REPO, "scripts", "build_guest.sh")
GUEST_DIR = os.environ.get("VIOLIN_GUEST_DIR", "/var/lib/libvirt/images/violin-guest")
URI = "qemu:///system"
RATE = 200.0  # ticks per second, both members
EXCHANGE_S = 3.0


def _missing():
    if os.geteuid() != 0:
        return "the guest image test needs root"
    for tool in ("ovs-vsctl", "ip", "nsenter", "ping", "ethtool", "qemu-system-x86_64", "gcc", "cpio"):
        if shutil.which(tool) is None:
            return "%s is not installed (run scripts/setup.sh)" % tool
    return vms.libvirt_available(URI)


@pytest.fixture(scope="module")
def vm_ready():
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail("CI must run the VM guest tests: " + reason)
        pytest.skip(reason)
    lab.ensure_ovs()


def build(guest_dir=GUEST_DIR):
    started = time.monotonic()
    result = subprocess.run(["bash", BUILD], env=dict(os.environ, VIOLIN_GUEST_DIR=guest_dir),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, "build_guest.sh failed:\n" + result.stdout + result.stderr
    return result.stdout, time.monotonic() - started


def test_build_is_idempotent_and_complete(vm_ready, tmp_path):
    out = str(tmp_path / "image")
    text, cold = build(out)
    assert "built" in text
    text, warm = build(out)
    assert "up to date" in text, text
    print("image build: cold %.2f s, warm %.2f s" % (cold, warm))
    listing = subprocess.run("zcat %s/initramfs.cpio.gz | cpio -t --quiet" % out, shell=True,
                             capture_output=True, text=True, check=True).stdout.split()
    for name in ["init", "bin/busybox", "bin/sh", "bin/ip", "bin/modprobe", "bin/vseq", "dev/console"]:
        assert name in listing, name
    for source in os.listdir(os.path.join(REPO, "guest")):  # every guest/*.c is a /bin program
        if source.endswith(".c"):
            assert "bin/" + source[:-2] in listing, source
    dep = [n for n in listing if n.endswith("/modules.dep")]
    assert dep and any(n.endswith("/virtio_net.ko") for n in listing)
    assert any(n.endswith("/virtio_pci.ko") for n in listing)
    assert os.path.getsize(os.path.join(out, "vmlinuz")) > 1 << 20


def _sh(*argv, check=True):
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError("%s: %s" % (" ".join(argv), result.stderr.strip()))
    return result.stdout


def _in_ns(ns, code, timeout=20):
    """Run Python ``code`` in network namespace ``ns`` (the guest is only reachable from there)."""
    result = subprocess.run(["nsenter", "--net=/run/netns/" + ns, sys.executable, "-c", code], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _guest(ns, ip, command):
    return _in_ns(ns, "import sys; from workloads import guestctl; "
                      "sys.stdout.write(guestctl.guest_command(%r, %r))" % (ip, command))


def _contiguous(seqs, first, last, upto=None):
    """What is wrong with ``seqs`` as first..last each once, plus maybe the next ones up to ``upto`` (a sender
    frozen between sending and recording that it sent): a list of problems, empty if none."""
    upto = max(last, upto or last)
    missing = sorted(set(range(first, last + 1)) - set(seqs))
    duplicates = sorted({s for s in seqs if seqs.count(s) > 1})
    beyond = sorted(s for s in set(seqs) if not first <= s <= upto)
    if missing or duplicates or beyond:
        return ["want %d..%d: missing %s, duplicates %s, beyond %s" % (
            first, last, missing[:10], duplicates[:10], beyond[:10])]
    return []


# A stand-in TCP peer for a seqstream.py without TCP (run in the namespace): it connects to the guest's
# port 47001 and writes one VTCP record per tick for ``seconds``, accepts the guest's stream and reads it
# until SIGTERM, then prints how many records it sent and the seqs it received.
TCP_PEER = r"""
import select, signal, socket, struct, sys, time
me, guest, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
REC = struct.Struct("!4sHHQ")
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); lst.bind((me, 47001)); lst.listen(4)
out = socket.create_connection((guest, 47001), timeout=5)
got, parts, sent, end = [], {}, 0, time.monotonic() + seconds
while not stop:
    if time.monotonic() < end:
        sent += 1
        out.sendall(REC.pack(b"VTCP", 1, 2, sent))
    for s in select.select([lst] + list(parts), [], [], 1.0 / rate)[0]:
        if s is lst:
            parts[lst.accept()[0]] = b""
            continue
        data = parts[s] + s.recv(65536)
        n = len(data) - len(data) % 16
        got += [REC.unpack_from(data, i)[3] for i in range(0, n, 16) if data[i:i + 4] == b"VTCP"]
        parts[s] = data[n:]
print(sent); print(" ".join(map(str, got)))
"""


def test_guest_boots_pings_and_exchanges_with_seqstream(vm_ready):
    import libvirt
    _text, build_s = build()
    tag = uuid.uuid4().hex[:6]
    bridge, tap, veth, ns = "vgb" + tag, "vgt" + tag, "vgv" + tag, "vgns-" + tag
    domain_name = "violin-gtest-" + tag
    net = "10.%d.%d" % (random.randint(100, 250), random.randint(0, 250))
    host_ip, guest_ip = net + ".1", net + ".2"
    mac = "52:54:00:%s:%s:%s" % (tag[0:2], tag[2:4], tag[4:6])
    workdir = tempfile.mkdtemp(prefix="violin-gtest-")
    os.chmod(workdir, 0o755)
    run = ["vseq", "--id", "2", "--bind", guest_ip, "--peers", "1=%s" % host_ip, "--rate", "%g" % RATE]
    guest = vms.Guest(domain_name, guest_ip + "/24", mac, bridge, run, tap=tap)
    os.makedirs(vms.RUN_DIR, mode=0o755, exist_ok=True)
    console = guest.console_log
    xml = vms.domain_xml(guest, GUEST_DIR)

    conn = libvirt.open(URI)
    member = stand_in = None
    with open(seqstream.__file__, "rb") as handle:
        source = handle.read()
    # seqstream.py speaks TCP too (VTCP records) unless it predates that; VIOLIN_TEST_TCP_STAND_IN=1 forces
    # the stand-in peer anyway.
    tcp_in_python = b"VTCP" in source and not os.environ.get("VIOLIN_TEST_TCP_STAND_IN")

    def console_text():
        try:
            with open(console, errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    stack = contextlib.ExitStack()
    try:
        # A plain learning switch with the guest's tap and a namespace's veth.
        _sh("ovs-vsctl", "add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=netdev",
            "fail_mode=standalone")
        _sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        _sh("ip", "link", "set", tap, "up")
        _sh("ovs-vsctl", "add-port", bridge, tap)
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "link", "set", veth, "up")
        _sh("ovs-vsctl", "add-port", bridge, veth)
        for cmd in (["ip", "addr", "add", host_ip + "/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                    ["ip", "link", "set", "lo", "up"], ["ethtool", "-K", "eth0", "tx", "off"]):
            _sh("ip", "netns", "exec", ns, *cmd)  # tx off: TCP over the userspace datapath needs it

        dom = conn.defineXML(xml)
        started = time.monotonic()
        dom.create()
        # One ping a time: ping -c1 -w N gives up early once ARP fails ("+N errors").
        while subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W0.5", guest_ip],
                             capture_output=True).returncode != 0:
            assert time.monotonic() - started < 120, "no ping reply in 120 s; console:\n" + console_text()[-3000:]
        ping_s = time.monotonic() - started
        ready = "violin-guest: ready ip=%s/24" % guest_ip
        deadline = time.monotonic() + 10  # the guest can answer a ping before its /init logs "ready"
        while ready not in console_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready in console_text()
        print("build %.2f s; ping reply %.1f s after start" % (build_s, ping_s))

        # Member 1 (Python) in the namespace; member 2 (vseq) has been running in the guest since boot.
        progress, log = os.path.join(workdir, "m1.progress"), os.path.join(workdir, "m1.log")
        python_out = stack.enter_context(open(os.path.join(workdir, "m1.out"), "w"))
        argv = [sys.executable, os.path.join(REPO, "workloads", "seqstream.py"), "--id", "1", "--bind", host_ip,
                "--peers", "2=" + guest_ip, "--rate", str(RATE), "--progress", progress, "--log", log]
        if not tcp_in_python and b"--no-tcp" in source:
            argv.append("--no-tcp")  # TCP from the stand-in peer
        member = subprocess.Popen(["nsenter", "--net=/run/netns/" + ns] + argv, stdout=python_out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        if not tcp_in_python:
            stand_in = subprocess.Popen(["nsenter", "--net=/run/netns/" + ns, sys.executable, "-c", TCP_PEER,
                                         host_ip, guest_ip, str(RATE), str(EXCHANGE_S)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        time.sleep(EXCHANGE_S)

        # Quiesce: the guest stops sending, the Python member is frozen; let what is in flight land.
        assert _guest(ns, guest_ip, "STOP") == "OK\n"
        assert _guest(ns, guest_ip, "HELLO") == "ERR\n"
        os.kill(member.pid, signal.SIGSTOP)
        time.sleep(1.0)
        state = guestctl.load_guest_state(_guest(ns, guest_ip, "DUMP"))
        py_udp = seqstream.read_progress(progress, [2])[2]
        py_tcp = seqstream.read_progress(progress, [2], tcp=True).get(2) if tcp_in_python else None
        os.kill(member.pid, signal.SIGCONT)
        time.sleep(0.5)  # it reads what the guest sent before it was frozen
        member.send_signal(signal.SIGTERM)
        member.wait(timeout=10)
        if stand_in is not None:
            stand_in.send_signal(signal.SIGTERM)
            stand_out, stand_err = stand_in.communicate(timeout=10)
            assert stand_in.returncode == 0, stand_err

        assert state["id"] == 2 and state["peers"] == [1]
        udp_about, udp_last, tcp_about, tcp_last = state["progress"][1]
        assert udp_about == udp_last > RATE * EXCHANGE_S / 2
        assert tcp_last > RATE * EXCHANGE_S / 2 and tcp_about - tcp_last in (0, 1)
        problems = []
        # The guest got the Python member's datagrams from the first that arrived up to its last, once each,
        got = [seq for proto, sender, seq, _t in state["log"] if proto == "u" and sender == 1]
        assert len(got) > RATE * EXCHANGE_S / 2, "guest got %d datagrams" % len(got)
        problems += ["guest UDP: " + p for p in _contiguous(got, min(got), py_udp[1], py_udp[0])]
        # and its TCP records 1.. (all of them: the sender's kernel took them a second ago).
        got_tcp = [seq for proto, sender, seq, _t in state["log"] if proto == "t" and sender == 1]
        if tcp_in_python:
            problems += ["guest TCP: " + p for p in _contiguous(got_tcp, 1, py_tcp[1], py_tcp[0])]
        else:
            sent, received = (stand_out.splitlines() + ["", ""])[:2]
            problems += ["guest TCP: " + p for p in _contiguous(got_tcp, 1, int(sent))]
            problems += ["stand-in TCP: " + p for p in _contiguous([int(s) for s in received.split()], 1, tcp_last)]
        # The Python member's log holds the guest's datagrams (and records) up to the guest's progress.
        mine = [seq for sender, seq, _t in seqstream.parse_log(log) if sender == 2]
        assert mine, "the Python member got nothing from the guest"
        problems += ["python UDP: " + p for p in _contiguous(mine, min(mine), udp_last)]
        if tcp_in_python:
            mine_tcp = [seq for sender, seq, _t in seqstream.parse_log(log, tcp=True) if sender == 2]
            problems += ["python TCP: " + p for p in _contiguous(mine_tcp, 1, tcp_last)]
        assert not problems, "\n".join(problems)
        # STOP holds: the guest's progress does not move any more.
        assert guestctl.load_guest_state(_guest(ns, guest_ip, "DUMP"))["progress"] == state["progress"]
    except BaseException:
        print("---- guest console ----\n" + console_text()[-4000:])
        raise
    finally:
        for process in (member, stand_in):
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
                process.wait()
        try:
            dom = conn.lookupByName(domain_name)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
        conn.close()
        stack.close()
        subprocess.run(["ovs-vsctl", "--if-exists", "del-br", bridge], capture_output=True)
        subprocess.run(["ip", "link", "del", tap], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
        if os.path.exists(console):
            os.unlink(console)
