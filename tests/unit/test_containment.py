"""Any exception in any background job ends that job with the reason, releases every hold and never
blocks later work: a failure injected at every step of the snapshot, restore and schedule jobs."""

import pytest

from harness import Harness, eth_frame
from violin_core.coordinator import SnapshotSettings
from violin_core.fabric import FabricSettings
from violin_core.members import parse_member

A, B = "00:00:00:00:00:0a", "00:00:00:00:00:0b"
WHERE = {A: (1, 1), B: (2, 1)}
IMAGE = {"server": "http://srv", "image": {"files": [{"name": "f", "sha256": "x"}]}}


def make(tmp_path, helpers=True):
    h = Harness({1: [1, 3], 2: [1, 2]}, [((1, 3), (2, 2))], FabricSettings(), SnapshotSettings(),
                state_dir=str(tmp_path / "state"))
    h.start()
    for name, mac in (("A", A), ("B", B)):
        spec = {"name": name, "macs": [mac], "marker": False}
        if helpers:
            spec["helper_url"] = "http://helper-%s" % name
        h.coordinator.add_member(parse_member(spec))
        h.send(*WHERE[mac], eth_frame("ff:ff:ff:ff:ff:ff", mac))
    h.run_spawned()
    return h


def boom(*_args, **_kwargs):
    raise KeyError("injected")


def complete(h):
    sid = h.controller.start_snapshot({})["id"]
    h.run_spawned()
    for name in ("A", "B"):
        h.controller.cut(sid, name)
        h.controller.done(sid, name, IMAGE)
    h.run_spawned()
    assert h.controller.snapshot_view(sid)["state"] == "complete"
    return sid


def assert_free(h):
    """Nothing held, nothing quarantined, and a new snapshot can start."""
    assert h.coordinator.holds == {} and h.coordinator.quarantined == set()
    sid = h.controller.start_snapshot({})["id"]
    assert h.controller.snapshot_view(sid)["state"] == "running"


@pytest.mark.parametrize("step", ["notify", "drain", "seal"])
def test_a_failing_snapshot_job_aborts_with_the_reason_and_releases_every_hold(tmp_path, monkeypatch, step):
    h = make(tmp_path)
    if step == "notify":
        monkeypatch.setattr(h.io, "post_json", boom)
    elif step == "drain":
        monkeypatch.setattr(h.io, "flow_stats", boom)
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A")
    h.send(*WHERE[B], eth_frame(A, B))  # held for A until its cut, or released by an abort
    assert h.coordinator.holds
    h.run_spawned()  # the helpers are asked
    if step != "notify":
        h.controller.cut(sid, "A")
        h.controller.cut(sid, "B")
        h.controller.done(sid, "A", IMAGE)
        h.controller.done(sid, "B", IMAGE)
        if step == "seal":
            monkeypatch.setattr(h.controller.catalogue, "save", boom)
        h.run_spawned()  # drain and seal
    current = h.coordinator.current
    assert current.state == "aborted" and "injected" in current.reason and not current.manifest()["restorable"]
    monkeypatch.undo()
    assert_free(h)


def inject(h, monkeypatch, step):
    """Make ``step`` of the next restore raise an exception nobody expects."""
    post, barrier = h.io.post_json, h.io.send_and_barrier

    def helper(url, body, timeout, token=None, method="POST"):
        if url == "http://helper-B/" + step:
            raise KeyError("injected")
        return post(url, body, timeout, token, method)

    def confirm(messages, dpids, timeout):
        if step == "reinject" and h.controller.restorer.running().phase == "reinjecting":
            raise KeyError("injected")
        return barrier(messages, dpids, timeout)
    monkeypatch.setattr(h.io, "post_json", helper)
    monkeypatch.setattr(h.io, "send_and_barrier", confirm)
    if step in ("quarantine", "restored"):
        monkeypatch.setattr(h.coordinator, step, boom)


