#!/usr/bin/env python3
"""The GENI-VIOLIN demo, end to end (the README's main command runs it after set-up).

On the demo LAN (members h1-h4 on two Open vSwitch switches under
violin-controller, snapshot servers ss1 and ss2 reached out of band), a
distributed Mandelbrot runs: a master in h1 hands rows to workers in h2-h4
over TCP. violin-helper snapshots the four members every few seconds (CRIU,
cut coordinated in the network). Mid-run, h3 and h4 "fail" (their processes
are killed); the whole slice is restored from the latest complete snapshot and
finishes. The image must be bit-identical to an uninterrupted run's. Prints a
timeline and writes the image as a PNG. Tears down only what it created.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hostside import mandelbrot  # noqa: E402
from topologies import lab, slicelab  # noqa: E402
from topologies.violin_demo import ViolinDemoTopo  # noqa: E402

SERVER_PORT = 7070


class Timeline:
    def __init__(self):
        self.started = time.monotonic()

    def say(self, text):
        print("[%6.2f s] %s" % (time.monotonic() - self.started, text), flush=True)


def start_in_host(host, workdir, argv, log_name):
    """A process in ``host`` whose stdio and cwd are opened inside the host (CRIU can dump it)."""
    os.makedirs(workdir, exist_ok=True)
    open(os.path.join(workdir, "stdin"), "a").close()
    command = "cd %s && exec %s <stdin >%s 2>&1" % (shlex.quote(workdir), " ".join(shlex.quote(a) for a in argv),
                                                  shlex.quote(log_name))
    return host.popen(["sh", "-c", command], stdin=None, stdout=None, stderr=None)


def read_progress(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def run(args, timeline):
    workdir = tempfile.mkdtemp(prefix="violin-demo-")
    controller = lab.ControllerProcess(
        command=[os.path.join(os.path.dirname(sys.executable), "violin-controller")],
        config=dict(slicelab.controller_config(), state={"directory": os.path.join(workdir, "catalogue")}))
    processes, daemons, reaping = {}, [], threading.Event()

    def reap():
        while not reaping.wait(0.05):
            for process in list(processes.values()):
                process.poll()

    try:
        controller.start()
        timeline.say("violin-controller up (OpenFlow :%d, REST %s/violin)" % (controller.of_port, controller.url))
        topo = ViolinDemoTopo(prefix=lab.run_prefix())
        with lab.network(topo, controller) as net:
            get = lambda name: net.get(topo.prefix + name)  # noqa: E731
            members = [get(n) for n in ("h1", "h2", "h3", "h4")]
            loss = net.pingAll(timeout=2)
            timeline.say("demo LAN up: members h1-h4, snapshot servers ss1 ss2, two switches; pingall loss %.0f%%"
                         % loss)
            servers = []
            for index, name in enumerate(("ss1", "ss2"), 1):
                address, _ = lab.attach_out_of_band(net, get(name), index, topo.prefix)
                processes[name] = start_in_host(get(name), os.path.join(workdir, name), [
                    sys.executable, "-m", "hostside.server", "--listen", "0.0.0.0:%d" % SERVER_PORT,
                    "--dir", os.path.join(workdir, name, "images"), "--token", slicelab.SERVER_TOKEN], "server.log")
                servers.append("http://%s:%d" % (address, SERVER_PORT))
            for url in servers:
                _wait_health(url)
            timeline.say("snapshot servers on ss1 and ss2, reached out of band: %s" % ", ".join(servers))

            width, height, iterations = args.width, args.height, args.iterations
            master = members[0]
            processes["h1"] = start_in_host(master, os.path.join(workdir, "h1"), [
                sys.executable, mandelbrot.__file__, "master", "--bind", master.IP(), "--port", "47100",
                "--width", str(width), "--height", str(height), "--iterations", str(iterations), "--workers", "3",
                "--out", "image.png", "--progress", "progress.json"], "master.log")
            for i, host in enumerate(members[1:], 2):
                processes[host.name[len(topo.prefix):]] = start_in_host(host, os.path.join(workdir, "h%d" % i), [
                    sys.executable, mandelbrot.__file__, "worker", "--master", "%s:47100" % master.IP(),
                    "--id", str(i), "--delay-ms", str(args.delay_ms)], "worker.log")
            threading.Thread(target=reap, daemon=True).start()
            progress_path = os.path.join(workdir, "h1", "progress.json")
            helper_port = lab.free_port()
            helper_url = "http://127.0.0.1:%d" % helper_port
            config = {"listen": "127.0.0.1:%d" % helper_port, "token": slicelab.HELPER_TOKEN,
                      "controller_token": controller.token, "servers": servers,
                      "server_token": slicelab.SERVER_TOKEN, "work_dir": os.path.join(workdir, "helper"),
                      "members": {h.name: {"pid": processes[h.name[len(topo.prefix):]].pid,
                                           "netns": "/proc/%d/ns/net" % h.pid, "mntns": "/proc/%d/ns/mnt" % h.pid,
                                           "workdir": os.path.join(workdir, h.name[len(topo.prefix):]),
                                           "iface": str(h.defaultIntf()), "mac": h.MAC()} for h in members}}
            with open(os.path.join(workdir, "helper.json"), "w") as handle:
                json.dump(config, handle)
            daemons.append(slicelab.start_daemon([sys.executable, "-m", "hostside.helper", "--config",
                                                  os.path.join(workdir, "helper.json")], helper_url,
                                                 os.path.join(workdir, "helper.log")))
            for h in members:
                _ok(controller.request("POST", "/violin/members", {
                    "name": h.name, "macs": [h.MAC()], "helper_url": helper_url, "backend": "criu"}), 201)
            _ok(controller.request("PUT", "/violin/schedule", {"interval_s": args.every, "keep": 3}), 200)
            timeline.say("Mandelbrot %dx%d running: master in h1, workers in h2-h4; a snapshot every %.0f s"
                         % (width, height, args.every))

            seen, failed_at = set(), None
            while True:
                time.sleep(0.1)
                progress = read_progress(progress_path)
                done = progress.get("rows_done", 0)
                _, listing = controller.get("/violin/snapshots")
                for snap in listing["snapshots"]:
                    if snap["state"] != "running" and snap["id"] not in seen:
                        seen.add(snap["id"])
                        pauses = ", ".join("%s %.0f ms" % (m["name"][len(topo.prefix):], m.get("pause_ms") or 0)
                                           for m in snap["members"])
                        timeline.say("snapshot %s %s%s (pauses: %s; channel state %d frames)" % (
                            snap["id"], snap["state"], ": " + snap["reason"] if snap.get("reason") else "",
                            pauses, (snap.get("channel") or {}).get("frames", 0)))
                complete = [s for s in listing["snapshots"] if s["state"] == "complete"]
                if complete and done >= height * args.fail_at:
                    failed_at = done
                    break
                if progress.get("done"):
                    raise lab.LabError("the run finished before the failure; use a larger --delay-ms")
            for name in ("h3", "h4"):
                os.kill(processes[name].pid, signal.SIGKILL)
            timeline.say("FAILURE: h3 and h4 killed at row %d of %d" % (failed_at, height))
            controller.request("DELETE", "/violin/schedule")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # a snapshot may be under way: let it end
                _, listing = controller.get("/violin/snapshots")
                if all(s["state"] != "running" for s in listing["snapshots"]):
                    break
                time.sleep(0.1)
            latest = [s for s in listing["snapshots"] if s["state"] == "complete"][-1]
            at_rows = "?"
            status, job = controller.request("POST", "/violin/snapshots/%s/restore" % latest["id"], {})
            _ok((status, job), 202)
            job = slicelab.wait_for(controller, "/violin/restores/%s" % job["id"], timeout=120)
            if job["state"] != "complete":
                raise lab.LabError("restore failed: %s" % job["reason"])
            at_rows = read_progress(progress_path).get("rows_done", "?")
            timeline.say("RESTORED all four members from %s (back at row %s): %s; %d frames re-injected" % (
                latest["id"], at_rows, ", ".join("%s %.0f ms" % (phase, job["timings_ms"][phase]) for phase in
                                                 ("staging", "restoring", "reinjecting", "resuming")),
                job["reinjected_frames"]))
            deadline = time.monotonic() + args.timeout
            while not read_progress(progress_path).get("done") and time.monotonic() < deadline:
                time.sleep(0.2)
            if not read_progress(progress_path).get("done"):
                raise lab.LabError("the restored run did not finish in %.0f s" % args.timeout)
            image = os.path.join(workdir, "h1", "image.png")
            for _ in range(50):
                if os.path.exists(image):
                    break
                time.sleep(0.1)
            with open(image, "rb") as handle:
                produced = handle.read()
            shutil.copyfile(image, args.out)
            identical = produced == mandelbrot.expected_image(width, height, iterations)
            timeline.say("finished: %s written; %s an uninterrupted run's image" % (
                args.out, "bit-identical to" if identical else "DIFFERENT FROM"))
            return identical
    finally:
        reaping.set()
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        for daemon in daemons:
            slicelab.stop_daemon(daemon)
        controller.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_health(url, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if lab.http_json(url + "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise lab.LabError("snapshot server %s did not answer" % url)


def _ok(answer, status):
    if answer[0] != status:
        raise lab.LabError("controller answered %s: %s" % (answer[0], answer[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--delay-ms", type=int, default=250, help="per row and worker: how long the run takes")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between snapshots (default 3)")
    parser.add_argument("--fail-at", type=float, default=0.5, help="fraction of rows done at the failure")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--out", default="mandelbrot.png", help="where to write the image (default ./mandelbrot.png)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (Mininet, Open vSwitch and CRIU need it)", file=sys.stderr)
        return 2
    timeline = Timeline()
    try:
        identical = run(args, timeline)
    except (lab.LabError, OSError) as error:
        timeline.say("demo FAILED: %s" % error)
        return 1
    timeline.say("demo %s" % ("PASSED" if identical else "FAILED"))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
