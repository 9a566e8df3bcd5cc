"""``ryu-manager violin_snapshot``: the RyuApp shim over ``violin_core``.

This module only translates: OpenFlow 1.3 events into calls on the pure core
(``violin_core.controller.ViolinController``) and the core's message objects
(``violin_core.of``) into ryu parser messages. It runs on Ryu 4.34 and on its
maintained fork os-ken. REST is served under ``/violin`` through Ryu's WSGI
server (``--wsapi-host``/``--wsapi-port``, default 127.0.0.1:8080 here) or, on
os-ken (which has no WSGI module), through a threaded WSGI server of our own on
the same options. With ``api.tls_cert``/``api.tls_key`` configured the REST API
is HTTPS, served by our own server on both frameworks (Ryu's ``ryu.app.wsgi``
passes no TLS options to its server), and ``advertise_url`` defaults to https.

The core is not thread-safe: every entry into it (OpenFlow events, REST
requests, the ticker) holds ``self.lock``, which the io waits (barriers, flow
statistics, sleeps) give up while they wait. Under Ryu's eventlet that is a
green semaphore; under os-ken's native threads a real one.
"""

import dataclasses
import functools
import logging
import struct
import sys
import threading
import time
import urllib.parse
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import violin_ryu_compat

violin_ryu_compat.install()

try:  # Ryu 4.34
    from ryu import cfg
    from ryu.base import app_manager
    from ryu.controller import ofp_event
    from ryu.controller.handler import CONFIG_DISPATCHER, DEAD_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
    from ryu.lib import hub
    from ryu.ofproto import ofproto_v1_3
    from ryu.ofproto.ofproto_protocol import ProtocolDesc
    FRAMEWORK = "ryu"
except ModuleNotFoundError:  # os-ken
    from os_ken import cfg
    from os_ken.base import app_manager
    from os_ken.controller import ofp_event
    from os_ken.controller.handler import CONFIG_DISPATCHER, DEAD_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
    from os_ken.lib import hub
    from os_ken.ofproto import ofproto_v1_3
    from os_ken.ofproto.ofproto_protocol import ProtocolDesc
    FRAMEWORK = "os_ken"

from oslo_config.cfg import NoSuchOptError

try:
    from ryu.app.wsgi import ControllerBase, WSGIApplication, route
except ModuleNotFoundError:
    ControllerBase = WSGIApplication = route = None

from violin_client import tls
from violin_client.api import ApiClient, Unreachable
from violin_core import of
from violin_core.config import ConfigError, load as load_config
from violin_core.controller import ControllerIO, ViolinController
from violin_core.routes import build_rest_app

LOG = logging.getLogger("violin_snapshot")
BaseApp = getattr(app_manager, "RyuApp", None) or app_manager.OSKenApp
COOKIE_APP = 0x76696F6C << 32  # "viol" in the high half marks every flow this app installs
COOKIE_APP_MASK = 0xFFFFFFFF << 32  # the low half is the flow's role (violin_core.of.ROLE_*)
TICK_SECONDS = 0.1
WRITE_BYTES = 64 * 1024  # the most one write to a switch carries (see ViolinSnapshot.send)
DEFAULT_WSAPI_HOST = "127.0.0.1"
DEFAULT_WSAPI_PORT = 8080

try:  # bind the REST API to loopback unless the user says otherwise
    cfg.CONF.set_default("wsapi_host", DEFAULT_WSAPI_HOST)
except NoSuchOptError:
    pass


def _tls_configured() -> bool:
    """Whether the config asks for HTTPS (decided at import: Ryu builds the app's contexts before the app).
    A config that does not load says so later, when the app starts."""
    try:
        return bool(load_config().tls_cert)
    except ConfigError:
        return False


SERVE_TLS = _tls_configured()


if ControllerBase is not None:
    class _RestBridge(ControllerBase):
        """Hands every /violin request to the core's WSGI app."""

        def __init__(self, req, link, data, **config):
            super().__init__(req, link, data, **config)
            self.rest_app = data

        # [\s\S], not ".": a decoded path may hold a newline (%0A), and every /violin... path must reach
        # the core (its JSON 404), never Ryu's HTML one.
        @route("violin", "/violin{tail}", requirements={"tail": r"(/[\s\S]*)?"})
        def handle(self, req, **_kwargs):
            return req.get_response(self.rest_app)


