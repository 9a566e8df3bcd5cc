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

With ``--vms`` the members are the seed's: four QEMU VMs under libvirt (vm1,
vm2 on s1; vm3, vm4 on s2) running guest/vmandel.c, snapshotted by a fake
live migration to the snapshot servers; vm3 and vm4 are destroyed mid-run.

With ``--containers`` the members are podman containers (one in each of h1-h4, joined to the host's
network namespace, the image of scripts/build_container_image.sh), checkpointed live by podman/runc/CRIU
with the cut in CRIU's post-dump; the containers of h3 and h4 are killed mid-run.

Every API call goes over HTTPS, verified against the set-up's lab CA
(scripts/make_tls.sh, in /var/lib/violin-snapshot/tls; made here if missing);
``--plain-http`` runs it on HTTP instead.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import mandelbrot  # noqa: E402
from lab import lab, slicelab  # noqa: E402
from violin_client.api import ApiClient, Unreachable, wait_until_done  # noqa: E402
from topologies.violin_demo import ViolinDemoTopo  # noqa: E402

SERVER_PORT = 7070
TLS_DIR = "/var/lib/violin-snapshot/tls"
OUT_OF_BAND = ("169.254.1.1", "169.254.2.1")  # the snapshot servers' addresses (lab.attach_out_of_band)


class Timeline:
    def __init__(self):
        self.started = time.monotonic()

    def say(self, text):
        print("[%6.2f s] %s" % (time.monotonic() - self.started, text), flush=True)


def start_in_host(host, workdir, argv, log_name, env=None):
    """A process in ``host`` whose stdio and cwd are opened inside the host (CRIU can dump it)."""
    os.makedirs(workdir, exist_ok=True)
    open(os.path.join(workdir, "stdin"), "a").close()
    command = "cd %s && exec %s <stdin >%s 2>&1" % (shlex.quote(workdir), " ".join(shlex.quote(a) for a in argv),
                                                  shlex.quote(log_name))
    return host.popen(["sh", "-c", command], stdin=None, stdout=None, stderr=None, env=env)


