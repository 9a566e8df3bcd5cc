"""VM members (QEMU under libvirt, TCG) beside CRIU process members on one Open vSwitch LAN.

The helper snapshots a VM by a fake live migration to the snapshot server, the cut
taken while QEMU holds the guest paused before the switchover. The consistency
oracle runs between VMs (guest/vseq.c) and processes (workloads/seqstream.py).
"""

import os
import random
import signal
import struct
import subprocess
import time

import pytest

from hostside.backends import libvirt as vm
from hostside.store.client import ImageServer
from lab import lab, slicelab, vms
from violin_client.api import wait_until_done
from workloads import oracle
from topologies.lan import LanTopo

CYCLES = int(os.environ.get("VIOLIN_VM_ORACLE_CYCLES", 5))
RATE = 100.0


def slice_with_vms(net, prefix, count, first_ident):
    """``count`` guests on the LAN's switch, peers of every host member and of each other."""
    hosts = net.hosts
    idents = {h.name: i for i, h in enumerate(hosts, 1)}
    names = ["%svm%d" % (prefix, i) for i in range(1, count + 1)]
    addresses = {first_ident + i: "10.0.0.%d" % (100 + i) for i in range(count)}
    guests = []
    for i, name in enumerate(names):
        ident = first_ident + i
        peers = {idents[h.name]: h.IP() for h in hosts}
        peers.update({k: v for k, v in addresses.items() if k != ident})
        guests.append(vms.seqstream_guest(name, ident, addresses[ident] + "/8", "52:54:00:76:00:%02x" % (i + 1),
                                          str(net.switches[0].name), peers, RATE))
    return guests, {g.name: first_ident + i for i, g in enumerate(guests)}


def oracle_of(net, members, guests, guest_ids):
    """Stop everything sending, then judge every stream: host members from their files, guests over the LAN."""
    for g in guests:
        vms.guest_command(net.hosts[0], g, "STOP")
    for h in net.hosts:
        os.kill(members.pids[h.name], signal.SIGTERM)
    time.sleep(0.5)
    records = {}
    for h in net.hosts:
        records.update(oracle.load_records([members.member_dir(h)]))
    for g in guests:
        records[guest_ids[g.name]] = vms.oracle_member(net.hosts[0], g)
    return oracle.check(records, margin=int(RATE // 2))


def test_a_vm_snapshot_under_traffic_keeps_the_vm_and_its_connections_running(slice_controller, vm_ready, tmp_path):
    controller = slice_controller
    prefix = lab.run_prefix()
    with lab.network(LanTopo(2, prefix=prefix), controller) as net:
        guests, guest_ids = slice_with_vms(net, prefix, 1, first_ident=3)
        with vms.guests(guests):
            with slicelab.helped_slice(controller, net, str(tmp_path), rate=RATE, guests=guests,
                                       guest_ids=guest_ids) as members:
                time.sleep(2.0)  # TCP streams connect, every member is located
                for round_ in range(2):
                    status, snap = controller.request("POST", "/violin/snapshots", {"label": "vm-%d" % round_})
                    assert status == 202, snap
                    view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"])
                    assert view["state"] == "complete", (view.get("reason"), view["members"], open(members.helper_log).read()[-3000:])
                    entry = next(m for m in view["members"] if m["name"] == guests[0].name)
                    image = entry["image"]
                    assert image["backend"] == "libvirt" and image["files"][0]["name"] == "vm.save", image
                    assert 0 < entry["pause_ms"] < 1000 and image["qemu_pause_ms"] is not None, entry
                    # The VM's marker went into its tap as the guest's own frame: the guest ran on without
                    # waiting for the controller, which flipped it on the cut request frame that followed.
                    assert image["cut"] == "in-band" and image["drain_ms"] > 0, image
                    # Frames to the VM flowed through its pre-copy: the controller held them only from the
                    # helper's prepare, which came once the pre-copy's pass was nearly done (issue 11 goal 3).
                    # (A hold that came too late is retried with frames held from the start, and says so.)
                    hold = image["hold"]
                    if "retried" not in hold:
                        assert hold["at"] == "switchover" and hold["precopy_ms"] > 0, hold
                        assert entry["held_ms"] is not None and entry["held_ms"] < image["precopy_ms"], (entry, hold)
                    stored = ImageServer(members.server_url, slicelab.SERVER_TOKEN).index(snap["id"], guests[0].name)
                    assert stored["files"][0]["sha256"] == image["files"][0]["sha256"]
                    time.sleep(1.0)
                # The VM ran on through both snapshots: its network answers, and every stream, its TCP
                # connections included, is intact (no restore: nothing may be lost or repeated).
                assert "0% packet loss" in net.hosts[0].cmd("ping -c 3 -i 0.2 %s" % guests[0].address)
                result = oracle_of(net, members, guests, guest_ids)
    assert result["totals"]["tcp"]["streams"] == 6 and result["totals"]["udp"]["streams"] == 6, result["totals"]
    assert result["consistent"], (result["totals"], {k: v for k, v in result["streams"].items()
                                                     if v["gaps"] or v["duplicates"]})


def test_vms_and_processes_restored_together_lose_and_duplicate_nothing(slice_controller, vm_ready, tmp_path):
    controller = slice_controller
    prefix = lab.run_prefix()
    rng = random.Random(os.environ.get("VIOLIN_ORACLE_SEED", 11))
    with lab.network(LanTopo(2, prefix=prefix), controller) as net:
        guests, guest_ids = slice_with_vms(net, prefix, 2, first_ident=3)
        with vms.guests(guests):
            with slicelab.helped_slice(controller, net, str(tmp_path), rate=RATE, guests=guests,
                                       guest_ids=guest_ids) as members:
                time.sleep(2.0)
                timings = []
                for cycle in range(CYCLES):
                    time.sleep(rng.uniform(0.1, 0.8))  # random cut timing
                    status, snap = controller.request("POST", "/violin/snapshots", {"label": "vm-oracle-%d" % cycle})
                    assert status == 202, snap
                    view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=120)
                    assert view["state"] == "complete", (view.get("reason"), view["members"], open(members.helper_log).read()[-3000:])
                    time.sleep(rng.uniform(0.1, 0.8))  # runs on past the snapshot, then "fails"
                    status, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap["id"], {})
                    assert status == 202, job
                    job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"], timeout=120)
                    assert job["state"] == "complete", (job, open(members.helper_log).read()[-2000:])
                    timings.append(job["timings_ms"])
                time.sleep(6.0)  # TCP streams in retransmission backoff catch up
                result = oracle_of(net, members, guests, guest_ids)
    assert result["totals"]["udp"]["streams"] == result["totals"]["tcp"]["streams"] == 4 * 3, result["totals"]
    assert all(r["judged_upto"] > 100 for r in result["streams"].values()), result["streams"]
    assert result["consistent"], (result["totals"], {k: v for k, v in result["streams"].items()
                                                     if v["gaps"] or v["duplicates"]})


