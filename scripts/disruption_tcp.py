"""bench_disruption part "tcp" (issue 11, goal 4): a TCP stream between two CRIU members after a live snapshot.

LanTopo(2): a paced TCP stream (workloads/tcpflow.py, ``--tcp-rate`` bytes/s) from one CRIU member to
the other, both members of one violin-helper; snapshots of both through the controller. From the
members' own 2 ms tick logs: each member's frozen interval (a gap in its ticks), the later member's
resume, the pre-snapshot throughput (the 0.5 s before the snapshot request), and how long after that
resume the received rate (20 ms windows, twice in a row) is back to 80 % of it; the goal is within the
later member's pause + 50 ms. Also the TCP retransmission timeouts (TcpExt TCPTimeouts) both kernels
counted per snapshot. Two helpers in the same run, both with CRIU's default ``--network-lock nftables``
(whose rules drop what reaches a member's dumped connections until CRIU unlocks them): the asynchronous
cut (``VIOLIN_CUT=async``, the default: a cut request frame, and with it the release of the frames held
for the member, once CRIU has let the tasks go) and the synchronous one (``VIOLIN_CUT=sync``: the cut call
while frozen, so the released frames met the lock).
"""

import shutil
import tempfile
import time
from contextlib import ExitStack

from benchkit import BenchError, summary_p95, timed_snapshot
from lab import flows, lab, slicelab
from topologies.lan import LanTopo
from workloads import tcpflow

VARIANTS = (("async", {"VIOLIN_CUT": "async"}), ("sync", {"VIOLIN_CUT": "sync"}))  # the default, and before



def add_arguments(parser):
    parser.add_argument("--tcp-snapshots", type=int, default=8, help="tcp: snapshots per variant (default 8)")
    parser.add_argument("--tcp-rate", type=float, default=2e6, help="tcp: the stream's bytes/s (default 2e6: about 1400 frames/s, within what the controller holds without loss)")


def analyse(flow, requested, settled):
    """One snapshot's figures from the logs between ``requested`` and ``settled`` (wall seconds)."""
    received, sent = flow.received(), tcpflow.read_log(flow.logs["send"])
    frozen = {}
    for name, rows in (("recv", received), ("send", sent)):
        found = [g for g in tcpflow.gaps(rows) if requested <= g[1] <= settled]
        if found:
            frozen[name] = max(found, key=lambda g: g[1] - g[0])
    if len(frozen) != 2:
        raise BenchError("could not see both members frozen in their tick logs (%s)" % sorted(frozen))
    later = max(frozen.values(), key=lambda g: g[1])
    baseline = tcpflow.rate_between(received, requested - 0.5, requested - 0.02)
    recovered = tcpflow.recovery(received, later[1], baseline)
    return {"baseline_bytes_s": round(baseline), "later_pause_ms": round((later[1] - later[0]) * 1000, 1),
            "frozen_ms": {k: round((g[1] - g[0]) * 1000, 1) for k, g in frozen.items()},
            "resume_gap_ms": round(abs(frozen["recv"][1] - frozen["send"][1]) * 1000, 1),
            "recovery_ms": None if recovered is None else round(recovered * 1000, 1)}


def run_variant(name, env, snapshots, rate, log):
    controller = lab.ControllerProcess(config=slicelab.controller_config())
    workdir = tempfile.mkdtemp(prefix="bench-tcp-")
    rows = []
    try:
        with ExitStack() as stack:
            stack.callback(controller.stop)
            controller.start()
            net = stack.enter_context(lab.network(LanTopo(2, prefix=lab.run_prefix()), controller))
            flow = stack.enter_context(flows.tcp_slice(controller, net, workdir, rate,
                                                       helper_env=env))
            time.sleep(1.0)
            for index in range(snapshots):
                timeouts = flow.timeouts()
                requested = time.time()
                view, wall_ms = timed_snapshot(controller, "tcp-%s-%d" % (name, index))
                time.sleep(1.0)
                row = analyse(flow, requested, time.time())
                row.update(timeouts=flow.timeouts() - timeouts, snapshot_wall_ms=round(wall_ms, 1),
                           counts={k: view["counts"].get(k) for k in ("held", "released", "dropped", "recorded")},
                           pause_ms=[m.get("pause_ms") for m in view["members"]],
                           cut=[(m.get("image") or {}).get("cut") for m in view["members"]])
                rows.append(row)
                log("  tcp %s: snapshot %d/%d recovery %s ms after the later resume (pause %s ms), "
                    "%d timeouts" % (name, index + 1, snapshots, row["recovery_ms"], row["later_pause_ms"],
                                     row["timeouts"]))
                time.sleep(0.5)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def run(args, log):
    record = {"topology": "LanTopo(2)", "rate_bytes_s": args.tcp_rate, "variants": {}}
    for name, env in VARIANTS:
        rows = run_variant(name, env, args.tcp_snapshots, args.tcp_rate, log)
        recoveries = [r["recovery_ms"] for r in rows if r["recovery_ms"] is not None]
        margins = [r["recovery_ms"] - r["later_pause_ms"] - 50 for r in rows if r["recovery_ms"] is not None]
        record["variants"][name] = {
            "network_lock": "nftables", "cut": name, "snapshots": rows, "recovery_ms": summary_p95(recoveries),
            "later_pause_ms": summary_p95([r["later_pause_ms"] for r in rows]),
            "not_recovered": sum(1 for r in rows if r["recovery_ms"] is None),
            "timeouts_per_snapshot": summary_p95([r["timeouts"] for r in rows]),
            "within_goal": sum(1 for m in margins if m <= 0), "count": len(rows)}
    return record


def report(record):
    lines = []
    for name, v in record["variants"].items():
        lines.append("%s cut (--network-lock %s): recovery after the later resume p50 %s ms p95 %s ms (later pause "
                     "p50 %s ms; goal pause + 50 ms met in %d of %d), retransmission timeouts per snapshot p50 %s" % (
                         name, v["network_lock"], v["recovery_ms"].get("p50"), v["recovery_ms"].get("p95"),
                         v["later_pause_ms"].get("p50"), v["within_goal"], v["count"],
                         v["timeouts_per_snapshot"].get("p50")))
    return lines
