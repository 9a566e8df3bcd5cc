"""bench_disruption part "pause" (issue 11, goal 1): a CRIU member's pause with the cut beside bare CRIU.

For 1, 2 and 8 CRIU members of one violin-helper (seqstream, UDP and a TCP stream to every peer,
``--pause-rate`` datagrams/s, in LanTopo(N)), interleaved in one run: a snapshot of all of them through
the controller and the helper, and a bare ``criu dump --leave-running --tcp-established --file-locks``
of each member, one after another, with CRIU's own network lock (``nftables``) and no action script:
the bare mechanism. The snapshot comes first in even rounds, the bare dumps in odd ones, and the bare
dumps' images are kept as the helper keeps its own (the newest per member until every member of the
next round is through), so that neither arm alone writes its images into memory the other has just
freed: on this VM a 40 MB process dumped into memory just freed was frozen 30-60 ms, into memory not
handed out lately ~125 ms (likely its balloon's free page reporting). A pause is CRIU's own frozen
time (stats-dump ``frozen_time``) either way. The goal: p50 with the cut <= 1.10x bare, p95 <= 1.25x.
Each size runs twice, once per cut mode of the helper (``VIOLIN_CUT``): ``async`` (the default: only the marker's round trip through the switch while
frozen, a cut request frame once the member runs), ``async-call`` (the same with the cut call instead of
the frame) and ``sync`` (the cut call while frozen), each beside its own bare dumps. Beside it, what
the helper's steps took (from the done report: prepare, the hook's hold, the cut call inside it, the
workdir's part), the member's deaf time (``held_ms``: its prepare to the release of the frames held
for it; goal 3: <= its pause + 10 ms) and how many members the helper froze at once (``FREEZE_SLOTS``).
"""

import os
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack

from benchkit import BenchError, helper_cut_mode, summary, summary_p95, timed_snapshot
from hostside.backends import criu
from lab import lab, slicelab
from topologies.lan import LanTopo
from violin_client.api import ApiError


def add_arguments(parser):
    parser.add_argument("--pause-sizes", default="1,2,8", help="pause: CRIU members per helper (default 1,2,8)")
    parser.add_argument("--pause-rounds", type=int, default=10, help="pause: snapshots per size (default 10)")
    parser.add_argument("--pause-rate", type=float, default=100.0, help="pause: seqstream datagrams/s per peer")
    parser.add_argument("--pause-modes", default="async,async-call,sync",
                        help="pause: the helper's cut modes (VIOLIN_CUT; default async,async-call,sync)")



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


STEPS = ("prepare_ms", "hook_ms", "cut_ms", "workdir_freeze_ms", "flip_ms", "held_ms", "deaf_minus_pause_ms",
         "resumed_after_ms", "dump_ms", "predump_after_ms", "udp_drain_ms", "freezing_ms", "upload_wait_ms",
         "disk_settle_ms")
MODES = {"async": "in-band", "async-call": "async", "sync": "sync"}  # VIOLIN_CUT -> the done report's image.cut


