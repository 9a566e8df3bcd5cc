"""Containers as members of a test slice: podman containers in Mininet hosts, and their helper.

Each container joins its Mininet host's network namespace (named
``/run/netns/<host name>`` with ``ip netns attach``), so the host's interface,
an Open vSwitch port of the topology, is the container's link; its files live
in a named volume (``<name>-data``) the supervisor reads on the host; the
repository's ``workloads/`` is mounted read-only at ``/opt/violin/workloads``.
Everything is made under this run's names and removed by name at the end
(containers, volumes, namespace names, CRIU configuration files): nothing here
touches another run's containers.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Dict, List, Optional

from lab import lab, slicelab
from workloads import seqstream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.environ.get("VIOLIN_CONTAINER_IMAGE", "localhost/violin-container") + ":latest"
CONF_DIR = "/run/violin-podman"  # one CRIU configuration file per container (its org.criu.config)
WORKLOADS = "/opt/violin/workloads"
# Open vSwitch coverage counters that say where frames went or died (evidence when a stream has gaps)
COVERAGE = ("drop", "upcall", "miss", "flow_extra", "netdev_sent", "netdev_received", "queue")
# Inside this sandbox runc can only set limits within the hard ones (see ENVIRONMENT.md).
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


def podman(*argv, check=True, timeout=120):
    result = subprocess.run(["podman", *argv], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise lab.LabError("podman %s: %s" % (" ".join(argv[:3]), result.stderr.strip()[-1500:]))
    return result


def podman_available() -> Optional[str]:
    """Why containers cannot run here (None: they can)."""
    if subprocess.run(["sh", "-c", "command -v podman && command -v runc"], capture_output=True).returncode != 0:
        return "podman or runc is not installed (run scripts/setup.sh)"
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        return "the container image %s is not built (scripts/build_container_image.sh)" % IMAGE
    return None


def ensure_image() -> None:
    built = subprocess.run(["bash", os.path.join(REPO, "scripts", "build_container_image.sh")],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise lab.LabError("container image: %s" % (built.stderr or built.stdout).strip()[-1500:])


def netns_path(name: str) -> str:
    return "/run/netns/%s" % name


def attach_netns(host, name: Optional[str] = None) -> str:
    """Name ``host``'s network namespace (``/run/netns/<name>``, default the host's name); its path."""
    name = name or host.name
    if not os.path.exists(netns_path(name)):
        result = subprocess.run(["ip", "netns", "attach", name, str(host.pid)], capture_output=True, text=True)
        if result.returncode != 0:
            raise lab.LabError("ip netns attach %s %d: %s" % (name, host.pid, result.stderr.strip()))
    return netns_path(name)


def detach_netns(name: str) -> None:
    """Remove the name only: the namespace lives on with its Mininet host."""
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def volume_dir(volume: str) -> str:
    answer = podman("volume", "inspect", volume, "--format", "{{.Mountpoint}}")
    return answer.stdout.strip()


def run_container(name: str, netns: str, argv: List[str], volume: str, workdir: str = "/data") -> str:
    """Start container ``name`` in namespace ``netns`` running ``argv`` in ``workdir`` (the volume)."""
    os.makedirs(CONF_DIR, exist_ok=True)
    conf = os.path.join(CONF_DIR, "%s.conf" % name)
    open(conf, "a").close()
    podman("volume", "create", volume, check=False)
    podman("run", "-d", "--runtime", "runc", "--name", name, "--network", "ns:%s" % netns,
           "--annotation", "org.criu.config=%s" % conf, *ULIMITS,
           "--cap-add", "NET_ADMIN",  # seqstream forces its receive buffer (SO_RCVBUFFORCE)
           "-v", "%s:%s" % (volume, workdir), "-v", "%s:%s:ro" % (os.path.join(REPO, "workloads"), WORKLOADS),
           "-w", workdir, "-e", "PYTHONPATH=/opt/violin", IMAGE, *argv)
    return conf


def remove_container(name: str, volume: Optional[str] = None) -> None:
    podman("rm", "--force", "--time", "0", name, check=False)
    if volume:
        podman("volume", "rm", "--force", volume, check=False)
    try:
        os.unlink(os.path.join(CONF_DIR, "%s.conf" % name))
    except OSError:
        pass


def state_of(name: str) -> Optional[str]:
    answer = podman("container", "inspect", name, "--format", "{{.State.Status}}", check=False)
    return answer.stdout.strip() if answer.returncode == 0 else None


class ContainerMembers:
    """One seqstream container per host (ids 1..n in host order), named like its host; same reading
    interface as lab.members.ProcessMembers (member_dir, progress, logs, alive), for the oracle."""

    def __init__(self, hosts, rate: float = 200.0, tcp: bool = True, first_id: int = 1,
                 extra_peers: Optional[Dict[int, str]] = None):
        self.hosts, self.rate, self.tcp = list(hosts), rate, tcp
        self.ids = {h.name: i for i, h in enumerate(self.hosts, first_id)}
        self.extra_peers = dict(extra_peers or {})  # id -> IP of peers that are no container here (CRIU, VMs)
        self.netns: Dict[str, str] = {}
        self.dirs: Dict[str, str] = {}

    def volume(self, host) -> str:
        return "%s-data" % host.name

    def peers_of(self, host) -> List[int]:
        return [self.ids[h.name] for h in self.hosts if h is not host] + sorted(self.extra_peers)

    def start(self):
        for host in self.hosts:
            self.netns[host.name] = attach_netns(host)
            podman("volume", "create", self.volume(host))
            self.dirs[host.name] = volume_dir(self.volume(host))
            with open(os.path.join(self.dirs[host.name], "member.id"), "w") as handle:
                json.dump([self.ids[host.name], self.peers_of(host)], handle)
            peers = ",".join(["%d=%s" % (self.ids[h.name], h.IP()) for h in self.hosts if h is not host]
                             + ["%d=%s" % pair for pair in sorted(self.extra_peers.items())])
            run_container(host.name, self.netns[host.name], [
                "python3", "%s/seqstream.py" % WORKLOADS, "--id", str(self.ids[host.name]), "--bind", host.IP(),
                "--peers", peers, "--rate", str(self.rate), "--progress", "/data/member.progress",
                "--log", "/data/member.log"] + ([] if self.tcp else ["--no-tcp"]), self.volume(host))
        deadline = time.monotonic() + 20
        while not all(os.path.exists(os.path.join(d, "member.progress")) for d in self.dirs.values()):
            if time.monotonic() > deadline:
                raise lab.LabError("seqstream containers did not start: %s" % {
                    h.name: state_of(h.name) for h in self.hosts})
            time.sleep(0.05)

    def member_dir(self, host) -> str:
        return self.dirs[host.name]

    def progress(self, host, tcp: bool = False):
        """{peer id: (about to send, last sent)} of its UDP streams (with ``tcp``: of its TCP streams,
        the last taken by the kernel)."""
        return seqstream.read_progress(os.path.join(self.dirs[host.name], "member.progress"), self.peers_of(host),
                                       tcp)

    def logs(self):
        return {h.name: seqstream.parse_log(os.path.join(self.dirs[h.name], "member.log")) for h in self.hosts}

    def alive(self, host) -> bool:
        return state_of(host.name) == "running"

    def helper_members(self) -> Dict[str, dict]:
        return {h.name: {"backend": "podman", "container": h.name} for h in self.hosts}

    def outputs(self) -> Dict[str, str]:
        """Each container's state and the tail of its output (for failure messages)."""
        return {h.name: "%s: %s" % (state_of(h.name), podman("logs", "--tail", "15", h.name, check=False).stderr[-1500:])
                for h in self.hosts}

    def stop(self):
        """Stop every container at once (SIGTERM: seqstream flushes its log and exits; a receiver stopped
        long before its senders would show their last datagrams as gaps); volumes stay for the oracle."""
        names = [h.name for h in self.hosts if state_of(h.name) == "running"]
        if names:
            podman("kill", "--signal", "CONT", *names, check=False)
            podman("kill", "--signal", "TERM", *names, check=False)
            podman("wait", *names, check=False, timeout=30)

    def cleanup(self):
        for host in self.hosts:
            remove_container(host.name, self.volume(host))
            detach_netns(host.name)


