"""Disruption benchmark: what a snapshot costs the members, beside the bare mechanism, in one run.

Part "flips" (issue 11, goal 5: cuts that arrive together are flipped together). The controller
alone: N manual members (``marker: false``, no dump, no helper) on LineTopo(4, 16), four switches in
a line with sixteen hosts each. Each round starts a snapshot of N members and sends their N cut
calls at once (N threads released by one barrier), as N helpers do when their members pause at the
same moment; then reports every member done and waits until the snapshot is sealed. The figure is
each cut call's wall time (POST .../cut until its answer: the time a member stays paused for the
cut), and the controller's ``flip_ms`` and ``batch`` (how many cuts went into one flow-table pass and
one barrier). N = 1 is the baseline of the same run; the goal is p50(N) <= 2 x p50(1) for N up to 64.
Beside each, N concurrent ``GET /violin/health`` sent the same way: the floor that the REST path
alone (N connections into the controller's one event loop) puts under N cut calls.

Parts "pause" (goal 1: CRIU members' pause with the cut beside bare ``criu dump``), "files" (goal 2: a
database-like member's pause by how its directory is taken) and "tcp" (goal 4: a TCP stream's recovery
after a snapshot) are scripts/disruption_{pause,files,tcp}.py; ``--parts`` picks some.

    .venv/bin/python scripts/bench_disruption.py [--out docs/bench/bench_disruption.json]
                                                 [--rounds 12] [--sizes 1,8,32,64] [--plot PNG]

Must run as root. Exit codes: 0 success, 1 a run failed, 2 bad usage, 130 interrupted. The run has
its own name prefix, controller process and bridges; teardown stops only what it started.
"""

import argparse
import json
import os
import sys
import threading
import time
from contextlib import ExitStack

from benchkit import (ROOT, BenchError, bring_up, finish_manual_snapshot, check_host, handle_signals, machine_info,  # sets sys.path
                      run_guarded, save, summary, timestamp)
from lab.lab import ControllerProcess, run_prefix
from topologies.tree import LineTopo

DEFAULT_OUT = os.path.join(ROOT, "docs", "bench", "bench_disruption.json")
DEFAULT_PLOT = os.path.join(ROOT, "docs", "bench", "bench_disruption_flips.png")
SWITCHES, PER_SWITCH = 4, 16


def locate_all(net, controller, hosts, timeout=30.0):
    """Every host sends one frame (an ARP for a neighbour) so the controller learns where it is."""
    for index, host in enumerate(hosts):
        host.cmd("ping -n -c 1 -W 0.2 %s >/dev/null 2>&1 &" % hosts[(index + 1) % len(hosts)].IP())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, health = controller.get("/violin/health")
        if status == 200 and health["hosts"] >= len(hosts):
            return
        time.sleep(0.2)
    raise BenchError("the controller learned %s of %d hosts in %.0f s" % (health.get("hosts"), len(hosts), timeout))


def register(controller, hosts):
    for host in hosts:
        status, answer = controller.request("POST", "/violin/members", {
            "name": host.name, "macs": [host.MAC()], "marker": False, "backend": "manual"})
        if status != 201:
            raise BenchError("registering %s failed: %s %s" % (host.name, status, answer))


