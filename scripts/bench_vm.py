#!/usr/bin/env python3
"""VM members: pause with our cut hook vs the same migration without it; snapshot and restore times.

For slices of 1 and 3 VMs (the project's guest image, TCG, 128 MiB, running the
oracle's endpoint towards each other) it takes snapshots through the controller
and violin-helper (fake live migration to the snapshot server, cut at
pre-switchover) and restores the whole slice. Interleaved with them, on the
same VMs and the same snapshot server, a bare migration (same QMP sequence and
stream, but no prepare, no drain proof, no cut) gives the pause to compare
with. Also times the guest image build (cold, into a scratch directory, and
warm). Writes docs/bench/bench_vm.json. Run as root.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

from benchkit import (ROOT, check_host, handle_signals, machine_info, run_guarded, save,  # sets sys.path
                      summary, timed_restore, timed_snapshot, timestamp)
from hostside.backends import libvirt as vm
from hostside.store.client import ImageServer
from lab import lab, slicelab, vms
from topologies.lan import LanTopo

DEFAULT_OUT = os.path.join(ROOT, "docs", "bench", "bench_vm.json")


def qemu_version() -> str:
    """The guests' QEMU, as it names itself (scripts/install_qemu.sh's build unless VIOLIN_QEMU)."""
    result = subprocess.run([vms.EMULATOR, "--version"], capture_output=True, text=True)
    return "%s: %s" % (vms.EMULATOR, result.stdout.splitlines()[0] if result.stdout else result.stderr.strip())


def build_times():
    scratch = tempfile.mkdtemp(prefix="bench-guest-", dir="/var/lib/libvirt/images")
    try:
        times = {}
        for kind in ("cold", "warm"):
            began = time.monotonic()
            subprocess.run(["bash", os.path.join(ROOT, "scripts", "build_guest.sh")], check=True,
                           env=dict(os.environ, VIOLIN_GUEST_DIR=scratch), capture_output=True)
            times[kind + "_s"] = round(time.monotonic() - began, 2)
        return times
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure(n, rounds, restores, log):
    controller = lab.ControllerProcess(config=slicelab.controller_config())
    workdir = tempfile.mkdtemp(prefix="bench-vm-")
    record = {"vms": n, "snapshots": [], "bare": [], "restores": []}
    try:
        with ExitStack() as stack:
            stack.callback(controller.stop)
            controller.start()
            prefix = lab.run_prefix()
            net = stack.enter_context(lab.network(LanTopo(1, prefix=prefix), controller))
            addresses = {i: "10.0.0.%d" % (100 + i) for i in range(1, n + 1)}
            guests = [vms.seqstream_guest("%sbvm%d" % (prefix, i), i, addresses[i] + "/8", "52:54:00:76:02:%02x" % i,
                                          net.switches[0].name, {k: v for k, v in addresses.items() if k != i}, 100)
                      for i in range(1, n + 1)]
            stack.enter_context(vms.guests(guests))
            members = stack.enter_context(slicelab.helped_slice(controller, net, workdir, hosts=[], guests=guests))
            time.sleep(2.0)
            libvirt = vm.Libvirt()
            storage = ImageServer(members.server_url, slicelab.SERVER_TOKEN)
            last = None
            for i in range(rounds):
                view, wall_ms = timed_snapshot(controller, "bench-%d" % i)
                record["snapshots"].append({
                    "id": view["id"], "wall_ms": round(wall_ms, 1),
                    "pause_ms": [m.get("pause_ms") for m in view["members"]],
                    "qemu_pause_ms": [m["image"].get("qemu_pause_ms") for m in view["members"]],
                    "libvirt_pause_ms": [m["image"].get("libvirt_pause_ms") for m in view["members"]],
                    "hook_ms": [m["image"].get("hook_ms") for m in view["members"]],
                    "image_bytes": sum(m.get("bytes", 0) for m in view["members"])})
                last = view["id"]
                time.sleep(0.3)
                for guest in guests:  # the same migration, one VM at a time as above, without the cut
                    report = libvirt.migrate_out(
                        guest.name, lambda reader, g=guest: storage.upload_stream("bare-%d" % i, g.name, "vm.save",
                                                                                  reader), lambda: 0.0)
                    record["bare"].append({"pause_ms": round(report.qemu_pause_ms if report.qemu_pause_ms is not None
                                                             else report.pause_ms, 3), "helper_pause_ms": round(report.pause_ms, 3),
                                           "qemu_pause_ms": report.qemu_pause_ms, "total_ms": round(report.total_ms, 1)})
                log("  %d VMs: round %d/%d, snapshot %.0f ms" % (n, i + 1, rounds, wall_ms))
                time.sleep(0.3)
            for i in range(restores):
                job, restore_ms = timed_restore(controller, last)
                record["restores"].append({"wall_ms": round(restore_ms, 1),
                                           "phases_ms": job["timings_ms"]})
                log("  %d VMs: restore %d/%d in %.0f ms" % (n, i + 1, restores, record["restores"][-1]["wall_ms"]))
                time.sleep(1.0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    hooked = [p for s in record["snapshots"] for p in s["pause_ms"] if p is not None]
    record["summary"] = {
        "pause_ms_with_hook": summary(hooked), "pause_ms_without_hook": summary([b["pause_ms"] for b in record["bare"]]),
        "qemu_pause_ms_with_hook": summary([p for s in record["snapshots"] for p in s["qemu_pause_ms"]]),
        "qemu_pause_ms_without_hook": summary([b["qemu_pause_ms"] for b in record["bare"]]),
        "libvirt_pause_ms_with_hook": summary([p for s in record["snapshots"] for p in s["libvirt_pause_ms"]]),
        "hook_ms": summary([h for s in record["snapshots"] for h in s["hook_ms"]]),
        "snapshot_wall_ms": summary([s["wall_ms"] for s in record["snapshots"]]),
        "restore_wall_ms": summary([r["wall_ms"] for r in record["restores"]])}
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output (default docs/bench/bench_vm.json)")
    parser.add_argument("--rounds", type=int, default=5, help="snapshots (and bare migrations) per size (default 5)")
    parser.add_argument("--restores", type=int, default=3, help="restores per size (default 3)")
    parser.add_argument("--sizes", default="1,3", help="VMs per slice (default 1,3)")
    args = parser.parse_args(argv)
    check_host(parser, ["ovs-vsctl", "mnexec", "virsh"])
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes takes numbers, e.g. 1,3")
    reason = vms.libvirt_available()
    if reason:
        print("bench_vm: %s" % reason, file=sys.stderr)
        return 2
    document = {"timestamp": timestamp(), "machine": machine_info(cpu_model=True),
                "parameters": {"rounds": args.rounds, "restores": args.restores, "sizes": sizes,
                               "guest": "scripts/build_guest.sh image, TCG, 128 MiB, vseq UDP+TCP 100/s per peer",
                               "qemu": qemu_version(),
                               "pause": "QEMU's STOP -> RESUME event stamps (the guest's pause); bare migrations "
                                        "run one VM at a time, snapshots migrate all VMs at once"},
                "slices": []}

    def body():
        handle_signals()
        lab.ensure_ovs()
        document["guest_build"] = build_times()
        print("guest image build: %(cold_s)s s cold, %(warm_s)s s warm" % document["guest_build"], flush=True)
        for n in sizes:
            print("slice of %d VMs" % n, flush=True)
            document["slices"].append(measure(n, args.rounds, args.restores, print))
    error, code = run_guarded(body)
    document["error"] = error
    for entry in document["slices"]:
        s = entry["summary"]
        print("%d VMs: pause p50 %s ms with the cut hook vs %s ms without (QEMU: %s vs %s); snapshot %s ms, "
              "restore %s ms (p50)" % (entry["vms"], s["pause_ms_with_hook"].get("p50"),
                                       s["pause_ms_without_hook"].get("p50"), s["qemu_pause_ms_with_hook"].get("p50"),
                                       s["qemu_pause_ms_without_hook"].get("p50"), s["snapshot_wall_ms"].get("p50"),
                                       s["restore_wall_ms"].get("p50")))
    return save("bench_vm", args.out, document, error, code)


if __name__ == "__main__":
    sys.exit(main())
