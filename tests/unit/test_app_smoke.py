"""The RyuApp shim: build it, feed every handler a fake event, serialize what it sends.

Like Faucet's test_valveapp_smoke: no switch and no sockets; the datapath is a
stand-in that records messages, and every message is serialized to OpenFlow
bytes to prove the translation from ``violin_core.of`` is well-formed.
"""

import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

violin_snapshot = pytest.importorskip("violin_snapshot")

from ryu.app.wsgi import WSGIApplication  # noqa: E402
from ryu.ofproto import ofproto_v1_3, ofproto_v1_3_parser  # noqa: E402
from webob import Request, Response  # noqa: E402

from violin_core import of  # noqa: E402
from violin_core.packets import build_probe  # noqa: E402


OFPT_NAMES = {ofproto_v1_3.OFPT_FLOW_MOD: "OFPFlowMod", ofproto_v1_3.OFPT_PACKET_OUT: "OFPPacketOut",
              ofproto_v1_3.OFPT_BARRIER_REQUEST: "OFPBarrierRequest"}


class FakeDatapath:
    ofproto = ofproto_v1_3
    ofproto_parser = ofproto_v1_3_parser

    def __init__(self, dpid):
        self.id = dpid
        self.sent = []  # every message, in order: a parser message (send_msg) or a Wire (send)
        self.writes = []  # what each send() was given
        self.xid = 0

    def set_xid(self, msg):
        self.xid += 1
        msg.set_xid(self.xid)

    def send_msg(self, msg):
        msg.serialize()  # raises if the translation produced something invalid
        self.sent.append(msg)

    def send(self, buf):
        """The framework's raw write: split it into OpenFlow messages; flow-mods are parsed back."""
        self.writes.append(buf)
        while buf:
            version, kind, length, xid = struct.unpack_from("!BBHI", buf)
            assert version == ofproto_v1_3.OFP_VERSION and 8 <= length <= len(buf), (version, length, len(buf))
            parsed = ofproto_v1_3_parser.OFPFlowMod.parser(self, version, kind, length, xid, buf[:length]) \
                if kind == ofproto_v1_3.OFPT_FLOW_MOD else None
            self.sent.append(Wire(OFPT_NAMES.get(kind, str(kind)), xid, bytes(buf[:length]), parsed))
            buf = buf[length:]


@dataclass
class Wire:
    name: str
    xid: int
    data: bytes
    parsed: object  # the OFPFlowMod, parsed back; None for other messages


def kind(message):
    return message.name if isinstance(message, Wire) else type(message).__name__


def port(no, name, down=False):
    return SimpleNamespace(port_no=no, name=name.encode(), state=1 if down else 0, config=0)


@pytest.fixture
def app(monkeypatch, tmp_path):
    monkeypatch.setenv("VIOLIN_API_TOKEN", "t")
    config = tmp_path / "violin.json"
    config.write_text(json.dumps({"state": {"directory": str(tmp_path / "state")}}))
    monkeypatch.setenv("VIOLIN_CONFIG", str(config))
    wsgi = WSGIApplication()
    instance = violin_snapshot.ViolinSnapshot(wsgi=wsgi)
    yield instance, wsgi
    for thread in instance.threads:
        thread.kill()


def connect(instance, dpid, ports):
    datapath = FakeDatapath(dpid)
    instance._switch_features(SimpleNamespace(msg=SimpleNamespace(datapath=datapath)))
    reply = SimpleNamespace(datapath=datapath, body=ports, flags=0)
    instance._port_desc_reply(SimpleNamespace(msg=reply))
    return datapath


