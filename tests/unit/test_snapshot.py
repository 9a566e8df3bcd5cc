"""Snapshot coordination in the pure core, against a simulated OF1.3 network.

Topology: s1 (port 1: A, port 4: C, port 3: trunk) -- s2 (port 2: trunk, port 1: B).
"""

import json
import os

import pytest
from webob import Request

from violin_core import channel, of
from violin_core.catalogue import Catalogue
from violin_core.routes import build_rest_app
from violin_core.fabric import LEARNED_TABLE, FabricSettings
from violin_core.packets import build_cut_request, build_marker
from violin_core.errors import Refused
from violin_core.coordinator import SnapshotSettings
from violin_core.members import parse_member

from harness import Harness, eth_frame

A, B, C, D = "00:00:00:00:00:0a", "00:00:00:00:00:0b", "00:00:00:00:00:0c", "00:00:00:00:00:0d"
BCAST = "ff:ff:ff:ff:ff:ff"
WHERE = {A: (1, 1), B: (2, 1), C: (1, 4), D: (2, 5)}


def frame(dst, src, seq):
    return eth_frame(dst, src, 0x0800, b"seq%06d" % seq + b"." * 40)


@pytest.fixture
def h(tmp_path):
    return make_harness(tmp_path)


def make_harness(tmp_path, members=("A", "B", "C"), marker=False, metrics=None, **snapshot_settings):
    harness = Harness({1: [1, 3, 4], 2: [1, 2, 5]}, [((1, 3), (2, 2))], FabricSettings(),
                      SnapshotSettings(**snapshot_settings), state_dir=str(tmp_path / "state"), metrics=metrics)
    harness.start()
    for mac, (dpid, port) in WHERE.items():
        harness.send(dpid, port, eth_frame(BCAST, mac, 0x0806))
    for name in members:
        mac = {"A": A, "B": B, "C": C, "D": D}[name]
        harness.coordinator.add_member(parse_member({"name": name, "macs": [mac], "marker": marker}))
    return harness


def send(h, src, dst, seq):
    h.deliveries.clear()
    h.send(*WHERE[src], frame(dst, src, seq))
    return list(h.deliveries)


def received(h, mac, deliveries=None):
    return [f[14:23] for d, p, f in (h.deliveries if deliveries is None else deliveries) if (d, p) == WHERE[mac]]


def test_three_colour_cases(h):
    snap = h.controller.start_snapshot({})
    sid = snap["id"]
    # Same colour (both pre): the switch delivers, nothing recorded or held.
    assert received(h, B, send(h, A, B, 1)) == [b"seq000001"]
    h.controller.cut(sid, "A")
    # Post -> pre: held at the controller.
    assert send(h, A, B, 2) == [] and send(h, A, B, 3) == []
    assert h.coordinator.current.counts["held"] == 2
    # Pre -> post: delivered and recorded.
    assert received(h, A, send(h, B, A, 4)) == [b"seq000004"]
    assert [r.frame[14:23] for r in h.coordinator.recorded] == [b"seq000004"]
    # B flips: its held frames are released in arrival order, then post->post is fast.
    h.deliveries.clear()
    h.controller.cut(sid, "B")
    assert received(h, B) == [b"seq000002", b"seq000003"]
    assert received(h, B, send(h, A, B, 5)) == [b"seq000005"]
    assert h.coordinator.current.counts["released"] == 2


def test_frames_arrive_unchanged_through_hold_and_record(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid, "A")
    original = frame(B, A, 7)
    h.send(*WHERE[A], original)
    h.deliveries.clear()
    h.controller.cut(sid, "C")
    h.send(*WHERE[B], frame(C, B, 8))  # pre -> post, recorded
    h.controller.cut(sid, "B")
    assert [f for d, p, f in h.deliveries if (d, p) == WHERE[B]] == [original]
    assert h.coordinator.recorded[0].frame == frame(C, B, 8)


def test_broadcast_in_mixed_epochs_is_replicated_under_the_cut_rules(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid, "A")
    # A (post) broadcasts: B and C are pre, so both copies are held; D (no member) gets it now.
    out = send(h, A, BCAST, 1)
    assert sorted((d, p) for d, p, _ in out) == [WHERE[D]]
    # B (pre) broadcasts: A (post) gets it and it is recorded for A; C (pre) gets it; D too.
    out = send(h, B, BCAST, 2)
    assert sorted((d, p) for d, p, _ in out) == sorted([WHERE[A], WHERE[C], WHERE[D]])
    assert [(r.receiver, r.frame[14:23]) for r in h.coordinator.recorded] == [("A", b"seq000002")]
    h.deliveries.clear()
    h.controller.cut(sid, "C")
    assert received(h, C) == [b"seq000001"]
    h.deliveries.clear()
    h.controller.cut(sid, "B")
    assert received(h, B) == [b"seq000001"]


def test_non_members_and_members_outside_the_subset_are_never_held(h):
    sid = h.controller.start_snapshot({"members": ["A", "B"]})["id"]
    h.controller.cut(sid, "A")
    assert received(h, C, send(h, A, C, 1)) == [b"seq000001"]  # C takes no part
    assert received(h, D, send(h, A, D, 2)) == [b"seq000002"]  # D is no member
    assert received(h, A, send(h, C, A, 3)) == [b"seq000003"]
    assert h.coordinator.recorded == []


def test_hold_bound_drops_and_counts(tmp_path):
    h = make_harness(tmp_path, hold_bytes_per_receiver=150)
    sid = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid, "A")
    for seq in range(5):
        send(h, A, B, seq)
    counts = h.coordinator.current.counts
    assert (counts["held"], counts["dropped"]) == (2, 3)
    h.deliveries.clear()
    h.controller.cut(sid, "B")
    assert received(h, B) == [b"seq000000", b"seq000001"]


