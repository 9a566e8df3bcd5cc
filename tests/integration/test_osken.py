"""The same app on os-ken (Ryu's maintained fork, native threads, no WSGI module of its own)."""

import os
import time

import pytest

from lab import lab
from lab.members import ProcessMembers, check_cut, pcap_datagrams
from topologies.tree import LineTopo
from violin_client.api import wait_until_done

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OSKEN_PYTHON = os.path.join(REPO, ".venv-osken", "bin", "python")


@pytest.fixture
def osken_controller(lab_ready):
    if not os.path.exists(OSKEN_PYTHON):
        if os.environ.get("CI"):
            pytest.fail("CI must test os-ken: %s is missing (scripts/setup.sh builds it)" % OSKEN_PYTHON)
        pytest.skip("no os-ken environment (run scripts/setup.sh)")
    process = lab.ControllerProcess(command=[OSKEN_PYTHON, "-m", "violin_launcher", "--framework", "os_ken"])
    process.start()
    yield process
    process.stop()


def test_forwarding_and_a_consistent_snapshot_on_os_ken(osken_controller, tmp_path):
    controller = osken_controller
    with lab.network(LineTopo(3, prefix=lab.run_prefix()), controller) as net:
        assert net.pingAll(timeout=2) == 0.0
        status, health = controller.get("/violin/health")
        assert status == 200 and health["switches"] == 3
        members = ProcessMembers(net.hosts, str(tmp_path), rate=200)
        members.start()
        try:
            time.sleep(0.8)
            for spec in members.member_specs():
                assert controller.request("POST", "/violin/members", spec)[0] == 201
            status, snap = controller.request("POST", "/violin/snapshots", {"label": "os-ken"})
            assert status == 202, snap
            for host in net.hosts:
                time.sleep(0.1)
                members.cut(controller, snap["id"], host)
            view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=10)
            assert view["state"] == "complete", view
        finally:
            members.stop()
    recorded = pcap_datagrams(os.path.join(controller.workdir, "state", snap["id"], "channel.pcapng"))
    assert check_cut(members, recorded) == []
