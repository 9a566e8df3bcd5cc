"""Forwarding benchmark: violin_snapshot against Ryu's simple_switch_13.

Measures iperf3 TCP throughput (and ping RTT) between two Mininet hosts across
two switches (LineTopo(2): h1 - s1 - s2 - h2) on the same Open vSwitch, once
per round with each controller, rounds interleaved (violin, simple, violin,
...) because the machine is noisy. Every round has its own name prefix,
controller process and bridges; teardown stops only the processes this script
started (by pid) and deletes only the bridges it created (by name).

    .venv/bin/python scripts/bench_forwarding.py [--seconds N] [--rounds R] [--out PATH]

Must run as root. Exit codes: 0 success, 1 a run failed, 2 bad usage,
130 interrupted. Results go to docs/bench/bench_forwarding.json by default.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack

from benchkit import (ROOT, BenchError, bring_up, check_host, handle_signals, ignore_signals,  # sets sys.path
                      machine_info, run, run_guarded, save, timestamp)
from lab.lab import ControllerProcess, run_prefix
from lab.slicelab import stop_daemon
from topologies.tree import LineTopo

CONTROLLERS = (  # (label, ryu app, serves REST)
    ("violin", "violin_snapshot", True),
    ("simple_switch_13", "ryu.app.simple_switch_13", False),
)
GOAL = 0.95
DEFAULT_OUT = os.path.join(ROOT, "docs", "bench", "bench_forwarding.json")
IPERF_PORT = 5201  # inside h2's own network namespace, so no clash with anything else
PING_COUNT = 20
PING_INTERVAL = 0.05


# --- helpers -------------------------------------------------------------------


def ping_stats(host, ip, count, interval, deadline):
    out = host.cmd("ping -n -q -c %d -i %s -w %d %s" % (count, interval, deadline, ip))
    loss = re.search(r"([\d.]+)% packet loss", out)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    result = {"loss_pct": float(loss.group(1)) if loss else None}
    if rtt:
        result.update(min_ms=float(rtt.group(1)), avg_ms=float(rtt.group(2)),
                      max_ms=float(rtt.group(3)), mdev_ms=float(rtt.group(4)))
    else:
        result["avg_ms"] = None
        result["raw"] = out.strip()[-400:]
    return result


def warm_up(h1, h2, timeout=15.0):
    """Ping h1 -> h2 until it answers, so the controller has learned both MACs."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = ping_stats(h1, h2.IP(), 3, 0.2, 3)
        if last.get("loss_pct") is not None and last["loss_pct"] < 100:
            return last
    raise BenchError("warm-up ping %s -> %s got no answer in %.0f s: %r" % (h1.name, h2.name, timeout, last))