@pytest.mark.parametrize("step", ["stage", "quarantine", "restore", "restored", "reinject", "resume"])
def test_a_failing_restore_ends_failed_lifts_the_quarantine_and_resumes_what_was_restored(tmp_path, monkeypatch,
                                                                                           step):
    h = make(tmp_path)
    sid = complete(h)
    inject(h, monkeypatch, step)
    h.io.posts.clear()
    job = h.controller.restorer.start(sid, {})
    h.run_spawned()
    view = h.controller.restorer.get(job["id"]).view()
    assert view["state"] == "failed" and "injected" in view["reason"] and view["finished"] is not None
    resumed = {url for url, _ in h.io.posts if url.endswith("/resume")}
    # a member whose restore call failed may have been restored all the same (left stopped): resumed too
    assert resumed == {"http://helper-%s/resume" % n for n in ("A", "B")
                       if step in ("restored", "reinject", "restore") or (step == "resume" and n == "A")}
    assert h.coordinator.quarantined == set()
    monkeypatch.undo()
    again = h.controller.restorer.start(sid, {})  # a failed restore never blocks the next one
    h.run_spawned()
    assert h.controller.restorer.get(again["id"]).state == "complete"


def test_a_failing_scheduled_turn_is_skipped_with_the_reason_and_the_next_turn_runs(tmp_path):
    h = make(tmp_path, helpers=False)
    h.controller.scheduler.set({"interval_s": 10, "keep": 2}, h.coordinator.members.get)
    take = h.controller.scheduler.take
    h.controller.scheduler.take = boom
    h.advance(10.0)
    h.run_spawned()
    assert "injected" in h.controller.scheduler.view()["skipped"][-1]
    h.controller.scheduler.take = take
    h.advance(10.0)
    h.run_spawned()
    assert h.controller.scheduler.view()["taken"] == 1 and h.coordinator.running()


def test_a_restore_cut_short_by_a_restart_is_failed_and_its_restored_members_resumed(tmp_path, monkeypatch):
    h = make(tmp_path)
    sid = complete(h)
    post = h.io.post_json

    def die_at_b(url, body, timeout, token=None, method="POST"):
        if url == "http://helper-B/restore":  # the controller dies while B is being restored
            raise SystemExit("killed")
        return post(url, body, timeout, token, method)
    monkeypatch.setattr(h.io, "post_json", die_at_b)
    job = h.controller.restorer.start(sid, {})
    with pytest.raises(SystemExit):
        h.run_spawned()
    monkeypatch.undo()
    assert h.controller.restorer.get(job["id"]).state == "running"
    again = make(tmp_path)  # a new controller on the same state directory (resumes in the background)
    view = again.controller.restorer.get(job["id"]).view()
    assert view["state"] == "failed" and "controller restarted" in view["reason"], view
    resumed = sorted(url for url, _ in again.io.posts if url.endswith("/resume"))
    assert resumed == ["http://helper-A/resume", "http://helper-B/resume"]  # A restored, B maybe
    assert view["members"]["A"]["after_restart"] == "resumed"
    assert again.controller.restorer.start(sid, {})["state"] == "running"  # nothing left blocking


def test_an_aborted_snapshot_deletes_the_images_members_stored_before_the_abort(tmp_path):
    h = make(tmp_path)
    sid = h.controller.start_snapshot({})["id"]
    h.run_spawned()
    h.controller.cut(sid, "A")
    h.controller.done(sid, "A", IMAGE)  # A's image is stored; B never finishes
    h.io.posts.clear()
    h.controller.abort(sid, {"reason": "test"})
    h.run_spawned()
    assert ("DELETE http://srv/images/%s" % sid, None) in h.io.posts
    assert not h.controller.snapshot_view(sid)["restorable"]


def test_a_failed_restore_asks_a_restarting_helper_again_to_resume_its_members(tmp_path, monkeypatch):
    h = make(tmp_path)
    sid = complete(h)
    post, down = h.io.post_json, {"resumes": 0}

    def restarting(url, body, timeout, token=None, method="POST"):
        if url == "http://helper-B/restore":  # B's helper dies in B's restore...
            return None, "connection reset"
        if url.endswith("/resume") and down["resumes"] < 3:  # ...and answers again only after a while
            down["resumes"] += 1
            return None, "connection refused"
        return post(url, body, timeout, token, method)
    monkeypatch.setattr(h.io, "post_json", restarting)
    job = h.controller.restorer.start(sid, {})
    h.run_spawned()
    view = h.controller.restorer.get(job["id"]).view()
    assert view["state"] == "failed" and "helper-B" in view["reason"], view
    assert {n: m["state"] for n, m in view["members"].items()} == {"A": "resumed", "B": "resumed"}, view
    assert h.coordinator.quarantined == set()
