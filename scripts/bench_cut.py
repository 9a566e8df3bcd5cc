"""Cut benchmark: the controller's flip latency and the capacity of the hold/record path.

Part 1, cut overhead. Eight seqstream members (light background traffic: every
member sends ``--bg-rate`` datagrams/s to every other) on two topologies,
LanTopo(8) (one switch) and LineTopo(4, 2) (four switches in a line, two hosts
each). Four series per topology, one snapshot at a time, each snapshot run to
``complete`` (every member done, then GET until the controller sealed it):

  one_at_a_time             ``marker: false``; each member in turn is paused
                            (SIGSTOP), cut (POST .../cut), resumed, reported done.
  all_at_once               ``marker: false``; all eight paused, then eight
                            concurrent POST .../cut from threads, resumed, done.
  markers_no_datapath_wait  ``marker: true``; each member in turn: pause, marker
                            frame on its own link, cut, resume, done.
  helper                    ``marker: true``; each member in turn through
                            ``lab.members.ProcessMembers.cut`` as it is in the tree
                            (the test suite's host helper: prepare, datapath wait,
                            pause, marker, cut, datapath wait, resume, done). Its
                            pause is the one a member sees.

``flip_ms`` is the controller's own figure (cut request -> barrier replies);
``rtt_ms`` is the client's wall time of the POST .../cut.

Part 2, hold/record capacity. Two members (LanTopo(2)) stream to each other at
R datagrams/s per direction. A snapshot cuts h1 by a bare POST .../cut while it
keeps sending (``marker: false``, not paused, so no catch-up burst), so its
frames to h2 are HELD at the controller and h2's frames to h1 are RECORDED;
after ``hold_s`` h2 is cut through the helper path (its held frames are
released) and the snapshot completes. A step passes when nothing was lost:
every h1 -> h2 datagram sent in the window arrived exactly once, every pre-cut
h2 -> h1 one arrived and, when it arrived after h1's flip, is in the channel
state, the controller dropped nothing and released all it held. Misses right
at a flip (stale datapath flows) are reported apart as ``flip_race``. R steps
up until a step fails twice in a row.

Part 3, cuts at once (``--scale``, issue 11 goal 5; docs/bench/bench_cut_scale.json). N manual members
of LineTopo(4, 16) cut at once, by N concurrent cut calls and by N cut request frames from the members'
own links (each prepared with ``divert`` and its marker in first), beside N concurrent GET
/violin/health (the REST path's floor). ``--baseline REV`` runs REV's controller on a second network,
rounds interleaved. The arm ``floor`` sends the same frames to ``scripts/bench_cut_floor_app.py``, a
Ryu app that answers each at once with two flow-mods and a barrier and does nothing else: what the
switch (and Ryu) take whatever the controller does.

    .venv/bin/python scripts/bench_cut.py [--out docs/bench/bench_cut.json] [--quick] [--keep DIR]
    .venv/bin/python scripts/bench_cut.py --scale [--sizes 1,8,32,64] [--rounds 8] [--baseline REV]

Must run as root. Exit codes: 0 success, 1 a run failed, 2 bad usage,
130 interrupted. Every part has its own name prefix, controller process and
bridges; teardown stops only the processes this script started (by pid) and
deletes only the bridges it created (by name).
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack

from benchkit import (ROOT, BenchError, bring_up, finish_manual_snapshot, check_host, cpu_seconds, handle_signals,  # sets sys.path
                      ignore_signals, machine_info, run, run_guarded, save, summary, timestamp)
from lab.lab import ControllerProcess, run_prefix
from topologies.lan import LanTopo
import lab.members as members_module
from lab.members import ProcessMembers, pcap_datagrams, wait_stopped
from topologies.tree import LineTopo
from violin_client.api import ApiError, wait_until_done

DEFAULT_OUT = os.path.join(ROOT, "docs", "bench", "bench_cut.json")
FULL = {"one_at_a_time": 30, "all_at_once": 20, "with_markers": 20, "helper": 6,
        "rates": [250, 500, 1000, 2000, 3000, 4000, 6000, 8000], "hold_s": 2.0}
QUICK = {"one_at_a_time": 4, "all_at_once": 3, "with_markers": 3, "helper": 2, "rates": [250, 1000], "hold_s": 1.0}
SENDER_SHORTFALL = 0.9  # a sender below 90% of the asked rate ends the sweep: the rest would measure seqstream
SLACK = 0.002  # as lab.members.check_cut: frames still in the kernel when the flip ended
BOUNDARY_MS = 50  # record misses this close to the flip are a flip race (stale datapath flows), not capacity
OVS_COUNTERS = re.compile(r"drop|overflow|discard|upcall_error|lost", re.I)


# --- helpers -------------------------------------------------------------------


def code_version():
    """Which code was measured: HEAD, the changed files, and a digest of the sources as they were."""
    import hashlib
    digest = hashlib.sha256()
    for folder in ("ryu_apps", "topologies", "hostside", "workloads", "lab"):
        for dirpath, _dirs, files in sorted(os.walk(os.path.join(ROOT, folder))):
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), "rb") as handle:
                        digest.update(name.encode() + handle.read())
    status = run(["git", "-C", ROOT, "status", "--porcelain"]) or ""
    return {"head": run(["git", "-C", ROOT, "rev-parse", "HEAD"]),
            "changed": [line.split(None, 1)[-1] for line in status.splitlines() if line.strip()],
            "sources_sha256": digest.hexdigest()}


def ovs_counters():
    """Open vSwitch's global drop/overflow coverage totals (all bridges: other runs count too)."""
    out = run(["ovs-appctl", "coverage/show"]) or ""
    found = {}
    for line in out.splitlines():
        match = re.match(r"(\S+)\s.*total: (\d+)", line)
        if match and OVS_COUNTERS.search(match.group(1)):
            found[match.group(1)] = int(match.group(2))
    return found


def softnet_dropped():
    """Frames the kernel dropped from its per-CPU backlogs (netdev_max_backlog), all CPUs."""
    try:
        with open("/proc/net/softnet_stat") as handle:
            return sum(int(line.split()[1], 16) for line in handle if line.strip())
    except (OSError, ValueError, IndexError):
        return None


def link_drops(net):
    """{interface: rx_dropped + tx_dropped} for both ends of every link (host ends read in the host)."""
    found = {}
    for link in net.links:
        for intf in (link.intf1, link.intf2):
            out = intf.node.cmd("cat /sys/class/net/%s/statistics/rx_dropped /sys/class/net/%s/statistics/tx_dropped"
                                % (intf.name, intf.name)).split()
            try:
                found[intf.name] = sum(int(v) for v in out)
            except ValueError:
                pass
    ovs = {}
    for switch in net.switches:
        for intf in switch.intfList():
            if intf.name == "lo":
                continue
            text = run(["ovs-vsctl", "--timeout=5", "get", "interface", intf.name, "statistics"]) or ""
            ovs[intf.name] = sum(int(v) for k, v in re.findall(r"(\w*drop\w*)=(\d+)", text))
    return {"kernel": found, "ovs": ovs}


def udp_errors(host):
    """The host's UDP error counters (its own network namespace): socket buffer overflows show here."""
    lines = [line.split() for line in host.cmd("cat /proc/net/snmp").splitlines() if line.startswith("Udp:")]
    if len(lines) < 2:
        return {}
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:]) if k in ("InErrors", "RcvbufErrors", "SndbufErrors")}


def quiesce(controller, timeout=15.0, idle=0.05):
    """Wait until the controller is idle (its queue of packet-ins worked off): seconds waited.

    seqstream datagrams carry no run id, so a frame of the previous step delivered
    late would count as a duplicate in the next one.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = cpu_seconds(controller.process.pid)
        time.sleep(0.3)
        after = cpu_seconds(controller.process.pid)
        if before is None or after is None or (after - before) / 0.3 < idle:
            break
    return round(time.monotonic() - started, 2)


def other_bridges(prefix):
    """Bridges on this Open vSwitch that are not this run's (another run shares ovs-vswitchd: noise)."""
    return sum(1 for name in (run(["ovs-vsctl", "--timeout=5", "list-br"]) or "").split()
               if not name.startswith(prefix))


def other_controllers():
    """ryu-manager processes this script did not start (e.g. a concurrent test run): noise."""
    mine, found = {c.process.pid for c in STARTED_CONTROLLERS if c.process}, 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in mine:
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    if b"ryu-manager" in handle.read():
                        found += 1
            except OSError:
                pass
    return found


STARTED_CONTROLLERS = []


def _counter_delta(before, after):
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _log_lines(controller):
    """Warnings, errors and tracebacks of the controller's whole log (read before stop())."""
    try:
        with open(controller.log_path, errors="replace") as handle:
            text = handle.read()
    except OSError:
        return {"lines": 0, "notable": []}
    notable = [line for line in text.splitlines()
               if re.search(r"error|warn|traceback|exception|abort|overflow|drop", line, re.I)]
    return {"lines": text.count("\n"), "notable_count": len(notable), "notable": notable[:40]}


