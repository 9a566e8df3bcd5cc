"""Part "restore" of bench_disruption (issue 11, goal 6): restoring N members beside one.

In one run: a slice of 1 VM and one of 3 VMs (the guest image, TCG, 128 MiB, vseq traffic), and a
slice of 1 CRIU member and one of 8 (seqstream in LanTopo(N)), each snapshotted once and restored
``--restore-rounds`` times through the controller and the helper. The goal is restore wall(N) <= 1.5 x
restore wall(1) of the same kind (the slowest single-member restore); the phases (staging, restoring,
reinjecting, resuming) say where the rest goes.

Where the goal is out of reach it says why, with the CPU: for every restore the CPU time (user + system,
their waited-for children such as ``criu restore`` included, and the replaced members the helper reaps)
of the controller, the helper and the snapshot server, and the whole host's busy time; before the
snapshot, the share of the host left idle by the slice's own traffic. On 2 cores N restores that each
need C ms of CPU (one member's, measured alone) take at least N * C / 2: ``cpu_floor``.
"""

import os
import shutil
import tempfile
import time
from contextlib import ExitStack

from benchkit import BenchError, cpu_seconds, summary, timed_restore, timed_snapshot
from lab import lab, slicelab, vms
from topologies.lan import LanTopo


def add_arguments(parser):
    parser.add_argument("--restore-rounds", type=int, default=3, help="restore: restores per slice (default 3)")
    parser.add_argument("--restore-vms", default="1,3", help="restore: VM slice sizes (default 1,3; empty: none)")
    parser.add_argument("--restore-criu", default="1,8", help="restore: CRIU slice sizes (default 1,8; empty: none)")
    parser.add_argument("--restore-rate", type=float, default=100.0,
                        help="restore: datagrams/s each CRIU member sends (default 100)")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc/stat's unit


def host_jiffies():
    """(busy, total) jiffies of the whole host so far (/proc/stat's cpu line; iowait counts as idle)."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def process_cpu_ms(pid):
    """CPU ms of ``pid`` so far: its own and its waited-for children's (criu restore, ss, ip...)."""
    seconds = cpu_seconds(pid, children=True)
    return None if seconds is None else seconds * 1000.0


def slice_processes(controller, workdir):
    """The pids that do a restore's work: the controller, and the helper and snapshot server whose
    command lines name this run's own work directory."""
    found = {"controller": controller.process.pid}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if any(workdir.encode() in arg for arg in argv):
            if b"hostside.helper" in argv:
                found["helper"] = int(entry)
            elif b"hostside.store.server" in argv:
                found["server"] = int(entry)
    return found


class CpuMeter:
    """CPU spent by the restore's processes and by the whole host between ``start`` and ``stop``."""

    def __init__(self, pids):
        self.pids = pids

    def start(self):
        self.began = {name: process_cpu_ms(pid) for name, pid in self.pids.items()}
        self.host = host_jiffies()

    def stop(self):
        busy, total = host_jiffies()
        spent = {}
        for name, pid in self.pids.items():
            now = process_cpu_ms(pid)
            if now is not None and self.began.get(name) is not None:
                spent[name] = round(now - self.began[name], 1)
        return {"processes_ms": spent, "host_busy_ms": round((busy - self.host[0]) * 1000.0 / CLOCK_TICKS, 1)}


def idle_share(seconds=2.0):
    """The host's idle share over ``seconds`` (0..1)."""
    busy, total = host_jiffies()
    time.sleep(seconds)
    busy2, total2 = host_jiffies()
    return round(1.0 - (busy2 - busy) / max(total2 - total, 1), 3)


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
            record["host_idle_share_before"] = idle_share(2.0)  # what the slice's own traffic leaves
            view = snapshot_to_restore(controller, record, log)
            record["image_bytes"] = sum(m.get("bytes", 0) for m in view["members"])
            meter = CpuMeter(slice_processes(controller, workdir))
            for i in range(rounds):
                meter.start()
                job, wall_ms = timed_restore(controller, view["id"])
                cpu = meter.stop()
                members = list(job["members"].values())
                staged = [m.get("staged_from") for m in members]
                record["restores"].append({"wall_ms": round(wall_ms, 1), "phases_ms": job.get("timings_ms"), "cpu": cpu,
                                           "staged_from_kept": staged.count("kept"),
                                           "stage_ms_p50": summary([m.get("stage_ms") for m in members]).get("p50"),
                                           "member_restore_ms_p50": summary([m.get("restore_ms") for m in members]).get("p50")})
                log("  %s x%d: restore %d/%d in %.0f ms (CPU: %s, host busy %.0f ms; %d of %d staged from the kept image)"
                    % (kind, n, i + 1, rounds, wall_ms, cpu["processes_ms"], cpu["host_busy_ms"],
                       staged.count("kept"), len(staged)))
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
    restore_cpu = [sum(r["cpu"]["processes_ms"].values()) for r in record["restores"]]
    record["summary"]["restore_cpu_ms_p50"] = summary(restore_cpu).get("p50")
    record["summary"]["host_busy_ms_p50"] = summary([r["cpu"]["host_busy_ms"] for r in record["restores"]]).get("p50")
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
    ratios, floors, cores = {}, {}, os.cpu_count() or 1
    for key, entry in series.items():
        if "error" in entry:
            continue
        single = series.get("%s-1" % entry["kind"])
        if single and "error" not in single and entry["members"] > 1:
            one = single["summary"]["restore_wall_ms"]["p50"]
            ratios[key] = round(entry["summary"]["restore_wall_ms"]["p50"] / one, 3)
            # N restores' own CPU (N x one member's, measured alone: the N-member series' helper count also
            # holds the CPU of the replaced members it reaps) over every core, against one restore's wall:
            # the ratio no order of work can beat here (the slice's own traffic takes its share on top)
            cpu = single["summary"].get("restore_cpu_ms_p50")
            if cpu:
                spread = entry["members"] * cpu / cores
                floors[key] = {"one_restore_cpu_ms": cpu, "members": entry["members"], "cores": cores,
                               "cpu_over_cores_ms": round(spread, 1), "ratio_floor": round(max(one, spread) / one, 3),
                               "host_idle_share_before": entry.get("host_idle_share_before")}
    return {"parameters": {"rounds": args.restore_rounds, "rate": args.restore_rate, "plan": ["%s-%d" % p for p in plan]},
            "series": series, "ratio_p50_to_one": ratios, "cpu_floor": floors}


def report(record):
    lines = []
    for key, entry in record["series"].items():
        if "error" in entry:
            lines.append("%s: failed: %s" % (key, entry["error"].splitlines()[0]))
            continue
        s = entry["summary"]
        lines.append("%s: restore wall p50 %s ms (%s x one), phases p50 %s, restore CPU p50 %s ms, host idle before %s" % (
            key, s["restore_wall_ms"].get("p50"), record["ratio_p50_to_one"].get(key, 1.0), s["phases_ms_p50"],
            s.get("restore_cpu_ms_p50"), entry.get("host_idle_share_before")))
        floor = (record.get("cpu_floor") or {}).get(key)
        if floor:
            lines.append("%s: %d x one restore's CPU (%s ms) over %d cores is %s ms: ratio floor %sx" % (
                key, floor["members"], floor["one_restore_cpu_ms"], floor["cores"], floor["cpu_over_cores_ms"],
                floor["ratio_floor"]))
    return lines