def cut_round(controller, names, label):
    """One snapshot of ``names``, all cut at once; [(rtt_ms, flip_ms, batch)] of its cuts."""
    status, snap = controller.request("POST", "/violin/snapshots", {"members": names, "label": label})
    if status != 202:
        raise BenchError("snapshot refused: %s %s" % (status, snap))
    sid, gate, results = snap["id"], threading.Barrier(len(names)), {}

    def cut(name):
        gate.wait()
        began = time.perf_counter()
        status, answer = controller.request("POST", "/violin/snapshots/%s/members/%s/cut" % (sid, name), {})
        results[name] = (status, answer, (time.perf_counter() - began) * 1000.0)
    threads = [threading.Thread(target=cut, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    bad = {n: r[:2] for n, r in results.items() if r[0] != 200}
    if bad or len(results) != len(names):
        raise BenchError("cuts of %s failed: %r" % (sid, bad or "some did not answer"))
    finish_manual_snapshot(controller, sid, names, "bench_disruption")
    return [(r[2], r[1]["flip_ms"], r[1].get("batch", 1)) for r in results.values()]


def concurrent_gets(controller, count):
    """The HTTP floor: ``count`` GET /violin/health at once, as the cuts are sent; their wall ms."""
    gate, times = threading.Barrier(count), []

    def get():
        gate.wait()
        began = time.perf_counter()
        controller.request("GET", "/violin/health")
        times.append((time.perf_counter() - began) * 1000.0)
    threads = [threading.Thread(target=get) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return times


def run_flips(sizes, rounds, log):
    prefix = run_prefix()
    topo = LineTopo(SWITCHES, PER_SWITCH, prefix=prefix)
    record = {"topology": "LineTopo(%d,%d)" % (SWITCHES, PER_SWITCH), "prefix": prefix, "series": {}}
    with ExitStack() as stack:
        controller = ControllerProcess()
        stack.callback(controller.stop)
        net = bring_up(stack, controller, topo, record["topology"])
        hosts = sorted(net.hosts, key=lambda h: h.name)
        locate_all(net, controller, hosts)
        register(controller, hosts)
        names = [h.name for h in hosts]
        samples, floor = {n: [] for n in sizes}, {n: [] for n in sizes}
        for index in range(rounds):  # sizes interleaved, so drift hits every size alike
            for size in sizes:
                samples[size] += cut_round(controller, names[:size], "flips-%d-%d" % (size, index))
                floor[size] += concurrent_gets(controller, size)
            log("round %d/%d done" % (index + 1, rounds))
        for size in sizes:
            rtt, flip, batch = zip(*samples[size])
            record["series"][str(size)] = {"cut_rtt_ms": summary(list(rtt)), "flip_ms": summary(list(flip)),
                                           "batches_p50": summary(list(batch))["p50"], "rtt_samples": list(rtt),
                                           "health_get_rtt_ms": summary(floor[size]), "health_samples": floor[size]}
    base = record["series"][str(sizes[0])]["cut_rtt_ms"]["p50"]
    record["ratio_p50_to_one"] = {str(n): round(record["series"][str(n)]["cut_rtt_ms"]["p50"] / base, 2)
                                  for n in sizes}
    record["health_get_ratio_p50_to_one"] = {
        str(n): round(record["series"][str(n)]["health_get_rtt_ms"]["p50"]
                      / record["series"][str(sizes[0])]["health_get_rtt_ms"]["p50"], 2) for n in sizes}
    return record


def plot(record, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = list(record["series"])
    figure, axis = plt.subplots(figsize=(7.5, 4))
    where = range(1, len(sizes) + 1)
    cuts = axis.boxplot([record["series"][n]["rtt_samples"] for n in sizes], positions=[x - 0.18 for x in where],
                        widths=0.3, patch_artist=True, boxprops={"facecolor": "#9ecae1"})
    floor = axis.boxplot([record["series"][n]["health_samples"] for n in sizes], positions=[x + 0.18 for x in where],
                         widths=0.3, patch_artist=True, boxprops={"facecolor": "#d9d9d9"})
    axis.legend([cuts["boxes"][0], floor["boxes"][0]], ["POST .../cut (N at once)", "GET /violin/health (N at once)"],
                fontsize=8, loc="upper left")
    axis.set_xticks(list(where), ["%s at once" % n for n in sizes])
    axis.set_ylabel("call wall time, ms")
    axis.set_title("Cuts flipped together, %s (p50 ratio to one: %s)" % (
        record["topology"], ", ".join("%s: %.2fx" % kv for kv in record["ratio_p50_to_one"].items())), fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# Parts of the benchmark besides "flips": each a module scripts/disruption_<part>.py with
# ``add_arguments(parser)``, ``run(args, log) -> dict`` (its JSON record), ``report(record) -> [lines]``
# and optionally ``plot(record, path)``. Named here so --parts can list them before importing any.
PARTS = ["flips", "pause", "files", "tcp", "vm", "restore"]


def part_module(name):
    import importlib
    return importlib.import_module("disruption_" + name)


def report_flips(record):
    return ["%3s at once: cut call p50 %.1f ms p90 %.1f ms (%.2fx one), flip p50 %.1f ms, batch p50 %s; "
            "as many GET /violin/health at once p50 %.1f ms (%.2fx one)" % (
                size, series["cut_rtt_ms"]["p50"], series["cut_rtt_ms"]["p90"],
                record["ratio_p50_to_one"][size], series["flip_ms"]["p50"], series["batches_p50"],
                series["health_get_rtt_ms"]["p50"], record["health_get_ratio_p50_to_one"][size])
            for size, series in record["series"].items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output (default docs/bench/bench_disruption.json)")
    parser.add_argument("--plot", default=DEFAULT_PLOT, help="PNG of the flips part's distributions")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts to run (default all: %s)" % ",".join(PARTS))
    parser.add_argument("--rounds", type=int, default=12, help="flips: snapshots per member count (default 12)")
    parser.add_argument("--sizes", default="1,8,32,64", help="flips: members cut at once (default 1,8,32,64)")
    for name in PARTS[1:]:
        part_module(name).add_arguments(parser)
    args = parser.parse_args(argv)
    check_host(parser, ["ovs-vsctl", "mnexec"])
    chosen = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown or not chosen:
        parser.error("--parts takes some of %s, got %r" % (",".join(PARTS), args.parts))
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes takes numbers, e.g. 1,8,32,64")
    if not sizes or min(sizes) < 1 or max(sizes) > SWITCHES * PER_SWITCH or args.rounds < 1:
        parser.error("sizes from 1 to %d and at least one round" % (SWITCHES * PER_SWITCH))
    handle_signals()
    document = {"timestamp": timestamp(), "machine": machine_info(cpu_model=True),
                "parameters": {"rounds": args.rounds, "sizes": sizes, "parts": chosen}}
    if os.path.exists(args.out):  # parts not run this time keep their last record (each has its own timestamp)
        try:
            with open(args.out) as handle:
                document.update({k: v for k, v in json.load(handle).items() if k in PARTS and k not in chosen})
        except (OSError, ValueError):
            pass
    log = lambda text: print("[bench_disruption] %s" % text, flush=True)  # noqa: E731

    def parts():
        for name in chosen:
            log("part %s" % name)
            record = run_flips(sizes, args.rounds, log) if name == "flips" else part_module(name).run(args, log)
            document[name] = dict(record, timestamp=timestamp())

    error, code = run_guarded(parts)
    status = save("bench_disruption", args.out, document, error, code)
    if status == 0:
        for name in chosen:
            if name == "flips":
                plot(document["flips"], args.plot)
                lines = report_flips(document["flips"])
            else:
                module = part_module(name)
                if hasattr(module, "plot"):
                    module.plot(document[name], os.path.join(os.path.dirname(args.plot),
                                                             "bench_disruption_%s.png" % name))
                lines = module.report(document[name])
            print("\n".join("%s: %s" % (name, line) for line in lines))
        print("wrote %s" % args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
