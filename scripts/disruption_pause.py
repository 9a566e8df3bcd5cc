"""bench_disruption part "pause" (issue 11, goal 1): a CRIU member's pause with the cut beside bare CRIU.

For 1, 2 and 8 CRIU members of one violin-helper (seqstream, UDP and a TCP stream to every peer,
``--pause-rate`` datagrams/s, in LanTopo(N)), interleaved in one run: a snapshot of all of them through
the controller and the helper, then a bare ``criu dump --leave-running --tcp-established --file-locks``
of each member, one after another, with CRIU's own network lock (``nftables``) and no action script:
the bare mechanism. A pause is CRIU's own frozen time (stats-dump ``frozen_time``) either way. The
goal: p50 with the cut <= 1.10x bare, p95 <= 1.25x. Beside it, what the helper's steps took (from the
done report: prepare, the hook's hold, the cut call inside it, the workdir's part) and how many
members the helper froze at once (``FREEZE_SLOTS``).
"""

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack

from benchkit import BenchError, summary, summary_p95, timed_snapshot
from hostside.backends import criu
from lab import lab, slicelab
from topologies.lan import LanTopo
from violin_client.api import ApiError


def add_arguments(parser):
    parser.add_argument("--pause-sizes", default="1,2,8", help="pause: CRIU members per helper (default 1,2,8)")
    parser.add_argument("--pause-rounds", type=int, default=10, help="pause: snapshots per size (default 10)")
    parser.add_argument("--pause-rate", type=float, default=100.0, help="pause: seqstream datagrams/s per peer")



def bare_dump(name, host_pid, pid, images):
    """CRIU alone: a live dump with its own network lock and no action script; its frozen ms."""
    os.makedirs(images, exist_ok=True)
    result = subprocess.run(
        ["nsenter", "--net=/proc/%d/ns/net" % host_pid, "--mount=/proc/%d/ns/mnt" % host_pid, criu.CRIU, "dump",
         "-t", str(pid), "-D", images, "-o", "dump.log", "-v2", "--leave-running", "--tcp-established",
         "--file-locks", "--network-lock", criu.NETWORK_LOCK], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise BenchError("bare dump of %s failed:\n%s" % (name, criu._log_tail(os.path.join(images, "dump.log"))))
    return criu.read_dump_stats(images).get("frozen_time", 0) / 1000.0


def measure(n, rounds, rate, log):
    controller = lab.ControllerProcess(config=slicelab.controller_config())
    workdir = tempfile.mkdtemp(prefix="bench-pause-")
    record = {"members": n, "freeze_slots": criu.FREEZE_SLOTS, "with_cut": [], "bare": [], "steps": []}
    try:
        with ExitStack() as stack:
            stack.callback(controller.stop)
            controller.start()
            net = stack.enter_context(lab.network(LanTopo(n, prefix=lab.run_prefix()), controller))
            members = stack.enter_context(slicelab.helped_slice(controller, net, workdir, rate=rate))
            time.sleep(1.0)
            record["aborted"] = []
            for index in range(rounds):
                try:
                    view, _wall = timed_snapshot(controller, "pause-%d-%d" % (n, index))
                except (BenchError, ApiError) as error:  # counted, not hidden: a loaded host can miss a marker
                    record["aborted"].append(str(error))
                    log("  pause %d members: round %d aborted: %s" % (n, index + 1, error))
                    time.sleep(1.0)
                    continue
                for entry in view["members"]:
                    record["with_cut"].append(entry.get("pause_ms"))
                    image = entry.get("image", {})
                    record["steps"].append({k: image.get(k) for k in ("prepare_ms", "hook_ms", "cut_ms", "dump_ms")}
                                           | {"workdir_freeze_ms": (image.get("workdir") or {}).get("freeze_ms"),
                                              "flip_ms": entry.get("flip_ms")})
                time.sleep(0.2)
                for host in net.hosts:
                    images = os.path.join(workdir, "bare-%s-%d" % (host.name, index))
                    record["bare"].append(bare_dump(host.name, host.pid, members.pids[host.name], images))
                    shutil.rmtree(images, ignore_errors=True)
                    time.sleep(0.05)
                log("  pause %d members: round %d/%d" % (n, index + 1, rounds))
                time.sleep(0.2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cut, bare = summary_p95(record["with_cut"]), summary_p95(record["bare"])
    record["summary"] = {"with_cut_ms": cut, "bare_ms": bare,
                         "ratio_p50": round(cut["p50"] / bare["p50"], 2), "ratio_p95": round(cut["p95"] / bare["p95"], 2),
                         "steps_p50": {k: (summary([s[k] for s in record["steps"]]) or {}).get("p50")
                                       for k in ("prepare_ms", "hook_ms", "cut_ms", "workdir_freeze_ms", "flip_ms",
                                                 "dump_ms")}}
    return record


def run(args, log):
    try:
        sizes = [int(x) for x in args.pause_sizes.split(",")]
    except ValueError:
        raise BenchError("--pause-sizes takes numbers, e.g. 1,2,8") from None
    return {"series": {str(n): measure(n, args.pause_rounds, args.pause_rate, log) for n in sizes},
            "load_note": "one run, sizes one after another; bare dumps interleaved with the snapshots"}


def report(record):
    lines = []
    for n, entry in record["series"].items():
        s = entry["summary"]
        lines.append("%s members (freeze slots %s, %d snapshots aborted): pause with cut p50 %.1f / p95 %.1f ms vs bare criu dump %.1f / "
                     "%.1f ms: %.2fx / %.2fx (goal 1.10x / 1.25x); steps p50 %s" % (
                         n, entry["freeze_slots"], len(entry.get("aborted", [])), s["with_cut_ms"]["p50"], s["with_cut_ms"]["p95"],
                         s["bare_ms"]["p50"], s["bare_ms"]["p95"], s["ratio_p50"], s["ratio_p95"], s["steps_p50"]))
    return lines


def plot(record, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = list(record["series"])
    figure, axis = plt.subplots(figsize=(7.5, 4))
    where = range(1, len(sizes) + 1)
    cut = axis.boxplot([record["series"][n]["with_cut"] for n in sizes], positions=[x - 0.18 for x in where],
                       widths=0.3, patch_artist=True, boxprops={"facecolor": "#9ecae1"})
    bare = axis.boxplot([record["series"][n]["bare"] for n in sizes], positions=[x + 0.18 for x in where],
                        widths=0.3, patch_artist=True, boxprops={"facecolor": "#d9d9d9"})
    axis.legend([cut["boxes"][0], bare["boxes"][0]], ["snapshot with cut (helper)", "bare criu dump --leave-running"],
                fontsize=8, loc="upper left")
    axis.set_xticks(list(where), ["%s per helper" % n for n in sizes])
    axis.set_ylabel("member frozen, ms (CRIU stats-dump)")
    axis.set_title("CRIU pause with the cut vs bare (p50 ratio: %s)" % ", ".join(
        "%s: %.2fx" % (n, record["series"][n]["summary"]["ratio_p50"]) for n in sizes), fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
