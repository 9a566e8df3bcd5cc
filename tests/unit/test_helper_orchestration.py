"""The helper's orchestration, driven whole through a fake backend (tests/fakebackend.py), no root:
the order of the controller callbacks, their bodies, the stored image, and a failure at every step
ending in ``failed`` with a reason, never in an exception out of the job thread."""

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest

import fakebackend
from hostside import helper, orchestration, ovs
from hostside.backends import criu
from hostside.backends.base import Located, Restored

CALLBACKS = "http://controller:8080/violin/snapshots/s1/members/f1/"
SNAPSHOT = {"snapshot": "s1", "member": "f1", "epoch": 1, "prepare_url": CALLBACKS + "prepare",
            "cut_url": CALLBACKS + "cut", "done_url": CALLBACKS + "done", "failed_url": CALLBACKS + "failed"}
ATTACHMENT = {"dpid": "00000000000000aa", "port": 3}


class StoreRefused(RuntimeError):
    """What the snapshot server client raises (StorageError is a RuntimeError)."""


class FakeStore:
    """Snapshot servers in memory: url -> {(snapshot, member): {file name: bytes}}."""

    def __init__(self):
        self.images, self.refuse, self.corrupt = {}, False, False

    def client(self, url):
        store = self

        class Client:
            def upload_dir(self, snapshot, member, directory):
                return [self.upload_stream(snapshot, member, name, open(os.path.join(directory, name), "rb"))
                        for name in sorted(os.listdir(directory))]

            def upload_stream(self, snapshot, member, name, reader):
                if store.refuse:
                    raise StoreRefused("snapshot server %s refused %s: disk full" % (url, name))
                data = b"".join(iter(lambda: reader.read(1 << 16), b""))
                store.images.setdefault(url, {}).setdefault((snapshot, member), {})[name] = data
                return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "path": "x"}

            def download_dir(self, snapshot, member, directory):
                os.makedirs(directory, exist_ok=True)
                files = []
                for name, data in store.images[url][(snapshot, member)].items():
                    with open(os.path.join(directory, name), "wb") as handle:
                        handle.write(data)
                    digest = hashlib.sha256(data + (b"!" if store.corrupt else b"")).hexdigest()
                    files.append({"name": name, "bytes": len(data), "sha256": digest})
                return files

        return Client()


class Rig:
    """A helper over the fake backend, a fake controller and fake snapshot servers; one timeline."""

    def __init__(self, tmp_path, members=None, spawn=lambda job: job()):
        raw = {"token": "t", "controller_token": "c", "server_token": "s", "servers": ["http://store:7070"],
               "work_dir": str(tmp_path), "members": members or {"f1": {"backend": "fake"}}}
        self.config = helper.parse_config(raw, environ={})
        self.timeline, self.refuse, self.store = [], set(), FakeStore()
        self.helper = helper.Helper(self.config, post=self.post, store=self.store.client,
                                    purge=lambda: self.timeline.append(("purge",)),
                                    attachment=lambda port: dict(ATTACHMENT, name=port) if port else None,
                                    spawn=spawn)
        self.backend = self.config.backends[next(iter(self.config.members))]
        if isinstance(self.backend, fakebackend.FakeBackend):
            self.backend.calls = self.timeline

    def post(self, url, body):
        step = url.rsplit("/", 1)[-1]
        self.timeline.append((step, body))
        if step in self.refuse:
            raise orchestration.ControllerError("controller answered 409 to %s: refused" % step)
        return {}

    def steps(self):
        return [entry[0] for entry in self.timeline]

    def reported(self, step):
        return [entry[1] for entry in self.timeline if entry[0] == step]


@pytest.fixture
def rig(tmp_path):
    with fakebackend.registered():
        yield Rig(tmp_path)


def async_rig(tmp_path, prepare_answer, **backend_attributes):
    """A snapshot of one fake-async member (``backend_attributes`` set on its backend first) whose
    controller answers the prepare with ``prepare_answer``."""
    with fakebackend.registered():
        rig = Rig(tmp_path, members={"f1": {"backend": "fake-async"}})
        for key, value in backend_attributes.items():
            setattr(rig.backend, key, value)
        rig.post = lambda url, body: rig.timeline.append((url.rsplit("/", 1)[-1], body)) or (
            prepare_answer if url.endswith("/prepare") else {})
        rig.helper.post = rig.post
        rig.helper.start_snapshot(SNAPSHOT)
    return rig


def test_an_asynchronous_cut_confirms_the_marker_frozen_and_asks_for_the_flip_in_band_once_the_member_runs(tmp_path):
    rig = async_rig(tmp_path, {"divert": True, "cut_frame": True})
    # frozen: the marker confirmed, then the purge (the datapath must forget the old colour); no cut call
    assert rig.steps() == ["quiet_open", "prepare", "purge", "before_cut", "quiet_confirmed", "purge", "after_cut",
                           "cut_request", "resumed", "quiet_close", "done"]
    assert rig.reported("prepare") == [{"divert": True}] and rig.reported("done")[0]["image"]["cut"] == "in-band"


