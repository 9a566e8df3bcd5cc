"""Restore with a different placement: a CRIU member comes back on another host (its own helper),
with its MAC and address moved there; the slice's streams stay consistent across the move."""

import json
import os
import signal
import sys
import time

from workloads import oracle
from lab import lab, slicelab
from violin_client.api import wait_until_done
from topologies.lan import LanTopo


def test_a_member_is_restored_on_a_spare_host_and_the_slice_stays_consistent(slice_controller, tmp_path):
    controller = slice_controller
    with lab.network(LanTopo(4, prefix=lab.run_prefix()), controller) as net:
        h1, h2, h3, spare = net.hosts
        with slicelab.helped_slice(controller, net, str(tmp_path), rate=150, hosts=[h1, h2, h3]) as members:
            # A second helper on the spare host, which can host h3 there: h3's image, the spare's namespace.
            # Named as users know it (the spare Mininet host, h3's command line); h3's MAC and address come
            # with its image. It does not run there yet, so this helper does not register it.
            port = lab.free_port()
            spare_url = "http://127.0.0.1:%d" % port
            config = {"listen": "127.0.0.1:%d" % port, "token": slicelab.HELPER_TOKEN,
                      "controller_token": controller.token, "servers": [members.server_url],
                      "server_token": slicelab.SERVER_TOKEN, "work_dir": str(tmp_path / "spare-helper"),
                      "controller": controller.url, "host_name": "spare",
                      "members": {h3.name: slicelab.criu_member(spare, members.member_dir(h3))}}
            (tmp_path / "spare.json").write_text(json.dumps(config))
            spare_helper = slicelab.start_daemon([sys.executable, "-m", "hostside.helper", "--config",
                                                  str(tmp_path / "spare.json")], spare_url,
                                                 str(tmp_path / "spare-helper.log"))
            try:
                time.sleep(0.6)
                assert controller.get("/violin/members/%s" % h3.name)[1]["helper_url"] == members.helper_url
                status, snap = controller.request("POST", "/violin/snapshots", {"label": "before-move"})
                assert status == 202, snap
                view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"])
                assert view["state"] == "complete", (view.get("reason"), view["members"])
                time.sleep(0.3)
                status, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap["id"],
                                                 {"placement": {h3.name: spare_url}})
                assert status == 202, job
                job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"])
                assert job["state"] == "complete", (job["reason"], job["members"], (tmp_path / "spare-helper.log").read_text()[-2000:])
                assert job["members"][h3.name]["previous"] == "stopped"
                # h3's process now lives in the spare host's namespace, behind the spare's port.
                pid = members.pids[h3.name]
                assert os.readlink("/proc/%d/ns/net" % pid) == os.readlink("/proc/%d/ns/net" % spare.pid)
                assert spare.cmd("cat /sys/class/net/%s/address" % spare.defaultIntf()).strip() == h3.MAC()
                status, member = controller.get("/violin/members/%s" % h3.name)
                assert member["helper_url"] == spare_url and member["located"], member
                # ... and the spare's helper has registered it as its own since (its host name)
                deadline = time.monotonic() + 10
                while controller.get("/violin/members/%s" % h3.name)[1]["host"] != "spare":
                    assert time.monotonic() < deadline, controller.get("/violin/members/%s" % h3.name)
                    time.sleep(0.1)
                assert member["attachment"][0]["port"] == spare.defaultIntf().link.intf2.node.ports[
                    spare.defaultIntf().link.intf2]
                # It keeps talking, and a later snapshot+restore goes through its new helper.
                time.sleep(0.5)
                status, snap2 = controller.request("POST", "/violin/snapshots", {"label": "after-move"})
                view2 = wait_until_done(controller.api, "/violin/snapshots/%s" % snap2["id"])
                assert view2["state"] == "complete", (view2.get("reason"), view2["members"])
                status, job2 = controller.request("POST", "/violin/snapshots/%s/restore" % snap2["id"], {})
                job2 = wait_until_done(controller.api, "/violin/restores/%s" % job2["id"])
                assert job2["state"] == "complete", job2
                assert job2["members"][h3.name]["helper"] == spare_url
                time.sleep(0.8)
                for h in (h1, h2, h3):
                    os.kill(members.pids[h.name], signal.SIGTERM)
                time.sleep(0.3)
            finally:
                slicelab.stop_daemon(spare_helper)
        result = oracle.load([members.member_dir(h) for h in (h1, h2, h3)], margin=75)
    assert result["consistent"], (result["totals"], {k: v for k, v in result["streams"].items()
                                                     if v["gaps"] or v["duplicates"]})
