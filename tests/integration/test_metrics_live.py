"""Prometheus metrics end to end: the controller's ``/violin/metrics``, the helper's and the snapshot
server's ``/metrics`` scraped (no token) during and after a real snapshot of CRIU members through
violin-helper, and after a restore of it."""

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from lab import lab, slicelab
from topologies.lan import LanTopo
from violin_client.api import wait_until_done

EXPOSITION = "text/plain; version=0.0.4"


def scrape(url):
    """{(sample name, sorted labels): value} of one scrape; checks the content type."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200 and answer.headers["Content-Type"].startswith(EXPOSITION), answer.headers
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_of_controller_helper_and_server_during_and_after_a_snapshot(slice_controller, tmp_path):
    controller = slice_controller
    with lab.network(LanTopo(3, prefix=lab.run_prefix()), controller) as net:
        with slicelab.helped_slice(controller, net, str(tmp_path)) as members:
            urls = {"controller": controller.url + "/violin/metrics", "helper": members.helper_url + "/metrics",
                    "server": members.server_url + "/metrics"}
            before = scrape(urls["controller"])
            assert sample(before, "violin_switches_connected") == 1
            assert sample(before, "violin_snapshots_running") == 0
            assert sample(before, "violin_packet_ins_total", role="learn") >= 3
            time.sleep(0.8)
            status, snap = controller.request("POST", "/violin/snapshots", {"label": "metrics"})
            assert status == 202, snap
            during = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                now, helper_now = scrape(urls["controller"]), scrape(urls["helper"])
                scrape(urls["server"])
                _, view = controller.request("GET", "/violin/snapshots/%s" % snap["id"])
                if view["state"] != "running":
                    break
                # Still running after the scrape, so running when scraped.
                assert sample(now, "violin_snapshots_running") == 1, now
                assert sample(now, "violin_snapshots_total", state="complete") == 0
                assert (sample(helper_now, "violin_helper_snapshots_total", backend="criu", result="done")
                        or 0) <= len(view["members"])
                during += 1
                time.sleep(0.02)
            assert view["state"] == "complete", (view, open(members.helper_log).read()[-2000:])
            assert during >= 1, "no scrape while the snapshot ran"

            after, helper, server = (scrape(urls[k]) for k in ("controller", "helper", "server"))
            names = [m["name"] for m in view["members"]]
            assert sample(after, "violin_snapshots_total", state="complete") == 1
            assert sample(after, "violin_snapshots_total", state="aborted") == 0
            assert sample(after, "violin_snapshots_running") == 0
            assert sample(after, "violin_snapshot_duration_seconds_count", state="complete") == 1
            assert 0 < sample(after, "violin_snapshot_duration_seconds_sum", state="complete") < 60
            for entry in view["members"]:
                name = entry["name"]
                assert sample(after, "violin_member_pause_seconds_count", member=name) == 1
                assert abs(sample(after, "violin_member_pause_seconds_sum", member=name)
                           - entry["pause_ms"] / 1000) < 1e-6
                assert sample(after, "violin_member_flip_seconds_count", member=name) == 1
                assert abs(sample(after, "violin_member_flip_seconds_sum", member=name)
                           - entry["flip_ms"] / 1000) < 1e-5
            assert sample(after, "violin_packet_ins_total", role="marker") >= len(names)  # one marker each
            for action in ("held", "released", "recorded", "dropped"):
                assert sample(after, "violin_snapshot_frames_total", action=action) == view["counts"][action]
            assert sample(after, "violin_snapshot_channel_bytes_total") == view["counts"]["recorded_bytes"]

            assert sample(helper, "violin_helper_snapshots_total", backend="criu", result="done") == len(names)
            assert sample(helper, "violin_helper_snapshots_total", backend="criu", result="failed") is None
            assert sample(helper, "violin_helper_pause_seconds_count", backend="criu") == len(names)
            assert sample(helper, "violin_helper_snapshot_duration_seconds_count", backend="criu") == len(names)
            assert sample(helper, "violin_helper_stored_bytes_total", backend="criu") == sum(
                m["bytes"] for m in view["members"])
            files = [f for m in view["members"] for f in m["image"]["files"]]
            assert sample(server, "violin_server_uploads_total", result="stored") == len(files)
            assert sample(server, "violin_server_stored_files_total") == len(files)
            assert sample(server, "violin_server_stored_bytes_total") == sum(f["bytes"] for f in files)
            assert sample(server, "violin_server_uploads_total", result="checksum_mismatch") == 0

            status, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap["id"], {})
            assert status == 202, job
            job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"])
            assert job["state"] == "complete", (job, open(members.helper_log).read()[-2000:])
            restored = scrape(urls["controller"])
            assert sample(restored, "violin_restores_total", state="complete") == 1
            assert sample(restored, "violin_restores_running") == 0
            assert sample(restored, "violin_restore_duration_seconds_count", state="complete") == 1
            assert sample(restored, "violin_switches_connected") == 1
