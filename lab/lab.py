"""Bring up a controller and a Mininet network for a run, and take down only what it made.

Used by the demo, the benchmarks and the integration tests. Every run gets its
own name prefix (bridges, interfaces), its own OpenFlow and REST ports, and
its own controller process; teardown deletes those bridges by name and stops
those processes by pid. Nothing here uses ``mn -c`` or kills by name.
"""

import json
import os
import random
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from violin_client.api import ApiClient

OVS_CTL = "/usr/share/openvswitch/scripts/ovs-ctl"


class LabError(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_prefix() -> str:
    """A short random letter prefix for this run's bridge and interface names."""
    return "v" + "".join(random.choice(string.ascii_lowercase) for _ in range(3))


def ensure_ovs() -> None:
    """Start Open vSwitch's daemons if they are not answering (idempotent)."""
    if subprocess.run(["ovs-vsctl", "--timeout=3", "show"], capture_output=True).returncode == 0:
        return
    result = subprocess.run([OVS_CTL, "start", "--system-id=random"], capture_output=True, text=True)
    if subprocess.run(["ovs-vsctl", "--timeout=5", "show"], capture_output=True).returncode != 0:
        raise LabError("Open vSwitch did not start:\n" + result.stdout + result.stderr)


class ControllerProcess:
    """A controller (``ryu-manager APP`` or ``violin-controller``) on private ports."""

    def __init__(self, app="violin_snapshot", config=None, token=None, extra_env=None, command=None,
                 rest=True):
        self.app = app
        self.rest = rest  # False for apps that serve no REST API (e.g. ryu.app.simple_switch_13)
        self.of_port = free_port()
        self.rest_port = free_port()
        self.token = token or "".join(random.choice(string.ascii_letters) for _ in range(24))
        self.workdir = tempfile.mkdtemp(prefix="violin-ctl-")
        self.log_path = os.path.join(self.workdir, "controller.log")
        self.config = config
        self.extra_env = extra_env or {}
        self.command = command
        self.process = None
        # The controller's REST API with this run's token (api.call raises, api.request does not).
        self.api = ApiClient(self.url, token=self.token, timeout=5.0)

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.rest_port

    def start(self, timeout=20.0):
        env = dict(os.environ, VIOLIN_API_TOKEN=self.token, PYTHONUNBUFFERED="1", **self.extra_env)
        if self.app == "violin_snapshot":
            config = dict(self.config or {})
            config.setdefault("state", {"directory": os.path.join(self.workdir, "state")})
            path = os.path.join(self.workdir, "config.json")
            with open(path, "w") as handle:
                json.dump(config, handle)
            env["VIOLIN_CONFIG"] = path
        ports = ["--ofp-tcp-listen-port", str(self.of_port), "--wsapi-host", "127.0.0.1",
                 "--wsapi-port", str(self.rest_port)]
        if self.command:  # e.g. violin-controller: it knows its app
            argv = self.command + ports
        else:
            argv = [os.path.join(os.path.dirname(sys.executable), "ryu-manager")] + ports + [self.app]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LabError("controller exited with %s:\n%s" % (self.process.returncode, self.log_text()))
            if self._listening():
                return self
            time.sleep(0.1)
        raise LabError("controller did not open its ports in %.0f s:\n%s" % (timeout, self.log_text()))

    def _listening(self) -> bool:
        for port in (self.of_port, self.rest_port) if self.rest else (self.of_port,):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    return False
        return True

    def get(self, path):
        """(status, parsed JSON) of ``GET path``."""
        return self.api.request("GET", path)

    def request(self, method, path, body=None, token=None):
        """(status, parsed JSON); ``token`` instead of this run's ("" sends none)."""
        return self.api.request(method, path, body, **({} if token is None else {"token": token}))

    def log_text(self) -> str:
        try:
            with open(self.log_path) as handle:
                return handle.read()[-8000:]
        except OSError:
            return ""

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def wait_settled(controller, switches, links, timeout=15.0):
    """Wait until the controller sees the whole topology with every port classified."""
    deadline, health = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status, health = controller.get("/violin/health")
        if (status == 200 and health.get("switches") == switches and health.get("links") == links
                and health.get("settled")):
            return health
        time.sleep(0.05)
    raise LabError("topology not settled in %.0f s (want %d switches, %d links): %r"
                   % (timeout, switches, links, health))


def controller_has_app(controller) -> bool:
    return controller.app == "violin_snapshot"


def attach_out_of_band(net, host, index: int, prefix: str = ""):
    """Give ``host`` a link to the root namespace that does not pass the switches.

    For snapshot servers: helpers (in the root namespace) reach them at the
    returned address, and image streams never cross the experiment's LAN.
    Returns (address in the host, the root-namespace interface name).
    """
    from mininet.node import Node
    root = net.get(prefix + "root") if (prefix + "root") in net.nameToNode else None
    if root is None:
        root = Node(prefix + "root", inNamespace=False)
        net.nameToNode[root.name] = root
    link = net.addLink(host, root)
    host_ip, root_ip = "169.254.%d.1" % index, "169.254.%d.2" % index
    host.setIP(host_ip, 30, intf=link.intf1)
    root.setIP(root_ip, 30, intf=link.intf2)
    host.cmd("ethtool -K %s tx off >/dev/null 2>&1" % link.intf1)
    return host_ip, link.intf2.name


@contextmanager
def network(topo, controller, wait=True):
    """A started Mininet network of ``topo`` on ``controller``; cleaned up by name/pid."""
    from mininet.log import setLogLevel
    from mininet.net import Mininet
    from mininet.node import RemoteController

    setLogLevel(os.environ.get("VIOLIN_MININET_LOG", "warning"))
    ensure_ovs()
    switch_names = list(topo.switches())
    net = Mininet(topo=topo, controller=None, autoSetMacs=True, build=False, waitConnected=False)
    class Remote(RemoteController):
        def checkListening(self):
            """Skipped: ControllerProcess.start saw the ports open, and Mininet's check (telnet) decodes the
            switch's OpenFlow hello as UTF-8 and fails at random (UnicodeDecodeError on its xid bytes)."""

    net.addController("c0", Remote, ip="127.0.0.1", port=controller.of_port)
    try:
        net.build()
        net.start()
        if wait and controller_has_app(controller):
            trunks = sum(1 for a, b in topo.links() if a in switch_names and b in switch_names)
            wait_settled(controller, len(switch_names), trunks)
        elif wait:
            net.waitConnected(timeout=15)
        yield net
    finally:
        try:
            net.stop()
        finally:
            for name in switch_names:
                subprocess.run(["ovs-vsctl", "--if-exists", "del-br", name], capture_output=True)