def test_an_asynchronous_cut_calls_the_cut_once_the_member_runs_without_cut_frames(tmp_path, monkeypatch):
    for answer, mode in (({"divert": True}, "async"), ({"divert": True, "cut_frame": True}, "async-call")):
        monkeypatch.setattr(orchestration, "CUT_MODE", mode)  # an older controller, or VIOLIN_CUT=async-call
        rig = async_rig(tmp_path / mode, answer)
        assert rig.steps() == ["quiet_open", "prepare", "purge", "before_cut", "quiet_confirmed", "purge", "after_cut",
                               "cut", "resumed", "quiet_close", "done"]
        assert rig.reported("prepare") == [{"divert": True}] and rig.reported("cut") == [{"marker": True}]
        assert rig.reported("done")[0]["image"]["cut"] == "async"


def test_an_older_controller_that_does_not_divert_gets_the_cut_while_frozen(tmp_path):
    with fakebackend.registered():
        rig = Rig(tmp_path, members={"f1": {"backend": "fake-async"}})
        rig.helper.start_snapshot(SNAPSHOT)
    assert rig.steps() == ["quiet_open", "prepare", "purge", "before_cut", "quiet", "cut", "purge", "after_cut",
                           "resumed", "quiet_close", "done"]  # resumed: nothing left to do
    assert rig.reported("prepare") == [{"divert": True}] and rig.reported("done")[0]["image"]["cut"] == "sync"


def test_a_member_that_takes_frames_while_stopped_asks_for_its_flip_right_after_its_marker(tmp_path):
    """A VM (``flips_stopped``): the cut request goes at the cut, behind the marker and the purge, so
    the frames held for it are released while QEMU completes; nothing is left to do once it runs."""
    rig = async_rig(tmp_path, {"divert": True, "cut_frame": True}, flips_stopped=True)
    assert rig.steps() == ["quiet_open", "prepare", "purge", "before_cut", "quiet_confirmed", "purge", "cut_request",
                           "after_cut", "resumed", "quiet_close", "done"]
    assert rig.reported("done")[0]["image"]["cut"] == "in-band"


def test_a_member_whose_proof_cannot_mark_is_cut_while_frozen_without_asking_to_divert(tmp_path):
    """A VM whose tap the helper cannot write a marker into (``marks`` False) is cut synchronously."""
    rig = async_rig(tmp_path, {"divert": True, "cut_frame": True}, proof_marks=False)
    assert rig.steps() == ["quiet_open", "prepare", "purge", "before_cut", "quiet", "cut", "purge", "after_cut",
                           "quiet_close", "done"]
    assert rig.reported("prepare") == [{}] and rig.reported("cut") == [{"marker": rig.backend.sends_marker}]
    assert rig.reported("done")[0]["image"]["cut"] == "sync"


def test_a_snapshot_calls_prepare_cut_done_in_order_and_stores_the_image(rig):
    assert rig.helper.start_snapshot(SNAPSHOT) == {"accepted": "s1/f1"}
    assert rig.steps() == ["quiet_open", "prepare", "purge", "before_cut", "quiet", "cut", "purge", "after_cut",
                           "quiet_close", "done"]
    assert rig.reported("prepare") == [{}] and rig.reported("cut") == [{"marker": True}]
    assert ("after_cut", "f1", 0.5) in rig.timeline  # at_cut hands back the quiet proof's result
    stored = rig.store.images["http://store:7070"][("s1", "f1")]
    assert stored == {"memory": b"state of f1"}
    done = rig.reported("done")
    assert len(done) == 1 and 0 <= done[0]["image"].pop("upload_wait_ms") < 1000  # no other member to wait for
    assert done[0]["image"].pop("prepare_call_ms") >= 0 and done[0]["image"].pop("prepare_purge_ms") >= 0
    assert done == [{
        "pause_ms": 1.25, "bytes": 11, "server": "http://store:7070",
        "image": {"backend": "fake", "fake_ms": 2.0, "files": [
            {"name": "memory", "bytes": 11, "sha256": hashlib.sha256(b"state of f1").hexdigest()}],
            "storage": {"logical_bytes": 11, "stored_bytes": 11, "sent_bytes": 11}, "cut": "sync"}}]
    assert rig.helper.jobs["s1/f1"]["state"] == "done"


def test_a_member_stores_its_image_once_the_helpers_other_members_are_through_their_freezes(tmp_path):
    jobs = []
    with fakebackend.registered():
        rig = Rig(tmp_path, members={"f1": {"backend": "fake"}, "f2": {"backend": "fake"}}, spawn=jobs.append)
        rig.helper.start_snapshot(SNAPSHOT)
        rig.helper.start_snapshot(dict(SNAPSHOT, member="f2"))
        first = threading.Thread(target=jobs[0])
        first.start()
        first.join(0.3)
        assert first.is_alive() and ("s1", "f1") not in rig.store.images.get("http://store:7070", {})
        jobs[1]()  # f2 freezes and settles: f1 may store now
        first.join(5)
    assert not first.is_alive()
    waits = {d["image"]["upload_wait_ms"] for d in rig.reported("done")}
    assert max(waits) >= 250 and set(rig.store.images["http://store:7070"]) == {("s1", "f1"), ("s1", "f2")}


