"""Prometheus metrics, each test on a fresh registry: the controller's through a simulated snapshot
(tests/harness.py) and restore, ``GET /violin/metrics`` through the REST app, the helper's through its
orchestration over the fake backend, the snapshot server's over loopback."""

import hashlib
import http.client
import threading
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from webob import Request

import fakebackend
from hostside import helper
from hostside.httpd import listen
from hostside.metrics import HelperMetrics, ServerMetrics
from hostside.store import server as srv
from hostside.store.client import ImageServer
from hostside.store.files import FileStore
from violin_core.errors import Refused
from violin_core.members import parse_member
from violin_core.metrics import ControllerMetrics
from violin_core.routes import build_rest_app
from test_snapshot import A, B, make_harness, send

IMAGE = {"server": "http://srv", "image": {"files": [{"name": "f", "sha256": "x"}]}}


def fresh_controller_metrics():
    return ControllerMetrics(CollectorRegistry())


def test_a_snapshot_counts_frames_while_it_runs_and_its_end_pauses_and_flips(tmp_path):
    metrics = fresh_controller_metrics()
    h = make_harness(tmp_path, metrics=metrics)
    value = metrics.value
    assert value("violin_switches_connected") == 2
    learned = value("violin_packet_ins_total", role="learn")
    assert learned >= 4  # the four hosts' first frames
    sid = h.controller.start_snapshot({})["id"]
    assert value("violin_snapshots_running") == 1
    h.controller.cut(sid, "A")
    send(h, A, B, 1)  # post -> pre: held
    send(h, A, B, 2)
    send(h, B, A, 3)  # pre -> post: recorded
    # While it runs, the frame counters already say so.
    assert value("violin_snapshot_frames_total", action="held") == 2
    assert value("violin_snapshot_frames_total", action="recorded") == 1
    assert value("violin_snapshot_channel_bytes_total") == len(h.coordinator.recorded[0].frame)
    assert value("violin_packet_ins_total", role="hold") == 2
    assert value("violin_packet_ins_total", role="record") == 1
    h.controller.cut(sid, "B")
    assert value("violin_snapshot_frames_total", action="released") == 2
    h.controller.cut(sid, "C")
    for name, pause_ms in (("A", 12.0), ("B", 30.0), ("C", 5.0)):
        h.controller.done(sid, name, dict(IMAGE, pause_ms=pause_ms))
    assert value("violin_snapshots_total", state="complete") == 0
    h.run_spawned()
    view = h.controller.snapshot_view(sid)
    assert view["state"] == "complete"
    assert value("violin_snapshots_total", state="complete") == 1
    assert value("violin_snapshots_total", state="aborted") == 0
    assert value("violin_snapshots_running") == 0
    assert value("violin_snapshot_duration_seconds_count", state="complete") == 1
    assert value("violin_snapshot_duration_seconds_sum", state="complete") == pytest.approx(
        view["completed"] - view["created"])
    for name, pause_ms in (("A", 12.0), ("B", 30.0), ("C", 5.0)):
        assert value("violin_member_pause_seconds_count", member=name) == 1
        assert value("violin_member_pause_seconds_sum", member=name) == pytest.approx(pause_ms / 1000)
        assert value("violin_member_flip_seconds_count", member=name) == 1
        flip_ms = next(m["flip_ms"] for m in view["members"] if m["name"] == name)
        assert value("violin_member_flip_seconds_sum", member=name) == pytest.approx(flip_ms / 1000, abs=1e-6)
    assert value("violin_member_pause_seconds_bucket", member="A", le="0.025") == 1
    assert value("violin_member_pause_seconds_bucket", member="A", le="0.01") == 0
    # The counts add up to the manifest's, and a second snapshot adds to them.
    assert value("violin_snapshot_frames_total", action="recorded") == view["counts"]["recorded"]
    sid2 = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid2, "A")
    send(h, A, B, 4)
    h.controller.abort(sid2, {"reason": "enough"})
    with pytest.raises(Refused):  # a second end of the same snapshot is refused, and not counted
        h.controller.abort(sid2, {})
    h.advance(0.1)
    assert value("violin_snapshots_total", state="aborted") == 1
    assert value("violin_snapshot_duration_seconds_count", state="aborted") == 1
    assert value("violin_snapshot_frames_total", action="held") == 3
    assert value("violin_snapshot_frames_total", action="released") == 3
    assert value("violin_snapshots_running") == 0