def test_abort_releases_everything_and_keeps_no_channel_state(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid, "A")
    send(h, A, B, 1)
    send(h, A, C, 2)
    send(h, B, A, 3)
    h.deliveries.clear()
    view = h.controller.abort(sid, {"reason": "operator said so"})
    assert view["state"] == "aborted" and view["reason"] == "operator said so" and not view["restorable"]
    assert received(h, B) == [b"seq000001"] and received(h, C) == [b"seq000002"]
    assert h.coordinator.holds == {} and h.coordinator.recorded == []
    # The slice is healthy: everyone is in the new epoch, frames flow on the fast path.
    assert {m.epoch for m in h.coordinator.members.values()} == {1}
    assert received(h, B, send(h, A, B, 4)) == [b"seq000004"]
    assert not any(e.role in (of.ROLE_HOLD, of.ROLE_RECORD, of.ROLE_FLOOD_CUT)
                   for t in h.net.switches.values() for table in t.tables.values() for e in table.values())


def run_to_completion(h, sid):
    for name in h.coordinator.current.participants:
        if h.coordinator.current.cuts[name].state == "pending":
            h.controller.cut(sid, name)
    for name in h.coordinator.current.participants:
        h.controller.done(sid, name, {"image": {"location": "x"}, "pause_ms": 1.0})
    h.run_spawned()
    return h.controller.snapshot_view(sid)


def test_completion_by_counters_writes_manifest_and_pcapng(h, tmp_path):
    sid = h.controller.start_snapshot({"label": "first"})["id"]
    h.controller.cut(sid, "A")
    send(h, B, A, 1)
    send(h, C, A, 2)
    view = run_to_completion(h, sid)
    assert view["state"] == "complete" and view["restorable"] and view["label"] == "first"
    assert view["drain"]["method"] == "counters" and view["drain"]["switch_record_rule_packets"] == 2
    assert view["channel"]["frames"] == 2
    with open(os.path.join(str(tmp_path / "state"), sid, "channel.pcapng"), "rb") as handle:
        frames = channel.decode(handle.read())
    assert [(f.receiver, f.frame[14:23]) for f in frames] == [("A", b"seq000001"), ("A", b"seq000002")]
    # Normal mode again: no cut rules left on any switch.
    assert not any(e.role in (of.ROLE_HOLD, of.ROLE_RECORD) for s in h.net.switches.values()
                   for table in s.tables.values() for e in table.values())


def test_completion_by_timeout_when_counters_are_unavailable(h):
    h.io.flow_stats = lambda dpids, role, timeout: None
    sid = h.controller.start_snapshot({})["id"]
    view = run_to_completion(h, sid)
    assert view["state"] == "complete" and view["drain"]["method"] == "timeout"


def test_drain_waits_for_record_counters_to_stand_still(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid, "A")
    send(h, B, A, 1)
    moving = iter(range(100))
    h.io.flow_stats = lambda dpids, role, timeout: next(moving)  # frames keep arriving
    view = run_to_completion(h, sid)
    assert view["drain"]["method"] == "timeout" and view["drain"]["polls"] > 10


def test_a_record_copy_after_completion_marks_the_snapshot_incomplete(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid, "A")
    late = eth_frame(A, B, 0x0800, b"late" * 12, vlan=h.coordinator.colour(0))
    run_to_completion(h, sid)
    assert h.controller.snapshot_view(sid)["restorable"]
    h.controller.packet_in(1, 3, late, of.ROLE_RECORD)
    view = h.controller.snapshot_view(sid)
    assert view["state"] == "aborted" and not view["restorable"] and "after completion" in view["reason"]


def test_one_snapshot_at_a_time_and_state_errors(h):
    sid = h.controller.start_snapshot({})["id"]
    with pytest.raises(Refused) as error:
        h.controller.start_snapshot({})
    assert error.value.status == 409
    with pytest.raises(Refused) as error:
        h.controller.done(sid, "A", {})
    assert error.value.status == 409  # done before cut
    h.controller.cut(sid, "A")
    with pytest.raises(Refused) as error:
        h.controller.cut(sid, "A")
    assert error.value.status == 409
    with pytest.raises(Refused) as error:
        h.controller.cut("snap-nope", "A")
    assert error.value.status == 404


def test_timeout_and_disappearing_member_abort(tmp_path):
    h = make_harness(tmp_path, timeout=5.0)
    sid = h.controller.start_snapshot({})["id"]
    h.advance(6.0)
    assert "timed out" in h.controller.snapshot_view(sid)["reason"]
    sid = h.controller.start_snapshot({})["id"]
    h.run(h.controller.port_changed(2, 1, "s2-eth1", up=False, deleted=False))
    h.advance(0.1)
    assert h.controller.snapshot_view(sid)["reason"] == "member B disappeared from the network"


def test_cut_waits_for_the_marker_from_the_members_own_link(tmp_path):
    h = make_harness(tmp_path, marker=True)
    sid = h.controller.start_snapshot({})["id"]
    h.send(*WHERE[A], build_marker(A, sid, "A"))
    assert h.controller.cut(sid, "A")["epoch"] == 1
    # A marker from the wrong port does not count; no marker in time aborts with the reason.
    h.send(*WHERE[C], build_marker(B, sid, "B"))
    with pytest.raises(Refused) as error:
        h.controller.cut(sid, "B")
    assert error.value.status == 409 and "no cut marker from B" in error.value.reason


def test_helpers_are_called_and_a_refusing_helper_aborts(tmp_path):
    h = make_harness(tmp_path, members=())
    h.coordinator.add_member(parse_member({"name": "A", "macs": [A], "helper_url": "http://helper-a:7000"}))
    sid = h.controller.start_snapshot({})["id"]
    h.io.post_status = 503
    h.run_spawned()
    url, body = h.io.posts[0]
    callbacks = "http://ctl:8080/violin/snapshots/%s/members/A/" % sid  # from api.advertise_url
    assert url == "http://helper-a:7000/snapshot" and {body[k + "_url"] for k in ("prepare", "cut", "done", "failed")} \
        == {callbacks + k for k in ("prepare", "cut", "done", "failed")}
    assert "did not take the snapshot request: 503" in h.controller.snapshot_view(sid)["reason"]