class Api:
    """REST calls with the client's wall time."""

    def __init__(self, controller):
        self.controller = controller

    def timed(self, method, path, body=None):
        started = time.perf_counter()
        status, answer = self.controller.request(method, path, body)
        return status, answer, (time.perf_counter() - started) * 1000.0

    def cut(self, sid, name):
        """POST .../cut: (status, answer, ms)."""
        return self.timed("POST", "/violin/snapshots/%s/members/%s/cut" % (sid, name))

    def done(self, sid, name, body):
        """POST .../done: None, or what went wrong."""
        status, answer = self.controller.request("POST", "/violin/snapshots/%s/members/%s/done" % (sid, name), body)
        return None if status == 200 else "done of %s: %s %s" % (name, status, answer)

    def register(self, hosts, marker):
        for host in hosts:
            status, _ = self.controller.request("DELETE", "/violin/members/%s" % host.name)
            if status not in (200, 404):
                raise BenchError("cannot remove member %s: %s" % (host.name, status))
            spec = {"name": host.name, "macs": [host.MAC()], "marker": marker, "backend": "manual"}
            status, answer = self.controller.request("POST", "/violin/members", spec)
            if status != 201:
                raise BenchError("registering %s failed: %s %s" % (host.name, status, answer))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, answer = self.controller.get("/violin/members")
            if status == 200 and all(m["located"] for m in answer["members"]):
                return
            time.sleep(0.1)
        raise BenchError("members not located after 10 s: %r" % answer)

    def start(self, label):
        status, answer = self.controller.request("POST", "/violin/snapshots", {"label": label})
        if status != 202:
            raise BenchError("starting snapshot %s failed: %s %s" % (label, status, answer))
        return answer["id"]

    def wait_final(self, sid, timeout=15.0):
        try:
            return wait_until_done(self.controller.api, "/violin/snapshots/%s" % sid, timeout, poll=0.02)
        except ApiError as error:  # still running at the deadline, or refused
            raise BenchError("snapshot %s: %s" % (sid, error)) from None

    def abort_if_running(self, sid):
        status, view = self.controller.get("/violin/snapshots/%s" % sid)
        if status == 200 and view.get("state") == "running":
            self.controller.request("POST", "/violin/snapshots/%s/abort" % sid, {"reason": "bench_cut cleanup"})
            return self.wait_final(sid)
        return view


def _pause(process):
    os.kill(process.pid, signal.SIGSTOP)
    wait_stopped(process.pid)


def _resume(process):
    os.kill(process.pid, signal.SIGCONT)


def _finish_snapshot(api, sid, started, kind, failed, snapshots, log):
    """Abort the snapshot if ``failed`` (else wait until it is final), append its record, log if not complete."""
    view = api.abort_if_running(sid) if failed else api.wait_final(sid)
    record = {"id": view["id"], "kind": kind, "state": view["state"], "reason": view.get("reason"),
              "total_ms": round((time.perf_counter() - started) * 1000, 1),
              "counts": view.get("counts"), "drain": view.get("drain")}
    if failed:
        record["error"] = failed
    snapshots.append(record)
    if view["state"] != "complete":
        log("  snapshot %s %s: %s" % (sid, view["state"], failed or view.get("reason")))


# --- part 1: cut overhead ---------------------------------------------------------


def series_one_at_a_time(api, members, hosts, count, marker, log):
    """``count`` snapshots; in each, every member in turn: pause, [marker], cut, resume, done."""
    samples, snapshots = [], []
    kind = "markers_no_datapath_wait" if marker else "one_at_a_time"
    for index in range(count):
        order = list(hosts)
        random.shuffle(order)
        started = time.perf_counter()
        sid = api.start("%s-%d" % (kind, index))
        failed = None
        try:
            for host in order:
                process = members.processes[host.name]
                t0 = time.perf_counter()
                _pause(process)
                t_stopped = time.perf_counter()
                marker_ms = None
                if marker:
                    members.progress(host)  # what the helper reads while the member is paused
                    pipe = members.markers[host.name]
                    pipe.stdin.write(("%s %s\n" % (sid, host.name)).encode())
                    pipe.stdin.flush()
                    pipe.stdout.readline()
                    marker_ms = (time.perf_counter() - t_stopped) * 1000
                try:
                    status, answer, rtt = api.cut(sid, host.name)
                finally:
                    _resume(process)
                pause_ms = (time.perf_counter() - t0) * 1000
                if status != 200:
                    failed = "cut of %s: %s %s" % (host.name, status, answer)
                    break
                samples.append({"flip_ms": answer["flip_ms"], "rtt_ms": round(rtt, 3),
                                "pause_ms": round(pause_ms, 3), "stop_ms": round((t_stopped - t0) * 1000, 3),
                                "marker_ms": None if marker_ms is None else round(marker_ms, 3)})
                failed = api.done(sid, host.name, {"pause_ms": round(pause_ms, 3), "note": "bench_cut"})
                if failed:
                    break
            _finish_snapshot(api, sid, started, kind, failed, snapshots, log)
        except BenchError:
            api.abort_if_running(sid)
            raise
    return samples, snapshots


def series_all_at_once(api, members, hosts, count, log):
    """``count`` snapshots; in each, all members paused, then concurrent cuts from threads."""
    samples, batches, snapshots = [], [], []
    for index in range(count):
        started = time.perf_counter()
        sid = api.start("all_at_once-%d" % index)
        results = [None] * len(hosts)
        gate = threading.Barrier(len(hosts) + 1)

        def worker(slot, host):
            try:
                gate.wait(10)
            except threading.BrokenBarrierError:
                return
            begin = time.perf_counter()
            status, answer, rtt = api.cut(sid, host.name)
            results[slot] = (status, answer, rtt, begin, time.perf_counter())

        threads = [threading.Thread(target=worker, args=(i, h), daemon=True) for i, h in enumerate(hosts)]
        failed = None
        try:
            paused_at = time.perf_counter()
            for host in hosts:
                _pause(members.processes[host.name])
            for thread in threads:
                thread.start()
            gate.wait(10)
            for thread in threads:
                thread.join(30)
        finally:
            for host in hosts:
                _resume(members.processes[host.name])
        pause_ms = (time.perf_counter() - paused_at) * 1000
        if any(r is None for r in results):
            failed = "a cut request did not return"
        else:
            for host, (status, answer, rtt, _b, _e) in zip(hosts, results):
                if status != 200:
                    failed = failed or "cut of %s: %s %s" % (host.name, status, answer)
                    continue
                samples.append({"flip_ms": answer["flip_ms"], "rtt_ms": round(rtt, 3)})
            if not failed:
                batches.append({"batch_ms": round((max(r[4] for r in results) - min(r[3] for r in results)) * 1000, 3),
                                "max_flip_ms": max(r[1]["flip_ms"] for r in results),
                                "pause_ms": round(pause_ms, 3)})
                for host in hosts:
                    failed = api.done(sid, host.name, {"pause_ms": round(pause_ms, 3), "note": "bench_cut all_at_once"})
                    if failed:
                        break
        _finish_snapshot(api, sid, started, "all_at_once", failed, snapshots, log)
    return samples, batches, snapshots


class TimedController:
    """A ControllerProcess whose request() remembers (last path element, status, ms, answer)."""

    def __init__(self, controller):
        self.controller, self.calls = controller, []

    def request(self, method, path, body=None, token=None):
        started = time.perf_counter()
        status, answer = self.controller.request(method, path, body, token)
        self.calls.append((path.rstrip("/").rsplit("/", 1)[-1], status, (time.perf_counter() - started) * 1000,
                           answer))
        return status, answer

    def __getattr__(self, name):
        return getattr(self.controller, name)


def series_helper(api, members, hosts, count, log):
    """``count`` snapshots; every member in turn through ``ProcessMembers.cut``, the test suite's host helper.

    Whatever that helper does (today: prepare, wait for the datapath, pause, marker, cut,
    wait for the datapath, resume, done) is timed from outside: each REST call, each
    datapath wait, the pause it reports.
    """
    samples, snapshots, waits = [], [], []
    original = getattr(members_module, "wait_datapath", None)

    def timed_wait(*args, **kwargs):
        started = time.perf_counter()
        how = original(*args, **kwargs)
        waits.append((how, (time.perf_counter() - started) * 1000))
        return how

    if original is not None:
        members_module.wait_datapath = timed_wait
    try:
        for index in range(count):
            order = list(hosts)
            random.shuffle(order)
            started = time.perf_counter()
            sid = api.start("helper-%d" % index)
            failed = None
            for host in order:
                timed = TimedController(api.controller)
                del waits[:]
                t0 = time.perf_counter()
                try:
                    members.cut(timed, sid, host, marker=True)
                except (AssertionError, RuntimeError) as exc:
                    failed = "%s: %s" % (host.name, exc)
                    break
                helper_ms = (time.perf_counter() - t0) * 1000
                calls = {name: (status, ms, answer) for name, status, ms, answer in timed.calls}
                record = members.cuts[host.name]
                cut = calls.get("cut")
                samples.append({
                    "flip_ms": cut[2]["flip_ms"], "rtt_ms": round(cut[1], 3), "pause_ms": round(record.pause_ms, 3),
                    "helper_ms": round(helper_ms, 3),
                    "resumed_ms_after_flip": round(record.resumed_ms_after_flip, 3),
                    "prepare_rtt_ms": round(calls["prepare"][1], 3) if "prepare" in calls else None,
                    "datapath_waits_ms": [round(ms, 3) for _how, ms in waits],
                    "datapath_wait_how": sorted({how for how, _ms in waits}),
                })
            _finish_snapshot(api, sid, started, "helper", failed, snapshots, log)
    finally:
        if original is not None:
            members_module.wait_datapath = original
    return samples, snapshots


