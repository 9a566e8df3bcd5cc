"""End to end on the host side: the controller asks violin-helper, which live-dumps CRIU members
(cut while frozen), streams their images to violin-snapshot-server, and reports done; then the
whole slice is restored from the snapshot, twice."""

import time

from hostside.store.client import ImageServer
from lab import lab, slicelab
from violin_client.api import wait_until_done
from topologies.lan import LanTopo


def test_snapshot_through_the_helper_then_restore_the_slice_twice(slice_controller, tmp_path):
    controller = slice_controller
    with lab.network(LanTopo(3, prefix=lab.run_prefix()), controller) as net:
        # The lab's server keeps chunks (chunks:DIR); this test keeps the plain file store covered.
        with slicelab.helped_slice(controller, net, str(tmp_path), store="file") as members:
            time.sleep(0.8)
            status, snap = controller.request("POST", "/violin/snapshots", {"label": "criu"})
            assert status == 202, snap
            view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"])
            assert view["state"] == "complete", (view, open(members.helper_log).read()[-2000:])
            client = ImageServer(members.server_url, slicelab.SERVER_TOKEN)
            for entry in view["members"]:
                assert entry["state"] == "done" and entry["marker"] and entry["pause_ms"] > 0
                assert entry["image"]["cut"] == "in-band"  # off the frozen path, flipped by a frame on its link
                assert entry["held_ms"] is not None and entry["flip_ms"] is not None
                assert entry["server"] == members.server_url and entry["image"]["files"]
                index = client.index(snap["id"], entry["name"])
                assert {f["sha256"] for f in index["files"]} == {f["sha256"] for f in entry["image"]["files"]}
            # The slice runs on, then every member is brought back from the snapshot.
            time.sleep(1.0)
            before = {h.name: members.progress(h) for h in net.hosts}
            status, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap["id"], {})
            assert status == 202, job
            job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"])
            assert job["state"] == "complete", (job, open(members.helper_log).read()[-2000:])
            assert job["reinjected_frames"] == (view.get("channel") or {}).get("frames", 0)
            time.sleep(0.5)
            after = {h.name: members.progress(h) for h in net.hosts}
            for h in net.hosts:
                assert members.alive(h), h.name
                peer = next(iter(after[h.name]))
                # Back at the snapshot's sequence numbers (below where it was), and running again.
                assert after[h.name][peer][1] < before[h.name][peer][1]
            time.sleep(0.3)
            assert all(members.progress(h) != after[h.name] for h in net.hosts)
            # A second restore of the same snapshot (replicas of one experiment) works too.
            status, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap["id"], {})
            assert status == 202, job
            assert wait_until_done(controller.api, "/violin/restores/%s" % job["id"])["state"] == "complete"
