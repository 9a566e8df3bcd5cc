"""Transport security end to end: a real controller with an HTTPS REST API, a real violin-helper and
violin-snapshot-server on HTTPS, every party verifying against the lab CA (scripts/make_tls.sh); one
snapshot of CRIU members and its restore go over it; no log has a token in it."""

import glob
import os
import subprocess
import time

import pytest

from hostside.backends import criu
from hostside.store.client import ImageServer
from lab import lab, slicelab
from topologies.lan import LanTopo
from violin_client.api import ApiClient, Unreachable, wait_until_done

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def pair(tmp_path):
    directory = tmp_path / "tls"
    subprocess.run(["bash", os.path.join(REPO, "scripts", "make_tls.sh"), str(directory)], check=True,
                   capture_output=True)
    return {"cert": str(directory / "server.crt"), "key": str(directory / "server.key"),
            "ca": str(directory / "ca.crt")}


def test_snapshot_and_restore_over_https_and_no_token_in_any_log(lab_ready, pair, tmp_path):
    if not os.path.exists(criu.CRIU):
        pytest.skip("CRIU 4.2.1 not installed (run scripts/setup.sh)")
    config = slicelab.controller_config()
    config["api"].update(tls_cert=pair["cert"], tls_key=pair["key"], ca_file=pair["ca"])
    controller = lab.ControllerProcess(config=config, ca_file=pair["ca"]).start()
    logs = {}
    try:
        assert controller.url.startswith("https://")
        with pytest.raises(Unreachable, match="not trusted"):
            ApiClient(controller.url, token=controller.token, ca_file=None).call("GET", "/violin/health")
        with lab.network(LanTopo(2, prefix=lab.run_prefix()), controller) as net:
            with slicelab.helped_slice(controller, net, str(tmp_path / "slice"), tls=pair) as members:
                assert members.server_url.startswith("https://") and members.helper_url.startswith("https://")
                time.sleep(0.8)
                status, snap = controller.request("POST", "/violin/snapshots", {"label": "tls"})
                assert status == 202, snap
                view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"])
                assert view["state"] == "complete", (view, open(members.helper_log).read()[-2000:],
                                                     controller.log_text())
                store = ImageServer(members.server_url, slicelab.SERVER_TOKEN, ca_file=pair["ca"])
                for entry in view["members"]:
                    assert entry["state"] == "done" and entry["marker"] and entry["server"] == members.server_url
                    assert store.index(snap["id"], entry["name"])["files"]
                status, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap["id"], {})
                assert status == 202, job
                job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"])
                assert job["state"] == "complete", (job, open(members.helper_log).read()[-2000:])
                time.sleep(0.3)
                assert all(members.alive(h) for h in net.hosts)
                # A member registered with a plain-HTTP helper URL cannot be reached: said, not hung.
                with pytest.raises(Unreachable, match="https://"):
                    ApiClient(members.helper_url.replace("https", "http")).call("GET", "/health")
        with open(controller.log_path) as handle:
            logs["controller"] = handle.read()
    finally:
        controller.stop()
    for path in glob.glob(str(tmp_path / "slice" / "**" / "*.log"), recursive=True):
        with open(path, errors="replace") as handle:
            logs[path] = handle.read()
    assert any(p.endswith("helper.log") for p in logs) and any(p.endswith("server.log") for p in logs)
    assert "listening on https://" in "".join(logs.values())
    for token in (controller.token, slicelab.HELPER_TOKEN, slicelab.SERVER_TOKEN):
        leaked = [name for name, text in logs.items() if token in text]
        assert not leaked, "a token is in %s" % leaked
    assert not [name for name, text in logs.items() if "Traceback" in text]
