"""A real slice (CRIU members, helper, controller) on a chunk store (``--store chunks:DIR``):
periodic snapshots store and send only what changed, a restore from it is complete, a corrupt chunk
fails the staging naming member, image file and chunk with the running members untouched, and the
verify command reports the damage."""

import json
import os
import subprocess
import sys
import time
import urllib.request

from lab import lab, slicelab
from violin_client.api import wait_until_done
from topologies.lan import LanTopo


def stats(url):
    request = urllib.request.Request(url + "/stats", headers={"Authorization": "Bearer " + slicelab.SERVER_TOKEN})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def snapshot(controller, members, label):
    status, snap = controller.request("POST", "/violin/snapshots", {"label": label})
    assert status == 202, snap
    view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"])
    assert view["state"] == "complete", (view, open(members.helper_log).read()[-2000:])
    return view


def storage(view):
    return {k: sum(e["image"]["storage"][k] for e in view["members"])
            for k in ("logical_bytes", "stored_bytes", "sent_bytes")}


def test_periodic_snapshots_on_a_chunk_store_dedupe_restore_and_refuse_a_corrupt_chunk(slice_controller, tmp_path):
    controller = slice_controller
    with lab.network(LanTopo(3, prefix=lab.run_prefix()), controller) as net:
        # No images kept on the helper: every restore here reads the chunk store (a kept image would
        # be staged from the helper's disk, and the corrupt chunk below never read).
        with slicelab.helped_slice(controller, net, str(tmp_path), helper_settings={"keep_images": 0}) as members:
            time.sleep(0.8)
            views = []
            for index in range(3):
                views.append(snapshot(controller, members, "periodic-%d" % index))
                time.sleep(0.5)
            first, later = storage(views[0]), [storage(v) for v in views[1:]]
            assert first["stored_bytes"] > 0 and first["logical_bytes"] > 0
            for cost in later:  # the members' images barely change between snapshots
                assert cost["stored_bytes"] < first["stored_bytes"] * 0.5, (first, later)
                assert cost["sent_bytes"] < first["sent_bytes"] * 0.5, (first, later)
            totals = stats(members.server_url)
            assert totals["store"] == "chunks" and totals["chunks"] > 0
            assert totals["stored_bytes"] < totals["logical_bytes"]

            # Restore the slice from the middle snapshot: complete, every member back and running.
            status, job = controller.request("POST", "/violin/snapshots/%s/restore" % views[1]["id"], {})
            assert status == 202, job
            job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"])
            assert job["state"] == "complete", (job, open(members.helper_log).read()[-2000:])
            time.sleep(0.5)
            assert all(members.alive(h) for h in net.hosts)

            # Damage one chunk of the newest snapshot's first member: its restore fails at staging,
            # naming the member, the file and the chunk, and the running slice goes on.
            root = os.path.join(str(tmp_path), "images")
            victim = views[2]["members"][0]["name"]
            with open(os.path.join(root, ".manifests", views[2]["id"], victim, "index.json")) as handle:
                entry = json.load(handle)["files"][0]
            cid = entry["chunks"][0][0]
            sys.path.insert(0, os.getcwd())
            from hostside.store import chunking
            # Every stored copy: two members uploading the same chunk at once may each have put it in a
            # pack of its own, and the server reads the one it indexed first.
            packs = os.path.join(root, ".packs")
            copies = [(name, offset, length) for name in sorted(os.listdir(packs)) if name.endswith(".pack")
                      for found, offset, length, _size in chunking.scan_pack(os.path.join(packs, name))
                      if found == cid]
            assert copies, cid
            for name, offset, length in copies:
                with open(os.path.join(packs, name), "r+b") as handle:
                    handle.seek(offset)
                    handle.write(bytes(length))
            before = {h.name: members.progress(h) for h in net.hosts}
            status, job = controller.request("POST", "/violin/snapshots/%s/restore" % views[2]["id"], {})
            assert status == 202, job
            job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"])
            assert job["state"] == "failed", job
            text = json.dumps(job)
            assert cid in text and victim in text and entry["name"] in text, job
            time.sleep(0.5)
            assert all(members.alive(h) and members.progress(h) != before[h.name] for h in net.hosts)

            verify = subprocess.run([sys.executable, "-m", "hostside.store.server", "verify", "--store",
                                     "chunks:" + root], capture_output=True, text=True, timeout=120)
            assert verify.returncode == 1, verify.stderr
            report = json.loads(verify.stdout)
            assert any(d.get("chunk") == cid and d["member"] == victim for d in report["damaged"]), report