def test_the_upload_gate_waits_for_every_member_still_to_freeze_and_gives_up_after_its_timeout(caplog):
    gate = orchestration.UploadGate(timeout=0.2)
    gate.begin("s/a")
    gate.begin("s/b")
    waited = []
    thread = threading.Thread(target=lambda: waited.append(gate.settle("s/a")))
    thread.start()
    time.sleep(0.05)
    gate.end("s/b")  # b failed before its freeze: a need not wait for it
    thread.join(1)
    assert waited and waited[0] < 0.2
    gate.begin("s/c")
    assert 0.2 <= gate.settle("s/d") < 1.0  # c never freezes: d stores after the timeout, and says why
    assert "s/c" in caplog.text


def test_without_prepare_url_the_cut_urls_sibling_is_used(rig):
    rig.helper.start_snapshot({k: v for k, v in SNAPSHOT.items() if k != "prepare_url"})
    assert rig.steps()[1] == "prepare"
    rig.helper.start_snapshot(dict(SNAPSHOT, snapshot="s2", prepare_url="http://elsewhere/p/ready"))
    assert ("ready", {}) in rig.timeline


def test_a_backend_without_marker_says_so_in_the_cut(rig, monkeypatch):
    monkeypatch.setattr(fakebackend.FakeBackend, "sends_marker", False)
    rig.helper.start_snapshot(SNAPSHOT)
    assert rig.reported("cut") == [{"marker": False}]


def _refuse(step):
    return lambda rig: rig.refuse.add(step)


def _backend_fails(step, error):
    return lambda rig: rig.backend.fail.__setitem__(step, error)


def _store_refuses(rig):
    rig.store.refuse = True