def test_a_timed_out_snapshot_and_dropped_frames_are_counted(tmp_path):
    metrics = fresh_controller_metrics()
    h = make_harness(tmp_path, metrics=metrics, hold_bytes_per_receiver=150, timeout=5.0)
    sid = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid, "A")
    for seq in range(4):  # 64-byte frames: two fit the bound, two are dropped
        send(h, A, B, seq)
    dropped = metrics.value("violin_snapshot_frames_total", action="dropped")
    assert dropped == h.coordinator.current.counts["dropped"] == 2
    h.advance(6.0)  # the ticker aborts it
    assert h.controller.snapshot_view(sid)["state"] == "aborted"
    assert metrics.value("violin_snapshots_total", state="aborted") == 1
    assert metrics.value("violin_snapshots_running") == 0


def snapshot_for_restore(tmp_path, metrics):
    h = make_harness(tmp_path, members=(), metrics=metrics)
    for name, mac in (("A", A), ("B", B)):
        h.coordinator.add_member(parse_member({"name": name, "macs": [mac], "marker": False,
                                               "helper_url": "http://helper-%s" % name}))
    sid = h.controller.start_snapshot({})["id"]
    for name in ("A", "B"):
        h.controller.cut(sid, name)
        h.controller.done(sid, name, IMAGE)  # no pause_ms: no pause observed
    h.run_spawned()
    assert not metrics.value("violin_member_pause_seconds_count", member="A")  # made at the start, never observed
    return h, sid


def test_restores_by_state_and_duration(tmp_path):
    metrics = fresh_controller_metrics()
    h, sid = snapshot_for_restore(tmp_path, metrics)
    h.controller.restorer.start(sid, {})
    assert metrics.value("violin_restores_running") == 1
    h.run_spawned()
    job = next(iter(h.controller.restorer.jobs.values()))
    assert job.state == "complete"
    assert metrics.value("violin_restores_total", state="complete") == 1
    assert metrics.value("violin_restores_running") == 0
    assert metrics.value("violin_restore_duration_seconds_count", state="complete") == 1
    assert metrics.value("violin_restore_duration_seconds_sum", state="complete") == pytest.approx(
        job.finished - job.started)
    h.io.post_status = 502  # staging fails: the restore fails, touching nothing
    h.controller.restorer.start(sid, {})
    h.run_spawned()
    assert metrics.value("violin_restores_total", state="failed") == 1
    assert metrics.value("violin_restore_duration_seconds_count", state="failed") == 1
    assert metrics.value("violin_restores_running") == 0


def test_get_metrics_is_text_exposition_without_a_token(tmp_path):
    metrics = fresh_controller_metrics()
    h = make_harness(tmp_path, metrics=metrics)
    sid = h.controller.start_snapshot({})["id"]
    h.controller.abort(sid, {})
    response = Request.blank("/violin/metrics").get_response(build_rest_app(h.controller))
    assert response.status_int == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert {"violin_snapshots", "violin_snapshots_running", "violin_snapshot_duration_seconds",
            "violin_member_pause_seconds", "violin_member_flip_seconds", "violin_snapshot_frames",
            "violin_snapshot_channel_bytes", "violin_restores", "violin_restores_running",
            "violin_restore_duration_seconds", "violin_packet_ins", "violin_switches_connected"} <= set(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("violin_snapshots_total", (("state", "aborted"),))] == 1
    # Only this controller's registry: nothing from the process-wide default one.
    assert not any(name.startswith(("python_", "process_")) for name in families)


