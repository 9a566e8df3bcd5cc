"""Cuts that arrive together are flipped together (issue 11, goal 5), with real concurrency.

The core runs under one lock, as in the RyuApp; each cut call is a thread. The io gives the lock up
while a barrier is in flight (the switches take ``BARRIER_S`` to confirm) and while a cut waits for
another batch, so cuts arriving meanwhile queue up and go into the next batch. The fake network
(``fakeoftable``) walks real frames through the flow-mods the batches install.

Topology: s1 ports 1-3 hosts, 4 trunk -- s2 port 4 trunk, ports 1-3 hosts.
"""

import threading
import time

import pytest

from violin_core.coordinator import SnapshotSettings
from violin_core.errors import Refused
from violin_core.fabric import FabricSettings
from violin_core.members import parse_member

from harness import FakeIO, Harness, eth_frame

BARRIER_S = 0.02
MACS = {"m%d%d" % (d, p): "02:00:00:00:%02x:%02x" % (d, p) for d in (1, 2) for p in (1, 2, 3)}
WHERE = {name: (int(name[1]), int(name[2])) for name in MACS}


class ThreadedIO(FakeIO):
    """FakeIO whose waits give up the core's lock, as HubIO's do: barriers take ``BARRIER_S``."""

    def __init__(self, harness):
        super().__init__(harness)
        self.lock = threading.Lock()
        self.barriers = []  # (dpids, time the switches confirmed, ok)
        self.fail_dpid = None  # a switch that never confirms

    def _unlocked(self, wait, *args):
        self.lock.release()
        try:
            return wait(*args)
        finally:
            self.lock.acquire()

    def send_and_barrier(self, messages, dpids, timeout):
        self.harness.run(messages)
        ok = self.fail_dpid not in set(dpids)
        self._unlocked(time.sleep, BARRIER_S)
        self.barriers.append((sorted(dpids), time.monotonic(), ok))
        return ok

    def wait_until(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            self._unlocked(time.sleep, 0.001)
        return predicate()

    def new_event(self):
        return threading.Event()

    def wait_event(self, event, timeout):
        return self._unlocked(event.wait, timeout)


def make_harness(tmp_path):
    ports = {1: [1, 2, 3, 4], 2: [1, 2, 3, 4]}
    h = Harness(ports, [((1, 4), (2, 4))], FabricSettings(), SnapshotSettings(barrier_timeout=2.0),
                state_dir=str(tmp_path / "state"))
    h.io = h.controller.io = ThreadedIO(h)
    h.controller.restorer.io = h.io
    h.start()
    for name, mac in MACS.items():
        h.send(*WHERE[name], eth_frame("ff:ff:ff:ff:ff:ff", mac, 0x0806))
        h.coordinator.add_member(parse_member({"name": name, "macs": [mac], "marker": False}))
    return h


def frame(dst, src, seq):
    return eth_frame(MACS[dst], MACS[src], 0x0800, b"seq%06d" % seq + b"." * 40)


def cut_all(h, sid, names):
    """Every name's cut call in its own thread, released together: {name: (answer or Refused, when)}."""
    results, gate = {}, threading.Barrier(len(names))

    def call(name, slot):
        gate.wait(5)
        with h.io.lock:
            try:
                outcome = h.controller.cut(sid, name)
            except Refused as refusal:
                outcome = refusal
        results[(name, slot)] = (outcome, time.monotonic())
    threads = [threading.Thread(target=call, args=(n, i)) for i, n in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not any(t.is_alive() for t in threads), "a cut call never returned"
    return results


def test_concurrent_cuts_share_barriers_and_answer_only_after_their_switches_confirmed(tmp_path):
    """Six cuts at once: fewer barrier rounds than cuts, every answer after the barrier of a batch that
    covered its switch, and the channel state is what the cuts imply: every pre-snapshot frame held for
    a prepared member is recorded once, in order, and released after its batch's barrier."""
    h = make_harness(tmp_path)
    names = sorted(MACS)
    with h.io.lock:
        sid = h.controller.start_snapshot({})["id"]
        for name in names:
            h.controller.prepare(sid, name)
        h.deliveries.clear()
        for seq, (src, dst) in enumerate([("m11", "m21"), ("m21", "m11"), ("m12", "m23"), ("m13", "m11")], 1):
            h.send(*WHERE[src], frame(dst, src, seq))  # held: every receiver is prepared
        assert h.deliveries == [] and h.coordinator.current.counts["held"] == 4
        h.io.barriers.clear()
    batches = []
    original = h.coordinator.flip_many

    def recording(now, snapshot_id, batch, wall=0.0):
        batches.append(list(batch))
        return original(now, snapshot_id, batch, wall)
    h.coordinator.flip_many = recording
    results = cut_all(h, sid, names)
    assert all(isinstance(outcome, dict) for outcome, _ in results.values()), results
    assert sorted(n for b in batches for n in b) == names
    assert len(batches) == len(h.io.barriers) < len(names)  # group commit: batches, not one flip each
    for (name, _slot), (answer, answered) in results.items():
        index = next(i for i, b in enumerate(batches) if name in b)
        dpids, confirmed, ok = h.io.barriers[index]
        assert ok and WHERE[name][0] in dpids and answered >= confirmed
        assert answer["batch"] == len(batches[index])
    with h.io.lock:
        snapshot = h.coordinator.current
        assert [c.state for c in snapshot.cuts.values()] == ["cut"] * len(names)
        recorded = [(r.receiver, r.frame[14:23]) for r in h.coordinator.recorded]
        assert sorted(recorded) == sorted([("m21", b"seq000001"), ("m11", b"seq000002"), ("m23", b"seq000003"),
                                           ("m11", b"seq000004")])
        assert [f for r, f in recorded if r == "m11"] == [b"seq000002", b"seq000004"]  # arrival order
        assert snapshot.counts["released"] == snapshot.counts["held"] == 4 and snapshot.counts["dropped"] == 0
        delivered = sorted(f[14:23] for _d, _p, f in h.deliveries)
        assert delivered == [b"seq000001", b"seq000002", b"seq000003", b"seq000004"]  # each once
        h.deliveries.clear()
        h.send(*WHERE["m11"], frame("m22", "m11", 5))  # all post: the switch delivers, nothing recorded
        assert [f[14:23] for _d, _p, f in h.deliveries] == [b"seq000005"] and len(h.coordinator.recorded) == 4


def test_a_switch_that_does_not_confirm_fails_every_cut_it_carries_and_none_hangs(tmp_path):
    h = make_harness(tmp_path)
    names = sorted(MACS)
    with h.io.lock:
        sid = h.controller.start_snapshot({})["id"]
        h.controller.prepare(sid, "m21")
        h.send(*WHERE["m11"], frame("m21", "m11", 1))  # held for m21
    h.io.fail_dpid = 2
    results = cut_all(h, sid, names)
    statuses = {name: outcome.status if isinstance(outcome, Refused) else 200
                for (name, _slot), (outcome, _when) in results.items()}
    assert all(statuses[n] in (409, 504) for n in names if n.startswith("m2")), statuses  # none answered "go on"
    assert 504 in statuses.values()
    with h.io.lock:
        assert h.coordinator.current.state == "aborted" and "did not confirm" in h.coordinator.current.reason
        assert h.coordinator.holds == {} and h.coordinator.recorded == []
        assert any(f[14:23] == b"seq000001" for _d, _p, f in h.deliveries)  # the held frame was released


def test_two_calls_for_one_member_in_a_batch_refuse_one_and_flip_the_rest(tmp_path):
    """A duplicate cut call (a helper retrying) is a 409 of its own; the other cuts are flipped."""
    h = make_harness(tmp_path)
    names = sorted(MACS)
    with h.io.lock:
        sid = h.controller.start_snapshot({})["id"]
    results = cut_all(h, sid, names + ["m12"])
    outcomes = [outcome for (name, _slot), (outcome, _when) in results.items() if name == "m12"]
    assert sorted(isinstance(o, Refused) and o.status for o in outcomes) == [False, 409]
    assert all(isinstance(o, dict) for (n, _s), (o, _w) in results.items() if n != "m12")
    with h.io.lock:
        assert {c.state for c in h.coordinator.current.cuts.values()} == {"cut"}
        assert h.coordinator.running()


def test_a_cut_refused_inside_a_batch_does_not_fail_the_others(tmp_path):
    """A queued cut whose member was meanwhile cut is answered 409 alone; the batch flips the rest."""
    h = make_harness(tmp_path)
    with h.io.lock:
        sid = h.controller.start_snapshot({})["id"]
        h.controller.cut(sid, "m21")
        h.controller.flip_queue["m21"] = (h.now, h.now)  # a second call that got past the first check
        h.controller.flip_queue["m22"] = (h.now, h.now)
        answer = h.controller.cut(sid, "m11")
        assert answer["batch"] == 2 and h.controller.flip_results["m22"]["batch"] == 2
        refusal = h.controller.flip_results["m21"]
        assert isinstance(refusal, Refused) and refusal.status == 409 and "already cut" in refusal.reason
        assert h.coordinator.running() and h.coordinator.current.cuts["m22"].state == "cut"


def test_a_cut_call_while_the_same_member_waits_is_refused(tmp_path):
    h = make_harness(tmp_path)
    with h.io.lock:
        sid = h.controller.start_snapshot({})["id"]
        h.controller.flip_queue["m11"] = (h.now, h.now)
        with pytest.raises(Refused) as error:
            h.controller.cut(sid, "m11")
        assert error.value.status == 409 and "already under way" in error.value.reason


def test_the_manifest_is_written_after_the_answers_once_and_not_over_the_completed_one(tmp_path):
    """Cuts and dones ask for one background write (no fsync before a cut's answer); it writes the running
    snapshot's progress, and skips a snapshot that ended meanwhile (its end wrote the final manifest)."""
    h = make_harness(tmp_path)
    with h.io.lock:
        sid = h.controller.start_snapshot({"members": ["m11", "m21"]})["id"]
        h.controller.cut(sid, "m11")
        stored = h.controller.catalogue.get(sid)
        assert {m["name"]: m["state"] for m in stored["members"]}["m11"] == "pending"  # not yet written
        h.controller.cut(sid, "m21")
        h.controller.done(sid, "m11", {})
        assert len(h.io.spawned) == 1  # one queued write for two cuts and a done
        h.run_spawned()
        assert {m["name"]: m["state"] for m in h.controller.catalogue.get(sid)["members"]} == {
            "m11": "done", "m21": "cut"}
        h.controller.done(sid, "m21", {})  # the last done: drain queued, then a write
        h.run_spawned()
        final = h.controller.catalogue.get(sid)
        assert final["state"] == "complete" and "channel" in final  # the write after it did not replace it


def test_the_progress_write_runs_off_the_event_loop_and_never_lands_over_a_later_manifest(tmp_path, monkeypatch):
    """The running snapshot's manifest is written through io.run_blocking (a thread in the RyuApp:
    its fsyncs no longer hold every cut); a write that lost the race with a later save of the same
    snapshot (the final manifest) is dropped, not renamed over it."""
    import json
    import os
    from violin_core.catalogue import Catalogue
    h = make_harness(tmp_path)
    blocking = []
    h.io.run_blocking = lambda function: blocking.append(function) or function()  # FakeIO's: no thread
    with h.io.lock:
        sid = h.controller.start_snapshot({"members": ["m11"]})["id"]
        h.controller.cut(sid, "m11")
        h.run_spawned()
    assert len(blocking) == 2  # the manifest's file, then its directory
    stored = h.controller.catalogue.get(sid)
    assert {m["name"]: m["state"] for m in stored["members"]} == {"m11": "cut"}
    path = os.path.join(str(tmp_path / "state"), sid, "manifest.json")
    with open(path) as handle:
        assert json.load(handle)["members"][0]["state"] == "cut"

    catalogue = Catalogue(str(tmp_path / "other")).open()
    # The fsyncs run in a worker thread: no eventlet-patched call in them (a green os.open there
    # stalled ryu-manager's event loop).
    monkeypatch.setattr(os, "open", lambda *args: pytest.fail("os.open in a write off the event loop"))

    def final_lands_meanwhile(function):  # the final manifest saved while the progress write is out
        result = function()
        if not os.path.exists(os.path.join(str(tmp_path / "other"), "s1", "manifest.json")):
            catalogue.save({"id": "s1", "state": "complete"})
        return result
    assert catalogue.save_later({"id": "s1", "state": "running"}, final_lands_meanwhile) is False
    reopened = Catalogue(str(tmp_path / "other")).open()
    assert reopened.get("s1")["state"] == "complete" and catalogue.get("s1")["state"] == "complete"
    assert catalogue.save_later({"id": "s2", "state": "running"}, lambda function: function()) is True
    assert Catalogue(str(tmp_path / "other")).open().get("s2")["state"] == "aborted"  # running at a restart
    assert os.listdir(str(tmp_path / "other" / "s1")) == ["manifest.json"]  # no temp file left


def test_a_progress_write_asked_for_by_one_snapshot_does_not_land_among_the_next_ones_cuts(tmp_path):
    """A's queued write, run while B runs, writes nothing (A's end wrote A; B's cuts are not held by
    A's write); B's own asks queue B's write, which writes B."""
    h = make_harness(tmp_path)
    with h.io.lock:
        first = h.controller.start_snapshot({"members": ["m11"]})["id"]
        h.controller.cut(first, "m11")
        first_write = h.io.spawned.pop(0)  # queued by the cut; held back until the next snapshot runs
        h.controller.done(first, "m11", {})
        h.run_spawned()  # the drain completes the first snapshot (its final manifest)
        assert h.controller.catalogue.get(first)["state"] == "complete"
        second = h.controller.start_snapshot({"members": ["m11", "m21"]})["id"]
        h.controller.cut(second, "m11")
        assert len(h.io.spawned) == 1  # the second snapshot's own write: not swallowed by the first's
        written = []
        h.controller.catalogue.save_later = lambda manifest, run: written.append(manifest["id"])
        first_write[0](*first_write[1])
        assert written == [] and h.controller.persist_pending == second
        h.run_spawned()
        assert written == [second]


def test_a_flip_derives_only_its_members_flows_and_its_deletes_repeat(tmp_path, monkeypatch):
    """A flip of one member derives that member's flows (and the switch's own), not every host's: the
    rest are the ones derived at the last reconcile (``Fabric.check_partial``, on in every test, compares
    each such reconcile with deriving everything). Its deletes carry no actions, so the same delete is
    the same message, and encoded once, in every snapshot."""
    h = make_harness(tmp_path)
    monkeypatch.setattr(h.fabric, "check_partial", False)  # which would derive everything again
    derived = []
    original = h.fabric.host_flows
    monkeypatch.setattr(h.fabric, "host_flows", lambda dpid, mac, hops: derived.append(mac) or original(dpid, mac, hops))
    deletes = []
    for _ in range(2):
        with h.io.lock:
            sid = h.controller.start_snapshot({"members": ["m11", "m12"]})["id"]
            h.controller.prepare(sid, "m11", {"divert": True})
            derived.clear()
            rules, releases, tidying = h.coordinator.flip_many(h.now, sid, ["m11"])
            assert derived == [MACS["m11"]]
            deletes.append({m for m in rules + tidying if m.command.startswith("delete")})
            assert all(m.entry.actions == () and m.entry.goto is None for m in deletes[-1])
            h.controller.abort(sid, {"reason": "test"})
    assert deletes[0] and deletes[0] == deletes[1]  # epochs differ; the deletes do not