def _locked(handler):
    """Run an event handler of the app with the core lock held."""
    @functools.wraps(handler)
    def wrapped(self, *args, **kwargs):
        with self.lock:
            return handler(self, *args, **kwargs)
    return wrapped


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 overflowed with many helpers calling at once (SYN cookies, resets)

    def finish_request(self, request, client_address):
        why = tls.handshake(request)  # HTTPS: in this connection's thread, not the accept loop
        if why is not None:
            LOG.warning("REST API: %s from %s", why, client_address[0])
            return
        super().finish_request(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


class ViolinSnapshot(BaseApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]
    _CONTEXTS = {"wsgi": WSGIApplication} if WSGIApplication is not None and not SERVE_TLS else {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            config = load_config()
        except ConfigError as exc:
            print("violin_snapshot: %s" % exc, file=sys.stderr)
            raise SystemExit(2) from None
        try:
            self._tls = tls.server_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        except tls.TlsError as exc:
            print("violin_snapshot: api.tls_cert: %s" % exc, file=sys.stderr)
            raise SystemExit(2) from None
        self.datapaths = {}
        self.lock = hub.BoundedSemaphore(1)
        self.io = HubIO(self, config.ca_file)
        if not config.advertise_url:  # helpers call back where the REST API listens
            host = _conf("wsapi_host", DEFAULT_WSAPI_HOST)
            host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
            config = dataclasses.replace(config, advertise_url="%s://%s:%d" % (
                "https" if self._tls else "http", "[%s]" % host if ":" in host else host,
                _conf("wsapi_port", DEFAULT_WSAPI_PORT)))
        self.core = ViolinController(config, time.monotonic, time.time, self.io)
        self._port_desc = {}
        self._stopping = threading.Event()
        self._rest_server = None
        self.rest_app = self._locked_app(build_rest_app(self.core))
        if "wsgi" in kwargs and self._tls is None:
            kwargs["wsgi"].register(_RestBridge, self.rest_app)
            self.threads.append(hub.spawn(self.answer_json_elsewhere, kwargs["wsgi"]))
        else:
            self.threads.append(hub.spawn(self._serve_rest))
        self.threads.append(hub.spawn(self._ticker))
        LOG.info("violin_snapshot %s on %s", __import__("violin_core").__version__, FRAMEWORK)

    # --- sending ---------------------------------------------------------------

    def send(self, messages):
        """Send ``messages`` in order, a few writes per switch: the framework's send queue holds 16
        entries, so a flip's hundreds of flow-mods, one at a time, each waited for its send loop
        (a third of the controller's time in 64 in-band cuts at once, py-spy). A write is at most
        ``WRITE_BYTES``: a full queue (the core lock held meanwhile) then waits for one such write to
        drain, not for thousands of released frames at once."""
        parts = {}
        for message in messages:
            datapath = self.datapaths.get(message.dpid)
            if datapath is not None:
                parts.setdefault(message.dpid, (datapath, []))[1].append(wire(datapath, message))
        for datapath, chunks in parts.values():
            pending, size = [], 0
            for chunk in chunks:
                if pending and size + len(chunk) > WRITE_BYTES:
                    datapath.send(b"".join(pending))
                    pending, size = [], 0
                pending.append(chunk)
                size += len(chunk)
            datapath.send(b"".join(pending))

    @staticmethod
    def answer_json_elsewhere(wsgi):
        """Paths no app of this ryu-manager serves get the core's JSON 404 as well, not Ryu's text one: a
        catch-all route, connected after every app has registered its own (ryu-manager builds them all
        before the hub runs this), so it shadows none of theirs."""
        wsgi.mapper.connect("violin_elsewhere", "/{tail}", controller=_RestBridge, action="handle",
                            requirements={"tail": r"[\s\S]*"})
        wsgi.mapper._created_regs = False  # Routes compiles its patterns once; compile them again with this one

    def _locked_app(self, app):
        def locked(environ, start_response):
            with self.lock:
                return app(environ, start_response)
        return locked

    def stop(self):
        """End our own threads too: os-ken's native hub cannot kill them, only join them."""
        self._stopping.set()
        if self._rest_server is not None:
            self._rest_server.shutdown()
        super().stop()

    def _ticker(self):
        while not self._stopping.is_set():
            try:
                with self.lock:
                    self.send(self.core.tick())
            except Exception:  # keep ticking; the error is logged in full
                LOG.exception("periodic work failed")
            hub.sleep(TICK_SECONDS)

    def _serve_rest(self):
        host = _conf("wsapi_host", DEFAULT_WSAPI_HOST)
        port = _conf("wsapi_port", DEFAULT_WSAPI_PORT)
        self._rest_server = make_server(host, port, self.rest_app, _ThreadingWSGIServer, _QuietHandler)
        if self._tls is not None:
            self._rest_server.socket = tls.wrap_listener(self._rest_server.socket, self._tls)
            self._rest_server.base_environ["wsgi.url_scheme"] = "https"
        LOG.info("REST API on %s://%s:%d/violin", "https" if self._tls else "http", host, port)
        self._rest_server.serve_forever()

    # --- OpenFlow events ---------------------------------------------------------

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    @_locked
    def _switch_features(self, ev):
        datapath = ev.msg.datapath
        self.datapaths[datapath.id] = datapath
        self._port_desc[datapath.id] = []
        datapath.send_msg(datapath.ofproto_parser.OFPPortDescStatsRequest(datapath, 0))

    @set_ev_cls(ofp_event.EventOFPPortDescStatsReply, MAIN_DISPATCHER)
    @_locked
    def _port_desc_reply(self, ev):
        datapath, ofproto = ev.msg.datapath, ev.msg.datapath.ofproto
        collected = self._port_desc.setdefault(datapath.id, [])
        collected.extend((p.port_no, _name(p), _port_up(ofproto, p)) for p in ev.msg.body)
        if not ev.msg.flags & ofproto.OFPMPF_REPLY_MORE:
            self.send(self.core.switch_up(datapath.id, self._port_desc.pop(datapath.id)))

    @set_ev_cls(ofp_event.EventOFPStateChange, DEAD_DISPATCHER)
    @_locked
    def _switch_gone(self, ev):
        dpid = ev.datapath.id
        if dpid is not None and self.datapaths.get(dpid) is ev.datapath:
            del self.datapaths[dpid]
            self.send(self.core.switch_down(dpid))

    @set_ev_cls(ofp_event.EventOFPPortStatus, MAIN_DISPATCHER)
    @_locked
    def _port_status(self, ev):
        msg, ofproto = ev.msg, ev.msg.datapath.ofproto
        deleted = msg.reason == ofproto.OFPPR_DELETE
        self.send(self.core.port_changed(msg.datapath.id, msg.desc.port_no, _name(msg.desc),
                                         _port_up(ofproto, msg.desc), deleted))

    @set_ev_cls(ofp_event.EventOFPErrorMsg, [CONFIG_DISPATCHER, MAIN_DISPATCHER])
    @_locked
    def _error(self, ev):
        msg = ev.msg
        self.core.switch_error(msg.datapath.id)
        LOG.error("switch %016x refused a message: type=%d code=%d data=%s",
                  msg.datapath.id, msg.type, msg.code, bytes(msg.data[:64]).hex())

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    @_locked
    def _packet_in(self, ev):
        msg = ev.msg
        role = msg.cookie & 0xFFFFFFFF if msg.cookie & COOKIE_APP_MASK == COOKIE_APP else None
        self.send(self.core.packet_in(msg.datapath.id, msg.match["in_port"], bytes(msg.data), role))

    @set_ev_cls(ofp_event.EventOFPBarrierReply, MAIN_DISPATCHER)
    def _barrier_reply(self, ev):
        self.io.replied(ev.msg.datapath.id, ev.msg.xid, None, final=True)

    @set_ev_cls(ofp_event.EventOFPFlowStatsReply, MAIN_DISPATCHER)
    def _flow_stats_reply(self, ev):
        msg = ev.msg
        packets = sum(stat.packet_count for stat in msg.body)
        self.io.replied(msg.datapath.id, msg.xid, packets, final=not msg.flags & msg.datapath.ofproto.OFPMPF_REPLY_MORE)


class HubIO(ControllerIO):
    """The core's waiting work on the framework's hub: barriers and flow statistics by xid,
    helpers over HTTP. Every wait gives up the core lock (held by the caller) while it waits."""

    def __init__(self, app, ca_file=None):
        self.app, self.ca_file = app, ca_file  # ca_file verifies https:// helpers and servers
        self.pending = {}  # (dpid, xid) -> [event, accumulated value]

    def _unlocked(self, wait, *args):
        self.app.lock.release()
        try:
            return wait(*args)
        finally:
            self.app.lock.acquire()

    def send(self, messages):
        self.app.send(messages)

    def _request(self, dpid, build):
        datapath = self.app.datapaths.get(dpid)
        if datapath is None:
            return None
        request = build(datapath)
        datapath.set_xid(request)
        waiter = self.pending[(dpid, request.xid)] = [hub.Event(), 0]
        datapath.send_msg(request)
        return (dpid, request.xid), waiter

    def _collect(self, requests, timeout):
        deadline = time.monotonic() + timeout
        try:
            if any(r is None for r in requests):
                return None
            for _, waiter in requests:
                if not self._unlocked(waiter[0].wait, max(0.0, deadline - time.monotonic())):
                    return None
            return [waiter[1] for _, waiter in requests]
        finally:
            for request in requests:
                if request is not None:
                    self.pending.pop(request[0], None)

    def replied(self, dpid, xid, value, final):
        waiter = self.pending.get((dpid, xid))
        if waiter is not None:
            waiter[1] += value or 0
            if final:
                waiter[0].set()

    def send_and_barrier(self, messages, dpids, timeout):
        self.app.send(messages)
        requests = [self._request(d, lambda dp: dp.ofproto_parser.OFPBarrierRequest(dp)) for d in sorted(dpids)]
        return self._collect(requests, timeout) is not None

    def flow_stats(self, dpids, role, timeout):
        def build(dp):
            ofp, parser = dp.ofproto, dp.ofproto_parser
            return parser.OFPFlowStatsRequest(dp, 0, ofp.OFPTT_ALL, ofp.OFPP_ANY, ofp.OFPG_ANY,
                                              COOKIE_APP | role, 0xFFFFFFFFFFFFFFFF, parser.OFPMatch())
        values = self._collect([self._request(d, build) for d in sorted(dpids)], timeout)
        return None if values is None else sum(values)

    def wait_until(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            self._unlocked(hub.sleep, 0.001)
        return predicate()

    def sleep(self, seconds):
        self._unlocked(hub.sleep, seconds)

    def run_blocking(self, function):
        if getattr(hub, "HUB_TYPE", "eventlet") == "native":  # os-ken: real threads already
            return self._unlocked(function)
        from eventlet import tpool  # a thread of eventlet's pool; the hub runs on meanwhile
        return self._unlocked(tpool.execute, function)

    def new_event(self):
        # os-ken's native hub.Event never times out (its Timeout cannot interrupt the wait): real threads
        # there, a real event; under eventlet (threading not patched) only the hub's event lets others run.
        return threading.Event() if getattr(hub, "HUB_TYPE", "eventlet") == "native" else hub.Event()

    def wait_event(self, event, timeout):
        return event.is_set() or bool(self._unlocked(event.wait, timeout))

    def spawn(self, function, *args):
        def guarded():
            try:
                with self.app.lock:
                    function(*args)
            except Exception:  # the core's background work must never die silently
                LOG.exception("background work %s failed", getattr(function, "__name__", function))
        self.app.threads.append(hub.spawn(guarded))

    def gather(self, functions):
        results, finished = [None] * len(functions), [hub.Event() for _ in functions]

        def run(index, function):
            try:
                with self.app.lock:
                    results[index] = function()
            except Exception as error:  # handed to the caller, which decides
                results[index] = error
            finally:
                finished[index].set()
        for index, function in enumerate(functions):
            self.app.threads.append(hub.spawn(run, index, function))
        for event in finished:
            self._unlocked(event.wait)
        return results

    def post_json(self, url, body, timeout, token=None, method="POST"):
        return self._unlocked(self._post_json, url, body, timeout, token, method, self.ca_file)

    @staticmethod
    def _post_json(url, body, timeout, token, method, ca_file=None):
        parts = urllib.parse.urlsplit(url)
        try:
            return ApiClient("%s://%s" % (parts.scheme, parts.netloc), token, timeout, ca_file).request(
                method, parts.path, body)
        except Unreachable as error:
            return None, error.reason
        except tls.TlsError as error:  # a CA file that cannot be read
            return None, str(error)


def _conf(name, default):
    try:
        return getattr(cfg.CONF, name)
    except NoSuchOptError:
        return default


def _name(port):
    return port.name.decode("utf-8", "replace") if isinstance(port.name, bytes) else port.name


def _port_up(ofproto, port) -> bool:
    return not (port.state & ofproto.OFPPS_LINK_DOWN) and not (port.config & ofproto.OFPPC_PORT_DOWN)


class _Xid:
    """Takes the datapath's next xid (``Datapath.set_xid``) for bytes encoded once."""
    xid = None

    def set_xid(self, xid):
        self.xid = xid


def wire(datapath, message) -> bytes:
    """``message`` as the bytes the switch gets, with the datapath's next xid.

    Flow-mods repeat (the same cut rules every other snapshot: colours alternate), and building
    and serialising one through the framework's parser took 0.2 ms: they are encoded once
    (``_flow_mod_bytes``) and only their xid is set per send."""
    if isinstance(message, of.FlowMod):
        xid = _Xid()
        datapath.set_xid(xid)
        encoded = bytearray(_flow_mod_bytes(datapath.ofproto.OFP_VERSION, message))
        struct.pack_into("!I", encoded, 4, xid.xid)  # ofp_header: version, type, length, xid
        return bytes(encoded)
    msg = to_ofp(datapath, message)
    datapath.set_xid(msg)
    msg.serialize()
    return bytes(msg.buf)


@functools.lru_cache(maxsize=1 << 16)
def _flow_mod_bytes(version: int, message: of.FlowMod) -> bytes:
    """The serialised flow-mod (xid 0); messages are frozen dataclasses, equal when their bytes are."""
    msg = to_ofp(ProtocolDesc(version), message)
    msg.set_xid(0)
    msg.serialize()
    return bytes(msg.buf)


def to_ofp(datapath, message):
    """Translate one ``violin_core.of`` message into a ryu/os-ken parser message."""
    ofproto, parser = datapath.ofproto, datapath.ofproto_parser
    if isinstance(message, of.Barrier):
        return parser.OFPBarrierRequest(datapath)
    if isinstance(message, of.PacketOut):
        return parser.OFPPacketOut(datapath, ofproto.OFP_NO_BUFFER, message.in_port,
                                   [_action(parser, a) for a in message.actions], message.data)
    if message.command == "delete":  # every flow of this table and role the match covers
        return parser.OFPFlowMod(datapath, cookie=COOKIE_APP | message.entry.role, cookie_mask=0xFFFFFFFFFFFFFFFF,
                                 table_id=message.entry.table_id, command=ofproto.OFPFC_DELETE,
                                 out_port=ofproto.OFPP_ANY, out_group=ofproto.OFPG_ANY,
                                 match=parser.OFPMatch(**dict(message.entry.match)))
    if message.command == "delete_all":
        return parser.OFPFlowMod(datapath, cookie=COOKIE_APP, cookie_mask=COOKIE_APP_MASK,
                                 table_id=ofproto.OFPTT_ALL, command=ofproto.OFPFC_DELETE,
                                 out_port=ofproto.OFPP_ANY, out_group=ofproto.OFPG_ANY)
    entry = message.entry
    instructions = []
    if entry.actions:
        instructions.append(parser.OFPInstructionActions(
            ofproto.OFPIT_APPLY_ACTIONS, [_action(parser, a) for a in entry.actions]))
    if entry.goto is not None:
        instructions.append(parser.OFPInstructionGotoTable(entry.goto))
    command = ofproto.OFPFC_ADD if message.command == "add" else ofproto.OFPFC_DELETE_STRICT
    return parser.OFPFlowMod(datapath, cookie=COOKIE_APP | entry.role, table_id=entry.table_id, command=command,
                             priority=entry.priority, buffer_id=ofproto.OFP_NO_BUFFER,
                             out_port=ofproto.OFPP_ANY, out_group=ofproto.OFPG_ANY,
                             match=parser.OFPMatch(**dict(entry.match)), instructions=instructions)


def _action(parser, action):
    if isinstance(action, of.Output):
        return parser.OFPActionOutput(action.port, action.max_len)
    if isinstance(action, of.PushVlan):
        return parser.OFPActionPushVlan(action.ethertype)
    if isinstance(action, of.PopVlan):
        return parser.OFPActionPopVlan()
    if isinstance(action, of.SetField):
        return parser.OFPActionSetField(**{action.name: action.value})
    if isinstance(action, of.Resubmit):
        return parser.NXActionResubmitTable(in_port=0xFFF8, table_id=action.table_id)  # 0xfff8: this packet's port
    if isinstance(action, of.LearnVid):
        return parser.NXActionLearn(table_id=action.table_id, priority=action.priority,
                                    cookie=COOKIE_APP | action.role, specs=[
                                        parser.NXFlowSpecMatch(src=("in_port", 0), dst=("in_port", 0), n_bits=32),
                                        parser.NXFlowSpecMatch(src=("reg0", 0), dst=("reg0", 0), n_bits=32),
                                        parser.NXFlowSpecLoad(src=action.vid, dst=("vlan_vid", 0), n_bits=12)])
    raise TypeError("unknown action %r" % (action,))