def helper_config(controller, port: int, server_url: str, work_dir: str, members: Dict[str, dict]) -> dict:
    """A helper config for ``members``: it registers them with ``controller`` itself (its ``controller``)."""
    return {"listen": "127.0.0.1:%d" % port, "token": slicelab.HELPER_TOKEN, "controller_token": controller.token,
            "controller": controller.url, "host_name": "lab", "servers": [server_url],
            "server_token": slicelab.SERVER_TOKEN, "work_dir": work_dir, "members": members}


def start_helper(controller, workdir: str, server_url: str, members: Dict[str, dict], name: str = "helper"):
    """A violin-helper for ``members`` (any backend's specs), registering those that run here with the
    controller itself (wait with ``slicelab.wait_registered``); (process, url)."""
    port = lab.free_port()
    config = helper_config(controller, port, server_url, os.path.join(workdir, name), members)
    path = os.path.join(workdir, "%s.json" % name)
    with open(path, "w") as handle:
        json.dump(config, handle)
    url = "http://127.0.0.1:%d" % port
    process = slicelab.start_daemon([sys.executable, "-m", "hostside.helper", "--config", path], url,
                                    os.path.join(workdir, "%s.log" % name))
    return process, url


def start_server(workdir: str):
    port = lab.free_port()
    url = "http://127.0.0.1:%d" % port
    process = slicelab.start_daemon(
        [sys.executable, "-m", "hostside.store.server", "--listen", "127.0.0.1:%d" % port,
         "--dir", os.path.join(workdir, "images")], url, os.path.join(workdir, "server.log"),
        env=dict(os.environ, VIOLIN_SERVER_TOKEN=slicelab.SERVER_TOKEN))
    return process, url


