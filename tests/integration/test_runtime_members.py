"""Members added and removed at runtime: ``violin member add`` names a process by its Mininet host and
command line, the helper finds it (pid, namespaces, interface, MAC) and registers it with the controller,
``violin members`` shows it with its backend, host and attachment, a snapshot takes it with the others,
and ``violin member rm`` removes it at the helper, which unregisters it."""

import json
import os
import shlex
import sys
import time

from lab import lab, slicelab
from topologies.lan import LanTopo
from violin_client import cli
from violin_client.api import ApiClient, wait_until_done

IDLE = "import time\nwhile True:\n    time.sleep(0.05)\n"


def start_idle(host, directory):
    """A process in ``host`` that CRIU can dump: stdio and working directory opened inside the host."""
    os.makedirs(directory, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-c", IDLE, "violin-idle-member"])
    return host.popen(["sh", "-c", "cd %s && exec %s </dev/null >%s 2>&1" % (
        shlex.quote(directory), command, shlex.quote(os.path.join(directory, "out")))])


def violin(controller, capsys, *argv):
    code = cli.main(["--url", controller.url, "--token", controller.token] + list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_member_added_and_removed_at_runtime(slice_controller, tmp_path, capsys, monkeypatch):
    controller = slice_controller
    monkeypatch.setenv("VIOLIN_HELPER_TOKEN", slicelab.HELPER_TOKEN)
    with lab.network(LanTopo(3, prefix=lab.run_prefix()), controller) as net:
        h1, h2, h3 = net.hosts
        with slicelab.helped_slice(controller, net, str(tmp_path), rate=100, hosts=[h1, h2]) as members:
            idle = start_idle(h3, str(tmp_path / "idle"))
            try:
                time.sleep(0.3)
                h3.cmd("ping -c 1 -W 1 %s" % h1.IP())  # the controller learns where h3's MAC is
                name = h3.name + "x"
                code, out, err = violin(controller, capsys, "member", "add", name, "--helper", members.helper_url,
                                        "--mininet-host", h3.name, "--command", "violin-idle-member",
                                        "--workdir", str(tmp_path / "idle"))
                assert code == 0, err
                assert "at its helper: %s on %s (pid %d)" % (h3.MAC(), h3.defaultIntf(), idle.pid) in out, out
                seen = slicelab.wait_registered(controller, [name], members.helper_url)[name]
                assert seen["macs"] == [h3.MAC()] and seen["backend"] == "criu" and seen["host"] == "lab"
                assert seen["handle"] == "%s: violin-idle-member" % h3.name and seen["marker"] is True
                code, out, err = violin(controller, capsys, "members")
                row = next(line for line in out.splitlines() if line.startswith(name + " "))
                port = h3.defaultIntf().link.intf2.node.ports[h3.defaultIntf().link.intf2]
                assert row.split()[3:6] == ["criu", "lab", "yes"], row
                assert row.endswith("%s@1:%d" % (h3.MAC(), port)), row
                listed = ApiClient(members.helper_url, slicelab.HELPER_TOKEN).call("GET", "/members")["members"]
                mine = next(m for m in listed if m["name"] == name)
                assert mine["located"]["pid"] == idle.pid and mine["registration"]["registered"] is True
                # It takes part in snapshots like the members of the helper's config.
                status, snap = controller.request("POST", "/violin/snapshots", {"label": "runtime"})
                assert status == 202, snap
                view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"])
                assert view["state"] == "complete", (view.get("reason"), open(members.helper_log).read()[-2000:])
                assert sorted(m["name"] for m in view["members"]) == sorted([h1.name, h2.name, name])
                assert idle.poll() is None  # it runs on
                # Removed at its helper (found through the controller's record of it), which unregisters it.
                code, out, err = violin(controller, capsys, "member", "rm", name)
                assert code == 0 and "at its helper" in out, err
                assert controller.get("/violin/members/%s" % name)[0] == 404
                assert name not in ApiClient(members.helper_url).call("GET", "/health")["members"]
                with open(os.path.join(str(tmp_path), "helper", "members.json")) as handle:
                    assert json.load(handle)["added"] == {}  # kept for the helper's next start
                # By name without a helper is a usage error; the other members were never touched.
                code, _, err = violin(controller, capsys, "member", "add", "x", "--mininet-host", h3.name,
                                      "--command", "y")
                assert code == 2 and "--helper" in err
                assert slicelab.advancing(members, h1) and slicelab.advancing(members, h2)
            finally:
                idle.kill()
                idle.wait(5)
