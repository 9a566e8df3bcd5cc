"""One slice of every kind (issue 14 part 4): seqstream as a CRIU process, in two podman containers and in a
VM (guest/vseq.c), each a peer of all the others over UDP and TCP, one helper registering them all. Random-
timed snapshot + restore cycles, one of them restoring a container onto another host (a second helper
there); then the oracle judges every stream: nothing lost, nothing repeated.

If a stream has gaps, the failure message says which stream, what each cycle's snapshot did with frames
(held, released, recorded, dropped, late_released), where the senders were at each snapshot and restore (to
place a gap in its cycle), Open vSwitch's drop counters over the run and the controller's frame metrics."""

import os
import random
import signal
import time

import pytest

from lab import containers, lab, slicelab, vms
from violin_client.api import wait_until_done
from workloads import oracle
from topologies.lan import LanTopo

CYCLES = int(os.environ.get("VIOLIN_MIXED_CYCLES", 10))
MOVE_AT = CYCLES // 2  # this cycle's restore puts the second container onto the spare host
RATE = 100.0



def sent(processes, members):
    """Where every sender we can read is: {sender: {peer id: last sent}} (UDP)."""
    where = {h.name: {p: v[1] for p, v in processes.progress(h).items()} for h in processes.hosts}
    where.update({h.name: {p: v[1] for p, v in members.progress(h).items()} for h in members.hosts})
    return where


def stop_all(net, processes, members, guests):
    """Stop every sender at (nearly) the same instant: a receiver stopped long before its senders would
    show their last datagrams as gaps. The guests stop sending and keep receiving (STOP)."""
    for guest in guests:
        vms.guest_command(net.hosts[0], guest, "STOP")
    pids = [processes.pids[h.name] for h in processes.hosts if processes.alive(h)]
    for h in members.hosts:
        if members.alive(h):
            pids.append(int(containers.podman("inspect", "-f", "{{.State.Pid}}", h.name).stdout))
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    members.stop()  # waits for the containers to exit (their logs flushed)
    processes.stop()


def judge(net, processes, members, guests, guest_ids):
    records = {}
    for h in processes.hosts:
        records.update(oracle.load_records([processes.member_dir(h)]))
    for h in members.hosts:
        records.update(oracle.load_records([members.member_dir(h)]))
    for g in guests:
        records[guest_ids[g.name]] = vms.oracle_member(net.hosts[0], g)
    return oracle.check(records, margin=int(RATE // 2))


def test_containers_processes_and_a_vm_in_one_slice_restore_consistently(slice_controller, vm_ready, podman_ready,
                                                                         tmp_path):
    controller = slice_controller
    rng = random.Random(int(os.environ.get("VIOLIN_ORACLE_SEED", 14)))
    prefix = lab.run_prefix()
    started = time.monotonic()
    with lab.network(LanTopo(4, prefix=prefix), controller) as net:
        h1, h2, h3, spare = net.hosts
        guest_ids = {"%svm1" % prefix: 4}
        guest = vms.seqstream_guest("%svm1" % prefix, 4, "10.0.0.101/8", "52:54:00:76:0e:01",
                                    str(net.switches[0].name), {1: h1.IP(), 2: h2.IP(), 3: h3.IP()}, RATE)
        with vms.guests([guest], ready_timeout=180):  # TCG boots slowly on a loaded machine
            with containers.mixed_slice(controller, net, str(tmp_path), [h1], [h2, h3], [guest], guest_ids,
                                        rate=RATE) as (processes, members):
                log = lambda: open(members.helper_log).read()[-2500:]  # noqa: E731
                spare_netns = containers.attach_netns(spare)
                spare_helper, spare_url = containers.start_helper(
                    controller, str(tmp_path), members.server_url,
                    {h3.name: {"backend": "podman", "container": h3.name, "netns": spare_netns,
                               "ip": "%s/8" % h3.IP()}}, name="spare-helper")
                try:
                    time.sleep(2.0)  # TCP streams connect (the VM's too)
                    ovs_before, evidence = containers.ovs_coverage(), []
                    for cycle in range(CYCLES):
                        time.sleep(rng.uniform(0.1, 0.8))  # random cut timing
                        at_snapshot = sent(processes, members)
                        status, snap = controller.request("POST", "/violin/snapshots", {"label": "mixed-%d" % cycle})
                        assert status == 202, snap
                        view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=120)
                        assert view["state"] == "complete", (cycle, view.get("reason"), view["members"], log())
                        backends = {m["name"]: m["image"]["backend"] for m in view["members"]}
                        assert sorted(backends.values()) == ["criu", "libvirt", "podman", "podman"], backends
                        time.sleep(rng.uniform(0.1, 0.8))  # runs on past the snapshot, then "fails"
                        at_restore = sent(processes, members)
                        body = {"placement": {h3.name: spare_url}} if cycle == MOVE_AT else {}
                        status, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap["id"], body)
                        assert status == 202, job
                        job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"], timeout=180)
                        assert job["state"] == "complete", (cycle, job.get("reason"), job.get("members"), log(),
                                                            (tmp_path / "spare-helper.log").read_text()[-2000:])
                        evidence.append({"cycle": cycle, "snapshot": view["id"], "counts": view["counts"],
                                         "sent_at_snapshot": at_snapshot, "sent_at_restore": at_restore,
                                         "restore_ms": job.get("timings_ms")})
                        if cycle == MOVE_AT:  # h3's container now runs in the spare host's namespace
                            assert job["members"][h3.name]["previous"] == "stopped", job["members"]
                            pid = int(containers.podman("inspect", "-f", "{{.State.Pid}}", h3.name).stdout)
                            assert os.readlink("/proc/%d/ns/net" % pid) == os.readlink("/proc/%d/ns/net" % spare.pid)
                            slicelab.wait_registered(controller, [h3.name], spare_url)  # by the spare's helper
                    time.sleep(6.0)  # TCP streams in retransmission backoff catch up
                    stop_all(net, processes, members, [guest])
                    result = judge(net, processes, members, [guest], guest_ids)
                    ovs_after = containers.ovs_coverage()
                finally:
                    slicelab.stop_daemon(spare_helper)
                    containers.detach_netns(spare.name)
    elapsed = time.monotonic() - started
    print("mixed slice: %d cycles (one onto another host) in %.0f s: %s" % (CYCLES, elapsed, result["totals"]))
    assert result["totals"]["udp"]["streams"] == result["totals"]["tcp"]["streams"] == 4 * 3, result["totals"]
    assert all(r["judged_upto"] > RATE for r in result["streams"].values()), result["streams"]
    if not result["consistent"]:
        bad = {k: v for k, v in result["streams"].items() if v["gaps"] or v["duplicates"]}
        pytest.fail("mixed slice inconsistent: %s\nstreams: %s\ncycles: %s\nOVS coverage over the run: %s\n"
                    "controller: %s" % (result["totals"], bad, evidence,
                                        {k: ovs_after[k] - ovs_before.get(k, 0) for k in ovs_after
                                         if ovs_after[k] != ovs_before.get(k, 0)},
                                        containers.frame_metrics(controller)))
