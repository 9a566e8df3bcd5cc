"""Faults on the host side: a clear reason, nothing running harmed, nothing half-restored."""

import os
import time

from hostside.backends import criu
from lab import lab, slicelab
from violin_client.api import wait_until_done
from topologies.lan import LanTopo


def test_unreachable_snapshot_server_aborts_with_the_reason(slice_controller, tmp_path):
    controller = slice_controller
    with lab.network(LanTopo(2, prefix=lab.run_prefix()), controller) as net:
        with slicelab.helped_slice(controller, net, str(tmp_path), servers=["http://127.0.0.1:%d" % lab.free_port()]) \
                as members:
            time.sleep(0.5)
            _, snap = controller.request("POST", "/violin/snapshots", {})
            view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"])
            assert view["state"] == "aborted" and "unreachable" in view["reason"], view
            assert all(slicelab.advancing(members, h) for h in net.hosts)  # the members run on
            assert slicelab.no_cut_rules(net) and net.pingAll(timeout=2) == 0.0


def test_helper_killed_during_a_snapshot(slice_controller, tmp_path):
    controller = slice_controller
    with lab.network(LanTopo(2, prefix=lab.run_prefix()), controller) as net:
        with slicelab.helped_slice(controller, net, str(tmp_path)) as members:
            time.sleep(0.5)
            _, snap = controller.request("POST", "/violin/snapshots", {"timeout_s": 4})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # wait until it is in the middle of the snapshot
                view = controller.get("/violin/snapshots/%s" % snap["id"])[1]
                if any(m["state"] != "pending" for m in view["members"]):
                    break
                time.sleep(0.005)
            members.helper_process.kill()  # gone before it could report everything
            view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=30)
            assert view["state"] == "aborted" and "timed out" in view["reason"], view
            time.sleep(criu.HOOK_TIMEOUT_S + 1)  # a dump the dead helper left behind gives up
            assert all(members.alive(h) and slicelab.advancing(members, h) for h in net.hosts)
            assert slicelab.no_cut_rules(net) and net.pingAll(timeout=2) == 0.0


def test_corrupted_image_fails_the_restore_before_anything_is_stopped(slice_controller, tmp_path):
    controller = slice_controller
    with lab.network(LanTopo(2, prefix=lab.run_prefix()), controller) as net:
        # a file store, whose files can be damaged in place (test_chunk_store_live corrupts a chunk)
        with slicelab.helped_slice(controller, net, str(tmp_path), store="file") as members:
            time.sleep(0.5)
            _, snap = controller.request("POST", "/violin/snapshots", {})
            view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"])
            assert view["state"] == "complete", view
            victim = view["members"][0]
            pages = max(victim["image"]["files"], key=lambda f: f["bytes"])["name"]
            with open(os.path.join(str(tmp_path), "images", snap["id"], victim["name"], pages), "r+b") as handle:
                handle.seek(100)
                handle.write(b"\xff\xfe\xfd")
            pids = dict(members.pids)
            _, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap["id"], {})
            job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"])
            assert job["state"] == "failed" and "corrupt" in job["reason"] and job["phase"] == "staging", job
            assert all(members.alive(h) and slicelab.advancing(members, h) for h in net.hosts)
            assert members.pids == pids and slicelab.no_cut_rules(net) and net.pingAll(timeout=2) == 0.0