def test_catalogue_survives_restart_and_interrupted_snapshots_are_not_restorable(h, tmp_path):
    first = h.controller.start_snapshot({})["id"]
    run_to_completion(h, first)
    second = h.controller.start_snapshot({})["id"]
    restarted = Catalogue(str(tmp_path / "state")).open()
    assert restarted.get(first)["state"] == "complete" and restarted.get(first)["restorable"]
    assert restarted.get(second)["state"] == "aborted" and not restarted.get(second)["restorable"]
    assert restarted.max_epoch() == 2


def test_member_validation():
    for bad, needle in [({"name": "x y", "macs": [A]}, "name"), ({"name": "x", "macs": []}, "macs"),
                        ({"name": "x", "macs": ["ff:ff:ff:ff:ff:ff"]}, "unicast"),
                        ({"name": "x", "macs": [A], "color": 1}, "unknown"),
                        ({"name": "x", "macs": [A], "helper_url": "ftp://x"}, "helper_url"),
                        ({"name": "x", "macs": [A], "marker": "yes"}, "marker")]:
        with pytest.raises(Refused) as error:
            parse_member(bad)
        assert error.value.status == 400 and needle in error.value.reason


def call(app, path, method="GET", body=None, token="token"):
    request = Request.blank(path, method=method)
    if body is not None:
        request.body = json.dumps(body).encode()
    request.headers["Authorization"] = "Bearer " + token
    response = request.get_response(app)
    return response.status_int, json.loads(response.text)


def test_rest_snapshot_lifecycle(h):
    app = build_rest_app(h.controller)
    assert call(app, "/violin/members", "POST", {"name": "D", "macs": [D]})[0] == 201
    assert call(app, "/violin/members", "POST", {"name": "D", "macs": [D]})[0] == 409
    assert call(app, "/violin/members", "POST", {"name": "E", "macs": [D]})[0] == 409
    assert call(app, "/violin/members/E")[0] == 404
    assert call(app, "/violin/snapshots", "POST", {"members": ["nobody"]})[0] == 404
    assert call(app, "/violin/snapshots", "POST", {"colour": 1})[0] == 400
    status, snap = call(app, "/violin/snapshots", "POST", {"members": ["A", "B"], "label": "x"})
    assert status == 202 and snap["state"] == "running"
    assert call(app, "/violin/snapshots", "POST", {})[0] == 409
    assert call(app, "/violin/members/A", "DELETE")[0] == 409
    assert call(app, "/violin/snapshots/%s" % snap["id"], "DELETE")[0] == 409
    for name in ("A", "B"):
        assert call(app, "/violin/snapshots/%s/members/%s/cut" % (snap["id"], name), "POST", {})[0] == 200
        assert call(app, "/violin/snapshots/%s/members/%s/done" % (snap["id"], name), "POST",
                    {"image": {"location": "srv:/x"}, "pause_ms": 3})[0] == 200
    h.run_spawned()
    status, listing = call(app, "/violin/snapshots")
    assert [s["state"] for s in listing["snapshots"]] == ["complete"]
    assert call(app, "/violin/snapshots/%s" % snap["id"], "DELETE") == (200, {"deleted": snap["id"]})
    assert call(app, "/violin/snapshots/%s" % snap["id"])[0] == 404


def test_members_from_config_are_registered(tmp_path):
    h = Harness({1: [1]}, [], state_dir=str(tmp_path), members=[{"name": "m1", "macs": [A]}])
    assert list(h.coordinator.members) == ["m1"]


def test_prepared_member_gets_nothing_until_its_flip_then_pre_frames_become_channel_state(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid, "C")  # C is post: its frames carry the new colour
    h.controller.prepare(sid, "A")
    assert send(h, B, A, 1) == []  # pre frame, held while A is (about to be) paused
    assert send(h, C, A, 2) == []  # post frame, held as before
    h.deliveries.clear()
    h.controller.cut(sid, "A")
    assert received(h, A) == [b"seq000001", b"seq000002"]  # released in arrival order
    assert [(r.receiver, r.frame[14:23]) for r in h.coordinator.recorded] == [("A", b"seq000001")]
    with pytest.raises(Refused) as error:
        h.controller.prepare(sid, "A")
    assert error.value.status == 409


