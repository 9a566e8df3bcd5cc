"""``violin-helper``: the host-side helper that snapshots the members on its host.

A thin HTTP shim over hostside/orchestration.py, which does the same for every
member whatever its backend (hostside/backends/: ``criu`` process trees,
``libvirt`` VMs). The controller asks it (``POST /snapshot``) to snapshot a
member; the helper then, in the background:

  1. calls the controller's ``prepare`` (frames for the member are held from
     now on) and purges its local datapath's cached flows;
  2. has the backend capture the member; while it is stopped (CRIU: tasks
     frozen in the post-dump hook, the member's directory copied; libvirt: QEMU
     paused before the switchover of a fake live migration) the helper proves
     the member's link is quiet (it sends the cut marker down the member's
     link: from the member's namespace for CRIU members and containers, into
     the VM's tap as the guest's own frame for a paused VM), calls ``cut`` with
     ``{"marker": true|false}``, purges the datapath again, and the member runs
     on. In the asynchronous cut (the default) the member runs on once the
     switch has sent the marker back, and a cut request frame asks for its
     flip once it runs;
  3. the image goes to a snapshot server (sha256 checked there; a VM's memory
     is streamed there while it runs, its disks as they were at the cut after);
  4. reports ``done`` with where the image went and how long the member was
     stopped, or ``failed`` with the reason.

``/stage`` fetches and checks an image (its answer says ``restores_paused``),
``/restore`` puts it in place, left stopped (its answer gives the switch port
as ``attachment: {dpid, port}``), ``/resume`` and ``/stop`` act on the member.
Errors answer ``{"error", "reason"}``: bad input 400, unknown member or image
404, a snapshot already running (or a member that exists) 409, a backend,
store or controller failure 502, anything else 500.

Members are named as users know them (a process by pidfile or by its Mininet
host and command line, a VM by its libvirt domain); the helper finds pid,
namespaces, interface and MAC itself, afresh for every operation. It registers
them with the controller (``controller:``), in the background and again until
the controller takes it: at start (each member running here), when one is added
and after a restore onto this helper (``PUT /violin/members/<name>`` with its
MAC, ``advertise_url``, backend, marker and ``host_name``). ``GET /members``
shows each one's spec, where it is now and its registration; ``POST /members``
``{"name", "backend", ...spec}`` adds one and ``DELETE /members/<name>`` removes
one (and unregisters it) at runtime; those changes are kept in
``work_dir/members.json`` across restarts. ``violin member add|rm ... --helper``
calls them.

Config (JSON or YAML; unknown keys refused; ``violin-helper --check``)::

    listen: 127.0.0.1:7001
    token: <bearer token the controller sends>          # or VIOLIN_HELPER_TOKEN
    controller_token: <bearer token for the controller> # or VIOLIN_API_TOKEN
    servers: [http://10.0.0.5:7070]                     # snapshot servers
    server_token: <token of the snapshot servers>       # or VIOLIN_SERVER_TOKEN
    work_dir: /var/lib/violin-helper
    libvirt_uri: qemu:///system                         # for libvirt members
    vm_max_bandwidth: 4294967296                        # bytes/s for a VM's image stream
    controller: http://127.0.0.1:8080                   # registers its members there (none: it does not)
    advertise_url: http://10.0.0.2:7001                 # where the controller reaches this helper
                                                        # (default: http(s)://<listen>)
    host_name: hv1                                      # shown with its members (default: the host's name)
    vm_hold: switchover                                 # hold a VM's frames from just before its switchover
                                                        # (or precopy: from before its pre-copy)
    keep_images: 1                                      # a member's newest images kept here for a restore
                                                        # here (checked, not downloaded; 0: none)
    tls_cert: /var/lib/violin-snapshot/tls/server.crt   # serve HTTPS (with tls_key)
    tls_key: /var/lib/violin-snapshot/tls/server.key
    ca_file: /var/lib/violin-snapshot/tls/ca.crt        # verifies the https:// controller and servers
                                                        # (or VIOLIN_CA_FILE; default: the system's CAs)
    members:                                            # each by its backend's schema
      h1: {backend: criu, mininet_host: h1, command: seqstream.py, workdir: /srv/h1}
      db: {backend: criu, pidfile: /run/db.pid, workdir: /srv/db, ip: 10.0.0.9/8}
      vm1: {backend: libvirt, domain: vm1}

A CRIU member by Mininet host is the root of the one process tree in the host's
network namespace whose command line holds ``command`` (the host's shell,
``bash ... mininet:<host>``, gives the namespaces); by pidfile, the pid's
namespaces (held open by the helper, so a member killed before its restore is
still found). Its interface is the only one besides ``lo`` in its namespace
(else the ``*-eth0`` one); its MAC and address are that interface's, and are
stored with the image: restored on another host they go onto that host's
interface (``ip`` overrides the address). A VM's MAC and tap come from its
domain's XML (or, when the domain is gone, the image's); ``tap`` names the one
it goes on when restored on a host where it never ran.
"""