def _series_result(samples, snapshots, batches=None):
    result = {
        "cuts": len(samples),
        "snapshots": len(snapshots),
        "complete": sum(1 for s in snapshots if s["state"] == "complete"),
        "aborted": [{"id": s["id"], "reason": s.get("error") or s.get("reason")}
                    for s in snapshots if s["state"] != "complete"],
        "flip_ms": summary([s["flip_ms"] for s in samples]),
        "rtt_ms": summary([s["rtt_ms"] for s in samples]),
        "snapshot_total_ms": summary([s["total_ms"] for s in snapshots]),
        "drain_waited_ms": summary([(s.get("drain") or {}).get("waited_ms") for s in snapshots]),
        "drain_methods": sorted({(s.get("drain") or {}).get("method") or "-" for s in snapshots}),
        "held_per_snapshot": summary([(s.get("counts") or {}).get("held") for s in snapshots]),
        "recorded_per_snapshot": summary([(s.get("counts") or {}).get("recorded") for s in snapshots]),
        "dropped_total": sum((s.get("counts") or {}).get("dropped", 0) for s in snapshots),
        "samples": {"flip_ms": [s["flip_ms"] for s in samples], "rtt_ms": [s["rtt_ms"] for s in samples]},
    }
    if samples and samples[0].get("pause_ms") is not None:
        result["pause_ms"] = summary([s["pause_ms"] for s in samples])
        result["stop_ms"] = summary([s.get("stop_ms") for s in samples])
        result["samples"]["pause_ms"] = [s["pause_ms"] for s in samples]
    if samples and samples[0].get("marker_ms") is not None:
        result["marker_ms"] = summary([s["marker_ms"] for s in samples])
    if samples and "helper_ms" in samples[0]:
        result["helper_ms"] = summary([s["helper_ms"] for s in samples])
        result["resumed_ms_after_flip"] = summary([s["resumed_ms_after_flip"] for s in samples])
        result["prepare_rtt_ms"] = summary([s["prepare_rtt_ms"] for s in samples])
        result["datapath_wait_ms"] = summary([ms for s in samples for ms in s["datapath_waits_ms"]])
        result["datapath_wait_how"] = sorted({how for s in samples for how in s["datapath_wait_how"]})
    if batches is not None:
        result["batch_ms"] = summary([b["batch_ms"] for b in batches])
        result["max_flip_ms_per_snapshot"] = summary([b["max_flip_ms"] for b in batches])
        result["pause_ms_all_members"] = summary([b["pause_ms"] for b in batches])
    return result


def run_overhead(name, topo, counts, bg_rate, log):
    prefix = topo.prefix
    controller = ControllerProcess()
    STARTED_CONTROLLERS.append(controller)
    record = {"topology": name, "prefix": prefix, "bridges": list(topo.switches()), "background_rate": bg_rate}
    workdir = tempfile.mkdtemp(prefix="bench-cut-")
    with ExitStack() as stack:
        stack.callback(handle_signals)       # runs last: signals back on after cleanup
        stack.callback(shutil.rmtree, workdir, True)
        stack.callback(controller.stop)
        started = time.monotonic()
        net = bring_up(stack, controller, topo, name)
        record["setup_s"] = round(time.monotonic() - started, 2)
        stack.callback(lambda: record.__setitem__("controller_log", _log_lines(controller)))
        stack.callback(ignore_signals)       # runs first: no second Ctrl-C mid-cleanup
        hosts = list(net.hosts)
        members = ProcessMembers(hosts, workdir, rate=bg_rate)
        stack.callback(members.stop)
        members.start()
        time.sleep(1.0)
        api = Api(controller)
        series = {}
        api.register(hosts, marker=False)
        log("%s: one_at_a_time x %d ..." % (name, counts["one_at_a_time"]))
        samples, snaps = series_one_at_a_time(api, members, hosts, counts["one_at_a_time"], False, log)
        series["one_at_a_time"] = _series_result(samples, snaps)
        log("%s: all_at_once x %d ..." % (name, counts["all_at_once"]))
        samples, batches, snaps = series_all_at_once(api, members, hosts, counts["all_at_once"], log)
        series["all_at_once"] = _series_result(samples, snaps, batches)
        api.register(hosts, marker=True)
        log("%s: markers_no_datapath_wait x %d ..." % (name, counts["with_markers"]))
        samples, snaps = series_one_at_a_time(api, members, hosts, counts["with_markers"], True, log)
        series["markers_no_datapath_wait"] = _series_result(samples, snaps)
        log("%s: helper (ProcessMembers.cut) x %d ..." % (name, counts["helper"]))
        samples, snaps = series_helper(api, members, hosts, counts["helper"], log)
        series["helper"] = _series_result(samples, snaps)
        record["series"] = series
        record["other_controllers_at_end"] = other_controllers()
        record["other_bridges_at_end"] = other_bridges(prefix)
        status, health = controller.get("/violin/health")
        record["health_after"] = health if status == 200 else None
        if controller.process.poll() is not None:
            raise BenchError("%s: controller died:\n%s" % (name, controller.log_text()[-2000:]))
    return record


# --- part 2: hold/record capacity ------------------------------------------------------


def _arrivals(log_entries, sender_id):
    got = {}
    for sender, seq, arrival in log_entries:
        if sender == sender_id:
            got.setdefault(seq, []).append(arrival / 1e9)
    return got


def _inversions(log_entries, sender_id, first, last):
    """Datagrams of the window that arrived after one with a higher seq (receive order vs send order)."""
    highest, late = 0, 0
    for sender, seq, _arrival in log_entries:
        if sender == sender_id and first <= seq <= last:
            if seq < highest:
                late += 1
            highest = max(highest, seq)
    return late


def _ranges(seqs, limit=8):
    """Compact runs of missing sequence numbers: [[first, last], ...]."""
    runs = []
    for seq in sorted(seqs):
        if runs and seq == runs[-1][1] + 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
    return runs[:limit]