def test_held_frame_reaching_the_controller_after_the_flip_is_recorded_and_delivered(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A")
    h.controller.cut(sid, "A")
    # A copy sent up by a hold rule the datapath still applied after the flip.
    late = eth_frame(A, B, 0x0800, b"seq000009" + b"." * 40, vlan=h.coordinator.colour(0))
    h.deliveries.clear()
    h.run(h.controller.packet_in(1, 3, late, of.ROLE_HOLD))
    assert received(h, A) == [b"seq000009"]
    assert [r.frame[14:23] for r in h.coordinator.recorded] == [b"seq000009"]


def test_rule_changes_add_before_they_delete(h):
    """Between two flow-mods no packet may meet a table more permissive than before and after."""
    sid = h.controller.start_snapshot({})["id"]
    for messages in (h.coordinator.prepare(h.now, sid, "A"), h.coordinator.flip(h.now, sid, "A")[0]):
        kinds = [m.command for m in messages if isinstance(m, of.FlowMod)]
        assert "delete_strict" in kinds and "add" in kinds
        assert min(i for i, k in enumerate(kinds) if k == "delete_strict") > max(
            i for i, k in enumerate(kinds) if k == "add")


def test_restore_checks_before_touching_anything_then_quarantines_reinjects_and_resumes(tmp_path):
    h = make_harness(tmp_path, members=())
    for name, mac in (("A", A), ("B", B)):
        h.coordinator.add_member(parse_member({"name": name, "macs": [mac], "marker": False,
                                               "helper_url": "http://helper-%s" % name}))
    sid = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid, "A")
    send(h, B, A, 7)  # pre -> post: channel state for A
    h.controller.cut(sid, "B")
    for name in ("A", "B"):
        h.controller.done(sid, name, {"server": "http://srv", "image": {"files": [{"name": "f", "sha256": "x"}]}})
    h.run_spawned()
    assert h.controller.snapshot_view(sid)["state"] == "complete"
    with pytest.raises(Refused) as error:
        h.controller.restorer.start("snap-nope", {})
    assert error.value.status == 404
    with pytest.raises(Refused) as error:
        h.controller.restorer.start(sid, {"placement": {"Z": "http://x"}})
    assert error.value.status == 400
    h.io.posts.clear()
    job = h.controller.restorer.start(sid, {})
    with pytest.raises(Refused) as error:
        h.controller.restorer.start(sid, {})
    assert error.value.status == 409  # one restore at a time
    h.deliveries.clear()
    h.run_spawned()
    view = h.controller.restorer.jobs[job["id"]].view()
    assert view["state"] == "complete" and view["reinjected_frames"] == 1
    assert [url.rsplit("/", 1)[1] for url, _ in h.io.posts] == ["stage", "stage", "restore", "restore",
                                                               "resume", "resume"]
    assert received(h, A) == [b"seq000007"]  # the channel state went back to its receiver
    assert h.coordinator.quarantined == set()


def test_restore_brings_members_that_restore_paused_back_first(tmp_path):
    """A restored process retransmits into the quarantine until the resume: it is restored last. What
    comes back paused (a VM, its clock stopped) is what its helper's stage answer says, not a backend name."""
    h = make_harness(tmp_path, members=())
    for name, mac in (("a-proc", A), ("b-vm", B), ("c-proc", C)):
        h.coordinator.add_member(parse_member({"name": name, "macs": [mac], "marker": False,
                                               "helper_url": "http://helper-%s" % name}))
    h.io.answers["http://helper-b-vm/stage"] = {"staged": "b-vm", "restores_paused": True}
    sid = h.controller.start_snapshot({})["id"]
    for name in ("a-proc", "b-vm", "c-proc"):
        h.controller.cut(sid, name)
        h.controller.done(sid, name, {"server": "http://srv", "image": {"files": [{"name": "f", "sha256": "x"}]}})
    h.run_spawned()
    h.io.posts.clear()
    h.io.gathered.clear()
    h.controller.restorer.start(sid, {})
    h.run_spawned()
    restored = [url.split("//helper-")[1].split("/")[0] for url, _ in h.io.posts if url.endswith("/restore")]
    assert restored == ["b-vm", "a-proc", "c-proc"]
    assert h.io.gathered == [3, 1, 2, 3]  # all staged at once, the paused one restored, then the rest, all resumed


def test_restore_stages_every_member_at_once_even_on_one_helper(tmp_path):
    """Members of one helper are asked for together too: the helper bounds how many it stages at once."""
    h = make_harness(tmp_path, members=())
    for name, mac in (("a", A), ("b", B), ("c", C)):
        h.coordinator.add_member(parse_member({"name": name, "macs": [mac], "marker": False,
                                               "helper_url": "http://helper-one"}))
    sid = h.controller.start_snapshot({})["id"]
    for name in ("a", "b", "c"):
        h.controller.cut(sid, name)
        h.controller.done(sid, name, {"server": "http://srv", "image": {"files": [{"name": "f", "sha256": "x"}]}})
    h.run_spawned()
    h.io.gathered.clear()
    job = h.controller.restorer.start(sid, {})
    h.run_spawned()
    assert h.controller.restorer.jobs[job["id"]].view()["state"] == "complete"
    assert h.io.gathered == [3, 3, 3]  # staged, restored (none paused), resumed: three at once each time