@contextmanager
def container_slice(controller, net, workdir: str, hosts=None, rate: float = 200.0, tcp: bool = True,
                    first_id: int = 1, extra_peers: Optional[Dict[int, str]] = None):
    """seqstream containers in ``hosts`` (default every host of ``net``), a snapshot server and a helper,
    the members registered by the helper; yields the members (with ``server_url``, ``helper_url``, ``helper_log``).
    ``first_id`` and ``extra_peers`` (id -> IP) make them peers of other members (e.g. CRIU ones)."""
    os.makedirs(workdir, exist_ok=True)
    members = ContainerMembers(net.hosts if hosts is None else hosts, rate=rate, tcp=tcp, first_id=first_id,
                               extra_peers=extra_peers)
    daemons = []
    try:
        server, members.server_url = start_server(workdir)
        daemons.append(server)
        members.start()
        helper, members.helper_url = start_helper(controller, workdir, members.server_url, members.helper_members())
        daemons.append(helper)
        members.helper_log = os.path.join(workdir, "helper.log")
        slicelab.wait_registered(controller, [h.name for h in members.hosts], members.helper_url)  # by the helper
        yield members
    finally:
        try:
            members.stop()
        finally:
            for daemon in daemons:
                slicelab.stop_daemon(daemon)
            members.cleanup()


@contextmanager
def mixed_slice(controller, net, workdir: str, process_hosts, container_hosts, guests=(), guest_ids=None,
                rate: float = 100.0):
    """One slice of every kind, one helper: seqstream as CRIU processes in ``process_hosts`` (ids 1..),
    in podman containers in ``container_hosts`` (the next ids) and in running VMs ``guests``
    (lab.vms.Guest, ids ``guest_ids``), each a peer of all the others over UDP and TCP. The helper
    registers every member itself. Yields (processes, containers): ``containers`` has ``server_url``,
    ``helper_url``, ``helper_log``."""
    from lab.members import ProcessMembers
    os.makedirs(workdir, exist_ok=True)
    guest_ids = dict(guest_ids or {})
    process_hosts, container_hosts = list(process_hosts), list(container_hosts)
    first_container = len(process_hosts) + 1
    guest_peers = {guest_ids[g.name]: g.address for g in guests}
    process_peers = {first_container + i: h.IP() for i, h in enumerate(container_hosts)}
    processes = ProcessMembers(process_hosts, os.path.join(workdir, "slice"), rate=rate,
                               extra_peers={**process_peers, **guest_peers})
    members = ContainerMembers(container_hosts, rate=rate, first_id=first_container, extra_peers={
        **{processes.ids[h.name]: h.IP() for h in process_hosts}, **guest_peers})
    daemons = []
    try:
        server, members.server_url = start_server(workdir)
        daemons.append(server)
        processes.start()
        members.start()
        specs = {h.name: slicelab.criu_member(h, processes.member_dir(h)) for h in process_hosts}
        specs.update(members.helper_members())
        specs.update({g.name: {"backend": "libvirt", "domain": g.name} for g in guests})
        helper, members.helper_url = start_helper(controller, workdir, members.server_url, specs)
        daemons.append(helper)
        members.helper_log = os.path.join(workdir, "helper.log")
        slicelab.wait_registered(controller, list(specs), members.helper_url)
        yield processes, members
    finally:
        try:
            members.stop()
            processes.stop()
        finally:
            for daemon in daemons:
                slicelab.stop_daemon(daemon)
            members.cleanup()


def ovs_coverage() -> Dict[str, int]:
    """Open vSwitch's coverage counters (totals) that say where frames went or died."""
    out = subprocess.run(["ovs-appctl", "coverage/show"], capture_output=True, text=True).stdout
    counters = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and any(k in words[0] for k in COVERAGE):
            try:
                counters[words[0]] = int(words[-1])
            except ValueError:
                pass
    return counters


def frame_metrics(controller):
    """The controller's frame and snapshot counters (its /violin/metrics exposition, violin_ lines)."""
    request = urllib.request.Request(controller.url + "/violin/metrics",
                                     headers={"Authorization": "Bearer " + controller.token})
    try:
        text = urllib.request.urlopen(request, timeout=10).read().decode()
    except OSError as error:
        return "metrics unreadable: %s" % error
    return [line for line in text.splitlines() if line.startswith("violin_") and not line.endswith(" 0.0")
            and ("frame" in line or "snapshot" in line or "drop" in line)][:60]