def test_every_handler_runs_and_sends_valid_openflow(app):
    instance, wsgi = app
    dp1 = connect(instance, 1, [port(1, "s1-eth1"), port(2, "s1-eth2"), port(ofproto_v1_3.OFPP_LOCAL, "s1")])
    dp2 = connect(instance, 2, [port(1, "s2-eth1"), port(2, "s2-eth2")])
    kinds = {kind(m) for m in dp1.sent}
    assert {"OFPPortDescStatsRequest", "OFPFlowMod", "OFPPacketOut"} <= kinds
    # A probe from s1 port 2 arriving at s2 port 2: a link.
    instance._packet_in(SimpleNamespace(msg=SimpleNamespace(
        datapath=dp2, match={"in_port": 2}, data=build_probe(instance.core.fabric.nonce, 1, 2),
        cookie=violin_snapshot.COOKIE_APP | of.ROLE_PROBE)))
    assert instance.core.fabric.is_trunk(2, 2) and instance.core.fabric.is_trunk(1, 2)
    # A host frame (ports settle after the settle time: move the core's clock on).
    start = instance.core.clock()
    instance.core.clock = lambda: start + 10
    instance.send(instance.core.tick())
    frame = bytes.fromhex("ffffffffffff0000000000aa0806") + b"\0" * 46
    instance._packet_in(SimpleNamespace(msg=SimpleNamespace(datapath=dp1, match={"in_port": 1}, data=frame,
                                                            cookie=violin_snapshot.COOKIE_APP | of.ROLE_LEARN)))
    assert "00:00:00:00:00:aa" in instance.core.fabric.hosts
    assert kind(dp1.sent[-1]) == "OFPPacketOut"
    # Port down, an error message, a disconnect.
    status = SimpleNamespace(datapath=dp1, reason=ofproto_v1_3.OFPPR_MODIFY, desc=port(1, "s1-eth1", down=True))
    instance._port_status(SimpleNamespace(msg=status))
    assert "00:00:00:00:00:aa" not in instance.core.fabric.hosts
    instance._error(SimpleNamespace(msg=SimpleNamespace(datapath=dp1, type=4, code=9, data=b"\0" * 8)))
    assert instance.core.health()["switch_errors"] == 1
    instance._switch_gone(SimpleNamespace(datapath=dp2))
    assert 2 not in instance.core.fabric.switches


def test_rest_is_mounted_under_violin_in_ryus_wsgi(app):
    _, wsgi = app
    response = Request.blank("/violin/health").get_response(wsgi)
    assert response.status_int == 200 and json.loads(response.text)["app"] == "violin_snapshot"
    assert Request.blank("/violin/nothing").get_response(wsgi).status_int == 404


@pytest.mark.parametrize("path", ["/violin/members/a%0Ab", "/violin/snapshots/%0A/abort", "/violin/x%0D%0A",
                                  "/violin/members/a%2Fb", "/violin/members/%00"])
def test_every_violin_path_answers_the_cores_json_even_with_a_newline(app, path):
    """Ryu's route pattern once had ".": a decoded %0A fell through to Ryu's HTML 404 (found by fuzzing)."""
    _, wsgi = app
    response = Request.blank(path, method="POST").get_response(wsgi)
    assert response.content_type == "application/json" and json.loads(response.text)["error"], path


def test_rest_binds_loopback_by_default():
    from ryu import cfg
    assert cfg.CONF.wsapi_host == "127.0.0.1"


def test_translation_covers_every_message_kind():
    datapath = FakeDatapath(7)
    entry = of.FlowEntry(2, 500, of.match(eth_dst="00:00:00:00:00:01", vlan_vid=(0x1000, 0x1000)),
                         (of.PopVlan(), of.PushVlan(), of.SetField("vlan_vid", 0x1F00), of.Output(3)), goto=3)
    for message in (of.add_flow(7, entry), of.delete_flow(7, entry), of.delete_all_flows(7), of.Barrier(7),
                    of.PacketOut(7, 1, (of.Output(of.OFPP_TABLE),), b"\0" * 60)):
        datapath.send_msg(violin_snapshot.to_ofp(datapath, message))
    assert len(datapath.sent) == 5


def test_the_learned_colour_translates_to_open_vswitch_learn_and_resubmit(tmp_path):
    """The asynchronous cut's flows in Nicira actions; decoded by ``ovs-ofctl ofp-parse`` where it is."""
    datapath = FakeDatapath(7)
    marker = of.FlowEntry(0, 1001, of.match(in_port=3, eth_type=0x88B5), (
        of.SetField("reg0", 3), of.LearnVid(4, 100, 0x65, of.ROLE_LEARNED), of.Output(of.OFPP_CONTROLLER), of.Output(of.OFPP_IN_PORT)),
        role=of.ROLE_MARKER)
    ingress = of.FlowEntry(0, 510, of.match(in_port=3, eth_src="00:00:00:00:00:01"), (
        of.PushVlan(), of.SetField("vlan_vid", 0x1064), of.SetField("reg0", 3), of.Resubmit(4)), goto=1)
    learned = of.FlowEntry(4, 100, of.match(in_port=3), role=of.ROLE_LEARNED, learned=True)
    encoded = b"".join(violin_snapshot.wire(datapath, message) for message in (
        of.add_flow(7, marker), of.add_flow(7, ingress), of.delete_covered_flows(7, learned)))
    if shutil.which("ovs-ofctl") is None:
        pytest.skip("no ovs-ofctl to decode the flow-mods with")
    wire = tmp_path / "flow-mods.bin"
    wire.write_bytes(encoded)  # the bytes the app writes to the switch
    text = subprocess.run(["ovs-ofctl", "ofp-parse", str(wire)], capture_output=True, text=True, check=True).stdout
    assert "set_field:0x3->reg0,learn(table=4,priority=100,cookie=0x76696f6c00000008,OXM_OF_IN_PORT[],NXM_NX_REG0[]," \
        "load:0x65->OXM_OF_VLAN_VID[]),CONTROLLER:65535,IN_PORT" in text, text
    assert "set_field:4196->vlan_vid,set_field:0x3->reg0,resubmit(,4),goto_table:1" in text, text
    assert "DEL table:4 in_port=3 cookie:0x76696f6c00000008/0xffffffffffffffff" in text, text


