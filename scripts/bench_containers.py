#!/usr/bin/env python3
"""Container members: pause with the cut versus podman's bare live checkpoint, and snapshot/restore times.

For each container (a Python loop writing a file in its volume, in a network namespace of its own with a
veth, as a topology's host would give it), alternately, in the same run:

  * ``cut``: the podman backend's snapshot (hostside/backends/podman.py): the CRIU post-dump hand-over,
    the container's files copied while frozen, the marker sent down its interface, a cut callback (an
    HTTP round trip to a local server standing in for the controller's cut), the archive rebuilt and
    stored (a local sink);
  * ``bare``: ``podman container checkpoint --leave-running --tcp-established --export`` of the same
    container with the same CRIU options (``network-lock nftables`` in its CRIU file), nothing else.
    (With CRIU's default iptables network lock a bare checkpoint freezes about 50 ms longer here.)

The pause is CRIU's frozen time (podman --print-stats) in both. Then the snapshot and restore wall times of
1 and of 4 containers at once (threads, as the helper runs its jobs). Writes docs/bench/bench_containers.json.

    .venv/bin/python scripts/bench_containers.py [--rounds 8] [--out docs/bench/bench_containers.json]
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
    parser.add_argument("--rounds", type=int, default=8, help="cut/bare pairs per container")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "bench",
                                                      "bench_containers.json"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_containers: run as root", file=sys.stderr)
        return 2
    containers.ensure_image()
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
    try:
        for i, name in enumerate(names, 1):
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "link", "add", "%s-e" % name, "type", "veth", "peer", "name", "%s-p" % name],
                           check=True)
            subprocess.run(["ip", "link", "set", "%s-e" % name, "netns", name], check=True)
            for cmd in (["ip", "addr", "add", "10.99.0.%d/24" % i, "dev", "%s-e" % name],
                        ["ip", "link", "set", "%s-e" % name, "up"], ["ip", "link", "set", "lo", "up"]):
                subprocess.run(["ip", "netns", "exec", name] + cmd, check=True)
            subprocess.run(["ip", "link", "set", "%s-p" % name, "up"], check=True)
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

        pairs = []
        for round_ in range(args.rounds):
            member = members[round_ % len(members)]
            order = ("cut", "bare") if round_ % 2 == 0 else ("bare", "cut")
            pair = {"container": member.name}
            for kind in order:
                if kind == "cut":
                    report, wall = snapshot(member, "pair-%d" % round_)
                    pair.update(cut_pause_ms=report.pause_ms, cut_hook_ms=report.details["hook_ms"],
                                cut_wall_ms=round(wall, 1))
                else:
                    frozen, wall = bare(member, "pair-%d" % round_)
                    pair.update(bare_pause_ms=frozen, bare_wall_ms=round(wall, 1))
            pairs.append(pair)
            print("round %d %s: cut %.0f ms (hook %.0f) vs bare %.0f ms" % (
                round_, member.name, pair["cut_pause_ms"], pair["cut_hook_ms"], pair["bare_pause_ms"]), flush=True)

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
            snap_ms, _ = together(lambda m: snapshot(m, label), group)
            staged = {m.name: os.path.join(work, "images", label, m.name) for m in group}
            restore_ms, _ = together(lambda m: (backend.restore(m, staged[m.name]), backend.resume(m)), group)
            walls[str(count)] = {"snapshot_ms": snap_ms, "restore_ms": restore_ms}
            print("%d container(s): snapshot %.0f ms, restore %.0f ms (wall, together)" % (count, snap_ms, restore_ms))
        cut = [p["cut_pause_ms"] for p in pairs]
        plain = [p["bare_pause_ms"] for p in pairs if p["bare_pause_ms"] is not None]
        ratios = [p["cut_pause_ms"] / p["bare_pause_ms"] for p in pairs if p["bare_pause_ms"]]
        doc = {"what": "podman container members: CRIU frozen time with the cut (hand-over, files, marker, cut "
                       "round trip) vs podman's bare live checkpoint, same containers, alternating, one run; "
                       "snapshot/restore wall times of 1 and 4 containers at once",
               "podman": subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip(),
               "runtime": subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
               "criu": podman.criu.CRIU, "rounds": args.rounds,
               "pause_ms": {"cut_median": median(cut), "bare_median": median(plain),
                            "ratio_of_medians": round(median(cut) / median(plain), 3) if plain else None,
                            "ratio_median_per_pair": round(statistics.median(ratios), 3) if ratios else None,
                            "goal_ratio": 1.10},
               "hook_ms_median": median([p["cut_hook_ms"] for p in pairs]),
               "wall_ms": walls, "pairs": pairs, "load_1min": os.getloadavg()[0]}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(doc, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, args.out)
        print(json.dumps(doc["pause_ms"]), json.dumps(walls))
        return 0
    finally:
        server.shutdown()
        for name in names:
            containers.remove_container(name, "%s-data" % name)
            subprocess.run(["ip", "link", "del", "%s-p" % name], capture_output=True)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


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