def read_progress(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


class ProcessRun:
    """The Mandelbrot in processes of the member hosts, snapshotted by CRIU."""

    kind = "processes"

    def __init__(self, args, net, get, workdir, processes):
        self.args, self.workdir, self.processes = args, workdir, processes
        self.members = [get(n) for n in ("h1", "h2", "h3", "h4")]
        self.progress_path = os.path.join(workdir, "h1", "progress.json")

    def start(self):
        args, master = self.args, self.members[0]
        self.processes["h1"] = start_in_host(master, os.path.join(self.workdir, "h1"), [
            sys.executable, mandelbrot.__file__, "master", "--bind", master.IP(), "--port", "47100",
            "--width", str(args.width), "--height", str(args.height), "--iterations", str(args.iterations),
            "--workers", "3", "--out", "image.png", "--progress", "progress.json"], "master.log")
        for i, host in enumerate(self.members[1:], 2):
            self.processes["h%d" % i] = start_in_host(host, os.path.join(self.workdir, "h%d" % i), [
                sys.executable, mandelbrot.__file__, "worker", "--master", "%s:47100" % master.IP(),
                "--id", str(i), "--delay-ms", str(args.delay_ms)], "worker.log")
        return "master in h1, workers in h2-h4 (processes, CRIU)"

    def helper_members(self):  # by Mininet host and command line: the helper finds pid, namespaces and MAC
        return {h.name: {"backend": "criu", "mininet_host": h.name, "command": mandelbrot.__file__,
                         "workdir": os.path.join(self.workdir, "h%d" % i)} for i, h in enumerate(self.members, 1)}

    def rows_done(self):
        progress = read_progress(self.progress_path)
        return progress.get("rows_done", 0), bool(progress.get("done"))

    def fail(self):
        for name in ("h3", "h4"):
            os.kill(self.processes[name].pid, signal.SIGKILL)
        return "h3 and h4 killed"

    def image(self):
        path = os.path.join(self.workdir, "h1", "image.png")
        for _ in range(50):
            if os.path.exists(path):
                break
            time.sleep(0.1)
        with open(path, "rb") as handle:
            return handle.read()


class ContainerRun:
    """The Mandelbrot in four podman containers (one per member host), snapshotted by podman checkpoints."""

    kind = "containers"

    def __init__(self, args, net, get, workdir, processes):
        from lab import containers
        self.containers, self.args = containers, args
        self.members = [get(n) for n in ("h1", "h2", "h3", "h4")]
        self.started = []

    def volume(self, host):
        return "%s-data" % host.name

    def start(self):
        containers, args, master = self.containers, self.args, self.members[0]
        containers.ensure_image()
        for i, host in enumerate(self.members, 1):
            netns = containers.attach_netns(host)
            self.started.append(host)
            if i == 1:
                argv = ["python3", "%s/mandelbrot.py" % containers.WORKLOADS, "master", "--bind", master.IP(),
                        "--port", "47100", "--width", str(args.width), "--height", str(args.height),
                        "--iterations", str(args.iterations), "--workers", "3", "--out", "image.png",
                        "--progress", "progress.json"]
            else:
                argv = ["python3", "%s/mandelbrot.py" % containers.WORKLOADS, "worker", "--master",
                        "%s:47100" % master.IP(), "--id", str(i), "--delay-ms", str(args.delay_ms)]
            containers.run_container(host.name, netns, argv, self.volume(host))
        self.master_dir = containers.volume_dir(self.volume(master))
        return "master in h1, workers in h2-h4 (podman containers in the hosts' namespaces, runc + CRIU)"

    def stop(self):
        for host in self.started:
            self.containers.remove_container(host.name, self.volume(host))
            self.containers.detach_netns(host.name)

    def helper_members(self):
        return {h.name: {"backend": "podman", "container": h.name} for h in self.members}

    def registrations(self):
        return [{"name": h.name, "macs": [h.MAC()], "backend": "podman"} for h in self.members]

    def rows_done(self):
        progress = read_progress(os.path.join(self.master_dir, "progress.json"))
        return progress.get("rows_done", 0), bool(progress.get("done"))

    def fail(self):
        for host in self.members[2:]:
            self.containers.podman("kill", "--signal", "KILL", host.name)
        return "the containers of h3 and h4 killed"

    def image(self):
        path = os.path.join(self.master_dir, "image.png")
        for _ in range(50):
            if os.path.exists(path):
                break
            time.sleep(0.1)
        with open(path, "rb") as handle:
            return handle.read()


class VmRun:
    """The Mandelbrot in four VMs (guest/vmandel.c) on the demo LAN, snapshotted by fake live migration."""

    kind = "VMs"

    def __init__(self, args, net, get, workdir, processes):
        from lab import vms
        self.vms, self.args, self.monitor = vms, args, get("h1")  # h1 only looks: it is no member here
        switches = (get("s1").name, get("s1").name, get("s2").name, get("s2").name)
        self.master_ip = "10.0.0.101"
        prefix = get("s1").name[:-2]
        self.guests = []
        for i in range(1, 5):
            if i == 1:
                run = ["vmandel", "master", "--bind", self.master_ip, "--port", "47100", "--width", str(args.width),
                       "--height", str(args.height), "--iterations", str(args.iterations), "--workers", "3"]
            else:
                run = ["vmandel", "worker", "--master", "%s:47100" % self.master_ip, "--id", str(i),
                       "--delay-ms", str(args.delay_ms)]
            self.guests.append(vms.Guest("%svm%d" % (prefix, i), "10.0.0.%d/8" % (100 + i),
                                         "52:54:00:76:01:%02x" % i, switches[i - 1], run))
        self._booted = None

    def start(self):
        self._booted = self.vms.guests(self.guests)
        self._booted.__enter__()
        return "master in vm1, workers in vm2-vm4 (QEMU/TCG VMs under libvirt, on s1 and s2)"

    def stop(self):
        if self._booted is not None:
            self._booted.__exit__(None, None, None)

    def helper_members(self):  # by domain: the helper reads the tap and MAC from the domain's XML
        return {g.name: {"backend": "libvirt", "domain": g.name} for g in self.guests}

    def _fetch(self):
        code = ("import sys; sys.path.insert(0, %r); from workloads import mandelbrot; "
                "w, h, i, done, pixels = mandelbrot.fetch_image(%r, 47101, 5.0); "
                "sys.stdout.write('%%d %%d ' %% (done, h) + (pixels.hex() if pixels else ''))"
                % (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), self.master_ip))
        return self.monitor.cmd("%s -c %s" % (shlex.quote(sys.executable), shlex.quote(code))).split()

    def rows_done(self):
        answer = self._fetch()
        if len(answer) < 2 or not all(a.isdigit() for a in answer[:2]):
            return 0, False  # the master is not up yet, or paused
        return int(answer[0]), int(answer[0]) == int(answer[1])

    def fail(self):
        import libvirt
        conn = libvirt.open(self.vms.URI)
        try:
            for guest in self.guests[2:]:
                conn.lookupByName(guest.name).destroy()
        finally:
            conn.close()
        return "vm3 and vm4 destroyed"

    def image(self):
        answer = self._fetch()
        if len(answer) != 3:
            raise lab.LabError("the master has no complete image: %s" % " ".join(answer)[:200])
        width, height, pixels = self.args.width, self.args.height, bytes.fromhex(answer[2])
        return mandelbrot.encode_png(width, height, [pixels[y * width:(y + 1) * width] for y in range(height)])


