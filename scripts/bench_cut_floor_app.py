"""The floor of an in-band cut on this switch: a Ryu app that does nothing but answer each cut request
frame at once with two flow-mods and a barrier (``bench_cut.py --scale``'s arm ``floor``).

Every switch gets one rule: cut request (and marker) frames go to the controller and back down their
link, as violin_snapshot's marker rule sends them, without its ``learn``. For each cut request the app
sends, right in its packet-in handler, what any flip of one member must at least send: an egress rule
for the member (added) and its hold rule (deleted; the member's marker added it, as a prepare would),
then a barrier. No flow-table pass, no batching, no REST. It appends one JSON line per packet-in and per barrier reply (wall clock) to ``$VIOLIN_FLOOR_LOG``:
the time from the frame's send to its packet-in and to the barrier reply is the switch's own part,
which no controller can take below.
"""

import json
import os
import time

import violin_ryu_compat

violin_ryu_compat.install()

from ryu.base import app_manager  # noqa: E402
from ryu.controller import ofp_event  # noqa: E402
from ryu.controller.handler import CONFIG_DISPATCHER, MAIN_DISPATCHER, set_ev_cls  # noqa: E402
from ryu.ofproto import ofproto_v1_3  # noqa: E402

from violin_core.packets import MARKER_DST, PROBE_ETH_TYPE, parse_cut_request, parse_marker  # noqa: E402

EGRESS_TABLE = 0  # one table: the floor needs no pipeline


class CutFloor(app_manager.RyuApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = open(os.environ["VIOLIN_FLOOR_LOG"], "a", buffering=1)
        self.waiting = {}  # barrier xid -> (snapshot id, member)

    def _write(self, **record):
        self.log.write(json.dumps(record) + "\n")

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def switch_features(self, ev):
        datapath = ev.msg.datapath
        ofp, parser = datapath.ofproto, datapath.ofproto_parser
        match = parser.OFPMatch(eth_type=PROBE_ETH_TYPE, eth_dst=MARKER_DST)
        actions = [parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER),
                   parser.OFPActionOutput(ofp.OFPP_IN_PORT)]
        datapath.send_msg(parser.OFPFlowMod(datapath, table_id=EGRESS_TABLE, priority=1001, match=match,
                                            instructions=[parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS,
                                                                                        actions)]))

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def packet_in(self, ev):
        arrived = time.time()
        msg = ev.msg
        datapath = msg.datapath
        ofp, parser = datapath.ofproto, datapath.ofproto_parser
        request, marker = parse_cut_request(msg.data), parse_marker(msg.data)
        if request is None and marker is None:
            return
        mac, snapshot_id, member = request or marker
        hold = dict(table_id=EGRESS_TABLE, priority=520,
                    match=parser.OFPMatch(eth_dst=mac, vlan_vid=(ofp.OFPVID_PRESENT, ofp.OFPVID_PRESENT)))
        to_controller = [parser.OFPInstructionActions(
            ofp.OFPIT_APPLY_ACTIONS, [parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER)])]
        if marker is not None:  # as a prepare: the member's frames held
            datapath.send_msg(parser.OFPFlowMod(datapath, instructions=to_controller, **hold))
            self._write(snapshot=snapshot_id, member=member, marker=arrived)
            return
        record = parser.OFPMatch(eth_dst=mac, vlan_vid=ofp.OFPVID_PRESENT | 1)
        datapath.send_msg(parser.OFPFlowMod(datapath, table_id=EGRESS_TABLE, priority=510, match=record,
                                            instructions=to_controller))
        datapath.send_msg(parser.OFPFlowMod(datapath, command=ofp.OFPFC_DELETE_STRICT, out_port=ofp.OFPP_ANY,
                                            out_group=ofp.OFPG_ANY, **hold))
        barrier = parser.OFPBarrierRequest(datapath)
        datapath.set_xid(barrier)
        self.waiting[barrier.xid] = (snapshot_id, member)
        datapath.send_msg(barrier)
        self._write(snapshot=snapshot_id, member=member, packet_in=arrived)

    @set_ev_cls(ofp_event.EventOFPBarrierReply, MAIN_DISPATCHER)
    def barrier_reply(self, ev):
        found = self.waiting.pop(ev.msg.xid, None)
        if found is not None:
            self._write(snapshot=found[0], member=found[1], rules=time.time())
