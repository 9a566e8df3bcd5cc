#!/usr/bin/env python3
"""Container members: pause with the cut versus podman's bare live checkpoint, and snapshot/restore times.

For each container (a Python loop writing a file in its volume, in a network namespace of its own with a
veth, as a topology's host would give it), in the same run, the arms rotated round by round:

  * ``cut``: the podman backend's snapshot (hostside/backends/podman.py): the CRIU post-dump hand-over
    (the compiled action script), the container's files copied while frozen, the marker sent down its
    interface, a cut callback (an HTTP round trip to a local server standing in for the controller's
    cut), the archive rebuilt and stored (a local sink);
  * ``cut_async``: the asynchronous cut the helper takes by default (VIOLIN_CUT=async): while frozen only
    the marker, sent down the interface and waited for until the switch sends it back (a real Open
    vSwitch bridge, userspace datapath, holding the controller's marker rule: marker -> in_port), then the
    cut callback once CRIU has let the tasks go;
  * ``cut`` above is the synchronous cut (VIOLIN_CUT=sync): the callback made while frozen;
  * ``cut_bash_hook``: the synchronous cut with the bash action script it had before (criu.HOOK);
  * ``bare``: ``podman container checkpoint --leave-running --tcp-established --export`` of the same
    container with the same CRIU options (``network-lock nftables`` in its CRIU file), nothing else.
    (With CRIU's default iptables network lock a bare checkpoint freezes about 50 ms longer here.)
  * ``handover`` / ``handover_bash_hook``: the bare checkpoint with the hand-over and an empty cut: what
    the action script costs inside the freeze (CRIU runs it at network-lock, post-dump and network-unlock).

and, interleaved, single runs of each action script by itself (fork, exec, its action filter, exit, wait).

The pause is CRIU's frozen time (podman --print-stats) in every arm. Then the snapshot and restore wall times of
1 and of 4 containers at once (threads, as the helper runs its jobs). Everything runs at ``--nice`` (default
-15): the arms alike, and less at the mercy of whatever else loads the machine. Writes docs/bench/bench_containers.json
and the plot beside it (.png).

    .venv/bin/python scripts/bench_containers.py [--rounds 10] [--out docs/bench/bench_containers.json]
"""

import argparse
import hashlib
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hostside import ovs  # noqa: E402
from hostside.backends import base, podman  # noqa: E402
from lab import containers, lab  # noqa: E402

LOOP = ("import os, time\n"
        "f = open('/data/log', 'a')\n"
        "n = 0\n"
        "while True:\n"
        "    n += 1; f.write('%d\\n' % n); f.flush(); time.sleep(0.005)\n")


class DirSink(base.ImageSink):
    def __init__(self, directory, snapshot, member):
        self.directory, self.snapshot, self.member = directory, snapshot, member
        os.makedirs(directory, exist_ok=True)

    def put_dir(self, directory):
        raise NotImplementedError

    def put_stream(self, name, reader):
        digest, size = hashlib.sha256(), 0
        with open(os.path.join(self.directory, name), "wb") as handle:
            for chunk in iter(lambda: reader.read(1 << 20), b""):
                handle.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        return {"name": name, "bytes": size, "sha256": digest.hexdigest()}