def tls_pair(directory):
    """The lab CA and server certificate (for 127.0.0.1 and the servers' addresses), made if missing."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_tls.sh")
    made = subprocess.run(["bash", script, directory, *OUT_OF_BAND], capture_output=True, text=True)
    if made.returncode != 0:
        raise lab.LabError("cannot make the TLS pair in %s: %s" % (directory, made.stderr.strip()))
    return {"cert": os.path.join(directory, "server.crt"), "key": os.path.join(directory, "server.key"),
            "ca": os.path.join(directory, "ca.crt")}


def run(args, timeline):
    workdir = tempfile.mkdtemp(prefix="violin-demo-")
    tls = None if args.plain_http else tls_pair(args.tls_dir)
    scheme, ca_file = ("https", tls["ca"]) if tls else ("http", None)
    config = dict(slicelab.controller_config(), state={"directory": os.path.join(workdir, "catalogue")})
    if tls:
        config["api"].update(tls_cert=tls["cert"], tls_key=tls["key"], ca_file=tls["ca"])
    controller = lab.ControllerProcess(
        command=[os.path.join(os.path.dirname(sys.executable), "violin-controller")], config=config, ca_file=ca_file)
    processes, daemons, reaping, workload = {}, [], threading.Event(), None

    def reap():
        while not reaping.wait(0.05):
            for process in list(processes.values()):
                process.poll()

    try:
        controller.start()
        timeline.say("violin-controller up (OpenFlow :%d, REST %s/violin)%s" % (
            controller.of_port, controller.url, "; every API over HTTPS, CA %s" % ca_file if tls else ""))
        topo = ViolinDemoTopo(prefix=lab.run_prefix())
        with lab.network(topo, controller) as net:
            get = lambda name: net.get(topo.prefix + name)  # noqa: E731
            loss = net.pingAll(timeout=2)
            timeline.say("demo LAN up: hosts h1-h4, snapshot servers ss1 ss2, two switches; pingall loss %.0f%%"
                         % loss)
            servers = []
            for index, name in enumerate(("ss1", "ss2"), 1):
                address, _ = lab.attach_out_of_band(net, get(name), index, topo.prefix)
                processes[name] = start_in_host(get(name), os.path.join(workdir, name), [
                    sys.executable, "-m", "hostside.store.server", "--listen", "0.0.0.0:%d" % SERVER_PORT,
                    "--store", "chunks:" + os.path.join(workdir, name, "images")]
                    + (["--tls-cert", tls["cert"], "--tls-key", tls["key"]] if tls else []), "server.log",
                    env=dict(os.environ, VIOLIN_SERVER_TOKEN=slicelab.SERVER_TOKEN))  # not in argv: ps shows it
                servers.append("%s://%s:%d" % (scheme, address, SERVER_PORT))
            for url in servers:
                _wait_health(url, ca_file=ca_file)
            timeline.say("snapshot servers on ss1 and ss2, reached out of band: %s" % ", ".join(servers))

            workload = (VmRun if args.vms else ContainerRun if args.containers else ProcessRun)(
                args, net, get, workdir, processes)
            where = workload.start()
            threading.Thread(target=reap, daemon=True).start()
            helper_port = lab.free_port()
            helper_url = "%s://127.0.0.1:%d" % (scheme, helper_port)
            config = {"listen": "127.0.0.1:%d" % helper_port, "token": slicelab.HELPER_TOKEN,
                      "controller_token": controller.token, "servers": servers,
                      "server_token": slicelab.SERVER_TOKEN, "work_dir": os.path.join(workdir, "helper"),
                      "controller": controller.url, "host_name": "demo", "members": workload.helper_members()}
            if tls:
                config.update(tls_cert=tls["cert"], tls_key=tls["key"], ca_file=tls["ca"])
            with open(os.path.join(workdir, "helper.json"), "w") as handle:
                json.dump(config, handle)
            daemons.append(slicelab.start_daemon([sys.executable, "-m", "hostside.helper", "--config",
                                                  os.path.join(workdir, "helper.json")], helper_url,
                                                 os.path.join(workdir, "helper.log"), ca_file=ca_file))
            slicelab.wait_registered(controller, list(workload.helper_members()), helper_url)  # the helper registers them
            width, height, iterations = args.width, args.height, args.iterations
            while workload.rows_done()[0] == 0:  # located and computing before the first snapshot
                time.sleep(0.2)
            _ok(controller.request("PUT", "/violin/schedule", {"interval_s": args.every, "keep": 3}), 200)
            timeline.say("Mandelbrot %dx%d running: %s; a snapshot every %.0f s" % (width, height, where, args.every))

            short = lambda name: name[len(topo.prefix):]  # noqa: E731
            seen, failed_at = set(), None
            while True:
                time.sleep(0.25)
                done, finished = workload.rows_done()
                _, listing = controller.get("/violin/snapshots")
                for snap in listing["snapshots"]:
                    if snap["state"] != "running" and snap["id"] not in seen:
                        seen.add(snap["id"])
                        pauses = ", ".join("%s %.0f ms" % (short(m["name"]), m.get("pause_ms") or 0)
                                           for m in snap["members"])
                        timeline.say("snapshot %s %s%s (pauses: %s; channel state %d frames)" % (
                            snap["id"], snap["state"], ": " + snap["reason"] if snap.get("reason") else "",
                            pauses, (snap.get("channel") or {}).get("frames", 0)))
                complete = [s for s in listing["snapshots"] if s["state"] == "complete"]
                if complete and done >= height * args.fail_at:
                    failed_at = done
                    break
                if finished:
                    raise lab.LabError("the run finished before the failure; use a larger --delay-ms")
            timeline.say("FAILURE: %s at row %d of %d" % (workload.fail(), failed_at, height))
            controller.request("DELETE", "/violin/schedule")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # a snapshot may be under way: let it end
                _, listing = controller.get("/violin/snapshots")
                if all(s["state"] != "running" for s in listing["snapshots"]):
                    break
                time.sleep(0.1)
            latest = [s for s in listing["snapshots"] if s["state"] == "complete"][-1]
            status, job = controller.request("POST", "/violin/snapshots/%s/restore" % latest["id"], {})
            _ok((status, job), 202)
            job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"], timeout=180)
            if job["state"] != "complete":
                raise lab.LabError("restore failed: %s" % job["reason"])
            timeline.say("RESTORED all four members from %s (back at row %s): %s; %d frames re-injected" % (
                latest["id"], workload.rows_done()[0], ", ".join(
                    "%s %.0f ms" % (phase, job["timings_ms"][phase])
                    for phase in ("staging", "restoring", "reinjecting", "resuming")), job["reinjected_frames"]))
            deadline = time.monotonic() + args.timeout
            while not workload.rows_done()[1] and time.monotonic() < deadline:
                time.sleep(0.25)
            if not workload.rows_done()[1]:
                raise lab.LabError("the restored run did not finish in %.0f s" % args.timeout)
            produced = workload.image()
            _write(args.out, produced)
            identical = produced == mandelbrot.expected_image(width, height, iterations)
            timeline.say("finished: %s written; %s an uninterrupted run's image" % (
                args.out, "bit-identical to" if identical else "DIFFERENT FROM"))
            return identical
    finally:
        reaping.set()
        if workload is not None and hasattr(workload, "stop"):
            workload.stop()
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        for daemon in daemons:
            slicelab.stop_daemon(daemon)
        controller.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _wait_health(url, timeout=15.0, ca_file=None):
    deadline, server = time.monotonic() + timeout, ApiClient(url, timeout=5.0, ca_file=ca_file)
    while time.monotonic() < deadline:
        try:
            if server.request("GET", "/health")[0] == 200:
                return
        except Unreachable:
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
    parser.add_argument("--vms", action="store_true",
                        help="the seed's shape: four QEMU VMs (libvirt) instead of processes in the hosts")
    parser.add_argument("--containers", action="store_true",
                        help="four podman containers (one per member host) instead of processes in the hosts")
    parser.add_argument("--tls-dir", default=TLS_DIR,
                        help="the lab CA and server certificate (default %s; made if missing)" % TLS_DIR)
    parser.add_argument("--plain-http", action="store_true", help="run every API on HTTP instead of HTTPS")
    args = parser.parse_args(argv)
    if args.vms and args.containers:
        parser.error("--vms and --containers are two different shapes: choose one")
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