def test_two_controllers_keep_their_own_metrics(tmp_path):
    first = make_harness(tmp_path / "1")
    second = make_harness(tmp_path / "2")
    first.controller.abort(first.controller.start_snapshot({})["id"], {})
    assert first.controller.metrics.value("violin_snapshots_total", state="aborted") == 1
    assert second.controller.metrics.value("violin_snapshots_total", state="aborted") == 0


def test_helper_metrics_after_a_done_and_a_failed_snapshot(tmp_path):
    from test_helper_orchestration import SNAPSHOT, FakeStore  # the orchestration tests' fakes
    metrics = HelperMetrics(CollectorRegistry())
    with fakebackend.registered():
        config = helper.parse_config({"token": "t", "controller_token": "c", "server_token": "s",
                                      "servers": ["http://store:7070"], "work_dir": str(tmp_path),
                                      "members": {"f1": {"backend": "fake"}}}, environ={})
        store, refuse = FakeStore(), set()

        def post(url, body):
            if url.rsplit("/", 1)[-1] in refuse:
                raise helper.ControllerError("refused")
            return {}
        ticks = iter(range(100))
        rig = helper.Helper(config, post=post, store=store.client, purge=lambda: None,
                            spawn=lambda job: job(), clock=lambda: 10.0 * next(ticks), metrics=metrics)
        rig.start_snapshot(SNAPSHOT)
        refuse.add("cut")
        rig.start_snapshot(dict(SNAPSHOT, snapshot="s2"))
        served = listen("127.0.0.1", 0, helper.make_handler(rig), "test")
        threading.Thread(target=served.serve_forever, daemon=True).start()
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % served.server_address[1]) as answer:
                assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = answer.read().decode()
        finally:
            served.shutdown()
            served.server_close()
    assert 'violin_helper_snapshots_total{backend="fake",result="done"} 1.0' in text
    assert metrics.value("violin_helper_snapshots_total", backend="fake", result="failed") == 1
    assert metrics.value("violin_helper_snapshot_duration_seconds_count", backend="fake") == 1
    assert metrics.value("violin_helper_snapshot_duration_seconds_sum", backend="fake") == 10.0
    assert metrics.value("violin_helper_pause_seconds_sum", backend="fake") == pytest.approx(0.00125)
    assert metrics.value("violin_helper_stored_bytes_total", backend="fake") == len(b"state of f1")


@pytest.fixture
def metered_server(tmp_path):
    metrics = ServerMetrics(CollectorRegistry())
    server = listen("127.0.0.1", 0, srv.make_handler(FileStore(str(tmp_path / "store")), "tok", metrics), "test")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], metrics
    server.shutdown()
    server.server_close()


def test_server_metrics_count_uploads_by_result_and_serve_without_a_token(metered_server, tmp_path):
    port, metrics = metered_server
    client = ImageServer("http://127.0.0.1:%d" % port, "tok")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.img").write_bytes(b"a" * 1000)
    (tmp_path / "img" / "b.img").write_bytes(b"b" * 24)
    client.upload_dir("snap-1", "h1", str(tmp_path / "img"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("PUT", "/images/snap-1/h1/c.img", b"data", {
        "Authorization": "Bearer tok", "X-Sha256": hashlib.sha256(b"other").hexdigest()})
    assert connection.getresponse().status == 422
    connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", "/metrics")  # no token
    answer = connection.getresponse()
    assert answer.status == 200 and answer.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    text = answer.read().decode()
    connection.close()
    assert "violin_server_stored_bytes_total 1024.0" in text
    assert metrics.value("violin_server_stored_files_total") == 2
    assert metrics.value("violin_server_uploads_total", result="stored") == 2
    assert metrics.value("violin_server_uploads_total", result="checksum_mismatch") == 1
    assert metrics.value("violin_server_uploads_total", result="storage_error") == 0