def capacity_step(api, controller, net, rate, hold_s, workdir, keep_dir=None):
    """One rate: h1 cut directly (not paused: no catch-up burst), h2 cut through the helper path.

    h1 is registered with ``marker: false`` and cut by a bare POST .../cut while it keeps
    sending, so from its flip on its frames to h2 are held at the controller at the
    steady rate R, and h2's frames to h1 go through the record path. h2 is then cut
    the way the helper does it (``ProcessMembers.cut``), which releases the held frames.
    """
    h1, h2 = net.hosts[0], net.hosts[1]
    members = ProcessMembers([h1, h2], workdir, rate=rate)
    id1, id2 = members.ids[h1.name], members.ids[h2.name]
    step = {"rate_pps_per_direction": rate, "hold_s": hold_s}
    ovs_before, softnet_before, links_before = ovs_counters(), softnet_dropped(), link_drops(net)
    udp_before = {h.name: udp_errors(h) for h in (h1, h2)}
    cpu_before, wall_before = cpu_seconds(controller.process.pid), time.monotonic()
    step["other_controllers"] = other_controllers()
    step["other_bridges"] = other_bridges(net.topo.prefix)
    sid, view, after = None, None, None
    try:
        members.start()
        time.sleep(0.6)
        base = {h.name: members.progress(h) for h in (h1, h2)}
        time.sleep(0.8)
        before = {h.name: members.progress(h) for h in (h1, h2)}
        t_before = time.monotonic()
        sid = api.start("capacity-%d" % rate)
        step["snapshot"] = sid
        h1_before_cut = members.progress(h1)[id2][1]
        status, cut1, rtt = api.cut(sid, h1.name)
        h1_after_cut = members.progress(h1)[id2][1]
        if status != 200:
            raise BenchError("cut of %s: %s %s" % (h1.name, status, cut1))
        step["h1_flip_ms"], step["h1_cut_rtt_ms"] = cut1["flip_ms"], round(rtt, 3)
        time.sleep(hold_s)
        _, mid = controller.get("/violin/snapshots/%s" % sid)
        step["counts_before_release"] = mid.get("counts")
        h1_before_release = members.progress(h1)[id2][1]
        failed = api.done(sid, h1.name, {"note": "bench_cut capacity, not paused"})
        if failed:
            raise BenchError(failed)
        members.cut(controller, sid, h2, marker=True)
        h1_after_release = members.progress(h1)[id2][1]
        view = api.wait_final(sid, timeout=30)
        time.sleep(0.5)
        after = {h.name: members.progress(h) for h in (h1, h2)}
        t_after = time.monotonic()
        time.sleep(0.4)  # the last datagrams reach their receivers before the logs close
    except (AssertionError, BenchError, RuntimeError) as exc:  # ProcessMembers.cut refused, or no completion
        step["error"] = str(exc)
        view = api.abort_if_running(sid) if sid else None
    finally:
        members.stop()
    step["ovs_counter_delta"] = _counter_delta(ovs_before, ovs_counters())
    cpu_after = cpu_seconds(controller.process.pid)
    if cpu_before is not None and cpu_after is not None:
        step["controller_cpu_pct"] = round(100 * (cpu_after - cpu_before) / (time.monotonic() - wall_before), 1)
    softnet_after = softnet_dropped()
    step["kernel_backlog_drops"] = (softnet_after - softnet_before) if None not in (softnet_after, softnet_before) \
        else None
    links_after = link_drops(net)
    step["link_drops"] = {kind: _counter_delta(links_before[kind], links_after[kind]) for kind in links_after}
    step["udp_errors"] = {h.name: _counter_delta(udp_before[h.name], udp_errors(h)) for h in (h1, h2)}
    step["state"] = view["state"] if view else None
    step["reason"] = view.get("reason") if view else None
    step["counts"] = view.get("counts") if view else None
    step["drain"] = view.get("drain") if view else None
    step["channel"] = view.get("channel") if view else None
    failures = []
    if step.get("error"):
        failures.append(step["error"])
    if view is None or view["state"] != "complete":
        failures.append("snapshot %s: %s" % (view and view["state"], view and view.get("reason")))
    if after is None:
        step["failures"], step["pass"], step["strict_pass"], step["flip_race"] = failures, False, False, []
        return step

    logs = members.logs()
    pcap = os.path.join(controller.workdir, "state", sid, "channel.pcapng")
    recorded = pcap_datagrams(pcap)
    channel_h1 = set(recorded.get(h1.name, []))
    cut2 = members.cuts[h2.name]
    h1_flip_started, h1_cut_time = cut1["flip_started"], cut1["cut_time"]
    at_h2, at_h1 = _arrivals(logs[h2.name], id1), _arrivals(logs[h1.name], id2)

    # h1 -> h2: every datagram of the window arrives exactly once (held ones after h2's flip).
    first, last = before[h1.name][id2][1] + 1, after[h1.name][id2][1]
    missing_12 = [q for q in range(first, last + 1) if q not in at_h2]
    dup_12 = [q for q in range(first, last + 1) if len(at_h2.get(q, ())) > 1]
    escaped = [q for q in range(h1_after_cut + 1, h1_before_release + 1)
               if at_h2.get(q) and min(at_h2[q]) < cut2.flip_started]
    b1, b2 = base[h1.name][id2][1] + 1, before[h1.name][id2][1]

    def phase_12(q):
        if q <= h1_before_cut:
            return "before_h1_cut"
        if q <= h1_after_cut:
            return "during_h1_cut"
        if q <= h1_before_release:
            return "held"
        if q <= h1_after_release:
            return "during_h2_cut"
        return "after_release"

    phases = {}
    for q in missing_12:
        phases[phase_12(q)] = phases.get(phase_12(q), 0) + 1
    step["h1_to_h2"] = {
        "window": [first, last], "sent": last - first + 1,
        "achieved_pps": round((last - first + 1) / (t_after - t_before), 1),
        "seq_marks": {"before_h1_cut": h1_before_cut, "after_h1_cut": h1_after_cut,
                      "before_release": h1_before_release, "after_release": h1_after_release},
        "missing": len(missing_12), "missing_by_phase": phases, "missing_runs": _ranges(missing_12),
        "duplicates": len(dup_12), "reordered": _inversions(logs[h2.name], id1, first, last),
        "escaped_hold": len(escaped), "escaped_hold_seqs": escaped[:10],
        "escaped_hold_ms_after_h1_flip": [round((min(at_h2[q]) - h1_cut_time) * 1000, 2) for q in escaped[:10]],
        "baseline_window": [b1, b2], "baseline_missing": sum(1 for q in range(b1, b2 + 1) if q not in at_h2),
    }
    # h2 -> h1: pre-cut datagrams (sent before h2's pause) all arrive; those arriving after h1's flip
    # are in the channel state. Post ones (after h2 resumed) take the fast path: reported apart.
    first, last = before[h2.name][id1][1] + 1, after[h2.name][id1][1]
    pre_last = cut2.progress[id1][1]
    missing_pre = [q for q in range(first, min(pre_last, last) + 1) if q not in at_h1]
    missing_post = [q for q in range(pre_last + 1, last + 1) if q not in at_h1]
    dup_21 = [q for q in range(first, last + 1) if len(at_h1.get(q, ())) > 1]
    must_record = [q for q in range(first, pre_last + 1) if at_h1.get(q) and min(at_h1[q]) > h1_cut_time + SLACK]
    not_recorded = [q for q in must_record if (id2, q) not in channel_h1]
    late_ms = {q: (min(at_h1[q]) - h1_cut_time) * 1000 for q in not_recorded}
    at_boundary = [q for q in not_recorded if late_ms[q] <= BOUNDARY_MS]
    beyond = [q for q in not_recorded if late_ms[q] > BOUNDARY_MS]
    recorded_early = [q for q in range(first, last + 1)
                      if (id2, q) in channel_h1 and at_h1.get(q) and min(at_h1[q]) < h1_flip_started]
    about = max(cut2.progress[id1])  # the seq it was about to send may or may not have left: ambiguous
    recorded_post = [q for s_, q in recorded.get(h1.name, []) if s_ == id2 and q > about]
    b1, b2 = base[h2.name][id1][1] + 1, before[h2.name][id1][1]
    step["h2_to_h1"] = {
        "window": [first, last], "sent": last - first + 1, "last_pre_cut_seq": pre_last,
        "achieved_pps": round((last - first + 1) / (t_after - t_before), 1),
        "missing_pre_cut": len(missing_pre), "missing_pre_cut_runs": _ranges(missing_pre),
        "missing_after_h2_resumed": len(missing_post), "missing_after_h2_resumed_runs": _ranges(missing_post),
        "duplicates": len(dup_21), "reordered": _inversions(logs[h1.name], id2, first, last),
        "must_be_recorded": len(must_record), "not_recorded": len(not_recorded),
        "not_recorded_runs": _ranges(not_recorded),
        "not_recorded_at_flip_boundary": len(at_boundary), "not_recorded_beyond_boundary": len(beyond),
        "not_recorded_ms_after_flip": [round(late_ms[q], 2) for q in not_recorded[:20]],
        "recorded_in_pcap": len(recorded.get(h1.name, [])), "recorded_before_h1_flip": len(recorded_early),
        "recorded_post_cut": len(recorded_post),
        "baseline_window": [b1, b2], "baseline_missing": sum(1 for q in range(b1, b2 + 1) if q not in at_h1),
    }
    step["h2_pause_ms"] = round(cut2.pause_ms, 3)
    step["h2_resumed_ms_after_flip"] = round(cut2.resumed_ms_after_flip, 3)
    step["h2_flip_ms"] = next((m.get("flip_ms") for m in view.get("members", []) if m["name"] == h2.name), None)
    step["h2_flip_after_h1_flip_ms"] = round((cut2.flip_started - h1_cut_time) * 1000, 1)

    counts = view.get("counts") or {}
    if counts.get("dropped"):
        failures.append("controller dropped %d held frames (counts.dropped)" % counts["dropped"])
    if counts.get("held", 0) != counts.get("released", 0):
        failures.append("held %d != released %d" % (counts.get("held", 0), counts.get("released", 0)))
    if missing_12:
        overflow = step["udp_errors"].get(h2.name, {}).get("RcvbufErrors", 0)
        unsent = step["udp_errors"].get(h1.name, {}).get("SndbufErrors", 0)
        failures.append("h1->h2: %d of %d datagrams never arrived (by phase %s; first runs %s)%s%s"
                        % (len(missing_12), step["h1_to_h2"]["sent"], phases, _ranges(missing_12, 3),
                           "; h2's UDP socket dropped %d for a full receive buffer (h2 paused %.0f ms, its flip "
                           "released %s held frames)" % (overflow, cut2.pause_ms, counts.get("released"))
                           if overflow else "",
                           "; h1's UDP socket refused %d sends (full send buffer)" % unsent if unsent else ""))
    if dup_12 or dup_21:
        failures.append("duplicates: h1->h2 %d, h2->h1 %d" % (len(dup_12), len(dup_21)))
    if missing_pre:
        unsent = step["udp_errors"].get(h2.name, {}).get("SndbufErrors", 0)
        overflow = step["udp_errors"].get(h1.name, {}).get("RcvbufErrors", 0)
        failures.append("h2->h1: %d pre-cut datagrams never arrived (first runs %s)%s%s"
                        % (len(missing_pre), _ranges(missing_pre, 3),
                           "; h2's UDP socket refused %d sends for a full send buffer (never sent)" % unsent
                           if unsent else "",
                           "; h1's UDP socket dropped %d for a full receive buffer" % overflow if overflow else ""))
    if beyond:
        failures.append("h2->h1: %d of %d pre-cut datagrams that reached h1 more than %d ms after its flip are "
                        "missing from the channel state (first runs %s)"
                        % (len(beyond), len(must_record), BOUNDARY_MS, _ranges(beyond, 3)))
    channel = view.get("channel") or {}
    if channel.get("frames") is not None and channel["frames"] != counts.get("recorded"):
        failures.append("channel.frames %s != counts.recorded %s" % (channel["frames"], counts.get("recorded")))
    shortfall = [d for d in ("h1_to_h2", "h2_to_h1") if step[d]["achieved_pps"] < SENDER_SHORTFALL * rate]
    step["sender_limited"] = shortfall
    notes = []
    if at_boundary:
        notes.append("h2->h1: %d pre-cut datagrams reached h1 %s ms after its flip (barrier reply) and are not "
                     "recorded" % (len(at_boundary), [round(late_ms[q], 1) for q in at_boundary[:5]]))
    if escaped:
        notes.append("h1->h2: %d datagrams sent after h1's cut reached h2 before h2's flip (not held), %s ms "
                     "after h1's flip" % (len(escaped), step["h1_to_h2"]["escaped_hold_ms_after_h1_flip"][:5]))
    late_escapes = [q for q in escaped if (min(at_h2[q]) - h1_cut_time) * 1000 > BOUNDARY_MS]
    if late_escapes:
        failures.append("h1->h2: %d datagrams escaped the hold more than %d ms after h1's flip: seqs %s"
                        % (len(late_escapes), BOUNDARY_MS, late_escapes[:5]))
    if recorded_early or recorded_post:
        notes.append("channel state: %d recorded before h1's flip, %d sent after h2's pause (post-cut)"
                     % (len(recorded_early), len(recorded_post)))
    step["failures"] = failures
    step["pass"] = not failures
    step["flip_race"] = notes
    step["strict_pass"] = step["pass"] and not notes
    if missing_post:
        step["note"] = ("h2->h1: %d datagrams sent after h2 resumed (fast path, outside the snapshot) were lost; "
                        "h2 was paused %.0f ms and seqstream catches up in a burst" % (len(missing_post), cut2.pause_ms))
    if keep_dir and (failures or notes or missing_post):
        kept = os.path.join(keep_dir, "%d-%s" % (rate, sid))
        shutil.copytree(workdir, kept, dirs_exist_ok=True)
        if os.path.exists(pcap):
            shutil.copy(pcap, kept)
        with open(os.path.join(kept, "step.json"), "w") as handle:
            json.dump({"cut1": cut1, "cut2": vars(cut2), "view": view, "before": before, "after": after,
                       "step": step}, handle, indent=1, default=str)
        step["kept"] = kept
    return step