def no_cut_rules(net):
    return all(s.cmd("ovs-ofctl -O OpenFlow13 dump-flows %s" % s.name).count("cookie=0x76696f6c0000000%d" % r) == 0
               for s in net.switches for r in (4, 5, 6))


def test_a_snapshot_server_refusing_the_vm_stream_aborts_and_the_vm_runs_on(slice_controller, vm_ready, tmp_path):
    controller = slice_controller
    prefix = lab.run_prefix()
    with lab.network(LanTopo(1, prefix=prefix), controller) as net:
        guests, guest_ids = slice_with_vms(net, prefix, 1, first_ident=2)
        with vms.guests(guests):
            # The helper presents the wrong token: the server refuses the stream (401) as it begins.
            with slicelab.helped_slice(controller, net, str(tmp_path), rate=RATE, guests=guests, guest_ids=guest_ids,
                                       helper_settings={"server_token": "not-the-servers-token"}):
                time.sleep(1.5)
                _, snap = controller.request("POST", "/violin/snapshots", {})
                view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=60)
                assert view["state"] == "aborted" and "refused vm.save: 401" in view["reason"], view
                assert vms.domain_state(guests[0].name) == "running"
                assert no_cut_rules(net)
                assert "0% packet loss" in net.hosts[0].cmd("ping -c 3 -i 0.2 %s" % guests[0].address)
                _, health = controller.get("/violin/health")
                assert not health.get("snapshot") or health["snapshot"].get("held_frames", 0) == 0, health


def test_a_vm_that_disappears_mid_migration_aborts_the_snapshot(slice_controller, vm_ready, tmp_path):
    import libvirt
    controller = slice_controller
    prefix = lab.run_prefix()
    with lab.network(LanTopo(2, prefix=prefix), controller) as net:
        guests, guest_ids = slice_with_vms(net, prefix, 1, first_ident=3)
        with vms.guests(guests):
            # A slow stream (1 MiB/s) keeps the migration going long enough to pull the VM from under it.
            with slicelab.helped_slice(controller, net, str(tmp_path), rate=RATE, guests=guests, guest_ids=guest_ids,
                                       helper_settings={"vm_max_bandwidth": 1 << 20}) as members:
                time.sleep(1.5)
                _, snap = controller.request("POST", "/violin/snapshots", {})
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    view = controller.get("/violin/snapshots/%s" % snap["id"])[1]
                    vm_entry = next(m for m in view["members"] if m["name"] == guests[0].name)
                    if vm_entry["state"] != "pending":
                        break
                    time.sleep(0.01)
                time.sleep(0.5)
                conn = libvirt.open(vms.URI)
                try:
                    conn.lookupByName(guests[0].name).destroy()
                finally:
                    conn.close()
                view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=60)
                assert view["state"] == "aborted" and guests[0].name in view["reason"], view
                assert no_cut_rules(net) and net.pingAll(timeout=2) == 0.0
                for h in net.hosts:
                    first = members.progress(h)
                    time.sleep(0.3)
                    assert members.progress(h) != first  # the process members run on