FAILURES = {
    "prepare refused": (_refuse("prepare"), "prepare: refused", ["quiet_open", "prepare", "quiet_close"]),
    "quiet proof cannot open": (_backend_fails("quiet_open", OSError(19, "No such device")), "No such device",
                                ["quiet_open"]),
    "capture fails before the cut": (_backend_fails("before_cut", RuntimeError("criu dump failed")),
                                     "criu dump failed", ["quiet_open", "prepare", "purge", "before_cut",
                                                          "quiet_close"]),
    "the quiet proof fails at the cut": (_backend_fails("quiet", RuntimeError("frames still wait")),
                                         "frames still wait", ["quiet_open", "prepare", "purge", "before_cut",
                                                               "quiet", "quiet_close"]),
    "cut refused": (_refuse("cut"), "cut: refused", ["quiet_open", "prepare", "purge", "before_cut", "quiet", "cut",
                                                     "quiet_close"]),
    "capture fails after the cut": (_backend_fails("after_cut", RuntimeError("switchover failed")),
                                    "switchover failed", None),
    "store refuses": (_store_refuses, "disk full", None),
    "done refused": (_refuse("done"), "done: refused", None),
    "unexpected AttributeError in the backend": (_backend_fails("after_cut", AttributeError("no attribute 'x'")),
                                                 "no attribute 'x'", None),
    "unexpected KeyError in the backend": (_backend_fails("before_cut", KeyError("pid")), "'pid'", None),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_failure_at_any_step_reports_failed_with_its_reason(rig, case):
    inject, reason, steps = FAILURES[case]
    inject(rig)
    rig.helper.start_snapshot(SNAPSHOT)
    assert rig.steps()[-1] == "failed"
    (failed,) = rig.reported("failed")
    assert reason in failed["reason"]
    assert rig.helper.jobs["s1/f1"]["state"] == "failed" and reason in rig.helper.jobs["s1/f1"]["reason"]
    if steps is not None:
        assert rig.steps()[:-1] == steps
    if case != "done refused":
        assert rig.reported("done") == []
    if steps != ["quiet_open"]:
        assert "quiet_close" in rig.steps()  # the marker socket is closed whatever happened after it opened


def test_a_refused_failed_report_does_not_escape_either(rig):
    rig.refuse.update({"cut", "failed"})
    rig.helper.start_snapshot(SNAPSHOT)
    assert rig.helper.jobs["s1/f1"]["state"] == "failed"


def test_no_exception_escapes_the_background_thread(tmp_path):
    escaped = []
    previous, threading.excepthook = threading.excepthook, escaped.append
    try:
        with fakebackend.registered():
            rig = Rig(tmp_path, spawn=orchestration.spawn_thread)
            rig.backend.fail["after_cut"] = KeyError("boom")
            rig.refuse.add("failed")
            rig.helper.start_snapshot(SNAPSHOT)
            deadline = time.monotonic() + 5
            while rig.helper.jobs["s1/f1"]["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)
    finally:
        threading.excepthook = previous
    assert rig.helper.jobs["s1/f1"] == dict(rig.helper.jobs["s1/f1"], state="failed", reason="'boom'")
    assert escaped == []


def test_one_job_per_snapshot_and_member(rig):
    rig.helper.start_snapshot(SNAPSHOT)
    with pytest.raises(orchestration.Conflict):
        rig.helper.start_snapshot(SNAPSHOT)


@pytest.mark.parametrize("body,error", [
    ([], orchestration.BadRequest),
    ({k: v for k, v in SNAPSHOT.items() if k != "cut_url"}, orchestration.BadRequest),
    (dict(SNAPSHOT, member=3), orchestration.BadRequest),
    (dict(SNAPSHOT, member="nobody"), orchestration.UnknownMember),
])
def test_bad_snapshot_requests_are_refused_before_any_callback(rig, body, error):
    with pytest.raises(error):
        rig.helper.start_snapshot(body)
    assert rig.timeline == []


def _snapshot_and_stage(rig):
    rig.helper.start_snapshot(SNAPSHOT)
    (done,) = rig.reported("done")
    return rig.helper.stage({"snapshot": "s1", "member": "f1", "server": done["server"],
                             "files": done["image"]["files"]})


def test_stage_restore_resume_stop(rig):
    staged = _snapshot_and_stage(rig)
    assert staged.pop("stage_ms") >= 0
    assert staged == {"staged": "f1", "files": 1, "restores_paused": True, "from": "server"}
    assert ("stage", "f1", ["memory"]) in rig.timeline
    assert rig.helper.restore({"snapshot": "s1", "member": "f1"}) == {
        "restored": "f1", "iface": "fake-eth0", "attachment": dict(ATTACHMENT, name="fake-eth0"),
        "restore_ms": 3.2, "fake": True}
    assert rig.helper.resume({"snapshot": "s1", "member": "f1"}) == {"resumed": "f1"}
    assert rig.helper.stop({"snapshot": "s1", "member": "f1"}) == {"stopped": "f1"}
    assert rig.steps()[-3:] == ["restore", "resume", "stop"]


def test_stage_refuses_an_image_whose_checksums_differ(rig):
    rig.store.corrupt = True
    with pytest.raises(orchestration.Failed, match="not the one the snapshot recorded"):
        _snapshot_and_stage(rig)
    assert "stage" not in rig.steps()  # the backend never sees a wrong image


def test_restore_of_an_unstaged_image_is_not_found(rig):
    with pytest.raises(orchestration.UnknownMember, match="not staged"):
        rig.helper.restore({"snapshot": "s9", "member": "f1"})


@pytest.mark.parametrize("step", ["restore", "resume", "stop"])
def test_backend_failures_of_restore_resume_stop_are_raised(rig, step):
    _snapshot_and_stage(rig)
    rig.backend.fail[step] = RuntimeError("member f1 (pid 1) is not running")
    with pytest.raises(RuntimeError, match="not running"):
        getattr(rig.helper, step)({"snapshot": "s1", "member": "f1"})
    assert orchestration.status_of(RuntimeError()) == 502


# --- the CRIU backend's retries, through the same orchestration -------------------------------------

class FakeSocket:
    def __init__(self):
        self.sent, self.closed = [], False

    def send(self, frame):
        self.sent.append(frame)

    def close(self):
        self.closed = True


@pytest.fixture
def criu_rig(tmp_path, monkeypatch):
    rig = Rig(tmp_path, members={"f1": {"mininet_host": "h1", "command": "seqstream.py"}})
    rig.located = []
    rig.backend.locate = lambda member: rig.located.append(member.name) or Located(
        "00:00:00:00:00:01", "h1-eth0", 10, "/proc/9/ns/net", details={"ip": "10.0.0.1/8"})
    rig.socket = FakeSocket()
    rig.dumps = []
    rig.backend.retry_delay = 0
    monkeypatch.setattr(criu, "open_marker_socket", lambda netns, iface: rig.socket)
    return rig


def _dumps(rig, outcomes):
    """criu.dump replaced: each call takes the next outcome: "ok", "fail" (before the cut), "cut-fail"."""
    def dump(member, images, on_frozen, **options):
        outcome = outcomes[len(rig.dumps)]
        rig.dumps.append(outcome)
        os.makedirs(images, exist_ok=True)
        if options.get("on_predump"):  # CRIU runs the hook at pre-dump, before anything can fail
            rig.timeline.append(("predump",))
            options["on_predump"]()
        if outcome == "fail":
            raise criu.CriuError("criu dump of f1 failed: queue changed")
        on_frozen()
        if outcome == "cut-fail":
            raise criu.CriuError("criu dump of f1 failed after the cut")
        with open(os.path.join(images, "pages-1.img"), "wb") as handle:
            handle.write(b"p" * 100)
        return criu.DumpReport(images, 4.0, 0.5, 30.0, 100)
    return dump


def test_criu_dumps_failing_before_the_cut_are_retried(criu_rig, monkeypatch):
    monkeypatch.setattr(criu, "dump", _dumps(criu_rig, ["fail", "fail", "ok"]))
    criu_rig.helper.start_snapshot(SNAPSHOT)
    # prepared at the first dump's pre-dump, just before CRIU would freeze the member, and only then
    assert criu_rig.dumps == ["fail", "fail", "ok"] and criu_rig.steps() == [
        "predump", "prepare", "purge", "predump", "predump", "cut", "purge", "done"]
    assert criu_rig.reported("cut") == [{"marker": True}] and len(criu_rig.socket.sent) == 1 and criu_rig.socket.closed
    (done,) = criu_rig.reported("done")
    assert done["pause_ms"] == 4.0 and done["image"]["backend"] == "criu" and done["image"]["dump_ms"] == 30.0
    assert not os.path.exists(os.path.join(criu_rig.config.work_dir, "s1", "f1"))  # the local copy is gone
    assert [f["name"] for f in done["image"]["files"]] == ["identity.json", "pages-1.img"]  # its MAC, for elsewhere
    assert criu_rig.located == ["f1"] * 2  # found afresh: the request, the marker socket (and the dump)


def test_criu_dumps_failing_every_time_fail_the_snapshot(criu_rig, monkeypatch):
    monkeypatch.setattr(criu, "dump", _dumps(criu_rig, ["fail"] * criu.DUMP_ATTEMPTS))
    criu_rig.helper.start_snapshot(SNAPSHOT)
    assert len(criu_rig.dumps) == criu.DUMP_ATTEMPTS and [s for s in criu_rig.steps() if s != "predump"] == [
        "prepare", "purge", "failed"]
    assert "queue changed" in criu_rig.reported("failed")[0]["reason"] and criu_rig.socket.closed


def test_with_prepare_before_the_member_is_prepared_before_criu_starts(criu_rig, monkeypatch):
    monkeypatch.setattr(criu, "PREPARE_WHEN", "before")
    monkeypatch.setattr(criu, "dump", _dumps(criu_rig, ["fail", "ok"]))
    criu_rig.helper.start_snapshot(SNAPSHOT)
    assert criu_rig.steps() == ["prepare", "purge", "predump", "predump", "cut", "purge", "done"]


def test_a_criu_dump_failing_after_the_cut_is_not_retried(criu_rig, monkeypatch):
    monkeypatch.setattr(criu, "dump", _dumps(criu_rig, ["cut-fail", "ok"]))
    criu_rig.helper.start_snapshot(SNAPSHOT)
    assert criu_rig.dumps == ["cut-fail"] and criu_rig.steps()[-1] == "failed"
    assert criu_rig.helper.jobs["s1/f1"]["state"] == "failed"


# --- through the HTTP handler ---------------------------------------------------------------------

@pytest.fixture
def served(rig):
    server = helper.listen("127.0.0.1", 0, helper.make_handler(rig.helper), "test")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rig.url = "http://127.0.0.1:%d" % server.server_address[1]
    yield rig
    server.shutdown()
    server.server_close()


def call(rig, path, body, token="t", raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(rig.url + path, data, {"Authorization": "Bearer " + token,
                                                            "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_snapshot_and_restore(served):
    assert call(served, "/snapshot", SNAPSHOT) == (202, {"accepted": "s1/f1"})
    (done,) = served.reported("done")
    status, answer = call(served, "/stage", {"snapshot": "s1", "member": "f1", "server": done["server"],
                                             "files": done["image"]["files"]})
    assert status == 200 and answer["restores_paused"] is True
    status, answer = call(served, "/restore", {"snapshot": "s1", "member": "f1"})
    assert status == 200 and answer["attachment"]["dpid"] == "00000000000000aa"


@pytest.mark.parametrize("path,body,raw,status,error", [
    ("/snapshot", None, b"{not json", 400, "bad_request"),
    ("/snapshot", ["a"], None, 400, "bad_request"),
    ("/resume", {"snapshot": "s1"}, None, 400, "bad_request"),
    ("/resume", {"snapshot": "s1", "member": "nobody"}, None, 404, "not_found"),
    ("/restore", {"snapshot": "s9", "member": "f1"}, None, 404, "not_found"),
    ("/nowhere", {}, None, 404, "not_found"),
    # found by fuzzing (issue 13): names that are paths (stage rmtree'd work_dir/restore/<snapshot>/<member>),
    # a server that is no URL, files without name/sha256 were 502 or 500
    ("/stage", {"snapshot": "../..", "member": "f1", "server": "http://127.0.0.1:1", "files": []}, None, 400, "bad_request"),
    ("/stage", {"snapshot": "/etc", "member": "f1", "server": "http://127.0.0.1:1", "files": []}, None, 400, "bad_request"),
    ("/restore", {"snapshot": "s1", "member": "f1/../f1"}, None, 400, "bad_request"),
    ("/stage", {"snapshot": "s1", "member": "f1", "server": "", "files": []}, None, 400, "bad_request"),
    ("/stage", {"snapshot": "s1", "member": "f1", "server": "http://127.0.0.1:1", "files": [{"name": []}]},
     None, 400, "bad_request"),
])
def test_http_errors_have_one_shape(served, path, body, raw, status, error):
    answer = call(served, path, body, raw=raw)
    assert answer[0] == status and answer[1]["error"] == error and answer[1]["reason"]


def test_http_conflict_unauthorized_backend_failure_and_unexpected(served, capsys):
    call(served, "/snapshot", SNAPSHOT)
    assert call(served, "/snapshot", SNAPSHOT)[0] == 409
    assert call(served, "/resume", {"snapshot": "s1", "member": "f1"}, token="wrong") == (
        401, {"error": "unauthorized", "reason": "missing or wrong bearer token"})
    served.backend.fail["resume"] = RuntimeError("member f1 (pid 1) is not running")
    assert call(served, "/resume", {"snapshot": "s1", "member": "f1"}) == (
        502, {"error": "failed", "reason": "member f1 (pid 1) is not running"})
    served.backend.fail["resume"] = AttributeError("'NoneType' object has no attribute 'pid'")
    status, answer = call(served, "/resume", {"snapshot": "s1", "member": "f1"})
    assert status == 500 and answer == {"error": "internal", "reason": "'NoneType' object has no attribute 'pid'"}
    served.backend.fail["stop"] = KeyError("pid")
    assert call(served, "/stop", {"snapshot": "s1", "member": "f1"})[0] == 500
    assert "Traceback" in capsys.readouterr().err


# --- ovs.attachment -------------------------------------------------------------------------------

def fake_vsctl(bridges, ports):
    """``ovs-vsctl --bare -- iface-to-br P -- get Interface P ofport -- --columns=name,datapath_id list
    Bridge`` over {bridge: datapath_id} and {port: (bridge, ofport)}, as the real one prints it."""
    def vsctl(*argv):
        port = argv[3]
        assert argv == ("--bare", "--", "iface-to-br", port, "--", "get", "Interface", port, "ofport",
                        "--", "--columns=name,datapath_id", "list", "Bridge")
        if port not in ports:
            return None  # ovs-vsctl: no interface named p (exit 1)
        bridge, ofport = ports[port]
        return "\n".join([bridge, ofport] + ["\n".join((b, d)) + "\n" for b, d in bridges.items()]).strip()
    return vsctl


def test_attachment_is_datapath_id_and_openflow_port():
    vsctl = fake_vsctl({"s0": "00000000000000a0", "s1": "00000000000000A1", "s2": "00000000000000a2"},
                       {"s1-eth2": ("s1", "2")})
    assert ovs.attachment("s1-eth2", vsctl) == {"dpid": "00000000000000a1", "port": 2}


@pytest.mark.parametrize("bridges,ports", [
    ({"s1": "00000000000000a1"}, {}),  # no such port
    ({"s1": "00000000000000a1"}, {"p": ("s1", "-1")}),  # the port failed
    ({"s1": "00000000000000a1"}, {"p": ("s1", "[]")}),  # not attached yet
    ({"s1": "[]"}, {"p": ("s1", "1")}),  # no datapath yet
    ({"s2": "00000000000000a2"}, {"p": ("s1", "1")}),  # its bridge gone meanwhile
])
def test_attachment_is_none_when_it_cannot_be_told(bridges, ports):
    assert ovs.attachment("p", fake_vsctl(bridges, ports)) is None
    assert ovs.attachment(None, fake_vsctl(bridges, ports)) is None


def test_attachment_reads_what_ovs_vsctl_prints():
    """The real ``ovs-vsctl --bare`` output of the one run (3.1.0): bridge, ofport, then each bridge's
    name and datapath id, records apart by a blank line."""
    printed = "s1\n3\ns0\n00000000000000a0\n\ns1\n00000000000000a1\n"
    assert ovs.attachment("s1-eth3", lambda *argv: printed.strip()) == {"dpid": "00000000000000a1", "port": 3}


def test_http_refusals_of_http_server_itself_are_json_too(served):
    """An unknown method is a JSON 405 with Allow (it was http.server's HTML 501), a bad length a 400."""
    import http.client
    host, port = served.url.split("//")[1].split(":")
    for method, headers, status in (("PATCH", {}, 405), ("QUERY", {}, 405), ("POST", {"Content-Length": "-5"}, 400)):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.putrequest(method, "/snapshot")
        for key, value in dict({"Authorization": "Bearer t"}, **headers).items():
            connection.putheader(key, value)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == status and response.getheader("Content-Type") == "application/json"
        assert json.loads(response.read())["reason"]
        if status == 405:
            assert "POST" in response.getheader("Allow")
        connection.close()


# --- registration with the controller, members at runtime ----------------------------------------

class FakeController:
    """The controller's /violin/members as the registrar calls it: answers, or raises what it is told."""

    def __init__(self):
        self.members, self.calls, self.fail = {}, [], []  # fail: errors raised by the next calls, in turn

    def __call__(self, method, name, body):
        self.calls.append((method, name))
        if self.fail:
            raise self.fail.pop(0)
        if method == "PUT":
            self.members[name] = body
        else:
            self.members.pop(name, None)
        return body


@pytest.fixture
def reg_rig(tmp_path):
    with fakebackend.registered():
        controller = FakeController()
        raw = {"token": "t", "controller_token": "c", "server_token": "s", "servers": ["http://store:7070"],
               "work_dir": str(tmp_path), "controller": "http://controller:8080", "host_name": "hv1",
               "listen": "127.0.0.1:7009",
               "members": {"f1": {"backend": "fake"}, "f2": {"backend": "fake", "mac": "00:00:00:00:00:0b"}}}
        config = helper.parse_config(raw, environ={})
        h = helper.Helper(config, post=lambda url, body: {}, store=FakeStore().client, purge=lambda: None,
                          register=controller, spawn=lambda job: None)  # the registrar is run by hand
        h.controller, h.fake = controller, config.backends["f1"]
        yield h


def test_the_helper_registers_every_running_member_with_what_locate_found(reg_rig):
    reg_rig.register_all()
    assert reg_rig.registrar.run_once() == 0
    assert reg_rig.controller.members == {
        "f1": {"name": "f1", "macs": ["00:00:00:00:00:0a"], "helper_url": "http://127.0.0.1:7009", "backend": "fake",
               "marker": True, "host": "hv1", "handle": "fake f1"},
        "f2": {"name": "f2", "macs": ["00:00:00:00:00:0b"], "helper_url": "http://127.0.0.1:7009", "backend": "fake",
               "marker": True, "host": "hv1", "handle": "fake f2"}}
    assert reg_rig.member_view("f1")["registration"]["registered"] is True
    # Registering again with nothing changed calls nobody; a restore onto this helper registers it again if changed.
    reg_rig.registrar.want("f1")
    reg_rig.registrar.run_once()
    assert reg_rig.controller.calls.count(("PUT", "f1")) == 1


def test_a_controller_not_up_yet_is_asked_again_and_a_member_not_running_here_is_not_claimed(reg_rig):
    reg_rig.fake.gone = {"f2"}  # e.g. a member this helper could host after a restore elsewhere
    reg_rig.controller.fail = [orchestration.ControllerError("controller unreachable at http://controller:8080")]
    reg_rig.register_all()
    assert reg_rig.registrar.run_once() == 1  # f1 waits for the controller
    view = reg_rig.member_view("f1")["registration"]
    assert view["registered"] is False and "unreachable" in view["reason"]
    assert reg_rig.registrar.run_once() == 0 and set(reg_rig.controller.members) == {"f1"}
    assert "not running here" in reg_rig.member_view("f2")["registration"]["reason"]
    assert reg_rig.member_view("f2")["located"]["running"] is False


def test_a_409_while_the_member_is_in_a_snapshot_is_retried_in_the_background():
    calls, waits = [], []
    answers = [orchestration.ControllerError("controller answered 409 to PUT f1: running snapshot", 409), None]

    def call(method, name, body):
        calls.append(method)
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    registrar = orchestration.Registrar(call, lambda name: {"name": name, "macs": ["00:00:00:00:00:0a"]},
                                        spawn=lambda job: None, refresh=None)
    registrar.want("f1")
    registrar.wake.wait = lambda seconds: waits.append(seconds)  # the backoff, without waiting
    registrar._loop()
    assert calls == ["PUT", "PUT"] and waits == [0.5] and not registrar.running


def test_the_registrar_registers_again_now_and_then_for_a_restarted_controller():
    calls = []
    registrar = orchestration.Registrar(lambda m, n, b: calls.append((m, n)), lambda name: {"name": name},
                                        spawn=lambda job: None, refresh=30.0)
    registrar.want("f1")
    registrar.run_once()
    rounds = []

    def wait(seconds):
        rounds.append(seconds)
        if len(rounds) > 2:
            raise StopIteration  # end the worker's loop
    registrar.wake.wait = wait
    with pytest.raises(StopIteration):
        registrar._loop()
    assert calls == [("PUT", "f1"), ("PUT", "f1"), ("PUT", "f1")] and rounds == [30.0, 30.0, 30.0]


def test_members_are_added_and_removed_at_runtime_and_kept_across_restarts(reg_rig, tmp_path):
    reg_rig.register_all()
    view = reg_rig.add_member({"name": "f3", "backend": "fake", "mac": "00:00:00:00:00:0c"})
    assert view["name"] == "f3" and view["located"]["mac"] == "00:00:00:00:00:0c"
    reg_rig.registrar.run_once()
    assert reg_rig.controller.members["f3"]["macs"] == ["00:00:00:00:00:0c"]
    with pytest.raises(orchestration.Conflict, match="f3 already"):
        reg_rig.add_member({"name": "f3", "backend": "fake"})
    for bad in ({"name": "x/y", "backend": "fake"}, {"backend": "fake"}, {"name": "f4", "backend": "xen"},
                {"name": "f4", "backend": "fake", "mac": "zz"}, {"name": "f4"}, ["f4"]):
        with pytest.raises(orchestration.BadRequest):
            reg_rig.add_member(bad)
    assert reg_rig.remove_member("f1") == {"removed": "f1", "unregistered": True}
    assert "f1" not in reg_rig.controller.members and reg_rig.names() == ["f2", "f3"]
    with pytest.raises(orchestration.UnknownMember):
        reg_rig.remove_member("f1")
    # A helper started again on the same work_dir hosts what was added and not what was removed.
    again = helper.Helper(reg_rig.config, post=lambda url, body: {}, store=FakeStore().client,
                          register=FakeController(), spawn=lambda job: None)
    assert again.names() == ["f2", "f3"] and again.members["f3"][1].mac == "00:00:00:00:00:0c"


def test_removing_a_member_the_controller_keeps_is_refused_and_an_unreachable_one_unregistered_later(reg_rig):
    reg_rig.register_all()
    reg_rig.registrar.run_once()
    reg_rig.controller.fail = [orchestration.ControllerError("409: takes part in running snapshot s1", 409)]
    with pytest.raises(orchestration.Conflict, match="running snapshot"):
        reg_rig.remove_member("f1")
    assert "f1" in reg_rig.names() and "f1" in reg_rig.controller.members
    reg_rig.controller.fail = [orchestration.ControllerError("controller unreachable")]
    assert reg_rig.remove_member("f1") == {"removed": "f1", "unregistered": False}
    assert reg_rig.registrar.run_once() == 0 and "f1" not in reg_rig.controller.members


def test_a_snapshot_of_a_member_that_cannot_be_located_is_refused_at_once(rig):
    rig.backend.fail["locate"] = RuntimeError("cannot locate f1: no Mininet host h1 here")
    with pytest.raises(orchestration.Failed, match="no Mininet host h1"):
        rig.helper.start_snapshot(SNAPSHOT)
    assert rig.helper.jobs == {} and rig.timeline == []


def test_a_restore_registers_the_member_again_and_a_stop_lets_it_go(reg_rig):
    reg_rig.register_all()
    reg_rig.registrar.run_once()
    reg_rig.fake.calls = []
    store = FakeStore()
    reg_rig.store = store.client
    reg_rig.start_snapshot(dict(SNAPSHOT))  # spawn does nothing: run the job here
    reg_rig._run_snapshot(orchestration.read_body("snapshot", SNAPSHOT), *reg_rig.members["f1"], "s1/f1")
    files = [{"name": n, "sha256": hashlib.sha256(d).hexdigest()} for n, d in
             store.images["http://store:7070"][("s1", "f1")].items()]
    reg_rig.stage({"snapshot": "s1", "member": "f1", "server": "http://store:7070", "files": files})
    reg_rig.fake.calls = []
    reg_rig.members["f1"][1].mac = "00:00:00:00:00:0d"  # e.g. a new interface here
    reg_rig.restore({"snapshot": "s1", "member": "f1"})
    reg_rig.registrar.run_once()
    assert reg_rig.controller.members["f1"]["macs"] == ["00:00:00:00:00:0d"]
    reg_rig.stop({"snapshot": "s1", "member": "f1"})
    assert reg_rig.member_view("f1")["registration"]["reason"] == "moved to another helper"


def test_http_members_add_list_remove(served):
    served.helper.factory = served.config.make_member
    status, answer = call(served, "/members", {"name": "f9", "backend": "fake", "mac": "00:00:00:00:00:09"})
    assert status == 201 and answer["located"]["mac"] == "00:00:00:00:00:09"
    assert call(served, "/members", {"name": "f9", "backend": "fake"})[0] == 409
    assert call(served, "/members", {"name": "f8", "backend": "fake", "colour": 1})[0] == 400
    request = urllib.request.Request(served.url + "/members", headers={"Authorization": "Bearer t"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert [m["name"] for m in json.loads(response.read())["members"]] == ["f1", "f9"]
    with urllib.request.urlopen(urllib.request.Request(served.url + "/health"), timeout=10) as response:
        assert json.loads(response.read())["members"] == ["f1", "f9"]

    def delete(path, token="t"):
        request = urllib.request.Request(served.url + path, method="DELETE", headers={"Authorization": "Bearer " + token})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    assert delete("/members/f9") == (200, {"removed": "f9", "unregistered": None})
    assert delete("/members/f9")[0] == 404 and delete("/members/f1", token="x")[0] == 401
    assert delete("/members/bad%20name")[0] == 400 and delete("/nowhere")[0] == 404


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_members_asked_for_at_once_are_staged_in_turn_and_restored_all_together(tmp_path, workers):
    """The controller asks for every member together; the helper stages ``stage_workers`` at most at
    once (the rest wait their turn, none is refused), then restores all of them at once."""
    names = ["f%d" % i for i in range(1, 7)]
    with fakebackend.registered():
        rig = Rig(tmp_path, members={n: {"backend": "fake"} for n in names})
        rig.helper.staging = threading.BoundedSemaphore(workers)
        done = {}
        for name in names:
            rig.helper.start_snapshot(dict(SNAPSHOT, member=name))
            done[name] = rig.reported("done")[-1]
        busy, peak, lock, release = [0], [0], threading.Lock(), threading.Event()

        def step(*_args):
            with lock:
                busy[0] += 1
                peak[0] = max(peak[0], busy[0])
            release.wait(5)
            with lock:
                busy[0] -= 1

        rig.backend.stage = lambda member, directory: step()
        rig.backend.restore = lambda member, directory: (step(), Restored(1.0, member.iface, {}))[1]
        for action, body in (("stage", lambda n: {"snapshot": "s1", "member": n, "server": done[n]["server"],
                                                   "files": done[n]["image"]["files"]}),
                             ("restore", lambda n: {"snapshot": "s1", "member": n})):
            peak[0], answers = 0, {}
            release.clear()
            threads = [threading.Thread(target=lambda n=n: answers.__setitem__(n, getattr(rig.helper, action)(body(n))))
                       for n in names]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 5
            while busy[0] < (workers if action == "stage" else len(names)) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)  # would more than ``workers`` get in?
            release.set()
            for thread in threads:
                thread.join(10)
            assert peak[0] == (workers if action == "stage" else len(names)), action
            assert sorted(answers) == names, action


def test_stage_workers_is_a_helper_setting(tmp_path):
    raw = {"token": "t", "controller_token": "c", "server_token": "s", "servers": ["http://store:7070"],
           "work_dir": str(tmp_path), "members": {}}
    assert helper.parse_config(raw, environ={}).stage_workers == orchestration.STAGE_WORKERS
    assert helper.parse_config(dict(raw, stage_workers=2), environ={}).stage_workers == 2
    with pytest.raises(helper.HelperConfigError, match="stage_workers"):
        helper.parse_config(dict(raw, stage_workers=0), environ={})