import argparse
import json
import os
import re
import socket
import sys
import traceback
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from hostside import backends, ovs
from hostside.backends import Backend
from hostside.httpd import JsonHandler, listen, scheme_of, serve
from hostside.kept import KEEP_IMAGES
from hostside.orchestration import STAGE_WORKERS, ControllerError, Orchestrator, Registrar, status_of
from violin_client import tls
from violin_client.api import ApiClient, ApiError, Unreachable
from violin_core.catalogue import write_atomic
from violin_core.errors import error_body
from violin_core.schema import Field, ListOf, MapOf, Schema, SchemaError, host_port, http_url, matches, name

MAX_BODY = 1 << 20  # bytes of a request body: the controller's are a few hundred
HelperConfigError = SchemaError  # what a malformed config raises; its ``path`` names the key


@dataclass
class HelperConfig:
    host: str
    port: int
    token: str = field(repr=False)  # secrets never in a repr (or a log of one)
    controller_token: str = field(repr=False)
    servers: List[str]
    server_token: str = field(repr=False)
    work_dir: str
    members: Dict[str, object]  # name -> its backend's spec (backends.criu.CriuMember, backends.libvirt.VmMember...)
    libvirt_uri: str = "qemu:///system"
    vm_max_bandwidth: int = 4 << 30  # bytes/s a VM's migration stream may take
    backends: Dict[str, Backend] = field(default_factory=dict)  # member name -> its backend (one
    # instance per backend for the whole helper, e.g. one libvirt connection)
    tls_cert: Optional[str] = None  # HTTPS when set (with tls_key)
    tls_key: Optional[str] = None
    ca_file: Optional[str] = None  # verifies https:// controller and servers (None: $VIOLIN_CA_FILE, system CAs)
    controller: Optional[str] = None  # the controller's REST URL: members are registered there (None: not)
    advertise_url: str = ""  # this helper's URL as the controller reaches it
    host_name: str = ""  # shown with the members it registers
    settings: Optional[object] = None  # the backends' HostSettings
    instances: Dict[str, Backend] = field(default_factory=dict)  # backend name -> the one instance
    stage_workers: int = STAGE_WORKERS  # members staged at once
    keep_images: int = KEEP_IMAGES  # images kept per member for a restore here (0: none)

    def make_member(self, member: str, spec: dict):
        """(backend, member spec object) of a member spec (the config's ``members.<name>`` shape),
        validated; a backend not used yet is made (and started) now."""
        values = backends.member_schema().validate(spec, "")
        kind = values["backend"]
        if kind not in self.instances:
            self.instances[kind] = backends.get(kind)(self.settings)
            self.instances[kind].start()
        return self.instances[kind], _build_member(self.instances[kind], member, values, "")


def _at_least(low: int):
    return lambda value: None if value >= low else "at least %d" % low


_SECRET = Field((str, type(None)), None)
_PATH = Field((str, type(None)), None, check=lambda v: None if v is None or v else "a file name")
SECRETS = (("token", "VIOLIN_HELPER_TOKEN"), ("controller_token", "VIOLIN_API_TOKEN"),
           ("server_token", "VIOLIN_SERVER_TOKEN"))