def test_restore_of_an_aborted_snapshot_is_refused(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.abort(sid, {})
    with pytest.raises(Refused) as error:
        h.controller.restorer.start(sid, {})
    assert error.value.status == 409 and "not offered for restore" in error.value.reason


def test_quarantine_cuts_members_off_both_ways(h):
    h.run(h.coordinator.quarantine(h.now, ["A"]))
    assert send(h, A, B, 1) == [] and send(h, B, A, 2) == []
    assert received(h, C, send(h, B, C, 3)) == [b"seq000003"]  # the rest of the slice is untouched
    h.run(h.coordinator.lift_quarantine(h.now))
    assert received(h, B, send(h, A, B, 4)) == [b"seq000004"]


def test_failed_staging_leaves_the_running_slice_alone(tmp_path):
    h = make_harness(tmp_path, members=())
    h.coordinator.add_member(parse_member({"name": "A", "macs": [A], "marker": False, "helper_url": "http://h"}))
    sid = h.controller.start_snapshot({})["id"]
    h.controller.cut(sid, "A")
    h.controller.done(sid, "A", {"server": "http://srv", "image": {"files": [{"name": "f", "sha256": "x"}]}})
    h.run_spawned()
    h.io.post_status = 502  # the helper finds the image corrupt
    job = h.controller.restorer.start(sid, {})
    h.io.posts.clear()
    h.run_spawned()
    view = h.controller.restorer.jobs[job["id"]].view()
    assert view["state"] == "failed" and "stage of A" in view["reason"]
    assert [url.rsplit("/", 1)[1] for url, _ in h.io.posts] == ["stage"]  # nothing stopped or restored
    assert h.coordinator.quarantined == set()


def test_schedule_takes_snapshots_and_keeps_the_newest(tmp_path):
    h = make_harness(tmp_path)
    with pytest.raises(Refused):
        h.controller.scheduler.set({"interval_s": 0.1}, h.coordinator.members.get)
    with pytest.raises(Refused):
        h.controller.scheduler.set({"interval_s": 5, "keep": 0}, h.coordinator.members.get)
    view = h.controller.scheduler.set({"interval_s": 10, "keep": 2}, h.coordinator.members.get)
    assert view["enabled"] and view["next_in_s"] == 10
    ids = []
    for _ in range(4):
        h.advance(10.0)
        h.run_spawned()  # the scheduled start
        sid = h.coordinator.current.id
        ids.append(sid)
        run_to_completion(h, sid)
    listed = [m["id"] for m in h.controller.catalogue.list()]
    assert listed == ids[-2:]  # the two newest kept, the older ones pruned
    assert h.controller.scheduler.view()["taken"] == 4
    # A turn while a snapshot runs is skipped, with the reason.
    h.controller.start_snapshot({"label": "manual"})
    h.advance(10.0)
    h.run_spawned()
    assert "running" in h.controller.scheduler.view()["skipped"][-1]
    assert not h.controller.scheduler.clear()["enabled"]


def test_a_cut_waits_for_a_marker_when_the_helper_says_it_sent_one(tmp_path):
    """The helper's cut call declares whether it sent a marker; registration only gives the default."""
    h = make_harness(tmp_path, marker=True)
    sid = h.controller.start_snapshot({})["id"]
    assert h.controller.cut(sid, "A", {"marker": False})["epoch"] == 1  # e.g. a paused VM: no marker to wait for
    with pytest.raises(Refused) as error:
        h.controller.cut(sid, "B", {"marker": True})  # said it sent one, none came
    assert error.value.status == 409 and "no cut marker from B" in error.value.reason
    with pytest.raises(Refused) as error:
        make_harness(tmp_path / "2").controller.cut("snap-x", "A", {"marker": "yes"})
    assert error.value.status == 400 and "marker" in error.value.reason


def complete_snapshot_with_helpers(tmp_path, names=("A",)):
    h = make_harness(tmp_path, members=())
    for name in names:
        h.coordinator.add_member(parse_member({"name": name, "macs": [{"A": A, "B": B}[name]], "marker": False,
                                               "helper_url": "http://helper-%s" % name}))
    sid = h.controller.start_snapshot({})["id"]
    for name in names:
        h.controller.cut(sid, name)
        h.controller.done(sid, name, {"server": "http://srv", "image": {"files": [{"name": "f", "sha256": "x"}]}})
    h.run_spawned()
    return h, sid


def test_a_restored_member_is_located_by_the_dpid_and_port_its_helper_names(tmp_path):
    h, sid = complete_snapshot_with_helpers(tmp_path)
    h.io.answers["http://helper-A/restore"] = {"restored": "A", "attachment": {"dpid": "%016x" % 2, "port": 5}}
    job = h.controller.restorer.start(sid, {})
    h.run_spawned()
    assert h.controller.restorer.get(job["id"]).state == "complete"
    assert h.fabric.hosts[A] == (2, 5)  # before it spoke: channel state and peers' frames go there


@pytest.mark.parametrize("attachment,needle", [
    ({"dpid": "%016x" % 9, "port": 1}, "which the slice does not have"),
    ({"dpid": "%016x" % 2, "port": 77}, "which the slice does not have"),
    ({"dpid": "zz", "port": 1}, "attachment.dpid"),
    ({"dpid": "%016x" % 2}, "attachment.port: required"),
])
def test_a_restore_behind_a_port_the_slice_lacks_fails_and_resumes_what_was_restored(tmp_path, attachment, needle):
    h, sid = complete_snapshot_with_helpers(tmp_path)
    h.io.answers["http://helper-A/restore"] = {"restored": "A", "attachment": attachment}
    job = h.controller.restorer.start(sid, {})
    h.io.posts.clear()
    h.run_spawned()
    view = h.controller.restorer.get(job["id"]).view()
    assert view["state"] == "failed" and needle in view["reason"]
    assert h.coordinator.quarantined == set() and h.fabric.hosts[A] == WHERE[A]


def test_restore_body_is_validated(tmp_path):
    h, sid = complete_snapshot_with_helpers(tmp_path)
    for body, needle in (({"placement": {"A": "ftp://x"}}, "placement"), ({"where": 1}, "unknown key(s) where")):
        with pytest.raises(Refused) as error:
            h.controller.restorer.start(sid, body)
        assert error.value.status == 400 and needle in error.value.reason


def test_cuts_that_arrive_together_are_flipped_in_one_pass_and_one_barrier(tmp_path):
    """Cuts that came in while an earlier batch was in the switches wait together: the next cut to run
    flips them all with one reconcile and one barrier per switch (each member's pause would otherwise
    grow with their number), and each waiting call finds its answer."""
    h = make_harness(tmp_path)
    sid = h.controller.start_snapshot({})["id"]
    barriers = []

    def count(messages, dpids, timeout):
        barriers.append(sorted(dpids))
        h.run(messages)
        return True
    h.io.send_and_barrier = count
    for name in ("B", "C"):  # their calls are waiting
        h.controller.flip_queue[name] = (h.now, h.now)
    answer = h.controller.cut(sid, "A")
    assert barriers == [[1, 2]]  # A, B, C on switches 1 and 2: one barrier each, once
    assert answer["batch"] == 3 and {m.epoch for m in h.coordinator.members.values()} == {1}
    assert {n: h.controller.flip_results[n]["batch"] for n in ("B", "C")} == {"B": 3, "C": 3}
    assert [c.state for c in h.coordinator.current.cuts.values()] == ["cut"] * 3
    assert received(h, B, send(h, A, B, 1)) == [b"seq000001"]  # all post now: the fast path


def test_a_batch_the_switches_do_not_confirm_answers_every_cut_in_it(tmp_path):
    h = make_harness(tmp_path)
    sid = h.controller.start_snapshot({})["id"]
    h.controller.flip_queue["B"] = (h.now, h.now)
    h.io.barrier_ok = False
    with pytest.raises(Refused) as error:
        h.controller.cut(sid, "A")
    assert error.value.status == 504 and "did not confirm the cut of A, B" in error.value.reason
    assert h.controller.flip_results["B"].status == 504
    assert h.coordinator.current.state == "aborted" and h.coordinator.holds == {}

def test_a_registration_that_changes_a_member_waits_for_its_snapshot_to_end(h):
    """PUT /violin/members/<name> (what helpers call): unchanged is fine at any time; a change to a member
    of the running snapshot is a 409 (the helper asks again after it)."""
    from violin_core.errors import Refused
    same = parse_member({"name": "A", "macs": [A], "marker": False})
    moved = parse_member({"name": "A", "macs": [A], "marker": False, "helper_url": "http://elsewhere:7001"})
    sid = h.controller.start_snapshot({})["id"]
    assert h.coordinator.put_member(same) == (False, h.coordinator.members["A"])
    with pytest.raises(Refused, match="takes part in running snapshot %s" % sid):
        h.coordinator.put_member(moved)
    for name in ("A", "B", "C"):
        h.controller.cut(sid, name)
    assert run_to_completion(h, sid)["state"] == "complete" and not h.coordinator.running()
    created, member = h.coordinator.put_member(moved)
    assert not created and member.helper_url == "http://elsewhere:7001" and member.epoch == 1


def test_deaf_time_runs_from_a_members_prepare_to_the_release_of_its_frames(h):
    """``held_ms``: the controller's own measure of how long frames to a member were held for it."""
    sid = h.controller.start_snapshot({})["id"]
    h.now = 10.0
    h.controller.prepare(sid, "A")
    h.now = 10.0375  # the member's helper pauses it and cuts 37.5 ms after the hold began
    answer = h.controller.cut(sid, "A")
    assert answer["held_ms"] == pytest.approx(37.5, abs=1e-6)
    h.controller.cut(sid, "B")  # cut without a prepare: nothing was held for it alone
    members = {m["name"]: m for m in h.controller.snapshot_view(sid)["members"]}
    assert members["A"]["held_ms"] == pytest.approx(37.5, abs=1e-6)
    assert members["B"]["held_ms"] is None
    assert h.controller.metrics.value("violin_member_held_seconds_sum", member="A") == pytest.approx(0.0375)
    assert not h.controller.metrics.value("violin_member_held_seconds_count", member="B")  # never observed


# --- the asynchronous cut: a prepared member's own frames coloured by the controller, by its marker ---

def marker_of(h, sid, name, mac):
    return h.send(*WHERE[mac], build_marker(mac, sid, name))


def learned_flows(h, dpid=1):
    return [e for e in h.net.switch(dpid).tables.get(LEARNED_TABLE, {}).values()]


def test_an_asynchronous_member_takes_the_old_colour_until_its_marker_and_the_new_after_in_the_switch(h):
    sid = h.controller.start_snapshot({})["id"]
    assert h.controller.prepare(sid, "A", {"divert": True})["divert"] is True
    h.controller.cut(sid, "C")  # C is post: a pre frame reaching it is channel state
    h.controller_log.clear()
    assert received(h, C, send(h, A, C, 1)) == [b"seq000001"]  # A before its marker: pre -> post, recorded
    assert received(h, B, send(h, A, B, 2)) == [b"seq000002"]  # pre -> pre: the switch delivers it
    assert [role for *_, role in h.controller_log] == [of.ROLE_RECORD]  # no packet-in for the fast path
    assert learned_flows(h) == []
    bounced = marker_of(h, sid, "A", A)
    assert [(d, p) for d, p, _ in bounced.delivered] == [WHERE[A]]  # the marker comes back down A's own link
    assert h.coordinator.current.cuts["A"].marker_seen
    assert [e.match for e in learned_flows(h)] == [of.match(in_port=WHERE[A][1], reg0=1)]  # the switch learned it
    # A runs on before its flip: its frames are post now, coloured so by the switch.
    h.controller_log.clear()
    assert send(h, A, B, 3) == []  # post -> pre: held for B
    assert received(h, C, send(h, A, C, 4)) == [b"seq000004"]  # post -> post: delivered, not recorded
    assert [role for *_, role in h.controller_log] == [of.ROLE_HOLD]
    assert [(r.receiver, r.frame[14:23]) for r in h.coordinator.recorded] == [("C", b"seq000001")]
    flip = h.controller.cut(sid, "A", {"marker": True})
    assert flip["epoch"] == 1 and learned_flows(h) == []  # the flip's rules replace it, and it goes after them
    # After the flip the switch colours A's frames by its plain ingress rule, with the new colour.
    h.controller_log.clear()
    assert send(h, A, B, 5) == []  # still post -> pre: held by B's egress rule
    assert [role for *_, role in h.controller_log] == [of.ROLE_HOLD]
    h.deliveries.clear()
    h.controller.cut(sid, "B")
    assert received(h, B) == [b"seq000003", b"seq000005"]
    assert [(r.receiver, r.frame[14:23]) for r in h.coordinator.recorded] == [("C", b"seq000001")]


def test_the_flip_deletes_the_learned_colour_after_the_rules_that_consult_it(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A", {"divert": True})
    marker_of(h, sid, "A", A)
    rules, _, tidying = h.coordinator.flip_many(h.now, sid, ["A"])
    assert not [m for m in rules if m.dpid == 1 and m.entry.table_id in (0, LEARNED_TABLE)]  # none on its path
    on_a = [m for m in tidying if m.dpid == 1]
    deletes = [m for m in on_a if m.command.startswith("delete")]
    assert [m.command for m in deletes if m.entry.learned] == ["delete"]  # with any stale copy of it
    assert deletes[-1].entry.learned and not any(m.entry.learned for m in on_a if m.command == "add")
    assert [i for i, m in enumerate(on_a) if m.command == "add"][-1] < on_a.index(deletes[0])


def test_a_learned_colour_the_switch_re_adds_after_the_flip_never_colours_a_later_snapshot(h):
    """OVS re-adds a deleted learned flow when the cached flow that learned it sees packets again (the
    cut request does): two snapshots on, with the same colours, it must not make pre frames post."""
    stale = []
    for _ in range(2):
        sid = h.controller.start_snapshot({})["id"]
        h.controller.prepare(sid, "A", {"divert": True})
        marker_of(h, sid, "A", A)
        stale += learned_flows(h)
        for name in ("A", "B", "C"):
            h.controller.cut(sid, name, {"marker": True} if name == "A" else None)
            h.controller.done(sid, name, {"pause_ms": 1.0})
        h.run_spawned()
        assert h.coordinator.current.state == "complete"
    first = stale[0]  # learned in epoch 1, re-added as OVS's learn refresh would
    h.net.switch(1).tables.setdefault(LEARNED_TABLE, {})[(first.priority, first.match)] = first
    sid = h.controller.start_snapshot({})["id"]  # epoch 3: the colours of epoch 1
    h.controller.prepare(sid, "A", {"divert": True})
    assert received(h, B, send(h, A, B, 1)) == [b"seq000001"]  # pre -> pre: delivered, not held as post
    h.controller.cut(sid, "C")
    assert received(h, C, send(h, A, C, 2)) == [b"seq000002"]
    assert [(r.receiver, r.frame[14:23]) for r in h.coordinator.recorded] == [("C", b"seq000002")]
    marker_of(h, sid, "A", A)
    h.controller.cut(sid, "A", {"marker": True})
    assert learned_flows(h) == []  # the flip took the stale copies too


def test_a_diverted_member_hears_nothing_until_its_flip_and_its_floods_follow_the_cut_rules(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A", {"divert": True})
    assert send(h, B, A, 1) == []  # held for A, as for any prepared member
    out = send(h, A, BCAST, 2)  # pre flood from A: B and C are pre, D is no member: all get it now
    assert sorted((d, p) for d, p, _ in out) == sorted([WHERE[B], WHERE[C], WHERE[D]])
    marker_of(h, sid, "A", A)
    out = send(h, A, BCAST, 3)  # post flood: held for the pre members, delivered to D
    assert sorted((d, p) for d, p, _ in out) == [WHERE[D]]
    h.deliveries.clear()
    h.controller.cut(sid, "A", {"marker": True})
    assert received(h, A) == [b"seq000001"]
    assert [(r.receiver, r.frame[14:23]) for r in h.coordinator.recorded] == [("A", b"seq000001")]
    h.deliveries.clear()
    h.controller.cut(sid, "B")
    assert received(h, B) == [b"seq000003"]


def test_a_switch_that_refuses_the_asynchronous_cuts_rules_aborts_the_snapshot(h):
    """A switch without OVS's learn/resubmit answers the prepare's flow-mods with errors before the barrier."""
    sid = h.controller.start_snapshot({})["id"]
    plain = h.io.send_and_barrier

    def refusing(messages, dpids, timeout):
        if any(isinstance(a, of.LearnVid) for m in messages if isinstance(m, of.FlowMod) and m.entry
               for a in m.entry.actions):
            h.controller.switch_error(1)
        return plain(messages, dpids, timeout)

    h.io.send_and_barrier = refusing
    with pytest.raises(Refused) as error:
        h.controller.prepare(sid, "A", {"divert": True})
    assert error.value.status == 502 and "learn and resubmit" in error.value.reason
    assert h.coordinator.current.state == "aborted"


def test_an_abort_takes_the_learned_colour_out_of_the_switch(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A", {"divert": True})
    marker_of(h, sid, "A", A)
    assert learned_flows(h)
    h.controller.abort(sid, {"reason": "test"})
    assert learned_flows(h) == []
    h.deliveries.clear()
    send(h, A, B, 9)
    assert received(h, B) == [b"seq000009"]


def test_a_lost_marker_aborts_an_asynchronous_cut(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A", {"divert": True})
    send(h, A, B, 1)  # coloured pre: without a marker nobody can tell where A's cut was
    with pytest.raises(Refused) as error:
        h.controller.cut(sid, "A", {"marker": True})
    assert error.value.status == 409 and "no cut marker from A" in error.value.reason
    assert h.coordinator.current.state == "aborted"


def cut_request_of(h, sid, name, mac, where=None):
    return h.send(*(where or WHERE[mac]), build_cut_request(mac, sid, name))


def test_an_in_band_cut_request_after_the_marker_flips_the_member_and_releases_what_it_was_held(h):
    sid = h.controller.start_snapshot({})["id"]
    answer = h.controller.prepare(sid, "A", {"divert": True})
    assert answer["divert"] is True and answer["cut_frame"] is True
    h.now = 10.0
    assert send(h, B, A, 1) == []  # held for A
    marker_of(h, sid, "A", A)
    assert send(h, A, B, 2) == []  # A runs on, post: held for B
    h.now = 10.02
    bounced = cut_request_of(h, sid, "A", A)
    assert [(d, p) for d, p, _ in bounced.delivered] == [WHERE[A]]  # the marker rule sends it back too
    assert h.coordinator.current.cuts["A"].state == "prepared"  # the flip is off the packet-in path
    h.deliveries.clear()
    h.run_spawned()
    cut = h.coordinator.current.cuts["A"]
    assert cut.state == "cut" and h.coordinator.members["A"].epoch == 1
    assert received(h, A) == [b"seq000001"]  # released, and recorded: B (pre) sent it before A's cut
    assert [(r.receiver, r.frame[14:23]) for r in h.coordinator.recorded] == [("A", b"seq000001")]
    assert learned_flows(h) == []
    assert cut.held_ms is not None and cut.flip_ms is not None
    cut_request_of(h, sid, "A", A)  # a repeated request (or one after the flip) asks for nothing
    assert h.coordinator.take_cut_requests() == [] and not h.io.spawned
    h.controller.done(sid, "A", {"pause_ms": 1.0})
    assert h.coordinator.current.cuts["A"].state == "done"


def test_cut_requests_before_the_marker_from_another_port_or_snapshot_ask_for_nothing(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A", {"divert": True})
    cut_request_of(h, sid, "A", A)  # before its marker: where its cut is is not known yet
    cut_request_of(h, sid, "A", A, where=WHERE[B])  # A's name from B's port
    cut_request_of(h, "snap-9999-000000", "A", A)
    h.controller.prepare(sid, "B")  # not diverted: cut by its call while it is paused
    marker_of(h, sid, "B", B)
    cut_request_of(h, sid, "B", B)
    assert not h.io.spawned and h.coordinator.current.cuts["A"].state == "prepared"
    assert h.coordinator.current.cuts["B"].state == "prepared"


def test_cut_requests_that_come_in_together_are_flipped_in_one_batch(tmp_path):
    h = make_harness(tmp_path, members=("A", "B", "C"))
    sid = h.controller.start_snapshot({})["id"]
    for name, mac in (("A", A), ("B", B)):
        h.controller.prepare(sid, name, {"divert": True})
        marker_of(h, sid, name, mac)
        cut_request_of(h, sid, name, mac)
    assert len(h.io.spawned) == 2
    h.run_spawned()
    members = {m["name"]: m for m in h.controller.snapshot_view(sid)["members"]}
    assert members["A"]["state"] == members["B"]["state"] == "cut"


def test_done_cuts_a_diverted_member_whose_cut_request_never_came_in(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A", {"divert": True})
    assert send(h, B, A, 1) == []
    marker_of(h, sid, "A", A)
    h.deliveries.clear()
    h.controller.done(sid, "A", {"pause_ms": 1.0})  # its cut request frame was lost
    assert h.coordinator.current.cuts["A"].state == "done" and received(h, A) == [b"seq000001"]
    assert h.coordinator.members["A"].epoch == 1


def test_done_waits_for_a_marker_still_queued_behind_other_packet_ins(h):
    """The helper saw the marker's echo; its packet-in may reach the controller after the done report."""
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A", {"divert": True})
    assert send(h, B, A, 1) == []
    plain_wait, waits = h.io.wait_until, []

    def marker_arrives_while_waiting(predicate, timeout):
        waits.append(timeout)
        if len(waits) == 1:
            marker_of(h, sid, "A", A)
            h.deliveries.clear()  # its echo down A's link
        return plain_wait(predicate, timeout)

    h.io.wait_until = marker_arrives_while_waiting
    h.controller.done(sid, "A", {"pause_ms": 1.0})
    assert waits[0] == h.controller.config.snapshot.marker_timeout
    assert h.coordinator.current.state == "running" and h.coordinator.current.cuts["A"].state == "done"
    assert received(h, A) == [b"seq000001"] and h.coordinator.members["A"].epoch == 1


def test_done_of_a_diverted_member_without_its_marker_aborts_the_snapshot(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A", {"divert": True})
    with pytest.raises(Refused) as error:
        h.controller.done(sid, "A", {"pause_ms": 1.0})
    assert error.value.status == 409 and "no cut marker from A within 5.0 s of its done report" in error.value.reason
    assert h.coordinator.current.state == "aborted"


def test_done_of_a_prepared_member_that_was_never_cut_is_refused(h):
    sid = h.controller.start_snapshot({})["id"]
    h.controller.prepare(sid, "A")
    with pytest.raises(Refused) as error:
        h.controller.done(sid, "A", {"pause_ms": 1.0})
    assert error.value.status == 409 and "before its cut" in error.value.reason


def test_prepare_body_is_validated(h):
    sid = h.controller.start_snapshot({})["id"]
    with pytest.raises(Refused) as error:
        h.controller.prepare(sid, "A", {"divert": "yes"})
    assert error.value.status == 400 and "divert" in error.value.reason
    assert h.controller.prepare(sid, "A", {})["divert"] is False


def test_a_member_on_two_ports_is_not_diverted_one_marker_speaks_for_one_port(tmp_path):
    h = make_harness(tmp_path, members=())
    h.coordinator.add_member(parse_member({"name": "AC", "macs": [A, C], "marker": True}))
    sid = h.controller.start_snapshot({})["id"]
    assert h.controller.prepare(sid, "AC", {"divert": True})["divert"] is False
    assert not [e for t in h.net.switch(1).tables.values() for e in t.values()
                if any(isinstance(a, (of.Resubmit, of.LearnVid)) for a in e.actions)]


def test_members_are_found_by_mac_through_every_change():
    """The registry's MAC index follows adds, updates and removals (every packet-in looks a MAC up)."""
    from violin_core.members import MemberRegistry
    registry = MemberRegistry()
    a = registry.add(parse_member({"name": "a", "macs": ["02:00:00:00:00:01"]}))
    registry.add(parse_member({"name": "b", "macs": ["02:00:00:00:00:02", "02:00:00:00:00:03"]}))
    assert registry.by_mac("02:00:00:00:00:01") is a and registry.by_mac("02:00:00:00:00:03").name == "b"
    assert registry.by_mac("02:00:00:00:00:09") is None
    registry.update(parse_member({"name": "a", "macs": ["02:00:00:00:00:04"]}))
    assert registry.by_mac("02:00:00:00:00:01") is None and registry.by_mac("02:00:00:00:00:04") is a
    registry.pop("b")
    assert registry.by_mac("02:00:00:00:00:02") is None
    a.macs = ("02:00:00:00:00:05",)  # changed behind the registry's back: a hit that no longer holds looks again
    assert registry.by_mac("02:00:00:00:00:04") is None and registry.by_mac("02:00:00:00:00:05") is a
