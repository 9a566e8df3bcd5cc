"""End to end on the host side: the controller asks violin-helper, which live-dumps CRIU members
(cut while frozen), streams their images to violin-snapshot-server, and reports done."""

import json
import os
import subprocess
import sys
import time

import pytest

from hostside import criu
from hostside.storage import ImageServer
from topologies import lab
from topologies.lan import LanTopo
from topologies.members import Slice


def start_daemon(argv, url, tmp_path, name, timeout=15.0):
    log = open(tmp_path / ("%s.log" % name), "w")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("%s exited:\n%s" % (name, (tmp_path / ("%s.log" % name)).read_text()))
        try:
            if lab.http_json(url + "/health")[0] == 200:
                return process
        except OSError:
            pass  # not listening yet
        time.sleep(0.1)
    raise AssertionError("%s did not answer" % name)


def stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def helper_controller(lab_ready):
    if not os.path.exists(criu.CRIU):
        if os.environ.get("CI"):
            pytest.fail("CI must test CRIU: %s is missing" % criu.CRIU)
        pytest.skip("CRIU 4.2.1 not installed")
    process = lab.ControllerProcess(config={"api": {"helper_token": "helper-secret"}}).start()
    yield process
    process.stop()


def test_controller_helper_criu_and_snapshot_server(helper_controller, tmp_path):
    controller = helper_controller
    server_port, helper_port = lab.free_port(), lab.free_port()
    server_url, helper_url = "http://127.0.0.1:%d" % server_port, "http://127.0.0.1:%d" % helper_port
    daemons = []
    try:
        daemons.append(start_daemon([sys.executable, "-m", "hostside.server", "--listen", "127.0.0.1:%d" % server_port,
                                     "--dir", str(tmp_path / "images"), "--token", "server-secret"],
                                    server_url, tmp_path, "server"))
        with lab.network(LanTopo(3, prefix=lab.run_prefix()), controller) as net:
            members = Slice(net.hosts, str(tmp_path / "slice"), rate=200)
            members.start()
            try:
                time.sleep(0.8)
                config = {
                    "listen": "127.0.0.1:%d" % helper_port, "token": "helper-secret",
                    "controller_token": controller.token, "servers": [server_url], "server_token": "server-secret",
                    "work_dir": str(tmp_path / "helper"),
                    "members": {h.name: {"pid": members.processes[h.name].pid, "netns": "/proc/%d/ns/net" % h.pid,
                                         "mntns": "/proc/%d/ns/mnt" % h.pid, "workdir": members.member_dir(h),
                                         "iface": str(h.defaultIntf()), "mac": h.MAC()} for h in net.hosts}}
                (tmp_path / "helper.json").write_text(json.dumps(config))
                daemons.append(start_daemon([sys.executable, "-m", "hostside.helper", "--config",
                                             str(tmp_path / "helper.json")], helper_url, tmp_path, "helper"))
                for h in net.hosts:
                    status, body = controller.request("POST", "/violin/members", {
                        "name": h.name, "macs": [h.MAC()], "helper_url": helper_url, "backend": "criu"})
                    assert status == 201, body
                status, snap = controller.request("POST", "/violin/snapshots", {"label": "criu"})
                assert status == 202, snap
                deadline, view = time.monotonic() + 60, None
                while time.monotonic() < deadline:
                    view = controller.get("/violin/snapshots/%s" % snap["id"])[1]
                    if view["state"] != "running":
                        break
                    time.sleep(0.1)
                assert view["state"] == "complete", (view, (tmp_path / "helper.log").read_text()[-2000:])
                client = ImageServer(server_url, "server-secret")
                for entry in view["members"]:
                    assert entry["state"] == "done" and entry["marker"] and entry["pause_ms"] > 0
                    assert entry["server"] == server_url and entry["image"]["files"]
                    index = client.index(snap["id"], entry["name"])
                    assert {f["sha256"] for f in index["files"]} == {f["sha256"] for f in entry["image"]["files"]}
                # Let the slice run on, then bring every member back from the snapshot through the helpers.
                time.sleep(1.0)
                before = {h.name: members.progress(h) for h in net.hosts}
                status, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap["id"], {})
                assert status == 202, job
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    job = controller.get("/violin/restores/%s" % job["id"])[1]
                    if job["state"] != "running":
                        break
                    time.sleep(0.1)
                assert job["state"] == "complete", (job, (tmp_path / "helper.log").read_text()[-2000:])
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
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    job = controller.get("/violin/restores/%s" % job["id"])[1]
                    if job["state"] != "running":
                        break
                    time.sleep(0.1)
                assert job["state"] == "complete", job
            finally:
                members.stop()
    finally:
        for daemon in daemons:
            stop(daemon)