def config_schema() -> Schema:
    """The helper config; ``members`` takes every registered backend's member schema."""
    return Schema({
        "listen": Field(str, "127.0.0.1:7001", check=host_port, help="HOST:PORT the helper listens on"),
        "token": _SECRET, "controller_token": _SECRET,
        "servers": ListOf(Field(str, check=matches(r"^https?://[^\s/]+", "an http(s)://HOST:PORT URL")),
                          min_items=1, help="snapshot servers"),
        "server_token": _SECRET,
        "work_dir": Field(str, "/var/lib/violin-helper"),
        "libvirt_uri": Field(str, "qemu:///system", check=lambda v: None if v else "a libvirt URI"),
        "vm_max_bandwidth": Field(int, 4 << 30, check=_at_least(1 << 20), help="bytes/s of a VM's image stream"),
        "vm_hold": Field(str, "switchover", check=lambda v: None if v in ("switchover", "precopy")
                         else "switchover or precopy", help="when frames to a VM begin to be held: just before "
                         "its switchover (deaf about its pause) or before its pre-copy (deaf through it)"),
        "stage_workers": Field(int, STAGE_WORKERS, check=lambda v: None if 1 <= v <= 64 else "from 1 to 64",
                                 help="members this helper stages (fetches and checks) at once; restores all run at once"),
        "keep_images": Field(int, KEEP_IMAGES, check=lambda v: None if 0 <= v <= 16 else "from 0 to 16",
                             help="a member's newest images kept on this host after they are stored, so that "
                             "a restore here checks them instead of downloading them (0: none)"),
        "members": MapOf(backends.member_schema(), key_check=name),
        "tls_cert": _PATH, "tls_key": _PATH, "ca_file": _PATH,
        "controller": Field((str, type(None)), None, check=http_url,
                            help="the controller's REST URL: the helper registers its members there"),
        "advertise_url": Field((str, type(None)), None, check=http_url,
                               help="this helper's URL as the controller reaches it (default: http(s)://<listen>)"),
        "host_name": Field((str, type(None)), None, check=lambda v: None if v else "a host name",
                           help="the host's name, shown with its members (default: the host's own)"),
    }, allow_none=False)


def _build_member(backend: Backend, member: str, values: dict, path: str):
    """The backend's member object; a spec its dataclass refuses (e.g. neither pidfile nor mininet_host)
    is a SchemaError at the member's path."""
    try:
        return backend.member(member, values)
    except SchemaError as error:
        raise SchemaError(".".join(p for p in (path, error.path) if p), error.message) from None
    except TypeError as error:
        raise SchemaError(path, str(error)) from None


def parse_config(raw, environ=os.environ) -> HelperConfig:
    values = config_schema().validate(raw)
    for key, env in SECRETS:
        values[key] = values[key] or environ.get(env)
        if not values[key]:
            raise HelperConfigError(key, "required (or set %s)" % env)
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise HelperConfigError("tls_key" if values["tls_cert"] else "tls_cert", "tls_cert and tls_key go together")
    host, _, port = values["listen"].rpartition(":")
    settings = backends.HostSettings(values["work_dir"], values["libvirt_uri"], values["vm_max_bandwidth"],
                                     values["vm_hold"])
    instances = {kind: backends.get(kind)(settings) for kind in {m["backend"] for m in values["members"].values()}}
    members = {member: _build_member(instances[spec["backend"]], member, spec, "members." + member)
               for member, spec in values["members"].items()}
    advertise = values["advertise_url"] or "%s://%s:%s" % ("https" if values["tls_cert"] else "http",
                                                           "[%s]" % host if ":" in host else host, port)
    return HelperConfig(host, int(port), values["token"], values["controller_token"], values["servers"],
                        values["server_token"], values["work_dir"], members, values["libvirt_uri"],
                        values["vm_max_bandwidth"],
                        {member: instances[spec["backend"]] for member, spec in values["members"].items()},
                        values["tls_cert"], values["tls_key"], values["ca_file"], values["controller"],
                        advertise.rstrip("/"), values["host_name"] or socket.gethostname(), settings, instances,
                        values["stage_workers"], values["keep_images"])


def controller_poster(token: str, timeout: float = 30.0,
                      ca_file: Optional[str] = None) -> Callable[[str, dict], object]:
    """POST a JSON callback to the controller (the one API client); raises ControllerError with its reason."""
    def post(url: str, body: dict):
        parts = urllib.parse.urlsplit(url)
        try:
            client = ApiClient("%s://%s" % (parts.scheme, parts.netloc), token, timeout, ca_file)
            return client.call("POST", parts.path, body)
        except Unreachable as error:
            raise ControllerError("controller unreachable at %s: %s" % (url, error.why)) from None
        except ApiError as error:
            raise ControllerError("controller answered %s to %s: %s" % (
                error.status, url.rsplit("/", 1)[-1], error.reason), error.status) from None
    return post