def run_capacity(rates, hold_s, log, keep_dir=None):
    prefix = run_prefix()
    topo = LanTopo(2, prefix=prefix)
    controller = ControllerProcess()
    STARTED_CONTROLLERS.append(controller)
    record = {"topology": "LanTopo(2)", "prefix": prefix, "bridges": list(topo.switches()), "steps": []}
    with ExitStack() as stack:
        stack.callback(handle_signals)
        stack.callback(controller.stop)
        net = bring_up(stack, controller, topo, "the capacity network")
        stack.callback(lambda: record.__setitem__("controller_log", _log_lines(controller)))
        stack.callback(ignore_signals)
        api = Api(controller)
        net.pingAll(timeout=2)
        api.register(net.hosts[:1], marker=False)  # cut directly, without pausing
        api.register(net.hosts[1:], marker=True)   # cut through the helper path
        for rate in rates:
            attempts = []
            for attempt in (1, 2):
                quiet_s = quiesce(controller)
                workdir = tempfile.mkdtemp(prefix="bench-cut-cap-")
                try:
                    step = capacity_step(api, controller, net, rate, hold_s, workdir, keep_dir)
                except (OSError, TimeoutError, AssertionError, BenchError) as error:
                    # An overloaded step (e.g. the REST call timing out) fails that step, not the run.
                    step = {"rate_pps_per_direction": rate, "pass": False, "strict_pass": False,
                            "failures": ["%s: %s" % (type(error).__name__, error)]}
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                step["attempt"] = attempt
                step["quiesce_before_s"] = quiet_s
                attempts.append(step)
                record["steps"].append(step)
                c = step.get("counts") or {}
                log("capacity %5d pps/direction, attempt %d: %s (held %s, released %s, recorded %s, dropped %s)"
                    % (rate, attempt, "ok" if step["pass"] else "LOSS", c.get("held"), c.get("released"),
                       c.get("recorded"), c.get("dropped")))
                if step["pass"] or controller.process.poll() is not None:
                    break
            if controller.process.poll() is not None:
                raise BenchError("capacity: controller died:\n%s" % controller.log_text()[-2000:])
            if not attempts[-1]["pass"]:
                break
            if attempts[-1].get("sender_limited"):
                record["sender_limited_at"] = rate
                log("capacity: the senders reached only %s of %d pps: sweep ends here" % (
                    [attempts[-1][d]["achieved_pps"] for d in ("h1_to_h2", "h2_to_h1")], rate))
                break
    passed = [s["rate_pps_per_direction"] for s in record["steps"] if s["pass"]]
    failed_rates = {s["rate_pps_per_direction"] for s in record["steps"] if not s["pass"]}
    max_ok = None
    for rate in rates:  # largest rate below the first one that failed on every attempt
        last = [s for s in record["steps"] if s["rate_pps_per_direction"] == rate]
        if not last or not last[-1]["pass"]:
            break
        max_ok = rate
    first_fail = next((s for s in record["steps"] if not s["pass"] and s["rate_pps_per_direction"] not in passed), None)
    record["max_lossless_pps_per_direction"] = max_ok
    best = [s for s in record["steps"] if s["rate_pps_per_direction"] == max_ok and s["pass"]]
    record["max_lossless_achieved_pps"] = (min(best[-1]["h1_to_h2"]["achieved_pps"], best[-1]["h2_to_h1"]["achieved_pps"])
                                           if best else None)
    record["first_failing_rate"] = first_fail["rate_pps_per_direction"] if first_fail else None
    record["first_failure"] = first_fail["failures"] if first_fail else None
    record["flaky_rates"] = sorted(r for r in failed_rates if r in passed)
    record["strict_pass_rates"] = sorted({s["rate_pps_per_direction"] for s in record["steps"] if s.get("strict_pass")})
    record["flip_race_steps"] = [{"rate": s["rate_pps_per_direction"], "attempt": s["attempt"],
                                  "what": s["flip_race"]} for s in record["steps"] if s.get("flip_race")]
    return record


# --- part 3: cuts at once (issue 11, goal 5) ---------------------------------------------

SCALE_SIZES = [1, 8, 32, 64]
SCALE_SWITCHES, SCALE_PER_SWITCH = 4, 16
DEFAULT_SCALE_OUT = os.path.join(ROOT, "docs", "bench", "bench_cut_scale.json")
DEFAULT_SCALE_PLOT = os.path.join(ROOT, "docs", "bench", "bench_cut_scale.png")


def export_code(revision, workdir):
    """``revision``'s ryu_apps and violin_client in ``workdir`` (a baseline controller runs from there)."""
    import subprocess
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "ryu_apps", "violin_client"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise BenchError("git archive %s failed: %s" % (revision, archive.stderr.decode(errors="replace")[:300]))
    subprocess.run(["tar", "-x", "-C", workdir], input=archive.stdout, check=True)
    return {"PYTHONPATH": "%s:%s" % (os.path.join(workdir, "ryu_apps"), workdir)}


