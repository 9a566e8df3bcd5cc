"""A TCP stream between two CRIU members of one helper (workloads/tcpflow.py), for TCP recovery runs.

``with tcp_slice(controller, net, workdir, rate=20e6, helper_env=None) as flow:`` starts a tcpflow
receiver in the first host and a paced sender in the second, a snapshot server and a violin-helper
whose members they are (registered with the controller), and yields the ``Flow``: its logs, pids and
``timeouts()`` (the TCP retransmission timeouts both members' kernels counted so far).
"""

import json
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict

from lab import lab, slicelab
from workloads import tcpflow

PORT = 5301


@dataclass
class Flow:
    hosts: list
    logs: Dict[str, str] = field(default_factory=dict)
    pids: Dict[str, int] = field(default_factory=dict)
    helper_log: str = ""

    def timeouts(self) -> int:
        """TcpExt TCPTimeouts summed over both members' network namespaces (/proc/PID/net/netstat)."""
        total = 0
        for host in self.hosts:
            with open("/proc/%d/net/netstat" % host.pid) as handle:
                lines = [line.split() for line in handle if line.startswith("TcpExt:")]
            names, values = lines[0], lines[1]
            total += int(values[names.index("TCPTimeouts")])
        return total

    def received(self):
        return tcpflow.read_log(self.logs["recv"])


def _start(host, directory, argv):
    os.makedirs(directory, exist_ok=True)
    stdin = os.path.join(directory, "stdin")
    open(stdin, "a").close()
    command = " ".join(shlex.quote(a) for a in argv)
    return host.popen(["sh", "-c", "cd %s && exec %s <%s >%s 2>&1" % (
        shlex.quote(directory), command, shlex.quote(stdin), shlex.quote(os.path.join(directory, "output")))],
        stdin=open(os.devnull), stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))


@contextmanager
def tcp_slice(controller, net, workdir, rate=20e6, helper_env=None):
    receiver, sender = net.hosts[0], net.hosts[1]
    flow = Flow([receiver, sender])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    server_port, helper_port = lab.free_port(), lab.free_port()
    server_url, helper_url = "http://127.0.0.1:%d" % server_port, "http://127.0.0.1:%d" % helper_port
    processes, daemons = [], []
    try:
        daemons.append(slicelab.start_daemon(
            [sys.executable, "-m", "hostside.store.server", "--listen", "127.0.0.1:%d" % server_port,
             "--dir", os.path.join(workdir, "images")], server_url, os.path.join(workdir, "server.log"),
            env=dict(os.environ, VIOLIN_SERVER_TOKEN=slicelab.SERVER_TOKEN)))
        dirs = {h.name: os.path.join(workdir, "members", h.name) for h in flow.hosts}
        flow.logs = {"recv": os.path.join(dirs[receiver.name], "flow.log"),
                     "send": os.path.join(dirs[sender.name], "flow.log")}
        python = [sys.executable, os.path.join(root, "workloads", "tcpflow.py")]
        processes.append(_start(receiver, dirs[receiver.name], python + [
            "recv", "--bind", "%s:%d" % (receiver.IP(), PORT), "--log", flow.logs["recv"]]))
        time.sleep(0.3)
        processes.append(_start(sender, dirs[sender.name], python + [
            "send", "--to", "%s:%d" % (receiver.IP(), PORT), "--rate", str(rate), "--log", flow.logs["send"]]))
        flow.pids = {receiver.name: processes[0].pid, sender.name: processes[1].pid}
        config = {"listen": "127.0.0.1:%d" % helper_port, "token": slicelab.HELPER_TOKEN,
                  "controller_token": controller.token, "servers": [server_url],
                  "server_token": slicelab.SERVER_TOKEN, "work_dir": os.path.join(workdir, "helper"),
                  "members": {h.name: slicelab.criu_member(h, dirs[h.name], command="tcpflow.py")
                              for h in flow.hosts}}  # by name: the helper locates them (no controller: we register)
        with open(os.path.join(workdir, "helper.json"), "w") as handle:
            json.dump(config, handle)
        flow.helper_log = os.path.join(workdir, "helper.log")
        daemons.append(slicelab.start_daemon(
            [sys.executable, "-m", "hostside.helper", "--config", os.path.join(workdir, "helper.json")],
            helper_url, flow.helper_log, env=dict(os.environ, **(helper_env or {}))))
        for h in flow.hosts:
            status, body = controller.request("POST", "/violin/members", {
                "name": h.name, "macs": [h.MAC()], "helper_url": helper_url, "backend": "criu"})
            if status != 201:
                raise lab.LabError("registering %s: %s %s" % (h.name, status, body))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (os.path.exists(flow.logs["recv"]) and flow.received()
                                                   and flow.received()[-1][1] > 0):
            time.sleep(0.1)
        if not flow.received() or flow.received()[-1][1] == 0:
            raise lab.LabError("the TCP stream did not start")
        yield flow
    finally:
        for pid in flow.pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(5)
            except Exception:  # noqa: BLE001 - cleanup goes on
                pass
        for daemon in daemons:
            slicelab.stop_daemon(daemon)