def controller_registrar_call(controller: str, token: str, timeout: float = 10.0,
                              ca_file: Optional[str] = None) -> Callable[[str, str, Optional[dict]], object]:
    """``call(method, member, body)`` on the controller's ``/violin/members/<member>`` (PUT registers or
    updates, DELETE unregisters; a member the controller does not know is gone already)."""
    client = ApiClient(controller, token, timeout, ca_file)

    def call(method: str, member: str, body: Optional[dict]):
        try:
            return client.call(method, "/violin/members/" + urllib.parse.quote(member, safe=""), body)
        except Unreachable as error:
            raise ControllerError("controller unreachable at %s: %s" % (controller, error.why)) from None
        except ApiError as error:
            if method == "DELETE" and error.status == 404:
                return None
            raise ControllerError("controller answered %s to %s %s: %s" % (
                error.status, method, member, error.reason), error.status) from None
    return call


def image_server_factory(token: str, ca_file: Optional[str] = None):
    from hostside.store.client import ImageServer
    return lambda url: ImageServer(url, token, ca_file=ca_file)


RUNTIME_MEMBERS = "members.json"  # in work_dir: members added and removed at runtime


class Helper(Orchestrator):
    """The orchestration wired to this host: the real controller, datapath, store and switch.

    ``register`` (default: a call to ``config.controller``, if any) is the Registrar's
    ``call(method, member, body)``."""

    def __init__(self, config: HelperConfig, post=None, store=None, purge=ovs.wait_datapath,
                 attachment=ovs.attachment, register=None, **seams):
        self.config = config
        if register is None and config.controller:
            register = controller_registrar_call(config.controller, config.controller_token, ca_file=config.ca_file)
        registrar = None
        if register is not None:
            registrar = Registrar(register, lambda member: self.registration_of(
                member, config.advertise_url, config.host_name), **{k: seams[k] for k in ("spawn", "clock") if k in seams})
        self.runtime_path = os.path.join(config.work_dir, RUNTIME_MEMBERS)
        self.runtime = {"added": {}, "removed": []}
        super().__init__({m: (config.backends[m], spec) for m, spec in config.members.items()},
                         config.servers, config.work_dir,
                         post or controller_poster(config.controller_token, ca_file=config.ca_file),
                         store or image_server_factory(config.server_token, config.ca_file), purge, attachment,
                         factory=config.make_member, registrar=registrar, on_change=self._changed,
                         stage_workers=config.stage_workers, keep_images=config.keep_images, **seams)
        self._load_runtime()

    def _load_runtime(self) -> None:
        """Members added and removed at runtime before this start (``work_dir/members.json``)."""
        try:
            with open(self.runtime_path) as handle:
                saved = json.load(handle)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            print("violin-helper: %s unreadable, ignored: %s" % (self.runtime_path, error), file=sys.stderr)
            return
        self.runtime = {"added": dict(saved.get("added") or {}), "removed": list(saved.get("removed") or [])}
        for member in self.runtime["removed"]:
            self.members.pop(member, None)
        for member, spec in self.runtime["added"].items():
            try:
                self.members[member] = self.config.make_member(member, spec)
            except SchemaError as error:
                print("violin-helper: %s: member %s no longer valid, ignored: %s" % (
                    self.runtime_path, member, error), file=sys.stderr)

    def _changed(self, member: str, spec: Optional[dict]) -> None:
        added, removed = self.runtime["added"], self.runtime["removed"]
        if spec is None:
            added.pop(member, None)
            if member in self.config.members and member not in removed:
                removed.append(member)
        else:
            added[member] = spec
            if member in removed:
                removed.remove(member)
        os.makedirs(self.config.work_dir, exist_ok=True)
        write_atomic(self.runtime_path, json.dumps(self.runtime, indent=1, sort_keys=True).encode())


MEMBER_PATH = re.compile(r"^/members/([^/?#]+)$")


