"""The ``violin`` command line against a fake controller on loopback."""

import io
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

from violin_client import cli

TOKEN = "good-token"
HELPER_TOKEN = "helper-token"


def path_is_helper(path):
    return path == "/members" or path.startswith("/members/")
CREATED = 1790000000.25


def member_entry(name, state="pending", cut=None, done=False):
    entry = {"name": name, "state": state, "cut_time": cut, "flip_ms": 1.5 if cut else None, "marker": bool(cut)}
    if done:
        entry.update(pause_ms=12.25, bytes=3 * 1024 * 1024, server="http://ss1:9000",
                     image={"backend": "criu", "files": [{"name": "pages-1.img", "bytes": 3 * 1024 * 1024}]})
    return entry


def manifest(snapshot_id, state, phase, members, label="", reason=None, **extra):
    body = {"id": snapshot_id, "epoch": 3, "label": label, "state": state, "phase": phase, "reason": reason,
            "created": CREATED, "completed": CREATED + 1.5 if state != "running" else None,
            "restorable": state == "complete", "members": members,
            "counts": {"held": 4, "released": 4, "recorded": 2, "recorded_bytes": 196, "dropped": 0,
                       "late_released": 0}, "drain": {}}
    body.update(extra)
    return body


def snapshot_at(poll):
    """snap-1: running (cutting, then draining) for a few polls, then complete."""
    if poll <= 1:
        return manifest("snap-1", "running", "cutting", [member_entry("h1", "cut", CREATED + 0.5), member_entry("h2")])
    if poll == 2:
        return manifest("snap-1", "running", "cutting",
                        [member_entry("h1", "done", CREATED + 0.5, True), member_entry("h2", "cut", CREATED + 0.6)])
    if poll == 3:
        return manifest("snap-1", "running", "draining", [member_entry("h1", "done", CREATED + 0.5, True),
                                                           member_entry("h2", "done", CREATED + 0.6, True)])
    return manifest("snap-1", "complete", "complete",
                    [member_entry("h1", "done", CREATED + 0.5, True), member_entry("h2", "done", CREATED + 0.6, True)],
                    drain={"method": "counters", "polls": 3, "waited_ms": 230.0, "switch_record_rule_packets": 2,
                           "controller_recorded": 2},
                    channel={"file": "channel.pcapng", "frames": 2, "bytes": 400, "sha256": "ab" * 32})


def doomed_at(poll):
    if poll <= 1:
        return manifest("snap-2", "running", "cutting", [member_entry("h1")], label="doomed")
    return manifest("snap-2", "aborted", "aborted", [member_entry("h1", "flipped")], label="doomed",
                    reason="no cut marker from h1 within 5.0 s")


def restore_at(poll):
    members = {"h1": {"helper": "http://helper1:7000", "state": "pending"},
               "h2": {"helper": "http://helper2:7000", "state": "pending"}}
    body = {"id": "restore-snap-1-abcd", "snapshot": "snap-1", "epoch": 3, "state": "running", "phase": "staging",
            "reason": None, "started": CREATED, "finished": None, "members": members, "timings_ms": {},
            "reinjected_frames": 0}
    if poll >= 1:
        members["h1"]["state"] = "staged"
    if poll >= 2:
        body.update(state="failed", finished=CREATED + 2,
                    reason="stage of h2 at http://helper2:7000 failed: 409 image checksum mismatch")
    return body


