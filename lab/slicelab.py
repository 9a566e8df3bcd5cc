"""A whole slice for end-to-end runs: seqstream members, a snapshot server and a violin-helper.

Everything runs on this machine: the server and the helper in the root
namespace on loopback, the members in the Mininet hosts; each run has its own
ports and directories, and everything is stopped by PID at the end.
"""

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager

from lab import lab
from lab.members import ProcessMembers
from violin_client.api import ApiClient, Unreachable

SERVER_TOKEN, HELPER_TOKEN = "server-secret", "helper-secret"


def start_daemon(argv, url, log_path, timeout=15.0, ca_file=None, env=None):
    """Start a daemon and wait for its /health (over HTTPS verified by ``ca_file`` for an https:// url).
    Tokens go in ``env`` or config files, never in ``argv`` (which every local user can read)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline, health = time.monotonic() + timeout, ApiClient(url, timeout=5.0, ca_file=ca_file)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise lab.LabError("%s exited:\n%s" % (argv[2], open(log_path).read()))
        try:
            if health.request("GET", "/health")[0] == 200:
                return process
        except Unreachable:
            pass  # not listening yet
        time.sleep(0.1)
    stop_daemon(process)
    raise lab.LabError("%s did not answer at %s" % (argv[2], url))


def stop_daemon(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_registered(controller, names, helper_url, timeout=20.0):
    """Wait until the controller has every member of ``names`` from the helper at ``helper_url`` (the helper
    registers its members itself, in the background); the members' views."""
    deadline, seen = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        status, answer = controller.get("/violin/members")
        if status == 200:
            seen = {m["name"]: m for m in answer["members"] if m["name"] in names}
            if len(seen) == len(set(names)) and all(m["helper_url"] == helper_url for m in seen.values()):
                return seen
        time.sleep(0.1)
    raise lab.LabError("the helper at %s did not register %s in %.0f s (the controller has %s)" % (
        helper_url, ", ".join(sorted(set(names) - set(seen))) or "them all with its URL", timeout,
        {n: m["helper_url"] for n, m in seen.items()}))


def criu_member(host, workdir, command="seqstream.py", **extra):
    """A helper config's CRIU member: the process of Mininet ``host`` whose command line holds ``command``."""
    return dict({"backend": "criu", "mininet_host": host.name, "command": command, "workdir": workdir}, **extra)


def controller_config():
    """What the controller needs to talk to this slice's helper and server."""
    return {"api": {"helper_token": HELPER_TOKEN, "server_token": SERVER_TOKEN}}


@contextmanager
def helped_slice(controller, net, workdir, rate=200.0, register=True, servers=None, hosts=None, guests=(),
                 guest_ids=None, helper_settings=None, tcp=True, tls=None, store="chunks"):
    """Members in every host of ``net`` (or in ``hosts``), their helper and a snapshot server; yields the members.

    The helper registers the members with the controller itself (its config's ``controller``); with
    ``register=False`` it is given no controller and registers nothing.
    ``servers`` overrides the snapshot servers the helper is told about (e.g. one that is down).
    ``guests`` are running VMs (lab.vms.Guest) that join the slice as libvirt members of the
    same helper; ``guest_ids`` (name -> seqstream id) makes them peers of the host members' streams.
    ``tls`` ({"cert", "key", "ca"}: a certificate for 127.0.0.1, its key, the CA that signed it) makes the
    server and the helper HTTPS, and the helper verify the controller and the server against the CA.
    ``store`` is the snapshot server's store scheme: ``chunks`` (deduplicated, the default) or ``file``."""
    hosts = list(net.hosts if hosts is None else hosts)
    os.makedirs(workdir, exist_ok=True)
    server_port, helper_port = lab.free_port(), lab.free_port()
    scheme, ca_file = ("https", tls["ca"]) if tls else ("http", None)
    server_url, helper_url = "%s://127.0.0.1:%d" % (scheme, server_port), "%s://127.0.0.1:%d" % (scheme, helper_port)
    server_tls = ["--tls-cert", tls["cert"], "--tls-key", tls["key"]] if tls else []
    members = ProcessMembers(hosts, os.path.join(workdir, "slice"), rate=rate, tcp=tcp,
                             extra_peers={guest_ids[g.name]: g.address for g in guests} if guest_ids else {})
    daemons = []
    try:
        daemons.append(start_daemon(
            [sys.executable, "-m", "hostside.store.server", "--listen", "127.0.0.1:%d" % server_port,
             "--store", "%s:%s" % (store, os.path.join(workdir, "images"))] + server_tls,
            server_url, os.path.join(workdir, "server.log"), ca_file=ca_file,
            env=dict(os.environ, VIOLIN_SERVER_TOKEN=SERVER_TOKEN)))
        members.start()
        config = {
            "listen": "127.0.0.1:%d" % helper_port, "token": HELPER_TOKEN, "controller_token": controller.token,
            "servers": servers or [server_url], "server_token": SERVER_TOKEN, "work_dir": os.path.join(workdir, "helper"),
            "host_name": "lab", "members": {h.name: criu_member(h, members.member_dir(h)) for h in hosts}}
        if register:
            config["controller"] = controller.url
        if tls:
            config.update(tls_cert=tls["cert"], tls_key=tls["key"], ca_file=tls["ca"])
        config.update(helper_settings or {})
        config["members"].update({g.name: {"backend": "libvirt", "domain": g.name} for g in guests})
        with open(os.path.join(workdir, "helper.json"), "w") as handle:
            json.dump(config, handle)
        daemons.append(start_daemon([sys.executable, "-m", "hostside.helper", "--config",
                                     os.path.join(workdir, "helper.json")], helper_url,
                                    os.path.join(workdir, "helper.log"), ca_file=ca_file))
        members.server_url, members.helper_url = server_url, helper_url
        members.helper_process = daemons[-1]
        members.helper_log = os.path.join(workdir, "helper.log")
        members.helper_config = config
        if register:  # the helper registers them (VMs with marker false: their synchronous cut sends none)
            wait_registered(controller, [h.name for h in hosts] + [g.name for g in guests], helper_url)
        yield members
    finally:
        members.stop()
        for daemon in daemons:
            stop_daemon(daemon)


def advancing(members, host, wait=0.4):
    """Whether ``host``'s member made progress within ``wait`` seconds (it runs and talks)."""
    first = members.progress(host)
    time.sleep(wait)
    return members.progress(host) != first


def no_cut_rules(net):
    """No switch of ``net`` still holds a hold, record or flood-cut rule (cookie roles 4, 5, 6)."""
    return all(s.cmd("ovs-ofctl -O OpenFlow13 dump-flows %s" % s.name).count("cookie=0x76696f6c0000000%d" % r) == 0
               for s in net.switches for r in (4, 5, 6))