def wait_listening(host, port, server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BenchError("iperf3 server exited early (%s): %s"
                             % (server.returncode, server.stderr.read().decode(errors="replace")))
        if host.cmd("ss -Hltn 'sport = :%d'" % port).strip():
            return
        time.sleep(0.05)
    raise BenchError("iperf3 server in %s not listening on port %d after %.0f s" % (host.name, port, timeout))


def flow_counters(bridges):
    """{bridge: {"flows": n, "to_controller_packets": n, "packets": n}} from dump-flows."""
    result = {}
    for bridge in bridges:
        out = run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", bridge]) or ""
        flows = [line for line in out.splitlines() if "n_packets=" in line]
        to_ctl = total = 0
        for line in flows:
            packets = int(re.search(r"n_packets=(\d+)", line).group(1))
            total += packets
            if "CONTROLLER" in line:
                to_ctl += packets
        result[bridge] = {"flows": len(flows), "packets": total, "to_controller_packets": to_ctl}
    return result


def _delta(before, after):
    return {bridge: {key: after[bridge][key] - before.get(bridge, {}).get(key, 0)
                     for key in ("packets", "to_controller_packets")}
            for bridge in after}


def iperf(h1, h2, seconds):
    ip = h2.IP()
    server = client = None
    try:
        server = h2.popen(["iperf3", "-s", "-1", "-B", ip, "-p", str(IPERF_PORT)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(h2, IPERF_PORT, server)
        client = h1.popen(["iperf3", "-c", ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
                           "--connect-timeout", "5000"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = client.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            raise BenchError("iperf3 client did not finish within %d s" % (seconds + 30)) from None
        try:
            report = json.loads(out)
        except ValueError:
            raise BenchError("iperf3 client (exit %s) gave no JSON: %s"
                             % (client.returncode, (out + err).decode(errors="replace")[-400:])) from None
        if report.get("error"):
            raise BenchError("iperf3: %s" % report["error"])
        end = report["end"]
        sent, received = end["sum_sent"], end["sum_received"]
        return {
            "sender_mbps": sent["bits_per_second"] / 1e6,
            "receiver_mbps": received["bits_per_second"] / 1e6,
            "retransmits": sent.get("retransmits"),
            "bytes_received": received.get("bytes"),
            "duration_s": received.get("seconds"),
            "interval_receiver_mbps": [round(i["sum"]["bits_per_second"] / 1e6, 1)
                                       for i in report.get("intervals", [])],
            "cpu_utilization_percent": end.get("cpu_utilization_percent"),
            "max_snd_cwnd": [stream.get("sender", {}).get("max_snd_cwnd") for stream in end.get("streams", [])],
            "max_rtt_us": [stream.get("sender", {}).get("max_rtt") for stream in end.get("streams", [])],
        }
    finally:
        for proc in (client, server):
            if proc is not None:
                stop_daemon(proc)


# --- one round -----------------------------------------------------------------


def run_round(label, app, rest, seconds):
    prefix = run_prefix()
    topo = LineTopo(2, prefix=prefix)
    bridges = list(topo.switches())
    controller = ControllerProcess(app, rest=rest)
    record = {"controller": label, "app": app, "prefix": prefix, "bridges": bridges}
    with ExitStack() as stack:
        stack.callback(handle_signals)       # runs last: signals back on after cleanup
        stack.callback(controller.stop)
        started = time.monotonic()
        net = bring_up(stack, controller, topo, label)
        stack.callback(ignore_signals)       # runs first: no second Ctrl-C mid-cleanup
        record["setup_s"] = round(time.monotonic() - started, 2)
        h1, h2 = net.get(prefix + "h1"), net.get(prefix + "h2")
        record["warmup_ping"] = warm_up(h1, h2)
        record["ping"] = ping_stats(h1, h2.IP(), PING_COUNT, PING_INTERVAL, 10)
        before = flow_counters(bridges)
        record["iperf"] = iperf(h1, h2, seconds)
        after = flow_counters(bridges)
        record["flows_after"] = after
        record["flow_packets_during_iperf"] = _delta(before, after)
        record["controller_log_tail"] = None
        if controller.process.poll() is not None:
            record["controller_log_tail"] = controller.log_text()[-2000:]
            raise BenchError("%s controller died during the round:\n%s" % (label, record["controller_log_tail"]))
    return record


# --- summary -------------------------------------------------------------------


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(records):
    per = {}
    for label, _app, _rest in CONTROLLERS:
        mine = [r for r in records if r["controller"] == label and "iperf" in r]
        per[label] = {
            "rounds": len(mine),
            "median_throughput_mbps": _median([r["iperf"]["receiver_mbps"] for r in mine]),
            "median_sender_mbps": _median([r["iperf"]["sender_mbps"] for r in mine]),
            "median_rtt_ms": _median([r["ping"].get("avg_ms") for r in mine]),
            "median_retransmits": _median([r["iperf"]["retransmits"] for r in mine]),
            "throughput_mbps_per_round": [round(r["iperf"]["receiver_mbps"], 1) for r in mine],
            "retransmits_per_round": [r["iperf"]["retransmits"] for r in mine],
        }
    violin = per["violin"]["median_throughput_mbps"]
    simple = per["simple_switch_13"]["median_throughput_mbps"]
    ratio = violin / simple if violin is not None and simple else None
    return per, ratio


def print_summary(per, ratio, out_path):
    print()
    print("%-18s %12s %10s %14s  %s" % ("controller", "median Mbit/s", "RTT ms", "retransmits", "per round Mbit/s"))
    for label, stats in per.items():
        thr, rtt = stats["median_throughput_mbps"], stats["median_rtt_ms"]
        print("%-18s %12s %10s %14s  %s" % (
            label,
            "-" if thr is None else "%.1f" % thr,
            "-" if rtt is None else "%.3f" % rtt,
            "-" if stats["median_retransmits"] is None else "%g" % stats["median_retransmits"],
            stats["throughput_mbps_per_round"]))
    if ratio is not None:
        print("ratio violin/simple_switch_13 = %.3f (goal >= %.2f: %s)"
              % (ratio, GOAL, "met" if ratio >= GOAL else "NOT met"))
    print("results: %s" % out_path)


# --- main ----------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 duration per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per controller (default 3)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output (default docs/bench/bench_forwarding.json)")
    args = parser.parse_args(argv)
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    check_host(parser, ("iperf3", "ping", "ss", "ovs-vsctl", "ovs-ofctl", "mnexec"))
    return args


def main(argv=None):
    args = parse_args(argv)
    handle_signals()
    document = {
        "timestamp": timestamp(),
        "machine": machine_info(iperf3=True),
        "parameters": {
            "seconds": args.seconds, "rounds_per_controller": args.rounds,
            "topology": "LineTopo(2): h1 - s1 - s2 - h2", "order": "interleaved",
            "controllers": {label: app for label, app, _rest in CONTROLLERS}, "iperf3": "TCP, 1 stream, -J",
            "ping": "-c %d -i %s" % (PING_COUNT, PING_INTERVAL),
            "throughput_metric": "iperf3 end.sum_received.bits_per_second",
        },
        "rounds": [],
        "goal": ">= %.2f" % GOAL,
    }

    def rounds():
        for index in range(args.rounds):
            for label, app, rest in CONTROLLERS:
                print("round %d/%d %-16s ... " % (index + 1, args.rounds, label), end="", flush=True)
                record = run_round(label, app, rest, args.seconds)
                record["round"] = index + 1
                document["rounds"].append(record)
                print("%.1f Mbit/s, %s retransmits, RTT %s ms"
                      % (record["iperf"]["receiver_mbps"], record["iperf"]["retransmits"],
                         record["ping"].get("avg_ms")), flush=True)

    error, code = run_guarded(rounds)
    per, ratio = summarize(document["rounds"])
    document.update(
        per_controller=per,
        median_throughput_mbps={k: v["median_throughput_mbps"] for k, v in per.items()},
        median_rtt_ms={k: v["median_rtt_ms"] for k, v in per.items()},
        ratio_throughput=ratio,
        meets_goal=(ratio >= GOAL) if ratio is not None and error is None else None,
        error=error,
    )
    status = save("bench_forwarding", args.out, document, error, code)
    if status == 0:
        print_summary(per, ratio, args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
