"""Podman containers as members, end to end: a real controller, Open vSwitch, Mininet, violin-helper with
the podman backend and a snapshot server. seqstream (UDP and TCP) runs in one container per Mininet host
(joined to the host's network namespace); snapshots are podman checkpoints with the cut in CRIU's
post-dump; restores are podman imports. The oracle judges every stream after the restores."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from hostside.backends import criu
from lab import containers, lab, slicelab
from violin_client.api import wait_until_done
from workloads import oracle
from topologies.lan import LanTopo

CYCLES = int(os.environ.get("VIOLIN_CONTAINER_CYCLES", 3))



def _oracle(members):
    return oracle.load([members.member_dir(h) for h in members.hosts], margin=int(members.rate // 2))


def _assert_consistent(result, members, evidence=None):
    pairs = len(members.hosts) * (len(members.hosts) - 1)
    assert result["totals"]["streams"] == 2 * pairs and result["totals"]["tcp"]["streams"] == pairs, result["totals"]
    if not result["consistent"]:  # everything that places the gaps, untruncated
        pytest.fail("inconsistent: %s\nstreams: %s\n%s" % (
            result["totals"], {k: v for k, v in result["streams"].items() if v["gaps"] or v["duplicates"]},
            "\n".join("%s: %s" % item for item in (evidence or {}).items())))
    tcp = {k: (v["judged_upto"], v["behind_udp"]) for k, v in result["streams"].items() if k.endswith("/tcp")}
    assert all(upto > members.rate for upto, _behind in tcp.values()), tcp


def _snapshot(controller, label):
    status, snap = controller.request("POST", "/violin/snapshots", {"label": label})
    assert status == 202, snap
    return wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=120)


def _restore(controller, snap_id, body=None):
    status, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap_id, body or {})
    assert status == 202, job
    return wait_until_done(controller.api, "/violin/restores/%s" % job["id"], timeout=180)


def test_container_snapshots_restore_consistently_also_onto_another_host(slice_controller, podman_ready, tmp_path):
    controller = slice_controller
    rng = random.Random(11)
    with lab.network(LanTopo(4, prefix=lab.run_prefix()), controller) as net:
        h1, h2, h3, spare = net.hosts
        with containers.container_slice(controller, net, str(tmp_path), hosts=[h1, h2, h3], rate=150) as members:
            log = lambda: (open(members.helper_log).read()[-2500:], members.outputs())  # noqa: E731
            sent = lambda: {h.name: {p: v[1] for p, v in members.progress(h).items()} for h in members.hosts}  # noqa
            cycles, ovs_before = [], containers.ovs_coverage()
            time.sleep(0.8)
            for cycle in range(CYCLES):
                time.sleep(rng.uniform(0.05, 0.4))
                at_snapshot = sent()
                view = _snapshot(controller, "containers-%d" % cycle)
                assert view["state"] == "complete", (view.get("reason"), log())
                for entry in view["members"]:
                    assert entry["state"] == "done" and entry["marker"] and entry["pause_ms"] > 0, entry
                    assert entry["image"]["backend"] == "podman", entry
                    assert {f["name"] for f in entry["image"]["files"]} == {"container.tar", "member.json"}
                time.sleep(rng.uniform(0.05, 0.4))
                at_restore, before = sent(), members.progress(h1)
                job = _restore(controller, view["id"])
                assert job["state"] == "complete", (job.get("reason"), job.get("members"), log())
                after = members.progress(h1)
                peer = next(iter(after))
                assert after[peer][1] <= before[peer][1]  # back at the snapshot
                cycles.append({"cycle": cycle, "counts": view["counts"], "sent_at_snapshot": at_snapshot,
                               "sent_at_restore": at_restore,
                               "restore_ms": job.get("timings_ms"), "load": os.getloadavg()[0]})
            # h3's container restored onto the spare host: another helper there, h3's image, the spare's namespace.
            spare_netns = containers.attach_netns(spare)
            spare_helper, spare_url = containers.start_helper(
                controller, str(tmp_path), members.server_url,
                {h3.name: {"backend": "podman", "container": h3.name, "netns": spare_netns, "ip": "%s/8" % h3.IP()}},
                name="spare-helper")
            try:
                cycles.append({"before-move snapshot, sent": sent()})
                view = _snapshot(controller, "before-move")
                assert view["state"] == "complete", (view.get("reason"), log())
                cycles.append({"move restore, sent": sent(), "counts": view["counts"]})
                job = _restore(controller, view["id"], {"placement": {h3.name: spare_url}})
                assert job["state"] == "complete", (job.get("reason"), job.get("members"),
                                                    (tmp_path / "spare-helper.log").read_text()[-2500:])
                assert job["members"][h3.name]["previous"] == "stopped"
                pid = int(containers.podman("inspect", "-f", "{{.State.Pid}}", h3.name).stdout)
                assert os.readlink("/proc/%d/ns/net" % pid) == os.readlink("/proc/%d/ns/net" % spare.pid)
                assert spare.cmd("cat /sys/class/net/%s/address" % spare.defaultIntf()).strip() == h3.MAC()
                slicelab.wait_registered(controller, [h3.name], spare_url)  # the spare's helper registers it
                time.sleep(0.5)
                cycles.append({"after-move snapshot, sent": sent(), "restore_ms": job.get("timings_ms")})
                view = _snapshot(controller, "after-move")  # later snapshots go through the new helper
                assert view["state"] == "complete", (view.get("reason"), log())
                cycles.append({"after-move restore, sent": sent(), "counts": view["counts"]})
                job = _restore(controller, view["id"])
                assert job["state"] == "complete", (job.get("reason"), job.get("members"))
                cycles.append({"after the last restore, sent": sent(), "restore_ms": job.get("timings_ms")})
                # Every TCP connection is up and moving: restoring containers takes seconds here (podman and
                # runc around CRIU), the restored sockets' retransmissions back off in the quarantine
                # meanwhile, so a stream may lag behind its UDP twin for a while, but never stops.
                time.sleep(1.0)
                first = {h.name: members.progress(h, tcp=True) for h in members.hosts}
                time.sleep(2.5)
                last = {h.name: members.progress(h, tcp=True) for h in members.hosts}
                stalled = ["%s->%s" % (h, peer) for h in first for peer in first[h]
                           if last[h][peer][1] <= first[h][peer][1]]
                assert not stalled, (stalled, first, last)
            finally:
                members.stop()
                containers.slicelab.stop_daemon(spare_helper)
                containers.detach_netns(spare.name)
            result = _oracle(members)
            ovs_after = containers.ovs_coverage()
            evidence = {"cycles": cycles, "ovs coverage over the run": {
                k: ovs_after[k] - ovs_before.get(k, 0) for k in ovs_after if ovs_after[k] != ovs_before.get(k, 0)},
                "controller": containers.frame_metrics(controller)}
    print("oracle over containers after %d restores and a move: %s" % (CYCLES + 2, result["totals"]))
    _assert_consistent(result, members, evidence)


def _poll(predicate, timeout=30.0, every=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("not within %.0f s" % timeout)


def _runs_and_holds_nothing(net, members, hosts, view):
    counts = view["counts"]
    assert counts["held"] == counts["released"] + counts.get("dropped", 0), counts
    assert slicelab.no_cut_rules(net)
    for h in hosts:
        assert members.alive(h), members.outputs()
        assert slicelab.advancing(members, h), h.name


def test_faults_abort_with_the_reason_and_leave_the_containers_running(slice_controller, podman_ready, tmp_path):
    """The snapshot server's disk full mid-upload, then a container removed mid-checkpoint."""
    controller = slice_controller
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "violin-container-faults", str(images)], check=True)
    try:
        with lab.network(LanTopo(2, prefix=lab.run_prefix()), controller) as net:
            h1, h2 = net.hosts
            with containers.container_slice(controller, net, str(tmp_path), rate=100) as members:
                time.sleep(0.5)
                used = os.statvfs(str(images))
                subprocess.run(["mount", "-o", "remount,size=%d" % ((used.f_blocks - used.f_bfree) * used.f_frsize
                                                                   + 256 * 1024), str(images)], check=True)
                view = _snapshot(controller, "disk-full")
                print("disk full: %s: %s" % (view["state"], view.get("reason")))
                assert view["state"] == "aborted" and not view["restorable"], view
                assert "No space left" in view["reason"] or "507" in view["reason"], view["reason"]
                _poll(lambda: not [f for _, _, fs in os.walk(str(images / view["id"])) for f in fs], timeout=10)
                _runs_and_holds_nothing(net, members, [h1, h2], view)
                subprocess.run(["mount", "-o", "remount,size=200m", str(images)], check=True)

                # h2 killed and removed while podman checkpoints it (just after the helper wrote its CRIU
                # configuration, before runc froze it; podman's own `rm` would wait for the checkpoint).
                conf = os.path.join(containers.CONF_DIR, "%s.conf" % h2.name)
                pid = int(containers.podman("inspect", "-f", "{{.State.Pid}}", h2.name).stdout)
                status, snap = controller.request("POST", "/violin/snapshots", {"label": "removed"})
                assert status == 202, snap
                _poll(lambda: "action-script" in open(conf).read(), every=0.001)
                os.kill(pid, signal.SIGKILL)
                remover = subprocess.Popen(["podman", "rm", "--force", "--time", "0", h2.name],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=120)
                remover.wait(60)
                print("container removed: %s: %s" % (view["state"], view.get("reason")))
                assert view["state"] == "aborted" and h2.name in view["reason"], view
                _runs_and_holds_nothing(net, members, [h1], view)
                assert containers.state_of(h2.name) is None
    finally:
        subprocess.run(["umount", "-l", str(images)], capture_output=True)


def test_demo_with_containers_gives_a_bit_identical_image(podman_ready, tmp_path, capsys):
    """scripts/demo.py --containers, small: the Mandelbrot in four containers, two killed, all restored."""
    if not os.path.exists(criu.CRIU):
        if os.environ.get("CI"):
            pytest.fail("CI must run the container demo: CRIU is missing")
        pytest.skip("CRIU 4.2.1 not installed (run scripts/setup.sh)")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
    import demo
    out = tmp_path / "mandelbrot.png"
    code = demo.main(["--containers", "--width", "120", "--height", "90", "--iterations", "200", "--delay-ms", "400",
                      "--every", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "FAILURE: the containers of h3 and h4 killed" in printed and "RESTORED all four members" in printed
    assert "bit-identical" in printed and out.exists()