def released_together(controller, calls):
    """Run ``calls`` in threads released at once by one barrier; the controller process's user+system
    CPU ms from the release to the last return."""
    gate = threading.Barrier(len(calls) + 1)

    def run(call):
        gate.wait(10)
        call()
    threads = [threading.Thread(target=run, args=(call,), daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    cpu_before = cpu_seconds(controller.process.pid)
    gate.wait(10)
    for thread in threads:
        thread.join(60)
    return (cpu_seconds(controller.process.pid) - cpu_before) * 1000.0


def scale_round(controller, names, label):
    """One snapshot of ``names`` cut by as many concurrent calls; ([(rtt, flip, batch)], controller CPU ms).

    The CPU is the controller process's user+system time from the first call to the last answer."""
    status, snap = controller.request("POST", "/violin/snapshots", {"members": names, "label": label})
    if status != 202:
        raise BenchError("snapshot refused: %s %s" % (status, snap))
    sid, results = snap["id"], {}

    def cut(name):
        began = time.perf_counter()
        status, answer = controller.request("POST", "/violin/snapshots/%s/members/%s/cut" % (sid, name), {})
        results[name] = (status, answer, (time.perf_counter() - began) * 1000.0)
    cpu_ms = released_together(controller, [lambda n=n: cut(n) for n in names])
    bad = {n: r[:2] for n, r in results.items() if r[0] != 200}
    if bad or len(results) != len(names):
        raise BenchError("cuts of %s failed: %r" % (sid, bad or "some did not answer"))
    finish_manual_snapshot(controller, sid, names, "bench_cut scale")
    return [(r[2], r[1]["flip_ms"], r[1].get("batch", 1)) for r in results.values()], cpu_ms


def send_cut_requests(controller, hosts, sockets, snapshot_id):
    """Every host's cut request frame sent on its own link, from threads released at once; {name: wall
    time of its send}."""
    from violin_core.packets import build_cut_request
    sent, requests = {}, {h.name: build_cut_request(h.MAC(), snapshot_id, h.name) for h in hosts}

    def request(name):
        sent[name] = time.time()
        sockets[name].send(requests[name])
    released_together(controller, [lambda n=n: request(n) for n in requests])
    return sent


def scale_round_in_band(controller, hosts, label, timeout=10.0):
    """One snapshot of ``hosts`` (manual members), each prepared with ``divert`` and its marker sent on its
    own link, then all cut at once by a cut request frame each (what the helper sends once a member runs
    again): [(ms from the frame's send to its rules in force, flip ms)], controller CPU ms from the
    release until every member is cut."""
    from hostside.backends import criu
    from violin_core.packets import build_marker
    names = [h.name for h in hosts]
    status, snap = controller.request("POST", "/violin/snapshots", {"members": names, "label": label})
    if status != 202:
        raise BenchError("snapshot refused: %s %s" % (status, snap))
    sid, sockets = snap["id"], {}
    try:
        for host in hosts:
            status, answer = controller.request("POST", "/violin/snapshots/%s/members/%s/prepare" % (sid, host.name),
                                                {"divert": True})
            if status != 200 or not answer.get("cut_frame"):
                raise BenchError("prepare of %s: %s %s" % (host.name, status, answer))
            sockets[host.name] = criu.open_marker_socket("/proc/%d/ns/net" % host.pid, host.defaultIntf().name)
            sockets[host.name].send(build_marker(host.MAC(), sid, host.name))
        deadline = time.monotonic() + timeout
        while not all(m["marker"] for m in controller.get("/violin/snapshots/%s" % sid)[1]["members"]):
            if time.monotonic() > deadline:
                raise BenchError("snapshot %s: not every marker reached the controller" % sid)
            time.sleep(0.02)
        cpu_before = cpu_seconds(controller.process.pid)
        sent = send_cut_requests(controller, hosts, sockets, sid)
        while True:
            view = controller.get("/violin/snapshots/%s" % sid)[1]
            if all(m["cut_time"] is not None for m in view["members"]):  # (state "cut" comes before the barrier)
                break
            if time.monotonic() > deadline + timeout or view["state"] != "running":
                raise BenchError("snapshot %s: in-band cuts not all made: %s" % (sid, view.get("reason") or [
                    m["name"] for m in view["members"] if m["cut_time"] is None]))
            time.sleep(0.05)
        cpu_ms = (cpu_seconds(controller.process.pid) - cpu_before) * 1000.0
    finally:
        for sock in sockets.values():
            sock.close()
    finish_manual_snapshot(controller, sid, names, "bench_cut scale in band")
    # cut_requested: when the frame reached the controller (a packet-in), so the wait splits into the
    # switch's part (send -> packet-in) and the controller's (packet-in -> rules in force)
    return [((m["cut_time"] - sent[m["name"]]) * 1000.0, m["flip_ms"],
             None if m.get("cut_requested") is None else (m["cut_requested"] - sent[m["name"]]) * 1000.0)
            for m in view["members"]], cpu_ms


def read_floor_log(path, label):
    """The floor app's records of snapshot ``label``: member -> {"marker"/"packet_in"/"rules": wall}."""
    found = {}
    with open(path) as handle:
        for line in handle:
            entry = json.loads(line)
            if entry.pop("snapshot") == label:
                found.setdefault(entry.pop("member"), {}).update(entry)
    return found


def wait_floor_connected(floor, hosts, log_path, timeout=20.0):
    """Until every switch of the floor's network has its rule (a marker from each switch's first host
    comes back to the controller)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            scale_round_floor(floor, hosts, "floor-warm-%d" % int(time.monotonic() * 1000), log_path, timeout=1.0)
            return
        except BenchError:
            if time.monotonic() > deadline:
                raise BenchError("the floor controller's switches did not come up in %.0f s" % timeout) from None


def scale_round_floor(controller, hosts, label, log_path, timeout=10.0):
    """The in-band round against ``bench_cut_floor_app`` (no snapshot: each marker adds a hold rule, each
    cut request gets two flow-mods and a barrier at once): [(ms from the frame's send to the barrier
    reply, None, ms from the send to the packet-in)], controller CPU ms, as scale_round_in_band's."""
    from hostside.backends import criu
    from violin_core.packets import build_marker
    names, sockets = [h.name for h in hosts], {}
    try:
        for host in hosts:
            sockets[host.name] = criu.open_marker_socket("/proc/%d/ns/net" % host.pid, host.defaultIntf().name)
            sockets[host.name].send(build_marker(host.MAC(), label, host.name))
        deadline = time.monotonic() + timeout
        while not all("marker" in r for r in read_floor_log(log_path, label).values()) or \
                len(read_floor_log(log_path, label)) < len(names):
            if time.monotonic() > deadline:
                raise BenchError("floor %s: not every marker reached the controller" % label)
            time.sleep(0.02)
        cpu_before = cpu_seconds(controller.process.pid)
        sent = send_cut_requests(controller, hosts, sockets, label)
        while True:
            records = read_floor_log(log_path, label)
            if all("rules" in records.get(n, {}) for n in names):
                break
            if time.monotonic() > deadline + timeout:
                raise BenchError("floor %s: barrier replies missing for %s" % (
                    label, [n for n in names if "rules" not in records.get(n, {})]))
            time.sleep(0.05)
        cpu_ms = (cpu_seconds(controller.process.pid) - cpu_before) * 1000.0
    finally:
        for sock in sockets.values():
            sock.close()
    return [((records[n]["rules"] - sent[n]) * 1000.0, None, (records[n]["packet_in"] - sent[n]) * 1000.0)
            for n in names], cpu_ms


def scale_gets(controller, count):
    """``count`` concurrent GET /violin/health sent as the cuts are: ([wall ms], controller CPU ms)."""
    times = []

    def get():
        began = time.perf_counter()
        controller.request("GET", "/violin/health")
        times.append((time.perf_counter() - began) * 1000.0)
    return times, released_together(controller, [get] * count)


def run_scale(sizes, rounds, baseline, log):
    """The cuts-at-once series on LineTopo(4,16), for this tree's controller and, side by side in the same
    run (rounds interleaved, a network each), for ``baseline``'s."""
    from bench_disruption import locate_all, register
    if baseline:  # named by its commit in the results, not by a ref that moves ("HEAD")
        import subprocess
        named = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", baseline], capture_output=True, text=True)
        baseline = named.stdout.strip() if named.returncode == 0 else baseline
    variants = [("this", None)] + ([("baseline", baseline)] if baseline else [])
    record = {"topology": "LineTopo(%d,%d)" % (SCALE_SWITCHES, SCALE_PER_SWITCH), "sizes": sizes,
              "rounds": rounds, "variants": {}}
    workdir = tempfile.mkdtemp(prefix="bench-cut-scale-")
    in_band_on = {}  # variant -> (controller, hosts): the in-band cut, where the variant has it
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        setups = []
        for name, revision in variants:
            env = export_code(revision, tempfile.mkdtemp(dir=workdir)) if revision else {}
            controller = ControllerProcess(extra_env=env)
            STARTED_CONTROLLERS.append(controller)
            stack.callback(controller.stop)
            topo = LineTopo(SCALE_SWITCHES, SCALE_PER_SWITCH, prefix=run_prefix())
            net = bring_up(stack, controller, topo, "%s %s" % (name, record["topology"]))
            hosts = sorted(net.hosts, key=lambda h: h.name)
            locate_all(net, controller, hosts)
            register(controller, hosts)
            setups.append((name, revision, controller, [h.name for h in hosts]))
            in_band_on[name] = (controller, hosts)
        # The floor: the switch's own part, with a controller that only answers each request at once
        floor_log = os.path.join(workdir, "floor.jsonl")
        open(floor_log, "w").close()
        floor = ControllerProcess(app=os.path.join(ROOT, "scripts", "bench_cut_floor_app.py"), rest=False,
                                  extra_env={"VIOLIN_FLOOR_LOG": floor_log})
        STARTED_CONTROLLERS.append(floor)
        stack.callback(floor.stop)
        floor_net = bring_up(stack, floor, LineTopo(SCALE_SWITCHES, SCALE_PER_SWITCH, prefix=run_prefix()),
                             "floor %s" % record["topology"])
        floor_hosts = sorted(floor_net.hosts, key=lambda h: h.name)
        wait_floor_connected(floor, floor_hosts, floor_log)
        samples = {name: {n: {"cuts": [], "cpu": [], "gets": [], "gets_cpu": []} for n in sizes}
                   for name, *_ in setups}
        in_band = {name: {n: {"cuts": [], "cpu": []} for n in sizes} for name in in_band_on}
        for index in range(rounds):  # sizes and variants interleaved: drift and load hit all alike
            for size in sizes:
                for name, _rev, controller, names in setups:
                    cuts, cpu_ms = scale_round(controller, names[:size], "scale-%d-%d" % (size, index))
                    gets, gets_cpu = scale_gets(controller, size)
                    cell = samples[name][size]
                    cell["cuts"] += cuts
                    cell["cpu"].append(cpu_ms)
                    cell["gets"] += gets
                    cell["gets_cpu"].append(gets_cpu)
                for name, (controller, hosts) in list(in_band_on.items()):
                    try:
                        cuts, cpu_ms = scale_round_in_band(controller, hosts[:size], "scale-frame-%d-%d" % (size, index))
                    except BenchError as error:
                        if name == "this" or "cut_frame" not in str(error):
                            raise
                        log("baseline %s has no in-band cut (%s): cut calls only" % (baseline, error))
                        del in_band_on[name], in_band[name]
                        continue
                    in_band[name][size]["cuts"] += cuts
                    in_band[name][size]["cpu"].append(cpu_ms)
                cuts, cpu_ms = scale_round_floor(floor, floor_hosts[:size], "floor-%d-%d" % (size, index), floor_log)
                in_band.setdefault("floor", {n: {"cuts": [], "cpu": []} for n in sizes})
                in_band["floor"][size]["cuts"] += cuts
                in_band["floor"][size]["cpu"].append(cpu_ms)
            log("scale round %d/%d done" % (index + 1, rounds))
    for name, revision, controller, _names in setups:
        series = {}
        for size in sizes:
            cell = samples[name][size]
            rtt, flip, batch = zip(*cell["cuts"])
            series[str(size)] = {
                "cut_rtt_ms": summary(list(rtt)), "flip_ms": summary(list(flip)),
                # CPU time is counted in clock ticks (10 ms): per call over every round, not per round
                "batch": summary(list(batch)), "controller_cpu_ms_per_cut": round(sum(cell["cpu"]) / len(rtt), 3),
                "health_get_rtt_ms": summary(cell["gets"]),
                "controller_cpu_ms_per_get": round(sum(cell["gets_cpu"]) / len(cell["gets"]), 3),
                "rtt_samples": [round(v, 3) for v in rtt], "health_samples": [round(v, 3) for v in cell["gets"]]}
        one = series[str(sizes[0])]
        record["variants"][name] = {
            "code": revision or "worktree", "series": series,
            "ratio_p50_to_one": {n: round(s["cut_rtt_ms"]["p50"] / one["cut_rtt_ms"]["p50"], 2)
                                 for n, s in series.items()},
            "health_ratio_p50_to_one": {n: round(s["health_get_rtt_ms"]["p50"] / one["health_get_rtt_ms"]["p50"], 2)
                                        for n, s in series.items()}}
        top = series[str(sizes[-1])]
        goal = 2 * one["cut_rtt_ms"]["p50"]
        record["variants"][name]["floor"] = {  # what N separate HTTP calls cost before any flip
            "goal_p50_ms": round(goal, 3), "members": sizes[-1],
            "health_gets_at_once_p50_ms": top["health_get_rtt_ms"]["p50"],
            "controller_cpu_ms_for_n_gets": round(sizes[-1] * top["controller_cpu_ms_per_get"], 3),
            "met": top["cut_rtt_ms"]["p50"] <= goal,
            "rest_floor_above_goal": top["health_get_rtt_ms"]["p50"] > goal}
    for name, cells in in_band.items():  # "in_band": this tree's; "in_band_baseline": the baseline's
        series = {}
        for size in sizes:
            latency, flip, to_controller = zip(*cells[size]["cuts"])
            series[str(size)] = {"request_to_rules_ms": summary(list(latency)),
                                 **({} if None in flip else {"flip_ms": summary(list(flip))}),
                                 **({} if None in to_controller else {  # a baseline may not say
                                     "request_to_packet_in_ms": summary(list(to_controller)),
                                     "packet_in_to_rules_ms": summary([a - b for a, b in zip(latency, to_controller)])}),
                                 "controller_cpu_ms_per_cut": round(sum(cells[size]["cpu"]) / len(latency), 3),
                                 "samples": [round(v, 3) for v in latency]}
        one = series[str(sizes[0])]["request_to_rules_ms"]["p50"]
        record["in_band" if name == "this" else "in_band_" + name] = {
            "what": "cut request frames (what the helper sends once a member runs again), N at once from the "
                    "members' own links: the frame's send -> the member's rules in force (manifest cut_time)"
                    if name != "floor" else
                    "the same frames to scripts/bench_cut_floor_app.py, which answers each packet-in at once with "
                    "two flow-mods and a barrier: the frame's send -> the barrier reply (the switch's own part)",
            "code": {"this": "worktree", "floor": "scripts/bench_cut_floor_app.py"}.get(name, baseline),
            "series": series, "ratio_p50_to_one": {n: round(v["request_to_rules_ms"]["p50"] / one, 2)
                                                   for n, v in series.items()},
            "goal_p50_ms": round(2 * one, 3), "met": series[str(sizes[-1])]["request_to_rules_ms"]["p50"] <= 2 * one}
        top = series[str(sizes[-1])]
        if "request_to_packet_in_ms" in top:  # the switch's part alone: the frames reaching the controller
            record["in_band" if name == "this" else "in_band_" + name]["floor"] = {
                "members": sizes[-1], "request_to_packet_in_p50_ms": top["request_to_packet_in_ms"]["p50"],
                "packet_in_to_rules_p50_ms": top["packet_in_to_rules_ms"]["p50"],
                "switch_part_over_goal": top["request_to_packet_in_ms"]["p50"] > 2 * one}
    return record


IN_BAND_KEYS = ("in_band", "in_band_baseline", "in_band_floor")


def plot_scale(record, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = [str(n) for n in record["sizes"]]
    names = list(record["variants"])
    figure, axis = plt.subplots(figsize=(8, 4.6))
    colours = {"this": "#9ecae1", "baseline": "#fdae6b", "in_band": "#a1d99b", "in_band_baseline": "#e5f5e0",
               "in_band_floor": "#bcbddc"}
    extra = [k for k in IN_BAND_KEYS if record.get(k)] + ["health"]
    width = 0.8 / (len(names) + len(extra))
    handles, labels = [], []
    for slot, name in enumerate(names + extra):
        variant = record["variants"][names[0] if name in extra else name]
        if name.startswith("in_band"):
            data = [record[name]["series"][n]["samples"] for n in sizes]
        else:
            key = "health_samples" if name == "health" else "rtt_samples"
            data = [variant["series"][n][key] for n in sizes]
        where = [i + 1 + (slot - (len(names) + len(extra) - 1) / 2) * width for i in range(len(sizes))]
        boxes = axis.boxplot(data, positions=where, widths=width * 0.9, patch_artist=True, showfliers=False,
                             boxprops={"facecolor": colours.get(name, "#d9d9d9")})
        handles.append(boxes["boxes"][0])
        labels.append("GET /violin/health, N at once (REST floor)" if name == "health" else
                      "cut request frames to a controller answering each at once (the switch's floor)"
                      if name == "in_band_floor" else
                      "cut request frames, N at once (frame -> rules in force; %s)" % record[name]["code"][:12]
                      if name.startswith("in_band") else
                      "POST .../cut, N at once (%s: %s)" % (name, variant["code"][:12]))
    axis.legend(handles, labels, fontsize=8, loc="upper left")
    axis.set_xticks(range(1, len(sizes) + 1), ["%s at once" % n for n in sizes])
    axis.set_ylabel("call wall time (cut request frame: to its rules), ms")
    axis.set_yscale("log")
    axis.set_title("Cuts at once, %s; p50 ratio to one:\n%s" % (record["topology"], "\n".join(
        "%s %s" % (name, ", ".join("%s: %.1fx" % kv for kv in record["variants"][name]["ratio_p50_to_one"].items()))
        for name in names) + "".join("\n%s %s" % (key.replace("_", "-"), ", ".join(
            "%s: %.1fx" % kv for kv in record[key]["ratio_p50_to_one"].items()))
            for key in IN_BAND_KEYS if record.get(key))), fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def print_scale(record):
    print()
    for key in IN_BAND_KEYS:
        if not record.get(key):
            continue
        print("in-band cuts at once (%s), %s: frame -> rules in force, p50 ms (ratio to one)" % (
            record[key]["code"], record["topology"]))
        for size, series in record[key]["series"].items():
            print("  %3s at once: %7.1f (%5.2fx) p90 %7.1f flip p50 %6.1f cpu/cut %5.2f" % (
                size, series["request_to_rules_ms"]["p50"], record[key]["ratio_p50_to_one"][size],
                series["request_to_rules_ms"]["p90"], series.get("flip_ms", {}).get("p50", float("nan")),
                series["controller_cpu_ms_per_cut"])
                + ("  | send -> packet-in p50 %6.1f, packet-in -> rules p50 %6.1f" % (
                    series["request_to_packet_in_ms"]["p50"], series["packet_in_to_rules_ms"]["p50"])
                   if "request_to_packet_in_ms" in series else ""))
    print("cuts at once, %s: p50 ms (ratio to one) / controller CPU ms per call" % record["topology"])
    for name, variant in record["variants"].items():
        for size, series in variant["series"].items():
            print("  %-8s %3s at once: cut %7.1f (%5.2fx) p90 %7.1f flip %6.1f batch p50 %4s cpu/cut %5.2f | "
                  "health %6.1f (%5.2fx) cpu/get %5.2f" % (
                      name, size, series["cut_rtt_ms"]["p50"], variant["ratio_p50_to_one"][size],
                      series["cut_rtt_ms"]["p90"], series["flip_ms"]["p50"], series["batch"]["p50"],
                      series["controller_cpu_ms_per_cut"], series["health_get_rtt_ms"]["p50"],
                      variant["health_ratio_p50_to_one"][size], series["controller_cpu_ms_per_get"]))


# --- main ------------------------------------------------------------------------------


def print_summary(document, out):
    print()
    print("cut overhead, ms                       flip p50  flip p99   rtt p50   rtt p99  pause p50 pause p99  complete")
    for topo in document["overhead"]:
        for key, stats in topo.get("series", {}).items():
            pause = stats.get("pause_ms", {})
            print("%-13s %-24s %9s %9s %9s %9s %9s %9s  %d/%d" % (
                topo["topology"], key, stats["flip_ms"].get("p50"), stats["flip_ms"].get("p99"),
                stats["rtt_ms"].get("p50"), stats["rtt_ms"].get("p99"),
                pause.get("p50", "-"), pause.get("p99", "-"), stats["complete"], stats["snapshots"]))
            if key == "all_at_once":
                print("%38s batch of 8 cuts: p50 %s, p99 %s" % ("", stats["batch_ms"].get("p50"),
                                                               stats["batch_ms"].get("p99")))
            if key == "helper":
                print("%38s datapath wait (%s): p50 %s, p99 %s; whole helper per member p50 %s" % (
                    "", ",".join(stats.get("datapath_wait_how", [])) or "-",
                    stats.get("datapath_wait_ms", {}).get("p50"), stats.get("datapath_wait_ms", {}).get("p99"),
                    stats.get("helper_ms", {}).get("p50")))
    cap = document.get("capacity")
    if cap:
        print()
        print("hold/record capacity (LanTopo(2), hold %.1f s):" % document["parameters"]["capacity_hold_s"])
        for step in cap["steps"]:
            c = step.get("counts") or {}
            a, b = step.get("h1_to_h2") or {}, step.get("h2_to_h1") or {}
            print("  %5d pps/dir try %d: %-4s held %-6s released %-6s recorded %-6s dropped %-3s lost h1->h2 %s, "
                  "h2->h1 pre-cut %s, unrecorded %s, sent %s/%s pps, ctl cpu %s%%" % (
                      step["rate_pps_per_direction"], step["attempt"], "ok" if step["pass"] else "LOSS",
                      c.get("held"), c.get("released"), c.get("recorded"), c.get("dropped"), a.get("missing"),
                      b.get("missing_pre_cut"), b.get("not_recorded"), a.get("achieved_pps"), b.get("achieved_pps"),
                      step.get("controller_cpu_pct")))
            for what in step["failures"] + step.get("flip_race", []) + ([step["note"]] if step.get("note") else []):
                print("        %s" % what)
        print("  largest lossless rate: %s pps per direction (achieved %s)%s" % (
            cap.get("max_lossless_pps_per_direction"), cap.get("max_lossless_achieved_pps"),
            " (the senders could not go faster: seqstream-limited at %s)" % cap["sender_limited_at"]
            if cap.get("sender_limited_at") else
            "" if cap.get("first_failing_rate") else " (no step failed: the sweep's top rate)"))
        if cap.get("first_failure"):
            print("  at %s pps: %s" % (cap["first_failing_rate"], "; ".join(cap["first_failure"])))
    if document.get("concurrent_activity_seen"):
        print("NOTE: other controllers or bridges were running on this machine's Open vSwitch during the run; "
              "the numbers include their noise")
    print("results: %s" % out)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output (default docs/bench/bench_cut.json)")
    parser.add_argument("--quick", action="store_true", help="few snapshots and two rates: a smoke run")
    parser.add_argument("--bg-rate", type=float, default=100.0,
                        help="background datagrams/s from every member to every other (default 100)")
    parser.add_argument("--keep", metavar="DIR", help="copy logs and channel state of failing capacity steps here")
    parser.add_argument("--scale", action="store_true",
                        help="only part 3, cuts at once (issue 11 goal 5): JSON to --out "
                             "(default docs/bench/bench_cut_scale.json) and a PNG (--plot)")
    parser.add_argument("--sizes", default=",".join(map(str, SCALE_SIZES)),
                        help="--scale: members cut at once (default 1,8,32,64; the first is the baseline)")
    parser.add_argument("--rounds", type=int, default=12, help="--scale: snapshots per member count (default 12)")
    parser.add_argument("--baseline", metavar="REV",
                        help="--scale: also run REV's controller side by side (rounds interleaved), e.g. main")
    parser.add_argument("--plot", default=DEFAULT_SCALE_PLOT, help="--scale: PNG of the distributions")
    parser.add_argument("--skip-overhead", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-capacity", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(n) for n in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes: comma-separated member counts, got %r" % args.sizes)
    if not args.sizes or min(args.sizes) < 1 or max(args.sizes) > SCALE_SWITCHES * SCALE_PER_SWITCH:
        parser.error("--sizes: counts between 1 and %d" % (SCALE_SWITCHES * SCALE_PER_SWITCH))
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    if args.scale and args.out == DEFAULT_OUT:
        args.out = DEFAULT_SCALE_OUT
    check_host(parser, ("ovs-vsctl", "ovs-appctl", "mnexec"))
    return args


def new_document(args, parameters, **more):
    """The JSON record's head: when, on what machine, which code, with which parameters."""
    return {"timestamp": timestamp(),
            "machine": machine_info(cpu_model=True, other_ryu_controllers_at_start=other_controllers()),
            "code": code_version(), "parameters": parameters, **more, "out": args.out}


def main_scale(args):
    """``--scale``: part 3 alone, its own JSON and plot."""
    handle_signals()
    log = lambda text: print(text, flush=True)  # noqa: E731
    document = new_document(args, {
        "setup": "N manual members (marker false, no dump, no helper) of LineTopo(4,16); each round starts a "
                 "snapshot of N and sends their N cut calls at once (threads released by one barrier), "
                 "then every member done and the snapshot sealed; then N concurrent GET /violin/health",
        "cut_rtt_ms": "client: wall time of POST .../cut (new TCP connection per request)",
        "flip_ms": "controller: cut request -> barrier replies (answer field flip_ms)",
        "batch": "cuts flipped in the same flow-table pass and barrier (answer field batch)",
        "controller_cpu_ms_per_cut": "controller process user+system CPU from the first call to the last "
                                     "answer, summed over the rounds and divided by the calls",
        "goal": "cut_rtt_ms p50 at 64 <= 2 x p50 at 1 (issue 11 goal 5)",
        "percentiles": "linear interpolation",
    })

    def body():
        document["scale"] = run_scale(args.sizes, args.rounds, args.baseline, log)

    began = time.monotonic()
    error, code = run_guarded(body)
    document["elapsed_s"] = round(time.monotonic() - began, 1)
    document["loadavg_at_end"] = list(os.getloadavg())
    document["error"] = error
    status = save("bench_cut", args.out, document, error, code)
    if status == 0:
        plot_scale(document["scale"], args.plot)
        print_scale(document["scale"])
        print("results: %s, plot %s" % (args.out, args.plot))
    return status


def main(argv=None):
    args = parse_args(argv)
    if args.scale:
        return main_scale(args)
    os.chdir(ROOT)  # the members run ``python -m hostside.marker`` from here
    counts = QUICK if args.quick else FULL
    handle_signals()
    log = lambda text: print(text, flush=True)  # noqa: E731
    document = new_document(args, {
        "quick": args.quick,
        "snapshots": {k: counts[k] for k in ("one_at_a_time", "all_at_once", "with_markers", "helper")},
        "series": {
            "one_at_a_time": "marker false; each member in turn: SIGSTOP, POST cut, SIGCONT, POST done",
            "all_at_once": "marker false; all 8 SIGSTOPped, 8 concurrent POST cut (threads), SIGCONT, done",
            "markers_no_datapath_wait": "marker true; each member in turn: SIGSTOP, marker frame, POST cut, "
                                        "SIGCONT, done (no prepare, no datapath wait)",
            "helper": "marker true; each member in turn through lab.members.ProcessMembers.cut as it is in "
                      "the tree (prepare, wait_datapath, SIGSTOP, marker, cut, wait_datapath, SIGCONT, done)",
        },
        "members": 8, "background_rate_per_peer": args.bg_rate,
        "topologies": ["LanTopo(8): 8 hosts on 1 switch", "LineTopo(4, 2): 4 switches in a line, 2 hosts each"],
        "capacity_rates": counts["rates"], "capacity_hold_s": counts["hold_s"],
        "capacity_setup": "LanTopo(2); h1<->h2 seqstream at R/s per direction, 120-byte datagrams; cut h1 "
                          "(helper path, marker), hold, cut h2, complete",
        "capacity_pass": "no datagram lost or duplicated in either direction, counts.dropped 0, held == "
                         "released, and every pre-cut h2->h1 datagram reaching h1 more than %d ms after h1's "
                         "flip is in channel.pcapng; misses within %d ms of the flip and cut-check problems "
                         "are reported as flip_race (strict_pass excludes them)" % (BOUNDARY_MS, BOUNDARY_MS),
        "flip_ms": "controller: cut request -> barrier replies (response field flip_ms)",
        "rtt_ms": "client: wall time of POST .../cut (new TCP connection per request)",
        "pause_ms": "SIGSTOP -> SIGCONT of the member (markers series: includes the marker; helper: as "
                    "ProcessMembers.cut reports it, includes its datapath wait before SIGCONT)",
        "percentiles": "linear interpolation",
    }, overhead=[], capacity=None)

    def parts():
        if not args.skip_overhead:
            for name, make in (("LanTopo(8)", lambda p: LanTopo(8, prefix=p)),
                               ("LineTopo(4,2)", lambda p: LineTopo(4, 2, prefix=p))):
                document["overhead"].append(run_overhead(name, make(run_prefix()), counts, args.bg_rate, log))
        if not args.skip_capacity:
            document["capacity"] = run_capacity(counts["rates"], counts["hold_s"], log, args.keep)

    began = time.monotonic()
    error, code = run_guarded(parts)
    document["elapsed_s"] = round(time.monotonic() - began, 1)
    document["loadavg_at_end"] = list(os.getloadavg())
    document["error"] = error
    document["concurrent_activity_seen"] = bool(
        document["machine"].get("other_ryu_controllers_at_start")
        or any(t.get("other_controllers_at_end") or t.get("other_bridges_at_end") for t in document["overhead"])
        or any(s.get("other_controllers") or s.get("other_bridges")
               for s in (document.get("capacity") or {}).get("steps", [])))
    status = save("bench_cut", args.out, document, error, code)
    if status == 0:
        print_summary(document, args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