class CutServer(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def median(values):
    return round(statistics.median(values), 1) if values else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds of every arm (on the containers in turn)")
    parser.add_argument("--spawns", type=int, default=200, help="timed runs of each action script by itself")
    parser.add_argument("--nice", type=int, default=-15,
                        help="run every arm at this niceness (children inherit it): on a machine others load, "
                             "the scheduler's waits would drown the differences measured (0: as is)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "bench",
                                                      "bench_containers.json"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_containers: run as root", file=sys.stderr)
        return 2
    containers.ensure_image()
    if args.nice:
        os.nice(args.nice)
    prefix = lab.run_prefix()
    work = tempfile.mkdtemp(prefix="violin-bench-containers-")
    code = os.path.join(work, "loop.py")
    with open(code, "w") as handle:
        handle.write(LOOP)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cut_url = "http://127.0.0.1:%d/cut" % server.server_address[1]
    backend = podman.PodmanBackend(base.HostSettings(work_dir=os.path.join(work, "helper")))
    names = ["%sc%d" % (prefix, i) for i in range(1, 5)]
    bridge = "%sbr" % prefix
    try:
        # The switch the containers' interfaces are plugged into, with the one rule an asynchronous cut
        # needs of it (the controller installs it with the rest: violin_core.fabric's marker rule).
        subprocess.run(["ovs-vsctl", "--may-exist", "add-br", bridge, "--", "set", "bridge", bridge,
                        "datapath_type=netdev"], check=True)
        subprocess.run(["ovs-ofctl", "add-flow", bridge, "priority=1000,dl_type=0x88b5,dl_dst=03:76:69:6f:6c:6d,"
                        "actions=in_port"], check=True)
        for i, name in enumerate(names, 1):
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "link", "add", "%s-e" % name, "type", "veth", "peer", "name", "%s-p" % name],
                           check=True)
            subprocess.run(["ip", "link", "set", "%s-e" % name, "netns", name], check=True)
            for cmd in (["ip", "addr", "add", "10.99.0.%d/24" % i, "dev", "%s-e" % name],
                        ["ip", "link", "set", "%s-e" % name, "up"], ["ip", "link", "set", "lo", "up"]):
                subprocess.run(["ip", "netns", "exec", name] + cmd, check=True)
            subprocess.run(["ip", "link", "set", "%s-p" % name, "up"], check=True)
            subprocess.run(["ovs-vsctl", "add-port", bridge, "%s-p" % name], check=True)
            containers.podman("volume", "create", "%s-data" % name)
            _run(name, code)
        time.sleep(1.0)
        members = [backend.member(n, {"backend": "podman"}) for n in names]

        def snapshot(member, label):
            started = time.monotonic()
            with backend.quiet_proof(member, label) as prove:
                def at_cut():
                    prove()
                    urllib.request.urlopen(urllib.request.Request(cut_url, b"{}", method="POST"), timeout=10).read()
                report = backend.snapshot(member, DirSink(os.path.join(work, "images", label, member.name),
                                                          label, member.name), at_cut)
            return report, (time.monotonic() - started) * 1000

        def snapshot_async(member, label):
            started = time.monotonic()
            with backend.quiet_proof(member, label) as prove:
                def resumed():
                    urllib.request.urlopen(urllib.request.Request(cut_url, b"{}", method="POST"), timeout=10).read()
                def at_cut():  # as the helper does: the marker back, then the datapath purged, still frozen
                    prove(confirm=True)
                    ovs.wait_datapath()
                report = backend.snapshot(member, DirSink(os.path.join(work, "images", label, member.name),
                                                          label, member.name), at_cut, resumed=resumed)
            return report, (time.monotonic() - started) * 1000

        def cut_async(member, label):
            report, wall = snapshot_async(member, label)
            return {"pause_ms": report.pause_ms, "hook_ms": report.details["hook_ms"],
                    "files_ms": report.details["files_ms"], "wall_ms": round(wall, 1),
                    "resumed_after_ms": report.details.get("resumed_after_ms")}

        def bare(member, label):
            # The same CRIU options as the backend's (network-lock nftables), without the action script.
            export = os.path.join(work, "bare-%s-%s.tar" % (label, member.name))
            conf = os.path.join(containers.CONF_DIR, "%s.conf" % member.container_name)
            podman.write_atomically(conf, podman.criu_config())
            started = time.monotonic()
            try:
                result = backend.podman(podman.checkpoint_argv(member.container_name, export))
            finally:
                podman.write_atomically(conf, "")
            wall = (time.monotonic() - started) * 1000
            os.unlink(export)
            return podman.frozen_ms_of(result.stdout), wall

        def handover(member, label, native):
            # Where the cut's extra freeze goes: the bare checkpoint with the backend's hand-over and an
            # empty cut (every action script CRIU runs while frozen, the FIFO round trip, no work).
            export = os.path.join(work, "handover-%s-%s.tar" % (label, member.name))
            conf = os.path.join(containers.CONF_DIR, "%s.conf" % member.container_name)
            with podman.frozen_hand_over(lambda: None, native=native) as hand:
                podman.write_atomically(conf, podman.criu_config(action_script=hand.script))
                try:
                    result = backend.podman(podman.checkpoint_argv(member.container_name, export))
                finally:
                    podman.write_atomically(conf, "")
            os.unlink(export)
            assert hand.fired and hand.native == native, (hand.fired, hand.native)
            return podman.frozen_ms_of(result.stdout)

        def cut(member, label, native):
            backend.native_hook = native
            try:
                report, wall = snapshot(member, label)
            finally:
                backend.native_hook = True
            assert report.details["hook_script"] == ("native" if native else "bash"), report.details
            return {"pause_ms": report.pause_ms, "hook_ms": report.details["hook_ms"],
                    "files_ms": report.details["files_ms"], "wall_ms": round(wall, 1)}

        arms = {  # name -> one checkpoint of member: its figures
            "cut_async": cut_async,
            "cut": lambda m, label: cut(m, label, True),
            "cut_bash_hook": lambda m, label: cut(m, label, False),  # before: the bash action script
            "bare": lambda m, label: dict(zip(("pause_ms", "wall_ms"), bare(m, label))),
            "handover": lambda m, label: {"pause_ms": handover(m, label, True)},
            "handover_bash_hook": lambda m, label: {"pause_ms": handover(m, label, False)},
        }
        kinds = list(arms)
        pairs = []
        for round_ in range(args.rounds):
            member = members[round_ % len(members)]
            shift = round_ % len(kinds)
            pair = {"container": member.name}
            for kind in kinds[shift:] + kinds[:shift]:  # each arm in every position in turn
                for key, value in arms[kind](member, "r%d-%s" % (round_, kind)).items():
                    pair["%s_%s" % (kind, key)] = value
            pairs.append(pair)
            print("round %d %s: %s" % (round_, member.name, ", ".join(
                "%s %.0f" % (k, pair["%s_pause_ms" % k] or -1) for k in kinds)), flush=True)

        # What each of CRIU's action-script runs inside the freeze costs by itself: fork, exec, the action
        # filter, exit, wait (as CRIU's cr_system does), bash hook vs compiled hook, interleaved.
        spawns = {"bash": [], "native": []}
        with podman.frozen_hand_over(lambda: None, native=False) as bash_hook, \
                podman.frozen_hand_over(lambda: None, native=True) as native_hook:
            scripts = {"bash": bash_hook.script, "native": native_hook.script}
            env = dict(os.environ, CRTOOLS_SCRIPT_ACTION="network-lock")
            for _ in range(args.spawns):
                for kind, script in scripts.items():
                    began = time.monotonic()
                    pid = os.fork()
                    if pid == 0:
                        try:
                            os.execve(script, [script], env)
                        finally:
                            os._exit(127)
                    _, status = os.waitpid(pid, 0)
                    assert status == 0, (kind, status)
                    spawns[kind].append((time.monotonic() - began) * 1000)
        spawn_ms = {kind: {"median": round(statistics.median(v), 2), "p90": round(sorted(v)[int(len(v) * 0.9)], 2)}
                    for kind, v in spawns.items()}
        print("one action-script run: %s" % spawn_ms, flush=True)

        def together(fn, group):
            results, threads = {}, []
            for member in group:
                thread = threading.Thread(target=lambda m=member: results.__setitem__(m.name, fn(m)))
                threads.append(thread)
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return round((time.monotonic() - started) * 1000, 1), results

        walls = {}
        for count in (1, 4):
            group = members[:count]
            label = "wall-%d" % count
            snap_ms, _ = together(lambda m: snapshot_async(m, label), group)
            staged = {m.name: os.path.join(work, "images", label, m.name) for m in group}
            restore_ms, _ = together(lambda m: (backend.restore(m, staged[m.name]), backend.resume(m)), group)
            walls[str(count)] = {"snapshot_ms": snap_ms, "restore_ms": restore_ms}
            print("%d container(s): snapshot %.0f ms, restore %.0f ms (wall, together)" % (count, snap_ms, restore_ms))
        def pauses(kind):
            return [p["%s_pause_ms" % kind] for p in pairs if p.get("%s_pause_ms" % kind) is not None]

        def ratio(kind):
            per_pair = [p["%s_pause_ms" % kind] / p["bare_pause_ms"] for p in pairs
                        if p.get("%s_pause_ms" % kind) and p.get("bare_pause_ms")]
            return {"median_ms": median(pauses(kind)),
                    "ratio_of_medians": round(median(pauses(kind)) / median(pauses("bare")), 3),
                    "ratio_median_per_pair": round(statistics.median(per_pair), 3) if per_pair else None}

        doc = {"what": "podman container members: CRIU frozen time with the cut (hand-over, files, marker, cut "
                       "round trip; compiled action script, and the bash one it replaced) vs podman's bare live "
                       "checkpoint and vs the bare checkpoint with an empty hand-over (each action script), same "
                       "containers, arms rotated, one run; snapshot/restore wall times of 1 and 4 containers "
                       "at once",
               "podman": subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip(),
               "runtime": subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
               "criu": podman.criu.CRIU, "rounds": args.rounds, "nice": os.nice(0),
               "pause_ms": dict({"cut_median": median(pauses("cut_async")), "bare_median": median(pauses("bare")),
                                 "goal_ratio": 1.10, "cut": "async"},
                                **{k: v for k, v in ratio("cut_async").items() if k != "median_ms"}),
               "arms": {kind: ratio(kind) for kind in kinds if kind != "bare"},
               "action_script_run_ms": dict(spawn_ms, runs=args.spawns, inside_each_freeze=3),
               "hook_ms_median": median([p["cut_async_hook_ms"] for p in pairs]),
               "files_ms_median": median([p["cut_async_files_ms"] for p in pairs]),
               "sync_hook_ms_median": median([p["cut_hook_ms"] for p in pairs]),
               "wall_ms": walls, "pairs": pairs, "load_1min": os.getloadavg()[0]}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(doc, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, args.out)
        plot(doc, os.path.splitext(args.out)[0] + ".png")
        print(json.dumps(doc["pause_ms"]), json.dumps(doc["arms"]), json.dumps(walls))
        return 0
    finally:
        server.shutdown()
        subprocess.run(["ovs-vsctl", "--if-exists", "del-br", bridge], capture_output=True)
        for name in names:
            containers.remove_container(name, "%s-data" % name)
            subprocess.run(["ip", "link", "del", "%s-p" % name], capture_output=True)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def plot(doc, path):
    """The pause of every arm, each round's points joined (docs/bench/bench_containers.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = ["bare", "handover", "handover_bash_hook", "cut_async", "cut", "cut_bash_hook"]
    labels = ["bare\ncheckpoint", "+ empty\nhand-over", "+ empty\nhand-over\n(bash hook)", "with the cut\n(async,\ndefault)",
              "with the cut\n(sync)", "with the cut\n(sync,\nbash hook)"]
    figure, axes = plt.subplots(figsize=(8, 4.2))
    for pair in doc["pairs"]:
        axes.plot(range(len(kinds)), [pair.get("%s_pause_ms" % k) for k in kinds], color="0.8", lw=0.8, zorder=1)
    for i, kind in enumerate(kinds):
        values = [p["%s_pause_ms" % kind] for p in doc["pairs"] if p.get("%s_pause_ms" % kind) is not None]
        axes.scatter([i] * len(values), values, s=14, zorder=2)
        axes.hlines(statistics.median(values), i - 0.3, i + 0.3, color="k", zorder=3)
    axes.set_xticks(range(len(kinds)))
    axes.set_xticklabels(labels, fontsize=8)
    axes.set_ylabel("CRIU frozen time (ms)")
    axes.set_title("container pause, %d rounds, arms rotated (load %.0f); bar: median" % (
        doc["rounds"], doc["load_1min"]), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _run(name, code):
    conf = os.path.join(containers.CONF_DIR, "%s.conf" % name)
    os.makedirs(containers.CONF_DIR, exist_ok=True)
    open(conf, "a").close()
    containers.podman("run", "-d", "--runtime", "runc", "--name", name, "--network",
                      "ns:%s" % containers.netns_path(name), "--annotation", "org.criu.config=%s" % conf,
                      *containers.ULIMITS, "-v", "%s-data:/data" % name, "-v", "%s:/opt/code/loop.py:ro" % code,
                      containers.IMAGE, "python3", "/opt/code/loop.py")


if __name__ == "__main__":
    sys.exit(main())