def test_paths_no_app_serves_answer_json_and_other_apps_keep_theirs(app):
    """Under Ryu's WSGI a path outside /violin got Ryu's text 404; the catch-all route, connected after
    every app registered, answers the core's JSON 404 and leaves the routes of other apps alone."""
    from ryu.app.wsgi import ControllerBase, route

    class Other(ControllerBase):
        @route("other", "/stats/switches", methods=["GET"])
        def switches(self, req, **_kwargs):
            return Response(json_body=[1])

    instance, wsgi = app
    wsgi.register(Other)  # an app loaded after ours (e.g. ofctl_rest) registers while apps are built
    Request.blank("/violin/health").get_response(wsgi)  # Routes compiled its patterns already
    instance.answer_json_elsewhere(wsgi)
    for path in ("/", "/nothing", "/stats/x%0Ay"):
        response = Request.blank(path, method="PUT").get_response(wsgi)
        assert response.status_int == 404 and response.content_type == "application/json", path
        assert "no such resource" in json.loads(response.text)["reason"]
    assert Request.blank("/stats/switches").get_response(wsgi).json_body == [1]
    assert Request.blank("/violin/health").get_response(wsgi).status_int == 200


def test_messages_go_out_in_one_write_per_switch_in_order_with_their_own_xids(app):
    """A flip's flow-mods in one write per switch (the framework's queue holds 16 messages), each
    flow-mod encoded once and sent again with a fresh xid: the same bytes the parser makes."""
    instance, _ = app
    dp1, dp2 = FakeDatapath(1), FakeDatapath(2)
    instance.datapaths.update({1: dp1, 2: dp2})
    entries = [of.FlowEntry(2, 510, of.match(eth_dst="02:00:00:00:00:%02x" % n, vlan_vid=0x1065),
                            (of.Output(of.OFPP_CONTROLLER),), role=of.ROLE_RECORD) for n in range(40)]
    messages = [of.add_flow(1, e) for e in entries] + [of.PacketOut(1, 3, (of.Output(4),), b"\x01" * 60)] + \
        [of.delete_flow(2, e) for e in entries[:3]] + [of.Barrier(1), of.delete_flow(1, entries[0])]
    for _round in range(2):  # the second time every flow-mod comes from the cache
        dp1.sent.clear(), dp1.writes.clear(), dp2.sent.clear(), dp2.writes.clear()
        instance.send(messages + [of.add_flow(9, entries[0])])  # (no switch 9: skipped)
        assert len(dp1.writes) == 1 and len(dp2.writes) == 1
        assert [kind(m) for m in dp1.sent] == ["OFPFlowMod"] * 40 + ["OFPPacketOut", "OFPBarrierRequest", "OFPFlowMod"]
        xids = [m.xid for m in dp1.sent]
        assert xids == sorted(set(xids)) and xids[-1] == dp1.xid
        for sent, message in zip(dp1.sent, [m for m in messages if m.dpid == 1]):
            reference = violin_snapshot.to_ofp(FakeDatapath(1), message)
            reference.set_xid(sent.xid)
            reference.serialize()
            assert sent.data == bytes(reference.buf)
        mods = [m.parsed for m in dp1.sent[:40]]
        assert [m.match["eth_dst"] for m in mods] == ["02:00:00:00:00:%02x" % n for n in range(40)]
        assert dp1.sent[-1].parsed.command == ofproto_v1_3.OFPFC_DELETE_STRICT
        assert [m.parsed.command for m in dp2.sent] == [ofproto_v1_3.OFPFC_DELETE_STRICT] * 3


def test_a_large_burst_goes_out_in_bounded_writes_in_order(app):
    """Thousands of released frames: writes of at most WRITE_BYTES, every message once, in order."""
    instance, _ = app
    datapath = FakeDatapath(1)
    instance.datapaths[1] = datapath
    frames = [of.PacketOut(1, 3, (of.Output(4),), bytes([n % 256]) * 200) for n in range(2000)]
    instance.send(frames)
    assert len(datapath.writes) > 1 and max(map(len, datapath.writes)) <= violin_snapshot.WRITE_BYTES
    assert [m.data[-1] for m in datapath.sent] == [n % 256 for n in range(2000)]
    assert [m.xid for m in datapath.sent] == list(range(1, 2001))