def measure(n, rounds, rate, log, mode="async"):
    controller = lab.ControllerProcess(config=slicelab.controller_config())
    workdir = tempfile.mkdtemp(prefix="bench-pause-")
    record = {"members": n, "freeze_slots": criu.FREEZE_SLOTS, "prepare_when": criu.PREPARE_WHEN, "cut_mode": mode,
              "with_cut": [], "bare": [], "steps": [], "cut_frames": []}
    try:
        with ExitStack() as stack:
            stack.enter_context(helper_cut_mode(mode))  # the helper started below inherits it
            stack.callback(controller.stop)
            controller.start()
            net = stack.enter_context(lab.network(LanTopo(n, prefix=lab.run_prefix()), controller))
            members = stack.enter_context(slicelab.helped_slice(controller, net, workdir, rate=rate))
            time.sleep(1.0)
            record["aborted"] = []

            kept_bare = []  # the last round's bare dumps, kept until this round's are all taken

            def bare_dumps(index, first):
                taken = []
                for host in net.hosts:
                    images = os.path.join(workdir, "bare-%s-%d" % (host.name, index))
                    record["bare"].append(bare_dump(host.name, host.pid, members.pids[host.name], images))
                    record["bare_order"].append("first" if first else "second")
                    taken.append(images)
                    time.sleep(0.05)
                # Kept as the helper keeps its images: the newest per member (KEEP_IMAGES), the older
                # removed once every member is through its freeze. Removed at once (as until 12-04),
                # each dump wrote its pages into memory the one before had just freed, which on this VM
                # is 2-4x cheaper to fill than memory not handed out lately (see the docstring).
                for images in kept_bare:
                    shutil.rmtree(images, ignore_errors=True)
                kept_bare[:] = taken
            record["bare_order"], record["cut_order"] = [], []
            for index in range(rounds):
                # Which arm comes first alternates: the one right after the other's images were removed
                # (the helper's older kept image, or the last bare dumps) fills the memory they freed.
                bare_first = index % 2 == 1
                if bare_first:
                    bare_dumps(index, True)
                    time.sleep(0.2)
                try:
                    view, wall = timed_snapshot(controller, "pause-%d-%d" % (n, index))
                except (BenchError, ApiError) as error:  # counted, not hidden: a loaded host can miss a marker
                    record["aborted"].append(str(error))
                    log("  pause %d members: round %d aborted: %s" % (n, index + 1, error))
                    time.sleep(1.0)
                    continue
                record.setdefault("snapshot_wall_ms", []).append(round(wall, 1))  # start to complete
                # frames the cut brought to the controller (held, recorded): the switch colours the rest
                record["cut_frames"].append(sum(view["counts"].get(k, 0) for k in ("held", "recorded", "dropped")))
                for entry in view["members"]:
                    record["with_cut"].append(entry.get("pause_ms"))
                    record["cut_order"].append("second" if bare_first else "first")
                    image = entry.get("image", {})
                    if image.get("cut") != MODES[mode]:
                        raise BenchError("%s took a %s cut, not %s" % (entry["name"], image.get("cut"), MODES[mode]))
                    held, pause = entry.get("held_ms"), entry.get("pause_ms")
                    record["steps"].append({k: image.get(k) for k in ("prepare_ms", "hook_ms", "cut_ms", "dump_ms",
                                                                      "resumed_after_ms", "predump_after_ms",
                                                                      "udp_drain_ms", "freezing_ms", "upload_wait_ms",
                                                                      "disk_settle_ms")}
                                           | {"workdir_freeze_ms": (image.get("workdir") or {}).get("freeze_ms"),
                                              "flip_ms": entry.get("flip_ms"), "held_ms": held,
                                              "deaf_minus_pause_ms": None if held is None or pause is None
                                              else round(held - pause, 3)})
                if not bare_first:
                    time.sleep(0.2)
                    bare_dumps(index, False)
                if n > 1:  # the same dumps all at once, as the snapshot freezes them: what 2 cores allow
                    time.sleep(0.2)
                    together = []
                    threads = [threading.Thread(target=lambda h=host: together.append(bare_dump(
                        h.name, h.pid, members.pids[h.name], os.path.join(workdir, "together-%s-%d" % (h.name, index)))))
                        for host in net.hosts]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    record.setdefault("bare_together", []).extend(together)
                    for host in net.hosts:  # kept as the bare dumps are: the last round's go now
                        shutil.rmtree(os.path.join(workdir, "together-%s-%d" % (host.name, index - 1)), ignore_errors=True)
                log("  pause %d members: round %d/%d" % (n, index + 1, rounds))
                time.sleep(0.2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cut, bare = summary_p95(record["with_cut"]), summary_p95(record["bare"])
    record["summary"] = {"with_cut_ms": cut, "bare_ms": bare,
                         "ratio_p50": round(cut["p50"] / bare["p50"], 2), "ratio_p95": round(cut["p95"] / bare["p95"], 2),
                         "steps_p50": {k: (summary([s[k] for s in record["steps"]]) or {}).get("p50") for k in STEPS},
                         "cut_frames_per_snapshot_p50": (summary(record["cut_frames"]) or {}).get("p50"),
                         "snapshot_wall_ms_p50": (summary(record.get("snapshot_wall_ms", [])) or {}).get("p50")}
    by_order = {}
    for order in ("first", "second"):  # each arm's p50 when it came first in its round, and second
        cut_o = [v for v, o in zip(record["with_cut"], record["cut_order"]) if o == order]
        bare_o = [v for v, o in zip(record["bare"], record["bare_order"]) if o == order]
        by_order[order] = {"with_cut_p50": (summary(cut_o) or {}).get("p50"), "bare_p50": (summary(bare_o) or {}).get("p50")}
    record["summary"]["p50_by_order"] = by_order
    if record.get("bare_together"):
        together = summary_p95(record["bare_together"])
        record["summary"].update(bare_together_ms=together, ratio_p50_to_together=round(cut["p50"] / together["p50"], 2))
    return record


def run(args, log):
    try:
        sizes = [int(x) for x in args.pause_sizes.split(",")]
    except ValueError:
        raise BenchError("--pause-sizes takes numbers, e.g. 1,2,8") from None
    modes = [m for m in args.pause_modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        raise BenchError("--pause-modes takes some of %s" % ", ".join(MODES))
    result = {"load_note": "one run, sizes one after another, each size once per cut mode; bare dumps "
                           "interleaved with the snapshots of each"}
    for mode in modes:
        key = "series" if mode == modes[0] else "series_" + mode.replace("-", "_")
        result[key] = {str(n): measure(n, args.pause_rounds, args.pause_rate, log, mode) for n in sizes}
    return result


def _all_series(record):
    return [record[key] for key in ("series", "series_async_call", "series_sync", "series_async") if key in record]


def report(record):
    lines = []
    for n, entry in ((n, e) for series in _all_series(record) for n, e in series.items()):
        s = entry["summary"]
        lines.append("%s members, %s cut (freeze slots %s, %d snapshots aborted): pause with cut p50 %.1f / p95 %.1f ms vs bare criu dump %.1f / "
                     "%.1f ms: %.2fx / %.2fx (goal 1.10x / 1.25x); steps p50 %s" % (
                         n, entry.get("cut_mode", "sync"), entry["freeze_slots"], len(entry.get("aborted", [])),
                         s["with_cut_ms"]["p50"], s["with_cut_ms"]["p95"],
                         s["bare_ms"]["p50"], s["bare_ms"]["p95"], s["ratio_p50"], s["ratio_p95"], s["steps_p50"])
                     + ("; p50 cut / bare when first in the round %s / %s, second %s / %s ms" % tuple(
                         s["p50_by_order"][o][k] for o in ("first", "second") for k in ("with_cut_p50", "bare_p50"))
                        if "p50_by_order" in s else "")
                     + ("; bare dumps all at once p50 %.1f ms (cut / that %.2fx)" % (
                         s["bare_together_ms"]["p50"], s["ratio_p50_to_together"]) if "bare_together_ms" in s else ""))
    return lines


def plot(record, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = list(record["series"])
    boxes = [(record["series"], "with_cut", "cut %s (helper)" % record["series"][sizes[0]].get("cut_mode", "async"),
              "#9ecae1")]
    if "series_async_call" in record:
        boxes.append((record["series_async_call"], "with_cut", "cut async-call (cut call once it runs)", "#a1d99b"))
    if "series_sync" in record:
        boxes.append((record["series_sync"], "with_cut", "cut sync (helper, cut call while frozen)", "#fdae6b"))
    boxes.append((record["series"], "bare", "bare criu dump --leave-running", "#d9d9d9"))
    figure, axis = plt.subplots(figsize=(7.5, 4))
    where, width = range(1, len(sizes) + 1), 0.8 / len(boxes)
    handles = []
    for index, (series, key, label, colour) in enumerate(boxes):
        offset = (index - (len(boxes) - 1) / 2) * width
        drawn = axis.boxplot([series[n][key] for n in sizes if n in series], widths=width * 0.85, patch_artist=True,
                             positions=[x + offset for x, n in zip(where, sizes) if n in series],
                             boxprops={"facecolor": colour})
        handles.append((drawn["boxes"][0], label))
    axis.legend([h for h, _ in handles], [l for _, l in handles], fontsize=8, loc="upper left")
    axis.set_xticks(list(where), ["%s per helper" % n for n in sizes])
    axis.set_yscale("log")  # 1-2 members at ~50 ms beside 8 at ~500
    axis.set_ylabel("member frozen, ms (CRIU stats-dump, log scale)")
    axis.set_title("CRIU pause with the cut vs bare (p50 ratio: %s)" % ", ".join(
        "%s: %.2fx" % (n, record["series"][n]["summary"]["ratio_p50"]) for n in sizes), fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