def make_handler(helper: Helper):
    routes = {"/snapshot": (202, helper.start_snapshot), "/stage": (200, helper.stage),
              "/restore": (200, helper.restore), "/resume": (200, helper.resume), "/stop": (200, helper.stop),
              "/members": (201, helper.add_member)}

    class Handler(JsonHandler):
        # what docs/openapi-helper.yaml documents
        get_paths, post_paths, delete_paths = ("/health", "/jobs", "/members"), tuple(routes), ("/members/{name}",)

        def _error(self, status: int, reason: str) -> None:
            self.send_json(status, error_body(status, reason))

        def _authorized(self):
            if self.bearer_is(helper.config.token):
                return True
            self._error(401, "missing or wrong bearer token")
            return False

        def _answer(self, status: int, action, *args) -> None:
            try:
                answer = action(*args)
            except Exception as error:  # every error answers JSON; the unexpected ones are logged in full
                code = status_of(error)
                if code == 500:
                    print("violin-helper: %s failed unexpectedly:\n%s" % (self.path, traceback.format_exc()),
                          file=sys.stderr, flush=True)
                return self._error(code, (str(error) or type(error).__name__)[:2000])
            self.send_json(status, answer)

        def do_GET(self):
            if self.path == "/health":
                return self.send_json(200, {"status": "ok", "members": helper.names()})
            if self.path == "/metrics":  # unauthenticated, like /health
                content_type, data = helper.metrics.exposition()
                return self.send_text(200, data, content_type)
            if self.path not in ("/jobs", "/members"):
                return self._error(404, "no such resource: %s" % self.path)
            if self._authorized():
                self._answer(200, lambda: dict(helper.jobs) if self.path == "/jobs" else helper.members_view())

        def do_DELETE(self):
            if not self._authorized():
                return
            match = MEMBER_PATH.match(self.path)
            if not match:
                return self._error(404 if not self.path.startswith("/members/") else 400,
                                   "no such resource: %s" % self.path)
            member = urllib.parse.unquote(match.group(1))
            if name(member):
                return self._error(400, "member: bad name %r: expected %s" % (member, name(member)))
            self._answer(200, helper.remove_member, member)

        def do_POST(self):
            if not self._authorized():
                return
            if self.path not in routes:
                return self._error(404, "no such resource: %s" % self.path)
            status, action = routes[self.path]
            try:
                length = int(self.headers.get("Content-Length", 0))
                if not 0 <= length <= MAX_BODY:
                    raise ValueError("Content-Length %d is not between 0 and %d" % (length, MAX_BODY))
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as error:
                self.close_connection = True  # the body may be unread
                return self._error(400, "body is not JSON: %s" % error)
            self._answer(status, action, body)

    return Handler


def load_config(path: str) -> HelperConfig:
    with open(path) as handle:
        text = handle.read()
    if path.endswith((".yaml", ".yml")):
        import yaml
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise HelperConfigError("", "malformed YAML: %s" % " ".join(str(error).split())) from None
    else:
        try:
            raw = json.loads(text)
        except ValueError as error:
            raise HelperConfigError("", "malformed JSON: %s" % error) from None
    return parse_config(raw)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="violin-helper", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="helper config (JSON or YAML)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config)
    except (OSError, HelperConfigError) as error:
        print("violin-helper: %s: %s" % (args.config, error), file=sys.stderr)
        return 2
    if config.tls_cert:  # a certificate that cannot be served is a config error, found before anything starts
        try:
            tls.server_context(config.tls_cert, config.tls_key)
        except tls.TlsError as error:
            print("violin-helper: %s: tls_cert: %s" % (args.config, error), file=sys.stderr)
            return 2
    if args.check:
        print("%s: OK (%d members)" % (args.config, len(config.members)))
        return 0
    os.makedirs(config.work_dir, exist_ok=True)
    helper = Helper(config)
    for backend in helper.backends():
        backend.start()
    server = listen(config.host, config.port, make_handler(helper), "violin-helper", config.tls_cert, config.tls_key)
    if server is None:
        return 1
    print("violin-helper: listening on %s://%s:%d for %s%s" % (
        scheme_of(server), config.host, config.port, ", ".join(helper.names()) or "no members yet",
        "; registering them with %s as %s" % (config.controller, config.advertise_url) if config.controller else ""),
        flush=True)
    helper.register_all()  # in the background: a controller not up yet is asked again
    return serve(server)


if __name__ == "__main__":
    sys.exit(main())
