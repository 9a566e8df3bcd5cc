"""``violin-helper``: the host-side helper that snapshots the members on its host.

The controller asks it (``POST /snapshot``) to snapshot a member; for a CRIU
member the helper then, in the background:

  1. calls the controller's ``prepare`` (frames for the member are held from
     now on) and purges its local datapath's cached flows;
  2. live-dumps the member; while its tasks are frozen (CRIU's post-dump hook)
     it copies the member's directory, sends the cut marker down the member's
     link, calls ``cut``, purges the datapath again, and lets CRIU resume it;
  3. streams the image to a snapshot server (sha256 checked there);
  4. reports ``done`` with where the image went and how long the member was
     frozen, or ``failed`` with the reason.

Config (JSON or YAML; unknown keys refused, ``violin-helper --check``)::

    listen: 127.0.0.1:7001
    token: <bearer token the controller sends>          # or VIOLIN_HELPER_TOKEN
    controller_token: <bearer token for the controller> # or VIOLIN_API_TOKEN
    servers: [http://10.0.0.5:7070]                     # snapshot servers
    server_token: <token of the snapshot servers>       # or VIOLIN_SERVER_TOKEN
    work_dir: /var/lib/violin-helper
    libvirt_uri: qemu:///system                         # for libvirt members
    vm_max_bandwidth: 4294967296                        # bytes/s for a VM's image stream
    members:
      h1: {backend: criu, pid: 1234, netns: /proc/77/ns/net, mntns: /proc/77/ns/mnt,
           workdir: /srv/h1, iface: h1-eth0, mac: "00:00:00:00:00:01"}
      vm1: {backend: libvirt, domain: vm1, iface: vm1-tap, mac: "52:54:00:00:00:11"}

For a libvirt member the snapshot is a fake live migration instead
(hostside/vm.py): the memory is streamed to the snapshot server while the VM
runs; when QEMU pauses it before the switchover, the helper waits until the
switch has read every frame from the VM's tap (``iface``), calls ``cut``, and
lets the migration finish and the VM run on. VMs cannot send a marker while
paused: register them with the controller with ``marker: false``.
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional

from hostside.backends import criu
from hostside.backends import libvirt as vm
from hostside.httpd import JsonHandler, listen, serve
from hostside.ovs import wait_datapath
from hostside.storage import ImageServer, StorageError
from violin_core.packets import build_marker

CLONE_NEWNET = 0x40000000
DUMP_ATTEMPTS = 3  # CRIU dumps of one member per snapshot, while no cut was taken
VM_IMAGE = "vm.save"  # a libvirt save file: header, migratable XML, QEMU's migration stream


class HelperConfigError(ValueError):
    pass


@dataclass
class HelperMember:
    name: str
    iface: str
    mac: str
    pid: int = 0
    netns: str = ""
    workdir: Optional[str] = None
    mntns: Optional[str] = None
    backend: str = "criu"
    domain: Optional[str] = None  # libvirt members
    ip: Optional[str] = None  # CRIU members: address/prefix to put on ``iface`` when restored here


@dataclass
class HelperConfig:
    host: str
    port: int
    token: str
    controller_token: str
    servers: List[str]
    server_token: str
    work_dir: str
    members: Dict[str, HelperMember]
    libvirt_uri: str = "qemu:///system"
    vm_max_bandwidth: int = 4 << 30  # bytes/s a VM's migration stream may take


MEMBER_KEYS = {"backend": str, "pid": int, "netns": str, "mntns": str, "workdir": str, "iface": str, "mac": str,
               "domain": str, "ip": str}
BACKEND_KEYS = {"criu": ({"pid", "netns", "iface", "mac"}, {"mntns", "workdir", "ip"}),
                "libvirt": ({"domain", "iface", "mac"}, set())}


def parse_config(raw, environ=os.environ) -> HelperConfig:
    if not isinstance(raw, dict):
        raise HelperConfigError("config: expected a mapping")
    known = {"listen", "token", "controller_token", "servers", "server_token", "work_dir", "members", "libvirt_uri",
             "vm_max_bandwidth"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise HelperConfigError("config: unknown key(s) %s; known: %s" % (", ".join(unknown), ", ".join(sorted(known))))
    host, _, port = str(raw.get("listen", "127.0.0.1:7001")).rpartition(":")
    if not host or not port.isdigit():
        raise HelperConfigError("listen: expected HOST:PORT, got %r" % raw.get("listen"))
    secrets = {}
    for key, env in (("token", "VIOLIN_HELPER_TOKEN"), ("controller_token", "VIOLIN_API_TOKEN"),
                     ("server_token", "VIOLIN_SERVER_TOKEN")):
        secrets[key] = raw.get(key) or environ.get(env)
        if not isinstance(secrets[key], str) or not secrets[key]:
            raise HelperConfigError("%s: required (or set %s)" % (key, env))
    servers = raw.get("servers")
    if not isinstance(servers, list) or not servers or not all(
            isinstance(s, str) and s.startswith("http://") for s in servers):
        raise HelperConfigError("servers: expected a non-empty list of http://HOST:PORT URLs")
    members = {}
    for name, spec in (raw.get("members") or {}).items():
        if not isinstance(spec, dict):
            raise HelperConfigError("members.%s: expected a mapping" % name)
        unknown = sorted(set(spec) - set(MEMBER_KEYS))
        if unknown:
            raise HelperConfigError("members.%s: unknown key(s) %s" % (name, ", ".join(unknown)))
        for key, kind in MEMBER_KEYS.items():
            if key in spec and (isinstance(spec[key], bool) or not isinstance(spec[key], kind)):
                raise HelperConfigError("members.%s.%s: expected %s" % (name, key, kind.__name__))
        backend = spec.get("backend", "criu")
        if backend not in BACKEND_KEYS:
            raise HelperConfigError("members.%s.backend: expected one of %s" % (name, ", ".join(sorted(BACKEND_KEYS))))
        required, optional = BACKEND_KEYS[backend]
        missing = sorted(required - set(spec))
        if missing:
            raise HelperConfigError("members.%s: missing %s" % (name, ", ".join(missing)))
        foreign = sorted(set(spec) - required - optional - {"backend"})
        if foreign:
            raise HelperConfigError("members.%s: %s do not apply to backend %s" % (name, ", ".join(foreign), backend))
        members[name] = HelperMember(name=name, **spec)
    uri = raw.get("libvirt_uri", "qemu:///system")
    if not isinstance(uri, str) or not uri:
        raise HelperConfigError("libvirt_uri: expected a libvirt URI such as qemu:///system")
    bandwidth = raw.get("vm_max_bandwidth", 4 << 30)
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth < 1 << 20:
        raise HelperConfigError("vm_max_bandwidth: expected bytes per second, at least 1048576")
    return HelperConfig(host, int(port), secrets["token"], secrets["controller_token"], servers,
                        secrets["server_token"], str(raw.get("work_dir", "/var/lib/violin-helper")), members, uri,
                        bandwidth)


def open_marker_socket(netns: str, iface: str) -> socket.socket:
    """An AF_PACKET socket on ``iface`` of another network namespace (opened in a thread there)."""
    result = {}

    def inside():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(netns) as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns %s" % netns)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            sock.bind((iface, 0))
            result["socket"] = sock
        except OSError as error:
            result["error"] = error

    thread = threading.Thread(target=inside)  # the thread's namespace dies with it; the socket stays
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["socket"]


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Restored trees (criu restore -d) are re-parented to us, so we can reap them when replaced."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def stop_tree(pid: int, timeout: float = 5.0) -> None:
    """Kill a member's process group and wait until its PID is free (reaped, if it is our child)."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
            break
        except ProcessLookupError:
            return
        except PermissionError:
            continue
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not ours: wait for its parent to reap it
            if not os.path.exists("/proc/%d" % pid):
                return
        time.sleep(0.01)
    raise RuntimeError("member process %d did not go away (a zombie nobody reaps keeps its PID)" % pid)