class FakeController(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests = []
        self.polls = {}
        self.schedule = {"enabled": False, "interval_s": None, "keep": 5, "members": None, "next_in_s": None,
                         "taken": 0, "skipped": []}
        self.members = [{"name": "h1", "macs": ["00:00:00:00:00:01"], "helper_url": "http://helper1:7000",
                         "backend": "criu", "handle": "h1", "marker": True, "epoch": 3, "located": True,
                         "attachment": [{"dpid": "0000000000000001", "port": 1}]},
                        {"name": "h2", "macs": ["00:00:00:00:00:02"], "helper_url": None, "backend": "manual",
                         "handle": "", "marker": False, "epoch": 3, "located": False, "attachment": [None]}]

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]

    def poll(self, key):
        self.polls[key] = self.polls.get(key, 0) + 1
        return self.polls[key]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.handle_call("GET")

    def do_POST(self):
        self.handle_call("POST")

    def do_PUT(self):
        self.handle_call("PUT")

    def do_DELETE(self):
        self.handle_call("DELETE")

    def answer(self, status, body):
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, name, reason):
        self.answer(status, {"error": name, "reason": reason})

    def handle_call(self, method):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        server = self.server
        server.requests.append((method, self.path, body, self.headers.get("Authorization")))
        if path_is_helper(self.path):  # the same fake plays a host helper (its own token)
            if self.headers.get("Authorization") != "Bearer " + HELPER_TOKEN:
                return self.error(401, "unauthorized", "missing or wrong bearer token")
            if self.path == "/members" and method == "POST":
                if body["name"] == "dup":
                    return self.error(409, "conflict", "this helper hosts a member dup already; remove it first")
                return self.answer(201, {"name": body["name"], "backend": body.get("backend"), "spec": body,
                                         "located": {"mac": "00:00:00:00:00:05", "iface": "h5-eth0", "pid": 55},
                                         "registration": {"registered": False, "reason": "pending"}})
            if self.path.startswith("/members/") and method == "DELETE":
                return self.answer(200, {"removed": self.path.rsplit("/", 1)[1], "unregistered": True})
            return self.error(404, "not_found", "no such resource")
        if method != "GET" and self.headers.get("Authorization") != "Bearer " + TOKEN:
            return self.error(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")
        path = self.path
        if path == "/violin/health":
            return self.answer(200, {"status": "ok", "app": "violin_snapshot", "version": "0.1.0", "uptime_s": 3725.5,
                                     "switches": 2, "links": 1, "hosts": 4, "members": 2, "settled": True,
                                     "counters": {}, "switch_errors": 0,
                                     "snapshot": {"id": "snap-1", "state": "complete", "phase": "complete"}})
        if path == "/violin/members" and method == "GET":
            return self.answer(200, {"members": server.members})
        if path == "/violin/members" and method == "POST":
            return self.answer(201, dict(body, epoch=0, located=False, attachment=[None]))
        if path == "/violin/members/h1" and method == "DELETE":
            return self.answer(200, server.members[0])
        known = {m["name"]: m for m in server.members}
        if path.startswith("/violin/members/") and method == "GET" and path.rsplit("/", 1)[1] in known:
            return self.answer(200, known[path.rsplit("/", 1)[1]])
        if path.startswith("/violin/members/"):
            return self.error(404, "not_found", "no member %s" % path.rsplit("/", 1)[1])
        if path == "/violin/snapshots" and method == "POST":
            if (body or {}).get("label") == "doomed":
                server.polls["snap-2"] = 0
                return self.answer(202, doomed_at(0))
            if (body or {}).get("label") == "busy":
                return self.error(409, "conflict", "snapshot snap-1 is running; one at a time")
            server.polls["snap-1"] = 0
            return self.answer(202, snapshot_at(0))
        if path == "/violin/snapshots":
            return self.answer(200, {"snapshots": [snapshot_at(99), doomed_at(99)]})
        if path == "/violin/snapshots/snap-1" and method == "GET":
            return self.answer(200, snapshot_at(server.poll("snap-1")))
        if path == "/violin/snapshots/snap-2" and method == "GET":
            return self.answer(200, doomed_at(server.poll("snap-2")))
        if path == "/violin/snapshots/snap-1" and method == "DELETE":
            return self.answer(200, {"deleted": "snap-1"})
        if path == "/violin/snapshots/snap-2/abort":
            return self.answer(200, doomed_at(99) if not body.get("reason") else
                               dict(doomed_at(99), reason=body["reason"]))
        if path == "/violin/snapshots/snap-1/restore":
            server.polls["restore"] = 0
            return self.answer(202, restore_at(0))
        if path == "/violin/restores/restore-snap-1-abcd":
            return self.answer(200, restore_at(server.poll("restore")))
        if path == "/violin/restores":
            return self.answer(200, {"restores": [restore_at(99)]})
        if path == "/violin/schedule":
            if method == "PUT":
                server.schedule.update(enabled=True, interval_s=float(body["interval_s"]), keep=body.get("keep", 5),
                                       members=body.get("members"), next_in_s=float(body["interval_s"]))
            elif method == "DELETE":
                server.schedule.update(enabled=False, interval_s=None, next_in_s=None)
            return self.answer(200, server.schedule)
        if path == "/violin/broken":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>")
            return None
        return self.error(404, "not_found", "no such resource: %s" % path)


@pytest.fixture
def controller(monkeypatch):
    monkeypatch.setattr(cli, "POLL_INTERVAL", 0.001)
    monkeypatch.delenv("VIOLIN_URL", raising=False)
    monkeypatch.delenv("VIOLIN_API_TOKEN", raising=False)
    server = FakeController()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run(controller, *argv, token=TOKEN):
    base = ["--url", controller.url] + (["--token", token] if token else [])
    return cli.main(base + list(argv))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- build_args ----------------------------------------------------------------------


def test_build_args_defaults_come_from_the_environment():
    args = cli.build_args(["status"], environ={"VIOLIN_URL": "http://ctl:8081/", "VIOLIN_API_TOKEN": "t0k"})
    assert (args.url, args.token, args.json, args.http_timeout) == ("http://ctl:8081", "t0k", False, 30.0)
    args = cli.build_args(["status"], environ={})
    assert (args.url, args.token) == ("http://127.0.0.1:8080", None)


def test_build_args_global_options_before_or_after_the_command():
    before = cli.build_args(["--json", "--url", "http://a:1", "--timeout", "4", "list"], environ={})
    after = cli.build_args(["list", "--json", "--url", "http://a:1", "--timeout", "4"], environ={})
    for args in (before, after):
        assert (args.command, args.json, args.url, args.http_timeout) == ("list", True, "http://a:1", 4.0)
    # a subcommand does not undo what was given before it
    assert cli.build_args(["--json", "--token", "x", "show", "snap-1"], environ={}).json is True


def test_build_args_snapshot_timeout_is_the_snapshots_own():
    args = cli.build_args(["--timeout", "9", "snapshot", "--members", "h1, h2,", "--label", "L", "--timeout", "30",
                           "--no-wait"], environ={})
    assert (args.http_timeout, args.snapshot_timeout, args.members, args.label, args.wait) == (
        9.0, 30.0, ["h1", "h2"], "L", False)
    assert cli.build_args(["snapshot"], environ={}).wait is True


def test_build_args_member_add_restore_schedule():
    args = cli.build_args(["member", "add", "h1", "--mac", "00:00:00:00:00:0A", "--mac", "00:00:00:00:00:0b",
                           "--helper", "http://helper:7000", "--backend", "criu", "--handle", "web",
                           "--no-marker"], environ={})
    assert (args.command, args.member_command, args.name, args.macs, args.helper_url, args.backend, args.handle,
            args.marker) == ("member", "add", "h1", ["00:00:00:00:00:0a", "00:00:00:00:00:0b"], "http://helper:7000",
                             "criu", "web", False)
    assert cli.build_args(["member", "remove", "h1"], environ={}).member_command == "rm"
    args = cli.build_args(["restore", "snap-1", "--place", "h1=http://b:7000", "--no-wait"], environ={})
    assert (args.id, args.placement, args.wait) == ("snap-1", [("h1", "http://b:7000")], False)
    assert cli.build_args(["schedule"], environ={}).schedule_command == "show"
    args = cli.build_args(["schedule", "set", "--every", "60", "--keep", "3", "--members", "h1"], environ={})
    assert (args.schedule_command, args.interval_s, args.keep, args.members) == ("set", 60.0, 3, ["h1"])


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["member"],
    ["member", "add", "h1"],
    ["member", "add", "h1", "--mac", "not-a-mac"],
    ["member", "add", "h1", "--domain", "vm1"],  # by name: to a helper
    ["member", "add", "h1", "--domain", "vm1", "--helper", "http://h:7001", "--mac", "00:00:00:00:00:01"],
    ["member", "add", "h1", "--spec", "no-equals", "--helper", "http://h:7001"],
    ["member", "add", "h1", "--domain", "vm1", "--spec", "domain=vm2", "--helper", "http://h:7001"],
    ["show"],
    ["snapshot", "--timeout", "-1"],
    ["snapshot", "--members", ","],
    ["restore", "snap-1", "--place", "h1"],
    ["restore", "snap-1", "--place", "h1=ftp://x"],
    ["schedule", "set"],
    ["schedule", "set", "--every", "0"],
    ["schedule", "set", "--every", "10", "--keep", "2.5"],
    ["--url", "ctl:8080", "status"],
    ["--timeout", "soon", "status"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "usage: violin" in captured.err and "Traceback" not in captured.err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("status", "members", "member", "snapshot", "list", "show", "restore", "delete", "abort",
                    "schedule"):
        assert command in out


def test_the_module_does_not_import_ryu_or_the_controller():
    code = ("import sys, violin_client.cli; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('ryu', 'os_ken', 'violin_core', 'eventlet', 'webob')]; print(bad); sys.exit(1 if bad else 0)")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.path.join(here, "..", ".."))
    done = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- read-only commands ------------------------------------------------------------------


def test_status(controller, capsys):
    assert run(controller, "status", token=None) == 0
    out = capsys.readouterr().out
    assert "ok at %s" % controller.url in out and "violin_snapshot 0.1.0, up 1h02m05s" in out
    assert "2 switches, 1 links, 4 hosts (settled)" in out and "snap-1 complete (complete)" in out


def test_status_json(controller, capsys):
    assert run(controller, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["app"] == "violin_snapshot"


def test_members_table(controller, capsys):
    assert run(controller, "members") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "MACS", "HELPER"]
    assert "h1" in lines[1] and "http://helper1:7000" in lines[1] and "00:00:00:00:00:01@1:1" in lines[1]
    assert "h2" in lines[2] and "not seen" in lines[2]


def test_list_table(controller, capsys):
    assert run(controller, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "EPOCH", "LABEL", "MEMBERS", "CREATED", "CHANNEL", "FRAMES"]
    created = cli.time.strftime("%Y-%m-%d %H:%M:%S", cli.time.localtime(CREATED))
    assert lines[1].split() == ["snap-1", "complete", "3", "-", "h1,h2"] + created.split() + ["2"]
    assert lines[2].split()[:4] == ["snap-2", "aborted", "3", "doomed"] and lines[2].split()[-1] == "-"


def test_list_json(controller, capsys):
    assert run(controller, "--json", "list") == 0
    answer = json.loads(capsys.readouterr().out)
    assert [s["id"] for s in answer["snapshots"]] == ["snap-1", "snap-2"]


def test_show(controller, capsys):
    controller.polls["snap-1"] = 10
    assert run(controller, "show", "snap-1") == 0
    out = capsys.readouterr().out
    assert "complete (restorable)" in out and "took 1.5 s" in out
    h1 = next(line for line in out.splitlines() if line.strip().startswith("h1"))
    assert cli._clock(CREATED + 0.5) in h1 and "1.5" in h1 and "12.2" in h1 and "http://ss1:9000" in h1
    assert "3.0 MiB" in h1
    assert "held 4, released 4, recorded 2 (196 B)" in out
    assert "2 frames" in out and "by counters after 3 polls, 230.0 ms" in out


def test_show_aborted_has_its_reason(controller, capsys):
    controller.polls["snap-2"] = 10
    assert run(controller, "show", "snap-2") == 0
    assert "reason     no cut marker from h1" in capsys.readouterr().out


def test_unknown_id_says_the_controllers_reason(controller, capsys):
    assert run(controller, "show", "nope") == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "violin: no such resource: /violin/snapshots/nope"
    assert captured.out == ""


def test_ids_are_quoted_into_the_path(controller, capsys):
    assert run(controller, "show", "a/b c") == 1
    assert controller.requests[-1][1] == "/violin/snapshots/a%2Fb%20c"
    capsys.readouterr()


def test_not_json_is_an_error(controller, capsys, monkeypatch):
    monkeypatch.setattr(cli.Client, "get", lambda self, path: self.call("GET", "/violin/broken"))
    assert run(controller, "status") == 1
    assert "not JSON" in capsys.readouterr().err


# --- changes ---------------------------------------------------------------------------------


def test_member_add_sends_the_fields_and_the_token(controller, capsys):
    assert run(controller, "member", "add", "h3", "--mac", "00:00:00:00:00:03", "--helper", "http://helper3:7000",
               "--backend", "criu", "--no-marker") == 0
    assert capsys.readouterr().out.strip() == "added member h3"
    method, path, body, auth = controller.requests[-1]
    assert (method, path, auth) == ("POST", "/violin/members", "Bearer " + TOKEN)
    assert body == {"name": "h3", "macs": ["00:00:00:00:00:03"], "helper_url": "http://helper3:7000",
                    "backend": "criu", "marker": False}


def test_member_add_by_name_goes_to_the_helper_with_its_token(controller, capsys):
    assert run(controller, "member", "add", "h5", "--helper", controller.url, "--mininet-host", "h5",
               "--command", "seqstream.py", "--workdir", "/srv/h5", "--spec", "ip=10.0.0.5/8",
               "--helper-token", HELPER_TOKEN) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("added member h5 (criu) at its helper: 00:00:00:00:00:05 on h5-eth0 (pid 55)"), out
    method, path, body, auth = controller.requests[-1]
    assert (method, path, auth) == ("POST", "/members", "Bearer " + HELPER_TOKEN)
    assert body == {"name": "h5", "backend": "criu", "mininet_host": "h5", "command": "seqstream.py",
                    "workdir": "/srv/h5", "ip": "10.0.0.5/8"}
    assert run(controller, "member", "add", "vm3", "--helper", controller.url, "--domain", "vm3",
               "--helper-token", HELPER_TOKEN) == 0
    assert controller.requests[-1][2] == {"name": "vm3", "backend": "libvirt", "domain": "vm3"}
    assert run(controller, "member", "add", "dup", "--helper", controller.url, "--pidfile", "/run/x.pid",
               "--helper-token", HELPER_TOKEN) == 1
    assert capsys.readouterr().err.strip() == "violin: this helper hosts a member dup already; remove it first"
    assert run(controller, "member", "add", "h6", "--helper", controller.url, "--pidfile", "/run/x.pid",
               "--helper-token", "wrong") == 1
    err = capsys.readouterr().err
    assert err.startswith("violin: the helper refused the token") and "Traceback" not in err


def test_member_rm_of_a_helper_registered_member_goes_to_its_helper(controller, capsys):
    controller.members[0].update(host="hv1", helper_url=controller.url)
    assert run(controller, "member", "rm", "h1", "--helper-token", HELPER_TOKEN) == 0
    assert capsys.readouterr().out.strip() == "removed member h1 at its helper %s" % controller.url
    assert controller.requests[-1][:2] == ("DELETE", "/members/h1")
    assert run(controller, "member", "rm", "h9", "--helper", controller.url, "--helper-token", HELPER_TOKEN) == 0
    assert controller.requests[-1][:2] == ("DELETE", "/members/h9")
    capsys.readouterr()


def test_members_table_shows_backend_host_and_attachment(controller, capsys):
    controller.members[0]["host"] = "hv1"
    assert run(controller, "members") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["NAME", "MACS", "HELPER", "BACKEND", "HOST", "MARKER"]
    assert lines[1].split()[3:5] == ["criu", "hv1"] and lines[2].split()[3:5] == ["manual", "-"]


def test_member_rm(controller, capsys):
    assert run(controller, "member", "rm", "h1") == 0
    assert capsys.readouterr().out.strip() == "removed member h1"
    assert controller.requests[-1][:2] == ("DELETE", "/violin/members/h1")
    assert run(controller, "member", "rm", "ghost") == 1
    assert capsys.readouterr().err.strip() == "violin: no member ghost"


def test_wrong_token_is_refused(controller, capsys):
    assert run(controller, "member", "rm", "h1", token="bad") == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("violin: the controller refused the token (missing or wrong bearer token")
    assert "Traceback" not in captured.err


def test_no_token_hints_where_to_give_one(controller, capsys):
    assert run(controller, "delete", "snap-1", token=None) == 1
    err = capsys.readouterr().err
    assert "refused the token" in err and "--token or VIOLIN_API_TOKEN" in err


def test_token_from_the_environment(controller, capsys, monkeypatch):
    monkeypatch.setenv("VIOLIN_API_TOKEN", TOKEN)
    monkeypatch.setenv("VIOLIN_URL", controller.url)
    assert cli.main(["delete", "snap-1"]) == 0
    assert capsys.readouterr().out.strip() == "deleted snapshot snap-1"
    assert controller.requests[-1] == ("DELETE", "/violin/snapshots/snap-1", None, "Bearer " + TOKEN)


def test_abort(controller, capsys):
    assert run(controller, "abort", "snap-2", "--reason", "changed my mind") == 0
    assert capsys.readouterr().out.strip() == "snapshot snap-2 aborted: changed my mind"
    assert controller.requests[-1][2] == {"reason": "changed my mind"}


def test_conflict_reason_and_exit_1(controller, capsys):
    assert run(controller, "snapshot", "--label", "busy") == 1
    assert capsys.readouterr().err.strip() == "violin: snapshot snap-1 is running; one at a time"


# --- snapshot and restore, followed -------------------------------------------------------------


def test_snapshot_follows_until_complete(controller, capsys):
    assert run(controller, "snapshot", "--members", "h1,h2", "--label", "before upgrade", "--timeout", "60") == 0
    post = next(r for r in controller.requests if r[0] == "POST")
    assert post[1:3] == ("/violin/snapshots", {"members": ["h1", "h2"], "label": "before upgrade", "timeout_s": 60.0})
    assert controller.polls["snap-1"] == 4
    captured = capsys.readouterr()
    progress = captured.err.splitlines()  # not a terminal: one line per change
    assert [line.split("  [")[0] for line in progress] == [
        "snap-1 cutting: cut 1/2, done 0/2, held 4, recorded 2",
        "snap-1 cutting: cut 2/2, done 1/2, held 4, recorded 2",
        "snap-1 draining: cut 2/2, done 2/2, held 4, recorded 2",
        "snap-1 complete: cut 2/2, done 2/2, held 4, recorded 2"]
    assert "complete (restorable)" in captured.out
    assert captured.out.splitlines()[-1].startswith("snapshot snap-1 complete in ")


def test_snapshot_json_prints_only_the_final_manifest(controller, capsys):
    assert run(controller, "--json", "snapshot") == 0
    captured = capsys.readouterr()
    final = json.loads(captured.out)
    assert final["state"] == "complete" and final["channel"]["frames"] == 2
    assert captured.err == ""


def test_snapshot_no_wait(controller, capsys):
    assert run(controller, "snapshot", "--no-wait") == 0
    assert capsys.readouterr().out.startswith("started snapshot snap-1 (epoch 3, members h1,h2)")
    assert "snap-1" not in controller.polls or controller.polls["snap-1"] == 0
    assert run(controller, "snapshot", "--no-wait", "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "running"


def test_snapshot_that_aborts_exits_1_with_the_reason(controller, capsys):
    assert run(controller, "snapshot", "--label", "doomed") == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == "violin: snapshot snap-2 aborted: no cut marker from h1 within 5.0 s"
    assert "aborted" in captured.out


def test_ctrl_c_while_following_exits_130(controller, capsys, monkeypatch):
    def interrupt(_seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.time, "sleep", interrupt)
    assert run(controller, "snapshot") == 130
    err = capsys.readouterr().err
    assert "interrupted; snapshot snap-1 goes on on the controller" in err and "violin abort snap-1" in err
    assert "Traceback" not in err


def test_restore_that_fails_exits_1_with_the_reason(controller, capsys):
    assert run(controller, "restore", "snap-1", "--place", "h2=http://spare:7000") == 1
    post = next(r for r in controller.requests if r[0] == "POST")
    assert post[1:3] == ("/violin/snapshots/snap-1/restore", {"placement": {"h2": "http://spare:7000"}})
    captured = capsys.readouterr()
    assert [line.split("  [")[0] for line in captured.err.splitlines()[:3]] == [
        "restore-snap-1-abcd staging: h1 pending, h2 pending",
        "restore-snap-1-abcd staging: h1 staged, h2 pending",
        "restore-snap-1-abcd failed (in staging): h1 staged, h2 pending"]
    assert captured.err.splitlines()[-1] == ("violin: restore restore-snap-1-abcd failed: stage of h2 at "
                                             "http://helper2:7000 failed: 409 image checksum mismatch")
    assert "h1    staged" in captured.out


def test_restore_json_and_no_wait(controller, capsys):
    assert run(controller, "restore", "snap-1", "--json") == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["state"] == "failed"
    assert captured.err.startswith("violin: restore restore-snap-1-abcd failed")
    assert run(controller, "restore", "snap-1", "--no-wait") == 0
    assert capsys.readouterr().out.strip() == "started restore restore-snap-1-abcd of snapshot snap-1"
    assert run(controller, "restores") == 0
    assert "restore-snap-1-abcd  snap-1" in capsys.readouterr().out


def test_progress_on_a_terminal_rewrites_one_line():
    stream = io.StringIO()
    progress = cli.Progress(stream, tty=True)
    progress.update("snap-1 cutting: cut 0/2", 0.2)
    progress.update("snap-1 cutting: cut 0/2", 0.4)
    progress.update("snap-1 draining: cut 2/2", 0.6)
    progress.close()
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r") == 4 and text.endswith("\r\x1b[K")
    assert "snap-1 draining: cut 2/2  [0.6 s]" in text


# --- schedule -------------------------------------------------------------------------------------


def test_schedule_set_show_off(controller, capsys):
    assert run(controller, "schedule") == 0
    assert capsys.readouterr().out.strip() == "periodic snapshots are off"
    assert run(controller, "schedule", "set", "--every", "90", "--keep", "3", "--members", "h1,h2") == 0
    assert controller.requests[-1][:3] == ("PUT", "/violin/schedule",
                                          {"interval_s": 90.0, "keep": 3, "members": ["h1", "h2"]})
    assert "a snapshot every 1m30s, keeping the newest 3 scheduled ones, members: h1,h2" in capsys.readouterr().out
    assert run(controller, "schedule", "show", "--json") == 0
    assert json.loads(capsys.readouterr().out)["interval_s"] == 90.0
    assert run(controller, "schedule", "off") == 0
    assert controller.requests[-1][:2] == ("DELETE", "/violin/schedule")
    assert capsys.readouterr().out.strip() == "periodic snapshots are off"


def test_schedule_set_sends_only_what_was_given(controller, capsys):
    assert run(controller, "schedule", "set", "--every", "5") == 0
    assert controller.requests[-1][2] == {"interval_s": 5.0}
    capsys.readouterr()


# --- unreachable --------------------------------------------------------------------------------------


def test_unreachable_controller_is_one_line_and_exit_1(capsys):
    url = "http://127.0.0.1:%d" % free_port()
    assert cli.main(["--url", url, "--timeout", "2", "status"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("violin: cannot reach the controller at %s: " % url)
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err


def test_silent_controller_times_out(capsys):
    with socket.socket() as listener:  # accepts (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = "http://127.0.0.1:%d" % listener.getsockname()[1]
        assert cli.main(["--url", url, "--timeout", "0.3", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("violin: cannot reach the controller at %s: " % url) and "--timeout" in err


# --- against the real REST app (pure core over a simulated network, served on loopback) ---------------


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def real(tmp_path, monkeypatch):
    """The real ``build_rest_app`` over ``Harness``; a GET of the running snapshot moves it on a step
    (cut h1, cut h2, both done and drained), in the server thread, so nothing races the core."""
    from harness import Harness, eth_frame
    from violin_core.routes import build_rest_app

    monkeypatch.setattr(cli, "POLL_INTERVAL", 0.001)
    h = Harness({1: [1, 3], 2: [1, 2]}, [((1, 3), (2, 2))], state_dir=str(tmp_path / "state"))
    h.start()
    h.send(1, 1, eth_frame("ff:ff:ff:ff:ff:ff", "00:00:00:00:00:01", 0x0806))
    h.send(2, 1, eth_frame("ff:ff:ff:ff:ff:ff", "00:00:00:00:00:02", 0x0806))
    rest = build_rest_app(h.controller)
    report = {"pause_ms": 4.0, "bytes": 2048, "server": "http://ss1:9000",
              "image": {"backend": "criu", "files": [{"name": "core.img", "bytes": 2048, "sha256": "0" * 64}]}}

    def step(snapshot):
        cuts = snapshot.cuts
        pending = [n for n in sorted(cuts) if cuts[n].state == "pending"]
        if pending:
            h.controller.cut(snapshot.id, pending[0])
            return
        for name in sorted(cuts):
            if cuts[name].state == "cut":
                h.controller.done(snapshot.id, name, report)
        h.run_spawned()

    def app(environ, start_response):
        current = h.coordinator.current
        if (environ["REQUEST_METHOD"] == "GET" and current is not None and current.state == "running"
                and environ["PATH_INFO"] == "/violin/snapshots/" + current.id and h.auto_step):
            step(current)
        return rest(environ, start_response)

    h.auto_step = True
    server = make_server("127.0.0.1", 0, app, handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    h.url = "http://127.0.0.1:%d" % server.server_address[1]
    yield h
    server.shutdown()
    server.server_close()


# webob, imported here for the first time when this file runs alone, still imports cgi
real_api = pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")


def real_run(h, *argv, token="token"):
    return cli.main(["--url", h.url, "--token", token] + list(argv))


@real_api
def test_real_api_members_snapshot_show_list_restore(real, capsys):
    assert real_run(real, "member", "add", "h1", "--mac", "00:00:00:00:00:01", "--no-marker",
                    "--helper", "http://helper1:7000") == 0
    assert real_run(real, "member", "add", "h2", "--mac", "00:00:00:00:00:02", "--no-marker",
                    "--helper", "http://helper2:7000") == 0
    assert real_run(real, "member", "add", "h2", "--mac", "00:00:00:00:00:03") == 1
    assert capsys.readouterr().err.strip() == "violin: member h2 exists; delete it first"
    assert real_run(real, "members") == 0
    out = capsys.readouterr().out
    assert "00:00:00:00:00:01@1:1" in out and "00:00:00:00:00:02@2:1" in out

    assert real_run(real, "snapshot", "--label", "cli") == 0
    captured = capsys.readouterr()
    assert "cut 1/2, done 0/2" in captured.err and "complete: cut 2/2, done 2/2" in captured.err
    assert "complete (restorable)" in captured.out and "by counters" in captured.out
    snapshot_id = real.coordinator.current.id
    assert real_run(real, "list") == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:5] == [snapshot_id, "complete", "1", "cli", "h1,h2"] and row[-1] == "0"
    assert real_run(real, "--json", "show", snapshot_id) == 0
    assert json.loads(capsys.readouterr().out)["members"][0]["server"] == "http://ss1:9000"

    assert real_run(real, "restore", snapshot_id, "--no-wait") == 0
    restore_id = capsys.readouterr().out.split()[2]
    assert real_run(real, "restores", restore_id) == 0
    assert "state      running (staging)" in capsys.readouterr().out
    real.run_spawned()  # the helpers (FakeIO) say yes to everything
    assert real_run(real, "restores", restore_id) == 0
    assert "state      complete" in capsys.readouterr().out

    assert real_run(real, "restore", "nope") == 1
    assert capsys.readouterr().err.strip() == "violin: no snapshot nope"
    assert real_run(real, "delete", snapshot_id, token="wrong") == 1
    assert "refused the token (missing or wrong bearer token" in capsys.readouterr().err
    assert real_run(real, "delete", snapshot_id) == 0
    assert real_run(real, "list") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "no snapshots"


@real_api
def test_real_api_abort_and_schedule(real, capsys):
    assert real_run(real, "member", "add", "h1", "--mac", "00:00:00:00:00:01", "--no-marker") == 0
    assert capsys.readouterr().out.strip() == "added member h1"
    real.auto_step = False
    assert real_run(real, "--json", "snapshot", "--no-wait") == 0
    started = json.loads(capsys.readouterr().out)
    snapshot_id = started["id"]
    assert started["state"] == "running" and snapshot_id == real.coordinator.current.id
    assert real_run(real, "abort", snapshot_id, "--reason", "testing") == 0
    assert capsys.readouterr().out.strip().endswith("snapshot %s aborted: testing" % snapshot_id)
    assert real_run(real, "abort", snapshot_id) == 1
    assert "is aborted: testing" in capsys.readouterr().err
    assert real_run(real, "restore", snapshot_id) == 1
    assert "not offered for restore" in capsys.readouterr().err

    assert real_run(real, "schedule", "set", "--every", "60", "--keep", "2", "--members", "h1") == 0
    assert "every 1m00s, keeping the newest 2 scheduled ones, members: h1" in capsys.readouterr().out
    assert real_run(real, "schedule", "set", "--every", "0.5") == 1
    assert "interval_s: 0.5 is out of range: expected a value from 1 to 604800" in capsys.readouterr().err
    assert real_run(real, "schedule", "set", "--every", "60", "--members", "ghost") == 1
    assert capsys.readouterr().err.startswith("violin: ")
    assert real_run(real, "--json", "schedule") == 0
    assert json.loads(capsys.readouterr().out)["interval_s"] == 60.0
    assert real_run(real, "schedule", "off") == 0
    assert capsys.readouterr().out.strip() == "periodic snapshots are off"
