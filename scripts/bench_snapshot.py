#!/usr/bin/env python3
"""Snapshot and restore of CRIU members, end to end, against a bare ``criu dump`` of the same members.

For 2 and 8 members (seqstream processes in Mininet hosts, light traffic) it
takes snapshots through the controller and violin-helper, and restores the
whole slice, recording: each member's pause (CRIU's own frozen time) with our
cut hook, the snapshot's wall time (request to complete), the restore's wall
time and phases. In the same run, on the same members, a bare
``criu dump --leave-running`` (no hook, no controller) gives the pause to
compare with. Writes docs/bench/bench_snapshot.json. Run as root.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack

from benchkit import (check_host, handle_signals, machine_info, run_guarded, save,  # sets sys.path
                      summary, timed_restore, timed_snapshot, timestamp)
from hostside.backends import criu
from lab import lab, slicelab
from topologies.lan import LanTopo

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "docs", "bench", "bench_snapshot.json")


def bare_dumps(members, hosts, rounds, workdir):
    """CRIU's frozen time of plain live dumps of the same members (no hook), ms."""
    pauses = []
    for _ in range(rounds):
        for host in hosts:
            images = tempfile.mkdtemp(prefix="bare-", dir=workdir)
            member = criu.ProcessMember(host.name, "/proc/%d/ns/net" % host.pid, members.pids[host.name],
                                        None, "/proc/%d/ns/mnt" % host.pid)
            report = criu.dump(member, images, lambda: None)
            pauses.append(report.frozen_ms)
            shutil.rmtree(images, ignore_errors=True)
            time.sleep(0.05)
    return pauses


def measure(n, snapshots, restores, log):
    controller = lab.ControllerProcess(config=slicelab.controller_config())
    workdir = tempfile.mkdtemp(prefix="bench-snapshot-")
    record = {"members": n, "snapshots": [], "restores": []}
    try:
        with ExitStack() as stack:
            stack.callback(controller.stop)
            controller.start()
            net = stack.enter_context(lab.network(LanTopo(n, prefix=lab.run_prefix()), controller))
            members = stack.enter_context(slicelab.helped_slice(controller, net, workdir, rate=100))
            time.sleep(0.8)
            record["bare_pause_ms"] = bare_dumps(members, net.hosts, max(1, snapshots // 2), workdir)
            last = None
            for i in range(snapshots):
                view, wall_ms = timed_snapshot(controller, "bench-%d" % i)
                record["snapshots"].append({
                    "id": view["id"], "wall_ms": round(wall_ms, 1),
                    "pause_ms": [m.get("pause_ms") for m in view["members"]],
                    "hook_ms": [m["image"].get("hook_ms") for m in view["members"]],
                    "image_bytes": sum(m.get("bytes", 0) for m in view["members"]),
                    "channel_frames": (view.get("channel") or {}).get("frames", 0)})
                last = view["id"]
                log("  %d members: snapshot %d/%d complete in %.0f ms" % (n, i + 1, snapshots, wall_ms))
                time.sleep(0.3)
            for i in range(restores):
                job, restore_ms = timed_restore(controller, last)
                record["restores"].append({"wall_ms": round(restore_ms, 1),
                                           "phases_ms": job["timings_ms"], "reinjected": job["reinjected_frames"]})
                log("  %d members: restore %d/%d complete in %.0f ms" % (n, i + 1, restores,
                                                                       record["restores"][-1]["wall_ms"]))
                time.sleep(0.5)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    hooked = [p for s in record["snapshots"] for p in s["pause_ms"] if p is not None]
    record["summary"] = {
        "pause_ms_with_hook": summary(hooked), "pause_ms_bare_dump": summary(record["bare_pause_ms"]),
        "hook_hold_ms": summary([h for s in record["snapshots"] for h in s["hook_ms"] if h is not None]),
        "snapshot_wall_ms": summary([s["wall_ms"] for s in record["snapshots"]]),
        "restore_wall_ms": summary([r["wall_ms"] for r in record["restores"]])}
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output (default docs/bench/bench_snapshot.json)")
    parser.add_argument("--snapshots", type=int, default=6, help="snapshots per slice size (default 6)")
    parser.add_argument("--restores", type=int, default=3, help="restores per slice size (default 3)")
    parser.add_argument("--sizes", default="2,8", help="slice sizes (default 2,8)")
    args = parser.parse_args(argv)
    check_host(parser, ["ovs-vsctl", "mnexec", criu.CRIU])
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes takes numbers, e.g. 2,8")
    document = {"timestamp": timestamp(), "machine": machine_info(cpu_model=True),
                "parameters": {"snapshots": args.snapshots, "restores": args.restores, "sizes": sizes,
                               "members": "seqstream (UDP and a TCP stream, 100/s per peer) in LanTopo(N)",
                               "pause": "CRIU stats-dump frozen_time"}, "slices": []}

    def body():
        handle_signals()
        lab.ensure_ovs()
        for n in sizes:
            print("slice of %d members" % n, flush=True)
            document["slices"].append(measure(n, args.snapshots, args.restores, print))
    error, code = run_guarded(body)
    document["error"] = error
    for entry in document["slices"]:
        s = entry["summary"]
        print("%d members: pause p50/p95 %s/%s ms with hook vs %s/%s ms bare; snapshot %s ms, restore %s ms (p50)" % (
            entry["members"], s["pause_ms_with_hook"].get("p50"), _p95(entry, "hooked"),
            s["pause_ms_bare_dump"].get("p50"), _p95(entry, "bare"), s["snapshot_wall_ms"].get("p50"),
            s["restore_wall_ms"].get("p50")))
    return save("bench_snapshot", args.out, document, error, code)


def _p95(entry, which):
    from benchkit import pct
    values = ([p for s in entry["snapshots"] for p in s["pause_ms"] if p is not None] if which == "hooked"
              else entry["bare_pause_ms"])
    value = pct(values, 95)
    return None if value is None else round(value, 1)


if __name__ == "__main__":
    sys.exit(main())