def clear_orphan_sockets(netns: str) -> None:
    """Destroy the TCP sockets the killed member left behind (TIME-WAIT, FIN-WAIT...).

    They hold the very address pairs its restored connections need: CRIU's
    connect-back would fail with EADDRNOTAVAIL. The member's namespace holds
    only the member, so every TCP socket left in it is an orphan.
    """
    subprocess.run(["nsenter", "--net=%s" % netns, "ss", "-K", "-t", "state", "all"],
                   capture_output=True, timeout=10)


def in_netns(netns: str, *argv: str) -> str:
    result = subprocess.run(["nsenter", "--net=%s" % netns, *argv], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError("%s in %s: %s" % (" ".join(argv), netns, result.stderr.strip()))
    return result.stdout


def take_identity(member: "HelperMember") -> None:
    """Give the member's interface here its MAC and address (a member restored away from home).

    CRIU restores sockets bound to the member's address, and its peers know it
    by its MAC: both must be on this host's interface before the restore.
    """
    current = json.loads(in_netns(member.netns, "ip", "-j", "addr", "show", "dev", member.iface) or "[]")
    link = current[0] if current else {}
    addresses = {"%s/%s" % (a["local"], a["prefixlen"]) for a in link.get("addr_info", []) if a.get("family") == "inet"}
    if link.get("address", "").lower() == member.mac.lower() and addresses == {member.ip} and \
            "UP" in link.get("flags", []):
        return
    in_netns(member.netns, "ip", "link", "set", member.iface, "down")
    in_netns(member.netns, "ip", "link", "set", member.iface, "address", member.mac)
    in_netns(member.netns, "ip", "-4", "addr", "flush", "dev", member.iface)
    in_netns(member.netns, "ip", "addr", "add", member.ip, "dev", member.iface)
    in_netns(member.netns, "ip", "link", "set", member.iface, "up")


def forget_unresolved_neighbours(member: "HelperMember") -> None:
    """Drop neighbour entries still unresolved in the member's namespace before it resumes.

    The ARP requests made while the member was restored (CRIU's TCP probes; on a
    new host its neighbour table starts empty) died in the quarantine, and the
    kernel asks again only a second later, queueing the member's sends in the
    meantime: kernel state no snapshot holds. Forgotten entries are resolved at
    once by the first packet after the resume.
    """
    for state in ("incomplete", "failed"):
        subprocess.run(["nsenter", "--net=%s" % member.netns, "ip", "neigh", "flush", "dev", member.iface,
                        "nud", state], capture_output=True, timeout=10)


def switch_port_of(member: "HelperMember") -> Optional[str]:
    """The switch's name for the port the member's interface (a veth in its namespace) plugs into;
    None when that cannot be told (then the controller finds the member when it next speaks)."""
    try:
        links = json.loads(in_netns(member.netns, "ip", "-j", "link", "show", "dev", member.iface) or "[]")
        peer = links[0].get("link_index") if links else None
        return socket.if_indextoname(peer) if peer else None
    except (RuntimeError, ValueError, OSError):
        return None


class Helper:
    def __init__(self, config: HelperConfig):
        self.config = config
        self.jobs: Dict[str, dict] = {}
        self.lock = threading.Lock()
        self._libvirt: Optional[vm.Libvirt] = None

    @property
    def libvirt(self) -> "vm.Libvirt":
        """One libvirt connection, opened when the first VM member needs it."""
        with self.lock:
            if self._libvirt is None:
                self._libvirt = vm.Libvirt(self.config.libvirt_uri)
            return self._libvirt

    def _member(self, body: dict) -> HelperMember:
        for key in ("snapshot", "member"):
            if not isinstance(body.get(key), str):
                raise ValueError("%s is required" % key)
        member = self.config.members.get(body["member"])
        if member is None:
            raise LookupError("this helper hosts no member %s" % body["member"])
        return member

    def _restore_dir(self, body: dict) -> str:
        return os.path.join(self.config.work_dir, "restore", body["snapshot"], body["member"])

    def stage(self, body: dict) -> dict:
        """Fetch a member's image and verify every checksum; nothing running is touched."""
        member = self._member(body)
        if not isinstance(body.get("server"), str) or not isinstance(body.get("files"), list):
            raise ValueError("server and files are required")
        target = self._restore_dir(body)
        shutil.rmtree(target, ignore_errors=True)
        files = ImageServer(body["server"], self.config.server_token).download_dir(body["snapshot"], member.name, target)
        expected = {(f.get("name"), f.get("sha256")) for f in body["files"] if isinstance(f, dict)}
        if {(f["name"], f["sha256"]) for f in files} != expected:
            raise StorageError("the server's image of %s/%s is not the one the snapshot recorded"
                               % (body["snapshot"], member.name))
        return {"staged": member.name, "files": len(files)}

    def restore(self, body: dict) -> dict:
        """Replace the running member by the staged image, left stopped until ``resume``."""
        member = self._member(body)
        images = self._restore_dir(body)
        if not os.path.isdir(images):
            raise FileNotFoundError("%s/%s is not staged" % (body["snapshot"], member.name))
        if member.backend == "libvirt":
            restore_ms = self.libvirt.restore(os.path.join(images, VM_IMAGE), member.domain, tap=member.iface,
                                              mac=member.mac, disks=vm.staged_disks(images))
            return {"restored": member.name, "domain": member.domain, "iface": member.iface,
                    "restore_ms": round(restore_ms, 1)}
        stop_tree(member.pid)
        clear_orphan_sockets(member.netns)
        if member.ip:
            take_identity(member)
        restore_ms = criu.restore(criu.ProcessMember(member.name, member.netns, member.pid, member.workdir,
                                                     member.mntns), images, leave_stopped=True)
        return {"restored": member.name, "pid": member.pid, "iface": switch_port_of(member),
                "restore_ms": round(restore_ms, 1)}

    def stop(self, body: dict) -> dict:
        """Stop the member here for good: it is being restored on another host."""
        member = self._member(body)
        if member.backend == "libvirt":
            self.libvirt.destroy(member.domain)
        else:
            stop_tree(member.pid)
            clear_orphan_sockets(member.netns)
            in_netns(member.netns, "ip", "link", "set", member.iface, "down")  # its MAC and IP live elsewhere now
        return {"stopped": member.name}

    def resume(self, body: dict) -> dict:
        member = self._member(body)
        if member.backend == "libvirt":
            self.libvirt.resume(member.domain)
            return {"resumed": member.name}
        forget_unresolved_neighbours(member)
        try:
            os.killpg(member.pid, signal.SIGCONT)
        except ProcessLookupError:
            raise RuntimeError("member %s (pid %d) is not running" % (member.name, member.pid)) from None
        return {"resumed": member.name}

    def _post(self, url: str, body: dict, timeout: float = 30.0):
        request = urllib.request.Request(url, json.dumps(body).encode(), {
            "Content-Type": "application/json", "Authorization": "Bearer " + self.config.controller_token})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            text = error.read().decode("utf-8", "replace")
            try:
                reason = json.loads(text).get("reason", text)
            except ValueError:
                reason = text
            raise RuntimeError("controller answered %d to %s: %s" % (error.code, url.rsplit("/", 1)[-1], reason))
        except (urllib.error.URLError, OSError) as error:
            raise RuntimeError("controller unreachable at %s: %s" % (url, error))

    def server_for(self, member: str) -> str:
        return self.config.servers[zlib.crc32(member.encode()) % len(self.config.servers)]

    def start_snapshot(self, body: dict) -> dict:
        for key in ("snapshot", "member", "cut_url", "done_url", "failed_url"):
            if not isinstance(body.get(key), str):
                raise ValueError("%s is required" % key)
        member = self.config.members.get(body["member"])
        if member is None:
            raise LookupError("this helper hosts no member %s" % body["member"])
        key = "%s/%s" % (body["snapshot"], member.name)
        with self.lock:
            if key in self.jobs:
                raise FileExistsError("already snapshotting %s" % key)
            self.jobs[key] = {"state": "running", "started": time.time()}
        threading.Thread(target=self._snapshot, args=(body, member, key), daemon=True).start()
        return {"accepted": key}

    def _snapshot(self, body: dict, member: HelperMember, key: str) -> None:
        if member.backend == "libvirt":
            return self._snapshot_vm(body, member, key)
        base = body["cut_url"].rsplit("/", 1)[0]
        images = os.path.join(self.config.work_dir, body["snapshot"], member.name)
        try:
            marker = open_marker_socket(member.netns, member.iface)
            try:
                self._post(base + "/prepare", {})
                wait_datapath()

                cut_called = []

                def on_frozen():
                    cut_called.append(True)
                    marker.send(build_marker(member.mac, body["snapshot"], member.name))
                    self._post(body["cut_url"], {})
                    wait_datapath()

                process = criu.ProcessMember(member.name, member.netns, member.pid, member.workdir, member.mntns)
                for attempt in range(1, DUMP_ATTEMPTS + 1):
                    try:
                        report = criu.dump(process, images, on_frozen)
                        break
                    except criu.CriuError:
                        # A dump that failed before its cut left the member running and its frames held:
                        # try again (e.g. TCP data still in the kernel's backlog on a loaded host changed a
                        # socket's queue while CRIU read it), but never after the cut was taken.
                        if cut_called or attempt == DUMP_ATTEMPTS:
                            raise
                        shutil.rmtree(images, ignore_errors=True)
                        time.sleep(0.05)
            finally:
                marker.close()
            server = self.server_for(member.name)
            stored = ImageServer(server, self.config.server_token).upload_dir(body["snapshot"], member.name, images)
            shutil.rmtree(images, ignore_errors=True)
            self._post(body["done_url"], {
                "pause_ms": round(report.frozen_ms if report.frozen_ms is not None else report.hook_ms, 3),
                "bytes": report.bytes, "server": server,
                "image": {"backend": "criu", "dump_ms": round(report.dump_ms, 1), "hook_ms": round(report.hook_ms, 3),
                          "files": [{"name": f["name"], "bytes": f["bytes"], "sha256": f["sha256"]} for f in stored]}})
            self.jobs[key].update(state="done")
        except (criu.CriuError, StorageError, RuntimeError, OSError) as error:
            self._report_failure(body, key, error)
            shutil.rmtree(images, ignore_errors=True)

    def _report_failure(self, body: dict, key: str, error: Exception) -> None:
        self.jobs[key].update(state="failed", reason=str(error))
        try:
            self._post(body["failed_url"], {"reason": str(error)[:1000]})
        except RuntimeError:
            pass

    def _store_disks(self, storage: ImageServer, snapshot: str, member: HelperMember, disks: list) -> list:
        """Each disk's image as it was at the cut (frozen: the guest writes to an overlay since),
        copied standalone and stored beside the RAM image; the guest runs on meanwhile."""
        files = []
        scratch = os.path.join(self.config.work_dir, "disks", snapshot)
        os.makedirs(scratch, exist_ok=True)
        try:
            for disk in disks:
                name = vm.DISK_IMAGE % disk["target"]
                copy = os.path.join(scratch, "%s-%s" % (member.name, name))
                vm.flatten_disk(disk["frozen"], copy)
                with open(copy, "rb") as reader:
                    stored = storage.upload_stream(snapshot, member.name, name, reader)
                files.append({"name": name, "bytes": stored["bytes"], "sha256": stored["sha256"]})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return files

    def _snapshot_vm(self, body: dict, member: HelperMember, key: str) -> None:
        """Fake live migration of a VM to a snapshot server, the cut taken while QEMU holds it paused."""
        server = self.server_for(member.name)
        try:
            self._post(body["cut_url"].rsplit("/", 1)[0] + "/prepare", {})
            wait_datapath()

            def on_paused() -> float:
                drain_ms = vm.wait_tap_drained(member.iface)
                self._post(body["cut_url"], {})
                wait_datapath()
                return drain_ms

            storage = ImageServer(server, self.config.server_token)
            report = self.libvirt.migrate_out(
                member.domain, lambda reader: storage.upload_stream(body["snapshot"], member.name, VM_IMAGE, reader),
                on_paused, max_bandwidth=self.config.vm_max_bandwidth)
            details = report.as_dict()
            stored = details.pop("stored")
            details.pop("sha256")
            files = [{"name": VM_IMAGE, "bytes": stored["bytes"], "sha256": stored["sha256"]}]
            files += self._store_disks(storage, body["snapshot"], member, report.disks)
            self._post(body["done_url"], {
                # The guest's pause as QEMU stamps it (STOP -> RESUME); ours also counts libvirt's reply to cont.
                "pause_ms": round(report.qemu_pause_ms if report.qemu_pause_ms is not None else report.pause_ms, 3),
                "bytes": report.bytes + sum(f["bytes"] for f in files[1:]), "server": server,
                "image": dict(details, backend="libvirt", domain=member.domain, files=files)})
            self.jobs[key].update(state="done")
        except (vm.VmError, StorageError, RuntimeError, OSError) as error:
            self._report_failure(body, key, error)


def make_handler(helper: Helper):
    class Handler(JsonHandler):
        def _authorized(self):
            if self.bearer_is(helper.config.token):
                return True
            self.send_json(401, {"error": "unauthorized", "reason": "missing or wrong bearer token"})
            return False

        def do_GET(self):
            if self.path == "/health":
                return self.send_json(200, {"status": "ok", "members": sorted(helper.config.members)})
            if self.path == "/jobs" and self._authorized():
                return self.send_json(200, helper.jobs)
            if self.path != "/jobs":
                self.send_json(404, {"error": "not_found", "reason": "no such resource: %s" % self.path})

        def do_POST(self):
            if not self._authorized():
                return
            routes = {"/snapshot": (202, helper.start_snapshot), "/stage": (200, helper.stage),
                      "/restore": (200, helper.restore), "/resume": (200, helper.resume), "/stop": (200, helper.stop)}
            if self.path not in routes:
                return self.send_json(404, {"error": "not_found", "reason": "no such resource: %s" % self.path})
            status, action = routes[self.path]
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("body must be a JSON object")
                self.send_json(status, action(body))
            except (ValueError, AttributeError) as error:
                self.send_json(400, {"error": "bad_request", "reason": str(error)})
            except (LookupError, FileNotFoundError) as error:
                self.send_json(404, {"error": "not_found", "reason": str(error)})
            except FileExistsError as error:
                self.send_json(409, {"error": "conflict", "reason": str(error)})
            except (StorageError, criu.CriuError, vm.VmError, RuntimeError, OSError) as error:
                self.send_json(502, {"error": "failed", "reason": str(error)[:2000]})

    return Handler


def load_config(path: str) -> HelperConfig:
    with open(path) as handle:
        text = handle.read()
    if path.endswith((".yaml", ".yml")):
        import yaml
        raw = yaml.safe_load(text)
    else:
        raw = json.loads(text)
    return parse_config(raw)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="violin-helper", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="helper config (JSON or YAML)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config)
    except (OSError, ValueError, HelperConfigError) as error:
        print("violin-helper: %s" % error, file=sys.stderr)
        return 2
    if args.check:
        print("%s: OK (%d members)" % (args.config, len(config.members)))
        return 0
    os.makedirs(config.work_dir, exist_ok=True)
    become_subreaper()
    server = listen(config.host, config.port, make_handler(Helper(config)), "violin-helper")
    if server is None:
        return 1
    print("violin-helper: listening on %s:%d for %s" % (config.host, config.port, ", ".join(sorted(config.members))),
          flush=True)
    return serve(server)


if __name__ == "__main__":
    sys.exit(main())