def test_a_vm_of_a_qemu_that_loses_guest_writes_is_refused_and_runs_on(slice_controller, vm_ready, tmp_path):
    """Debian's own QEMU 7.2 under TCG stores stale pages (see hostside/backends/libvirt.py): never snapshot it."""
    stock = "/usr/bin/qemu-system-x86_64"
    version = subprocess.run([stock, "--version"], capture_output=True, text=True).stdout
    if not version.startswith("QEMU emulator version 7.") or vm.TCG_MIGRATION_FIX_MARK in version:
        pytest.skip("%s is not an unfixed QEMU 7: %s" % (stock, version.splitlines()[:1]))
    controller = slice_controller
    prefix = lab.run_prefix()
    with lab.network(LanTopo(1, prefix=prefix), controller) as net:
        guests, guest_ids = slice_with_vms(net, prefix, 1, first_ident=2)
        guests[0].emulator = stock
        with vms.guests(guests):
            with slicelab.helped_slice(controller, net, str(tmp_path), rate=RATE, guests=guests, guest_ids=guest_ids):
                time.sleep(1.5)
                _, snap = controller.request("POST", "/violin/snapshots", {})
                view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=60)
                assert view["state"] == "aborted", view
                assert "loses guest writes in live migration" in view["reason"] and guests[0].name in view["reason"], view
                assert vms.domain_state(guests[0].name) == "running"
                assert no_cut_rules(net)
                assert "0% packet loss" in net.hosts[0].cmd("ping -c 3 -i 0.2 %s" % guests[0].address)


def read_chain(image: str, scratch: str) -> dict:
    """{k: (k, token, prev)} of the blocks guest/vdisk.c wrote into a disk image (read with its backing chain)."""
    raw = os.path.join(scratch, os.path.basename(image) + ".raw")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, raw], check=True, capture_output=True)
    with open(raw, "rb") as handle:
        data = handle.read()
    os.unlink(raw)
    blocks = {}
    for k in range(1, len(data) // 512):
        block = data[k * 512:(k + 1) * 512]
        if block[:4] == b"VDSK":
            blocks[k] = struct.unpack_from("<QQQ", block, 8)
    return blocks


def test_a_vm_disk_is_taken_at_the_cut_and_comes_back_with_the_memory(slice_controller, vm_ready, tmp_path):
    """guest/vdisk.c chains numbered blocks on its disk, each naming the previous one's token as the
    process holds it in memory: a disk taken later than the memory would change under the restored
    process, one taken earlier would leave a hole in the chain."""
    import libvirt
    controller = slice_controller
    prefix = lab.run_prefix()
    name = prefix + "dvm"
    disk = os.path.join(vms.RUN_DIR, name + "-data.qcow2")
    os.makedirs(vms.RUN_DIR, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "8M"], check=True)
    try:
        with lab.network(LanTopo(1, prefix=prefix), controller) as net:
            guest = vms.Guest(name, "10.0.0.120/8", "52:54:00:76:01:01", str(net.switches[0].name),
                              ["vdisk", "/dev/vda", "10"], disks=[disk], modules=["virtio_blk"])
            with vms.guests([guest]):
                with slicelab.helped_slice(controller, net, str(tmp_path), rate=RATE, guests=[guest],
                                           store="file"):  # the stored disk is read from the store's directory
                    time.sleep(1.5)
                    assert "vdisk: writing blocks" in vms.console_text(guest), vms.console_text(guest)[-1500:]
                    _, snap = controller.request("POST", "/violin/snapshots", {})
                    view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=90)
                    assert view["state"] == "complete", view
                    entry = next(m for m in view["members"] if m["name"] == name)
                    files = [f["name"] for f in entry["image"]["files"]]
                    assert files == ["vm.save", "disk-vda.qcow2"], files
                    time.sleep(1.0)  # the original writes on past the cut, into its new overlay
                    _, job = controller.request("POST", "/violin/snapshots/%s/restore" % snap["id"], {})
                    job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"], timeout=90)
                    assert job["state"] == "complete", job
                    time.sleep(1.5)  # the restored process writes on
                    conn = libvirt.open(vms.URI)
                    try:
                        dom = conn.lookupByName(name)
                        active = vm.disk_sources(dom.XMLDesc(0))["vda"]
                        dom.destroy()
                    finally:
                        conn.close()
                    stored_image = os.path.join(str(tmp_path), "images", snap["id"], name, "disk-vda.qcow2")
                    stored, final = read_chain(stored_image, str(tmp_path)), read_chain(active, str(tmp_path))
        assert stored and max(final) > max(stored) + 20, (len(stored), len(final))
        changed = sorted(k for k, block in stored.items() if final.get(k) != block)
        assert not changed, "blocks of the disk at the cut rewritten after the restore (disk later than memory): %s" % changed[:10]
        assert sorted(final) == list(range(1, max(final) + 1)), "hole in the chain (disk earlier than memory)"
        broken = [k for k in range(2, max(final) + 1) if final[k][0] != k or final[k][2] != final[k - 1][1]]
        assert not broken, broken[:10]
    finally:
        for leftover in os.listdir(vms.RUN_DIR):
            if leftover.startswith(name):
                os.unlink(os.path.join(vms.RUN_DIR, leftover))
