"""Part "restore" of bench_disruption (issue 11, goal 6): restoring N members beside one.

In one run: a slice of 1 VM and one of 3 VMs (the guest image, TCG, 128 MiB, vseq traffic), and a
slice of 1 CRIU member and one of 8 (seqstream in LanTopo(N)), each snapshotted once and restored
``--restore-rounds`` times through the controller and the helper. The goal is restore wall(N) <= 1.5 x
restore wall(1) of the same kind (the slowest single-member restore); the phases (staging, restoring,
reinjecting, resuming) say where the rest goes.
"""

import shutil
import tempfile
import time
from contextlib import ExitStack

from benchkit import BenchError, summary, timed_restore, timed_snapshot
from lab import lab, slicelab, vms
from topologies.lan import LanTopo


def add_arguments(parser):
    parser.add_argument("--restore-rounds", type=int, default=3, help="restore: restores per slice (default 3)")
    parser.add_argument("--restore-vms", default="1,3", help="restore: VM slice sizes (default 1,3; empty: none)")
    parser.add_argument("--restore-criu", default="1,8", help="restore: CRIU slice sizes (default 1,8; empty: none)")
    parser.add_argument("--restore-rate", type=float, default=100.0,
                        help="restore: datagrams/s each CRIU member sends (default 100)")


SNAPSHOT_ATTEMPTS = 3  # the part measures restores: a snapshot aborted on a loaded host is taken again


def snapshot_to_restore(controller, record, log):
    """The one snapshot the slice is restored from; one that aborts (e.g. a cut marker late behind thousands
    of held frames on a loaded host) is taken again, each abort kept in ``record["snapshot_aborts"]``."""
    record["snapshot_aborts"] = []
    for attempt in range(1, SNAPSHOT_ATTEMPTS + 1):
        try:
            view, _ = timed_snapshot(controller, "drs")
            return view
        except BenchError as error:
            record["snapshot_aborts"].append(str(error))
            log("  snapshot %d/%d: %s" % (attempt, SNAPSHOT_ATTEMPTS, error))
            if attempt == SNAPSHOT_ATTEMPTS:
                raise
            time.sleep(2.0)


def measure(kind, n, rounds, log, rate=100.0):
    controller = lab.ControllerProcess(config=slicelab.controller_config())
    workdir = tempfile.mkdtemp(prefix="bench-drs-")
    record = {"kind": kind, "members": n, "restores": []}
    try:
        with ExitStack() as stack:
            stack.callback(controller.stop)
            controller.start()
            prefix = lab.run_prefix()
            if kind == "vm":
                net = stack.enter_context(lab.network(LanTopo(1, prefix=prefix), controller))
                addresses = {i: "10.0.0.%d" % (100 + i) for i in range(1, n + 1)}
                guests = [vms.seqstream_guest("%srvm%d" % (prefix, i), i, addresses[i] + "/8",
                                              "52:54:00:76:04:%02x" % i, net.switches[0].name,
                                              {k: v for k, v in addresses.items() if k != i}, 100)
                          for i in range(1, n + 1)]
                stack.enter_context(vms.guests(guests))
                stack.enter_context(slicelab.helped_slice(controller, net, workdir, hosts=[], guests=guests))
            else:
                net = stack.enter_context(lab.network(LanTopo(max(n, 2), prefix=prefix), controller))
                stack.enter_context(slicelab.helped_slice(controller, net, workdir, rate=rate, hosts=net.hosts[:n]))
            time.sleep(2.0)
            view = snapshot_to_restore(controller, record, log)
            record["image_bytes"] = sum(m.get("bytes", 0) for m in view["members"])
            for i in range(rounds):
                job, wall_ms = timed_restore(controller, view["id"])
                record["restores"].append({"wall_ms": round(wall_ms, 1), "phases_ms": job.get("timings_ms")})
                log("  %s x%d: restore %d/%d in %.0f ms" % (kind, n, i + 1, rounds, wall_ms))
                time.sleep(1.0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    record["summary"] = {"restore_wall_ms": summary([r["wall_ms"] for r in record["restores"]])}
    phases = {}
    for entry in record["restores"]:
        for phase, ms in (entry["phases_ms"] or {}).items():
            if isinstance(ms, (int, float)):
                phases.setdefault(phase, []).append(ms)
    record["summary"]["phases_ms_p50"] = {k: summary(v).get("p50") for k, v in phases.items()}
    return record


def run(args, log):
    plan = [("vm", int(x)) for x in args.restore_vms.split(",") if x]
    plan += [("criu", int(x)) for x in args.restore_criu.split(",") if x]
    if any(kind == "vm" for kind, _n in plan):
        reason = vms.libvirt_available()
        if reason:
            raise RuntimeError(reason)
    lab.ensure_ovs()
    from disruption_vm import _each
    series = _each({"%s-%d" % (kind, n): (lambda kind=kind, n=n: measure(kind, n, args.restore_rounds, log, args.restore_rate))
                    for kind, n in plan}, log)
    ratios = {}
    for key, entry in series.items():
        if "error" in entry:
            continue
        single = series.get("%s-1" % entry["kind"])
        if single and "error" not in single and entry["members"] > 1:
            ratios[key] = round(entry["summary"]["restore_wall_ms"]["p50"] / single["summary"]["restore_wall_ms"]["p50"], 3)
    return {"parameters": {"rounds": args.restore_rounds, "rate": args.restore_rate, "plan": ["%s-%d" % p for p in plan]},
            "series": series, "ratio_p50_to_one": ratios}


def report(record):
    lines = []
    for key, entry in record["series"].items():
        if "error" in entry:
            lines.append("%s: failed: %s" % (key, entry["error"].splitlines()[0]))
            continue
        s = entry["summary"]
        lines.append("%s: restore wall p50 %s ms (%s x one), phases p50 %s" % (
            key, s["restore_wall_ms"].get("p50"), record["ratio_p50_to_one"].get(key, 1.0), s["phases_ms_p50"]))
    return lines
