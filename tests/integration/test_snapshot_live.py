"""Snapshots on real OVS with real member processes: the cut, hold/record, completion, abort."""

import json
import os
import random
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from lab import lab
from topologies.lan import LanTopo
from lab.members import ProcessMembers, check_cut, pcap_datagrams, received_fraction
from topologies.ring import RingTopo
from topologies.tree import LineTopo
from violin_client.api import wait_until_done

RAWFRAME = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "rawframe.py")


def register(controller, specs):
    for spec in specs:
        status, body = controller.request("POST", "/violin/members", spec)
        assert status == 201, body


def wait_state(controller, snapshot_id, states=("complete", "aborted"), timeout=15.0):
    return wait_until_done(controller.api, "/violin/snapshots/%s" % snapshot_id, timeout, done_states=states)


def flows_with_role(net, role):
    cookie = "cookie=0x76696f6c%08x" % role
    return sum(s.cmd("ovs-ofctl -O OpenFlow13 dump-flows %s" % s.name).count(cookie) for s in net.switches)


@pytest.mark.parametrize("shape", ["single-switch", "ring-of-4"])
def test_cut_is_consistent_under_load(controller, tmp_path, shape):
    topo = LanTopo(4, prefix=lab.run_prefix()) if shape == "single-switch" else RingTopo(4, prefix=lab.run_prefix())
    with lab.network(topo, controller) as net:
        members = ProcessMembers(net.hosts, str(tmp_path), rate=int(os.environ.get("VIOLIN_TEST_RATE", 400)))
        members.start()
        try:
            time.sleep(1.0)  # every member learned, streams running
            register(controller, members.member_specs())
            status, snap = controller.request("POST", "/violin/snapshots", {"label": shape})
            assert status == 202, snap
            order = list(net.hosts)
            random.shuffle(order)
            for host in order:
                time.sleep(random.uniform(0.05, 0.25))  # traffic crosses the cut in both directions
                members.cut(controller, snap["id"], host)
            view = wait_state(controller, snap["id"])
            assert view["state"] == "complete", view
            counts = view["counts"]
            assert counts["held"] > 0 and counts["recorded"] > 0, counts  # the cut really was crossed
            assert counts["held"] == counts["released"] + counts["late_released"] * 0 and counts["dropped"] == 0
            assert flows_with_role(net, 4) == 0 and flows_with_role(net, 5) == 0  # no hold/record rules left
            # Full rate again after completion.
            before = {h.name: members.progress(h) for h in net.hosts}
            time.sleep(1.0)
            after = {h.name: members.progress(h) for h in net.hosts}
        finally:
            members.stop()
        recorded = pcap_datagrams(os.path.join(controller.workdir, "state", snap["id"], "channel.pcapng"))
        assert view["channel"]["frames"] == counts["recorded"] >= sum(len(v) for v in recorded.values())
        problems = check_cut(members, recorded)
        assert problems == [], "\n".join(problems[:20])
        assert received_fraction(members, before, after) >= 0.98


def test_uncoordinated_snapshots_violate_the_cut(controller, tmp_path):
    """The baseline that proves the checker can fail: each member paused and "snapshotted"
    on its own (no colours, no holding, no recording) gives an inconsistent cut."""
    with lab.network(LanTopo(3, prefix=lab.run_prefix()), controller) as net:
        members = ProcessMembers(net.hosts, str(tmp_path), rate=400)
        members.start()
        try:
            time.sleep(0.8)
            for host in net.hosts:
                time.sleep(0.2)
                members.pause_only(host)
            time.sleep(0.3)
        finally:
            members.stop()
    problems = check_cut(members, {})
    assert any("after its pause but is not recorded" in p for p in problems), problems[:5]
    assert any("before its flip" in p for p in problems), problems[:5]


def test_tagged_and_odd_frames_cross_switches_unchanged_during_a_snapshot(controller):
    with lab.network(LineTopo(3, prefix=lab.run_prefix()), controller) as net:
        net.pingAll(timeout=2)
        sender, receiver = net.hosts[0], net.hosts[-1]
        register(controller, [{"name": h.name, "macs": [h.MAC()], "marker": False} for h in (sender, receiver)])
        _, snap = controller.request("POST", "/violin/snapshots", {})
        sid = snap["id"]
        assert controller.request("POST", "/violin/snapshots/%s/members/%s/cut" % (sid, sender.name))[0] == 200
        listener = receiver.popen(["python3", RAWFRAME, "recv", "--iface", str(receiver.defaultIntf()),
                                   "--src", sender.MAC(), "--count", "6", "--timeout", "15"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)
        sent = []
        for args in ("--vlan 100 --ethertype 0x0800", "--ethertype 0x88b6", "--vlan 7 --ethertype 0x86dd"):
            sent += sender.cmd("python3 %s send --iface %s --src %s --dst %s %s --count 2"
                               % (RAWFRAME, sender.defaultIntf(), sender.MAC(), receiver.MAC(), args)).split()
        time.sleep(0.3)
        _, view = controller.get("/violin/snapshots/%s" % sid)
        assert view["counts"]["held"] >= 6  # post sender, pre receiver: held, none delivered yet
        assert controller.request("POST", "/violin/snapshots/%s/members/%s/cut" % (sid, receiver.name))[0] == 200
        out, err = listener.communicate(timeout=20)
        # Byte-for-byte, each exactly once (their order across kinds of frame is the network's).
        assert sorted(out.decode().split()) == sorted(sent), err.decode()


class _SilentHelper(BaseHTTPRequestHandler):
    """A helper that accepts the snapshot request and then never calls back."""

    requests = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _SilentHelper.requests.append((self.path, json.loads(body)))
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_helper_that_never_calls_back_aborts_and_leaves_traffic_healthy(controller):
    server = HTTPServer(("127.0.0.1", 0), _SilentHelper)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    helper_url = "http://127.0.0.1:%d" % server.server_address[1]
    try:
        with lab.network(LineTopo(2, prefix=lab.run_prefix()), controller) as net:
            assert net.pingAll(timeout=2) == 0.0
            h1, h2 = net.hosts
            register(controller, [{"name": h1.name, "macs": [h1.MAC()], "helper_url": helper_url},
                                  {"name": h2.name, "macs": [h2.MAC()], "marker": False}])
            _, snap = controller.request("POST", "/violin/snapshots", {"timeout_s": 2})
            # h2 is cut (post), h1 never is: h2 -> h1 frames are held until the abort releases them.
            assert controller.request("POST", "/violin/snapshots/%s/members/%s/cut" % (snap["id"], h2.name))[0] == 200
            pinger = h2.popen(["ping", "-c", "1", "-W", "5", h1.IP()], stdout=subprocess.PIPE)
            view = wait_state(controller, snap["id"], timeout=10)
            assert view["state"] == "aborted" and "timed out" in view["reason"] and h1.name in view["reason"]
            assert not view["restorable"]
            assert pinger.wait(10) == 0  # the held echo request was released, not lost
            assert _SilentHelper.requests and _SilentHelper.requests[0][0] == "/snapshot"
            assert flows_with_role(net, 4) == 0 and flows_with_role(net, 5) == 0
            assert net.pingAll(timeout=2) == 0.0
            status, listing = controller.get("/violin/snapshots")
            assert [s["state"] for s in listing["snapshots"]] == ["aborted"]
    finally:
        server.shutdown()
        server.server_close()
