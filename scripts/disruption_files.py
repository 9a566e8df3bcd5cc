"""bench_disruption part "files" (issue 11, goal 2): a database-like member's pause with its directory.

A member (workloads/appender.py) with a ``--files-mib`` (128) MiB data file it keeps appending 4 KiB
records to (``--files-rate`` per second), in a network namespace of its own. Interleaved in one run, on
the same member, each a live ``criu dump`` (CRIU's nftables lock, as CRIU alone):
  memory     CRIU's memory-only freeze (no action script, the directory not taken): the baseline
  hook       the same with the helper's post-dump hook doing nothing (the hand-over's own cost)
  tar        the directory archived while frozen (how the helper did it before)
  precopy    the iterative pre-copy (hostside/workdir.py), only the final delta copied while frozen
  clone      copy-on-write at the freeze: the member's directory on btrfs in a loop file, as a plain
             directory (its file reflinked) and as a subvolume with 64 more small files (one snapshot
             ioctl)
The precopy member lives on this machine's root filesystem, the clone members on the btrfs; each path
is compared with the memory-only freeze of its own member. Goal: <= 1.25x memory-only.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import ExitStack

from benchkit import ROOT, BenchError, summary_p95
from hostside import workdir
from hostside.backends import criu
from lab import lab, loopfs


def add_arguments(parser):
    parser.add_argument("--files-rounds", type=int, default=8, help="files: dumps per variant (default 8)")
    parser.add_argument("--files-mib", type=float, default=128.0, help="files: the data file's MiB (default 128)")
    parser.add_argument("--files-rate", type=float, default=500.0, help="files: 4 KiB records/s appended (default 500)")



class Member:
    def __init__(self, netns, directory, mib, rate):
        self.netns, self.directory = netns, directory
        os.makedirs(directory, exist_ok=True)
        self.process = subprocess.Popen(
            ["nsenter", "--net=" + netns, "setsid", sys.executable, "-m", "workloads.appender", "--dir", directory,
             "--prefill-mib", str(mib), "--record-bytes", "4096", "--rate", str(rate)],
            cwd=directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=ROOT))
        self.spec = criu.ProcessMember(os.path.basename(directory), netns, self.process.pid, None)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def bare(member, images):
    """CRIU alone, no action script: frozen ms."""
    result = subprocess.run(
        ["nsenter", "--net=" + member.netns, criu.CRIU, "dump", "-t", str(member.process.pid), "-D", images,
         "-o", "dump.log", "-v2", "--leave-running", "--tcp-established", "--file-locks", "--network-lock",
         criu.NETWORK_LOCK], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise BenchError("bare dump failed:\n%s" % criu._log_tail(os.path.join(images, "dump.log")))
    return criu.read_dump_stats(images).get("frozen_time", 0) / 1000.0, {}


def with_capture(member, images, mode):
    if mode == "hook":
        return criu.dump(member.spec, images, lambda: None).frozen_ms, {}
    if mode == "tar":
        def archive():
            with tarfile.open(os.path.join(images, workdir.ARCHIVE), "w") as tar:
                tar.add(member.directory, arcname=".")
        return criu.dump(member.spec, images, archive).frozen_ms, {}
    capture = workdir.capture_for(member.directory, lambda: workdir.tree_pids(member.process.pid),
                                  "precopy" if mode == "precopy" else "clone", images + ".stage")
    capture.prepare()
    report = criu.dump(member.spec, images, lambda: None, capture=capture)
    capture.finish(images)
    return report.frozen_ms, capture.details()


def run(args, log):
    record = {"data_mib": args.files_mib, "record_bytes": 4096, "rate": args.files_rate, "members": {}}
    reason = loopfs.available("btrfs")
    if reason:
        raise BenchError("the copy-on-write path needs a loop btrfs: " + reason)
    scratch = tempfile.mkdtemp(prefix="bench-files-")
    name = lab.run_prefix() + "fi"
    try:
        with ExitStack() as stack:
            subprocess.run(["ip", "netns", "add", name], check=True)
            stack.callback(subprocess.run, ["ip", "netns", "delete", name], capture_output=True)
            subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
            netns = "/run/netns/" + name
            mountpoint = stack.enter_context(loopfs.loop_filesystem(scratch, "btrfs", int(args.files_mib * 3 + 400)))
            subvolume = os.path.join(mountpoint, "subvolume")
            subprocess.run(["btrfs", "subvolume", "create", subvolume], check=True, capture_output=True)
            for index in range(64):  # small tables beside the log: many files, where a snapshot beats reflinks
                with open(os.path.join(subvolume, "table-%02d" % index), "w") as handle:
                    handle.write("row %d\n" % index)
            plans = {"ext4": (os.path.join(scratch, "ext4member"), ["memory", "hook", "tar", "precopy"]),
                     "btrfs-plain": (os.path.join(mountpoint, "plain"), ["memory", "clone"]),
                     "btrfs-subvolume": (subvolume, ["memory", "clone"])}
            members = {}
            for key, (directory, _variants) in plans.items():
                members[key] = Member(netns, directory, args.files_mib, args.files_rate)
                stack.callback(members[key].stop)
            time.sleep(1.0 + args.files_mib / 100.0)  # the prefill written
            samples = {key: {v: [] for v in plans[key][1]} for key in plans}
            details = {key: [] for key in plans}
            for index in range(args.files_rounds):
                for key, (_directory, variants) in plans.items():
                    for variant in variants:
                        images = os.path.join(scratch, "img-%s-%s-%d" % (key, variant, index))
                        os.makedirs(images)
                        frozen, detail = bare(members[key], images) if variant == "memory" else \
                            with_capture(members[key], images, variant)
                        samples[key][variant].append(frozen)
                        if detail:
                            details[key].append(detail)
                        shutil.rmtree(images, ignore_errors=True)
                        shutil.rmtree(images + ".stage", ignore_errors=True)
                        time.sleep(0.1)
                log("  files: round %d/%d" % (index + 1, args.files_rounds))
            for key in plans:
                base = summary_p95(samples[key]["memory"])
                entry = {"variants": {}, "details": details[key][-3:],
                         "workdir_freeze_ms": summary_p95([d.get("freeze_ms") for d in details[key]]),
                         "frozen_bytes": summary_p95([d.get("frozen_bytes") for d in details[key]])}
                for variant, values in samples[key].items():
                    s = summary_p95(values)
                    entry["variants"][variant] = dict(s, samples=values, ratio_p50=round(s["p50"] / base["p50"], 2),
                                                      ratio_p95=round(s["p95"] / base["p95"], 2))
                record["members"][key] = entry
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return record


def report(record):
    lines = []
    for key, entry in record["members"].items():
        parts = ["%s p50 %.1f ms (%.2fx)" % (v, s["p50"], s["ratio_p50"]) for v, s in entry["variants"].items()]
        lines.append("%s member, %.0f MiB appended: %s (goal <= 1.25x memory); the directory's own step while "
                     "frozen p50 %s ms" % (key, record["data_mib"], ", ".join(parts),
                                          entry.get("workdir_freeze_ms", {}).get("p50")))
    return lines


def plot(record, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, data = [], []
    for key, entry in record["members"].items():
        for variant, s in entry["variants"].items():
            labels.append("%s\n%s" % (key, variant))
            data.append(s["samples"])
    figure, axis = plt.subplots(figsize=(9, 4))
    axis.boxplot(data)
    axis.set_xticks(range(1, len(labels) + 1), labels)
    axis.set_yscale("log")
    axis.set_ylabel("member frozen, ms (log)")
    axis.set_title("A member with %.0f MiB it appends to: pause by how its directory is taken" % record["data_mib"],
                   fontsize=9)
    axis.tick_params(axis="x", labelsize=7)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
