"""What the helper does for every member, whatever its backend (hostside/backends/).

Snapshot (in the background, one job per snapshot and member)::

    open the backend's quiet proof (CRIU: the marker socket in the member's namespace)
    -> controller prepare (frames for the member are held from now on) -> purge the datapath
       (a backend that ``prepares_itself`` calls this step later, just before the member stops)
    -> backend.snapshot(member, sink, at_cut), where at_cut, run while the member is stopped, is:
           quiet proof (marker sent / a VM's tap drained) -> controller cut {"marker": sends_marker}
           -> purge the datapath
       and the backend stores the image through the sink (a snapshot server)
       An asynchronous cut (a backend that ``cuts_async``, the default ``VIOLIN_CUT=async``): prepare
       asks {"divert": true} (the switch learns the member's new colour from its marker), at_cut only
       sends the marker, waits for the switch to send it back and purges the datapath, and once the
       member runs again (``resumed``) a cut request frame down its link (``cut_frame`` in the
       prepare's answer; ``VIOLIN_CUT=async-call``: the cut call) has the controller flip it: the
       member is frozen for no controller round trip, frames held for it are released
       only once CRIU's network lock is gone, and no HTTP call stands between its resume and that
       release (its done report flips it if the frame never reached the controller). A backend whose
       member takes frames unharmed while stopped (``flips_stopped``: a VM's tap) sends that request
       at the cut, right behind the marker, so what is held for it is released while it completes.
    -> controller done {pause_ms, bytes, server, image{backend, files, storage{logical_bytes,
       stored_bytes, sent_bytes}, ...}}
    or, on any failure at any step, controller failed {reason} and the job "failed" with it.

Stage fetches the image and checks every checksum, restore replaces the running
member by it (left stopped), resume and stop act on the member: the same calls
for every backend. Every operation finds its member afresh (``backend.locate``:
pid, namespaces, interface, MAC), since a restored member's pid or namespace can
change; a snapshot of a member that cannot be located is refused at once (502).

Members can change at runtime (``add_member``, ``remove_member``, under a lock).
The ``Registrar`` keeps the controller's view of them: each member running here
is registered (``PUT /violin/members/<name>``: its MAC from locate, this helper's
URL, backend, marker, host) when the helper starts, when it is added and after a
restore onto this helper; a controller that does not answer (or answers 409
while the member is in a running snapshot or restore) is asked again in the
background, never holding up the helper. Everything with an outside effect is
injected: the controller poster, the registration call, the datapath purge, the
store client factory, the switch port lookup, the clock and the thread that runs
a job.
"""

import logging
import os
import shutil
import threading
import time
import traceback
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from hostside.backends.base import Backend, ImageSink, Located
from hostside.kept import KEEP_IMAGES, KeptImages
from hostside.metrics import HelperMetrics
from violin_core.schema import Field, ListOf, Schema, SchemaError, matches, name

LOG = logging.getLogger("violin-helper")
# Members one helper stages (fetches and checks) at once; the controller asks for all of them together.
# One: concurrent downloads in one helper are Python threads under one GIL and cost more than one after
# another (16:39, 8 CRIU members 4 at a time: staging 3148 ms where one took 170). Restores are not
# bounded: their work is in CRIU's or QEMU's own processes (8 at once: 2.4x one; 3 VMs: 1.29x).
STAGE_WORKERS = 1
# "async" (default): backends that can (cuts_async) take the cut off the member's frozen path and, once it
# runs again, ask for its flip by a frame down its link when the controller offers it (``cut_frame``);
# "async-call": the same with the cut call instead of that frame; "sync": the cut call is made while the
# member is frozen, as for every backend that cannot (VMs).
CUT_MODE = os.environ.get("VIOLIN_CUT", "async")


class HelperError(Exception):
    """An error with its HTTP status (``status``)."""
    status = 500


class BadRequest(HelperError):
    status = 400


class UnknownMember(HelperError):
    status = 404


class Conflict(HelperError):
    status = 409


class Failed(HelperError):
    """A backend, the store or the controller failed."""
    status = 502


class ControllerError(RuntimeError):
    """The controller refused a callback (``status``) or could not be reached (``status`` None)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


# Errors of backends (CriuError, VmError...), the store (StorageError) and the controller: RuntimeError
# or OSError. Anything else (AttributeError, KeyError...) is a bug: 500, logged with its traceback.
FAILURES = (RuntimeError, OSError)


def status_of(error: BaseException) -> int:
    if isinstance(error, HelperError):
        return error.status
    if isinstance(error, SchemaError):
        return 400
    if isinstance(error, FAILURES):
        return 502
    return 500


_STR = Field(str)
# Snapshot and member names become directories under work_dir (stage, restore): a name, never a path.
_NAME = Field(str, check=name)
_SERVER = Field(str, check=matches(r"^https?://[^\s/]+", "a snapshot server's http://HOST:PORT URL"))
BODIES = {  # the request bodies the controller sends
    "snapshot": Schema({"snapshot": _NAME, "member": _NAME, "epoch": Field((int, type(None)), None),
                        "prepare_url": Field((str, type(None)), None), "cut_url": _STR, "done_url": _STR,
                        "failed_url": _STR}),
    "stage": Schema({"snapshot": _NAME, "member": _NAME, "server": _SERVER,
                     "files": ListOf(Field(dict, check=lambda f: None if all(
                         isinstance(f.get(k), str) for k in ("name", "sha256")) else "needs name and sha256 strings"))}),
    "member": Schema({"snapshot": _NAME, "member": _NAME}),
}
MEMBER_NAME = _NAME


def read_body(kind: str, body) -> dict:
    """The keys of ``body`` that ``kind`` knows, validated (others are ignored: newer controllers)."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    schema = BODIES[kind]
    try:
        return schema.validate({k: v for k, v in body.items() if k in schema.fields})
    except SchemaError as error:
        raise BadRequest(str(error)) from None


# How long a member that runs again waits for this helper's other members to be through their freezes
# before storing its image (UploadGate); past it, it stores anyway.
SETTLE_TIMEOUT_S = float(os.environ.get("VIOLIN_SETTLE_TIMEOUT_S", "30"))


class UploadGate:
    """A member's image is stored once none of this helper's members is still to freeze or frozen.

    Storing (cutting, hashing, compressing, sending) takes the CPU that a member frozen meanwhile
    waits for: 8 CRIU members on 2 cores, frozen one at a time, paused 2.9x their bare dump with the
    earlier ones storing beside them and 1.19x with every store after the last freeze (issue 11).
    ``begin(key)`` as a member's snapshot starts, ``settle(key)`` once it runs again and is about to
    store (it waits for the others, at most ``timeout``), ``end(key)`` whatever happened."""

    def __init__(self, timeout: float = SETTLE_TIMEOUT_S, clock: Callable[[], float] = time.monotonic):
        self.timeout, self.clock = timeout, clock
        self.changed = threading.Condition()
        self.freezing = set()

    def begin(self, key: str) -> None:
        with self.changed:
            self.freezing.add(key)

    def end(self, key: str) -> None:
        with self.changed:
            self.freezing.discard(key)
            self.changed.notify_all()

    def settle(self, key: str) -> float:
        """``key``'s member is through its freeze: wait until every other one is too (or ``timeout``
        passed); the seconds waited."""
        began = self.clock()
        with self.changed:
            self.freezing.discard(key)
            self.changed.notify_all()
            if not self.changed.wait_for(lambda: not self.freezing, timeout=self.timeout):
                LOG.warning("%s: stores its image while %s still to be frozen (waited %.0f s)",
                            key, ", ".join(sorted(self.freezing)), self.timeout)
        return self.clock() - began


class StoreSink(ImageSink):
    """An ImageSink on one store client (a snapshot server); ``storage()`` adds up what its uploads
    cost: logical bytes (the image's size), stored bytes (newly stored by the server, compressed:
    a chunk store keeps only chunks it lacked) and sent bytes (over the wire). ``settle()`` waits
    at ``gate`` (if any) for the helper's other members' freezes."""

    COUNTS = ("logical_bytes", "stored_bytes", "sent_bytes")

    def __init__(self, client, snapshot: str, member: str, gate: Optional[UploadGate] = None,
                 kept: Optional[KeptImages] = None):
        self.client, self.snapshot, self.member, self.gate, self.kept = client, snapshot, member, gate, kept
        self.counts = dict.fromkeys(self.COUNTS, 0)
        self.settled_ms: Optional[float] = None

    def settle(self) -> None:
        if self.gate is not None and self.settled_ms is None:
            self.settled_ms = round(self.gate.settle("%s/%s" % (self.snapshot, self.member)) * 1000, 1)

    def _count(self, stored: dict) -> dict:
        for key in self.COUNTS:
            self.counts[key] += int(stored.get(key, stored.get("bytes", 0)))
        return _file_entry(stored)

    def put_dir(self, directory: str) -> List[dict]:
        return [self._count(f) for f in self.client.upload_dir(self.snapshot, self.member, directory)]

    def put_stream(self, name: str, reader) -> dict:
        return self._count(dict(self.client.upload_stream(self.snapshot, self.member, name, reader), name=name))

    @property
    def keeps(self) -> bool:
        return self.kept is not None and self.kept.keep > 0

    def keep(self, directory: str, files: List[dict], trees: Optional[Dict[str, str]] = None,
             private: Sequence[str] = ()) -> bool:
        return self.keeps and self.kept.take(self.member, self.snapshot, directory, files, trees, private)

    def storage(self) -> dict:
        return dict(self.counts)

    def discard(self) -> None:
        if self.kept is not None:
            self.kept.forget(self.member, self.snapshot)
        self.client.delete(self.snapshot, self.member)


def _file_entry(stored: dict) -> dict:
    return {"name": stored["name"], "bytes": stored["bytes"], "sha256": stored["sha256"]}


def spawn_thread(target: Callable[[], None]) -> None:
    threading.Thread(target=target, daemon=True).start()


def runs_here(where: Located) -> bool:
    """Whether a located member runs on this host now (a backend says so in ``details["running"]``;
    by default, when it has a pid). Only running members are registered: a helper that could host a
    member restored onto it (placement) does not claim it before."""
    return bool(where.details.get("running", where.pid is not None))


def registration(name: str, backend: Backend, where: Located, helper_url: str, host: str) -> dict:
    """The body of the controller's ``PUT /violin/members/<name>`` for a located member."""
    return {"name": name, "macs": [where.mac], "helper_url": helper_url, "backend": backend.name,
            "marker": bool(backend.sends_marker), "host": host, "handle": str(where.details.get("handle", ""))[:200]}


REFRESH_S = 30.0  # seconds between re-registrations of every member (PUT is idempotent)


class Registrar:
    """This helper's members as the controller should know them, kept so in the background.

    ``want(name)``: locate the member and register it (PUT) if it runs here; ``drop(name)``: unregister it
    (DELETE). ``call(method, name, body)`` talks to the controller (raises ControllerError); what cannot be
    done now (no answer, 409) is tried again after ``retry`` seconds, doubling up to ``max_retry``; every
    ``refresh`` seconds each registered member is registered again (a restarted controller has forgotten
    the members registered over REST). The
    worker runs in ``spawn``'s thread; ``run_once()`` is one pass (what unit tests call). ``status`` says,
    per member, whether the controller has it and why not."""

    def __init__(self, call: Callable[[str, str, Optional[dict]], object], describe: Callable[[str], Optional[dict]],
                 spawn: Callable[[Callable[[], None]], None] = spawn_thread, clock: Callable[[], float] = time.time,
                 retry: float = 0.5, max_retry: float = 10.0, refresh: Optional[float] = REFRESH_S):
        self.call, self.describe, self.spawn, self.clock = call, describe, spawn, clock
        self.retry, self.max_retry, self.refresh = retry, max_retry, refresh
        self.pending: Dict[str, str] = {}  # name -> "put" or "delete"
        self.accepted: Dict[str, Optional[dict]] = {}  # name -> the body the controller last took
        self.status: Dict[str, dict] = {}
        self.wake = threading.Condition()
        self.running = False
        self.delay = retry

    def want(self, name: str) -> None:
        self._queue(name, "put")

    def drop(self, name: str) -> None:
        self._queue(name, "delete")

    def _queue(self, name: str, action: str) -> None:
        with self.wake:
            self.pending[name] = action
            self.delay = self.retry
            self.wake.notify()
            start = not self.running
            self.running = True
        if start:
            self.spawn(self._loop)

    def _loop(self) -> None:
        while True:
            left = self.run_once()
            with self.wake:
                if left:  # something failed: back off (a new want wakes us at once)
                    self.wake.wait(self.delay)
                    self.delay = min(self.delay * 2, self.max_retry)
                    continue
                if self.refresh is None:
                    self.running = False
                    return
                self.wake.wait(self.refresh)
                if not self.pending:  # say it again now and then: a restarted controller forgot REST registrations
                    for member in list(self.accepted):
                        self.pending.setdefault(member, "refresh")

    def run_once(self) -> int:
        """Try every pending registration once; how many are still pending."""
        with self.wake:
            work = dict(self.pending)
        for member, action in work.items():
            try:
                done = self._do(member, action)
            except Exception as error:  # noqa: BLE001 - kept and retried; the reason is shown in /members
                done = False
                self.status[member] = {"registered": self.accepted.get(member) is not None,
                                       "reason": str(error)[:500], "at": self.clock()}
                LOG.warning("registering %s with the controller: %s (will retry)", member, error)
            if done:
                with self.wake:
                    if self.pending.get(member) == action:
                        del self.pending[member]
        with self.wake:
            return len(self.pending)

    def _do(self, name: str, action: str) -> bool:
        if action == "delete":
            if self.accepted.get(name) is not None:
                self.call("DELETE", name, None)
            self.accepted.pop(name, None)
            self.status[name] = {"registered": False, "reason": "removed from this helper", "at": self.clock()}
            return True
        body = self.describe(name)  # locates it (raises if it cannot be located)
        if body is None:
            self.status[name] = {"registered": self.accepted.get(name) is not None,
                                 "reason": "not running here: not registered by this helper", "at": self.clock()}
            return True
        if self.accepted.get(name) != body or action == "refresh":
            self.call("PUT", name, body)
            self.accepted[name] = body
        self.status[name] = {"registered": True, "at": self.clock()}
        return True

    def forget(self, name: str) -> None:
        """The member went elsewhere (stopped here for a restore on another helper): not ours to register."""
        with self.wake:
            self.pending.pop(name, None)
        self.accepted.pop(name, None)
        self.status[name] = {"registered": False, "reason": "moved to another helper", "at": self.clock()}


class Orchestrator:
    """The helper's work, backend-neutral. ``members``: name -> (backend, member spec).

    ``factory(name, spec) -> (backend, member)`` makes a member added at runtime from its spec (the helper
    config's ``members.<name>`` shape); ``registrar`` keeps the controller's view of the members (None: no
    controller to tell); ``on_change(members specs)`` persists runtime changes."""

    def __init__(self, members: Dict[str, Tuple[Backend, object]], servers: List[str], work_dir: str,
                 post: Callable[[str, dict], object], store: Callable[[str], object],
                 purge: Callable[[], object] = lambda: None,
                 attachment: Callable[[Optional[str]], Optional[dict]] = lambda port: None,
                 clock: Callable[[], float] = time.time, spawn: Callable[[Callable[[], None]], None] = spawn_thread,
                 metrics: Optional[HelperMetrics] = None,
                 factory: Optional[Callable[[str, dict], Tuple[Backend, object]]] = None,
                 registrar: Optional[Registrar] = None, on_change: Optional[Callable[[str, Optional[dict]], None]] = None,
                 stage_workers: int = STAGE_WORKERS, keep_images: int = KEEP_IMAGES):
        self.members, self.servers, self.work_dir = dict(members), servers, work_dir
        self.staging = threading.BoundedSemaphore(stage_workers)  # members downloaded at once
        self.checking = threading.BoundedSemaphore(os.cpu_count() or 1)  # kept images checked at once
        self.kept = KeptImages(os.path.join(work_dir, "kept"), keep_images)
        self.uploads = UploadGate()  # images stored after every member's freeze
        self.metrics = HelperMetrics() if metrics is None else metrics  # its own registry unless given
        self.post, self.store, self.purge, self.attachment = post, store, purge, attachment
        self.clock, self.spawn = clock, spawn
        self.factory, self.registrar, self.on_change = factory, registrar, on_change
        self.jobs: Dict[str, dict] = {}
        self.lock = threading.Lock()
        self.members_lock = threading.RLock()  # members come and go at runtime (POST/DELETE /members)

    def backends(self) -> List[Backend]:
        seen = {}
        with self.members_lock:
            for backend, _spec in self.members.values():
                seen[id(backend)] = backend
        return list(seen.values())

    def names(self) -> List[str]:
        with self.members_lock:
            return sorted(self.members)

    def _member(self, name: str) -> Tuple[Backend, object]:
        with self.members_lock:
            try:
                return self.members[name]
            except KeyError:
                raise UnknownMember("this helper hosts no member %s" % name) from None

    def locate(self, name: str) -> Located:
        """Where member ``name`` is now (its backend finds it afresh); Failed (502) if it cannot be found."""
        backend, member = self._member(name)
        try:
            return backend.locate(member)
        except FAILURES as error:
            raise Failed(str(error) or "cannot locate %s" % name) from None

    def server_for(self, member: str) -> str:
        return self.servers[zlib.crc32(member.encode()) % len(self.servers)]

    def _restore_dir(self, body: dict) -> str:
        return os.path.join(self.work_dir, "restore", body["snapshot"], body["member"])

    # --- members at runtime -----------------------------------------------------------------

    def registration_of(self, name: str, helper_url: str, host: str) -> Optional[dict]:
        """The registration body of ``name`` located now; None if it does not run here (or is gone)."""
        with self.members_lock:
            if name not in self.members:
                return None
            backend, member = self.members[name]
        where = backend.locate(member)
        if not runs_here(where) or not where.mac:
            return None
        return registration(name, backend, where, helper_url, host)

    def register_all(self) -> None:
        """At start: register every member that runs here (in the background)."""
        if self.registrar is not None:
            for member in self.names():
                self.registrar.want(member)

    def add_member(self, raw) -> dict:
        """``{"name": ..., "backend": ..., <the backend's spec>}``: host it from now on (and register it)."""
        if not isinstance(raw, dict):
            raise BadRequest("body must be a JSON object")
        name = raw.get("name")
        try:
            MEMBER_NAME.validate(name, "name")
        except SchemaError as error:
            raise BadRequest(str(error)) from None
        if self.factory is None:
            raise BadRequest("this helper takes no members at runtime")
        spec = {k: v for k, v in raw.items() if k != "name"}
        try:
            backend, member = self.factory(name, spec)
        except SchemaError as error:
            raise BadRequest("member %s: %s" % (name, error)) from None
        with self.members_lock:
            if name in self.members:
                raise Conflict("this helper hosts a member %s already; remove it first" % name)
            self.members[name] = (backend, member)
            if self.on_change is not None:
                self.on_change(name, spec)
        if self.registrar is not None:
            self.registrar.want(name)
        return self.member_view(name)

    def remove_member(self, name: str) -> dict:
        """Host ``name`` no more, and unregister it from the controller (409 while a snapshot of it runs
        or while the controller refuses: it takes part in a snapshot or restore)."""
        backend, member = self._member(name)
        with self.lock:
            busy = [key for key, job in self.jobs.items() if key.endswith("/" + name) and job["state"] == "running"]
        if busy:
            raise Conflict("a snapshot of %s is running (%s)" % (name, busy[0]))
        unregistered = None
        if self.registrar is not None and self.registrar.accepted.get(name) is not None:
            try:
                self.registrar.call("DELETE", name, None)
                unregistered = True
            except ControllerError as error:
                if error.status == 409:
                    raise Conflict("the controller keeps %s: %s" % (name, error)) from None
                unregistered = False  # not reachable now: the registrar will ask again
        with self.members_lock:
            self.members.pop(name, None)
            if self.on_change is not None:
                self.on_change(name, None)
        getattr(backend, "forget", lambda _member: None)(member)
        self.kept.forget(name)  # a member of that name added later is another one
        if self.registrar is not None:
            if unregistered is False:
                self.registrar.drop(name)
            else:
                self.registrar.accepted.pop(name, None)
                self.registrar.status[name] = {"registered": False, "reason": "removed from this helper",
                                               "at": self.clock()}
        return {"removed": name, "unregistered": unregistered}

    def member_view(self, name: str) -> dict:
        """What this helper knows of ``name``: its spec, where it is now (or why not) and its registration."""
        backend, member = self._member(name)
        view = {"name": name, "backend": backend.name,
                "spec": {k: v for k, v in vars(member).items() if k != "name"} if hasattr(member, "__dict__") else {}}
        try:
            where = backend.locate(member)
            view["located"] = {"mac": where.mac, "iface": where.iface, "pid": where.pid, "netns": where.netns,
                               "mntns": where.mntns, "port": where.port, "running": runs_here(where)}
        except Exception as error:  # noqa: BLE001 - shown, not raised: the member may not run here (yet)
            view["located"] = None
            view["problem"] = str(error)[:500] or type(error).__name__
        if self.registrar is not None:
            view["registration"] = self.registrar.status.get(name, {"registered": False, "reason": "pending"})
        return view

    def members_view(self) -> dict:
        return {"members": [self.member_view(name) for name in self.names()]}

    # --- snapshot ---------------------------------------------------------------------------

    def start_snapshot(self, raw: dict) -> dict:
        body = read_body("snapshot", raw)
        backend, member = self._member(body["member"])
        self.locate(body["member"])  # found now, or refused at once with the reason (the controller aborts)
        key = "%s/%s" % (body["snapshot"], body["member"])
        with self.lock:
            if key in self.jobs:
                raise Conflict("already snapshotting %s" % key)
            self.jobs[key] = {"state": "running", "started": self.clock()}
        self.uploads.begin(key)  # now, not in the job: a member quicker to freeze stores after this one's freeze
        self.spawn(lambda: self._run_snapshot(body, backend, member, key))
        return {"accepted": key}

    def _run_snapshot(self, body: dict, backend: Backend, member, key: str) -> None:
        """The whole snapshot of one member; whatever goes wrong ends in ``failed``, never escapes."""
        try:
            try:
                self._snapshot(body, backend, member)
            finally:  # before the failure report, too: the others' stores need not wait for it
                self.uploads.end(key)
            self.jobs[key].update(state="done")
        except BaseException as error:  # noqa: B902 - a job thread must report, whatever happened
            if not isinstance(error, (HelperError, FAILURES)):
                LOG.error("snapshot %s: unexpected %s", key, "".join(traceback.format_exception(
                    type(error), error, error.__traceback__)))
            reason = str(error) or type(error).__name__
            self.jobs[key].update(state="failed", reason=reason)
            self.metrics.snapshot_failed(backend.name)
            try:
                self.post(body["failed_url"], {"reason": reason[:1000]})
            except Exception as post_error:  # the controller's own timeout will fail the member
                LOG.warning("snapshot %s: failed (%s), not reported: %s", key, reason[:300], post_error)

    def _snapshot(self, body: dict, backend: Backend, member) -> None:
        prepare_url = body["prepare_url"] or body["cut_url"].rsplit("/", 1)[0] + "/prepare"
        server = self.server_for(body["member"])
        sink = StoreSink(self.store(server), body["snapshot"], body["member"], self.uploads, self.kept)
        with backend.quiet_proof(member, body["snapshot"]) as prove_quiet:
            # A backend's proof may say this member cannot send a marker (a VM whose tap cannot be written).
            wants_async = bool(backend.cuts_async) and CUT_MODE in ("async", "async-call") \
                and getattr(prove_quiet, "marks", True)
            prepared, cut = [], {}

            def prepare():
                if not prepared:  # frames to the member are held from here on: as late as the backend can
                    asked = self.clock()
                    answer = self.post(prepare_url, {"divert": True} if wants_async else {})
                    answered = self.clock()
                    # An older controller answers without "divert": then the cut is made while frozen.
                    cut["async"] = wants_async and isinstance(answer, dict) and answer.get("divert") is True
                    cut["frame"] = cut["async"] and answer.get("cut_frame") is True and CUT_MODE == "async" \
                        and callable(getattr(prove_quiet, "request_cut", None))
                    self.purge()
                    cut["timings"] = {"prepare_call_ms": round((answered - asked) * 1000, 3),
                                      "prepare_purge_ms": round((self.clock() - answered) * 1000, 3)}
                    prepared.append(True)

            if not backend.prepares_itself:
                prepare()

            def at_cut():
                prepare()
                if cut["async"]:  # the switch took the marker, and learned the port's new colour from it
                    cut["marked"] = True
                    proof = prove_quiet(confirm=True)
                    self.purge()  # a flow the datapath still caches would give the member's next frames the old one
                    if backend.flips_stopped and cut.get("frame"):  # what is released to it waits for it unharmed
                        prove_quiet.request_cut()
                        cut["answer"] = {}
                    return proof
                proof = prove_quiet()
                self.post(body["cut_url"], {"marker": backend.sends_marker})
                self.purge()
                return proof

            def resumed():
                if cut.get("marked") and "answer" not in cut:
                    if cut.get("frame"):  # in band, behind the marker and what the member sent since
                        prove_quiet.request_cut()
                        cut["answer"] = {}
                        return
                    # No purge after it: the flows the datapath caches since the marker give the new colour.
                    cut["answer"] = self.post(body["cut_url"], {"marker": True})

            began = self.clock()
            try:
                report = backend.snapshot(member, sink, at_cut, prepare, resumed) if wants_async else \
                    backend.snapshot(member, sink, at_cut, prepare)
                resumed()  # a backend that did not say so: it runs again now
            except BaseException:  # e.g. the server's disk filled up: never leave part of an image offered
                self._discard(sink, body)
                raise
            seconds = self.clock() - began
        try:
            self.post(body["done_url"], {
                "pause_ms": report.pause_ms, "bytes": report.bytes, "server": server,
                "image": dict(report.details, backend=backend.name, files=report.files, storage=sink.storage(),
                              **({} if sink.settled_ms is None else {"upload_wait_ms": sink.settled_ms}),
                              cut="in-band" if cut.get("frame") else "async" if cut.get("async") else "sync",
                              **cut.get("timings", {}))})
        except ControllerError as error:
            if error.status is not None and 400 <= error.status < 500:  # refused (aborted meanwhile): unused
                self._discard(sink, body)
            raise
        self.metrics.snapshot_done(backend.name, seconds, report)  # once the controller has it

    @staticmethod
    def _discard(sink, body: dict) -> None:
        try:
            getattr(sink, "discard", lambda: None)()
        except Exception as error:  # noqa: BLE001 - the snapshot's own failure is what is reported
            LOG.warning("snapshot %s/%s: partial image not removed: %s", body["snapshot"], body["member"], error)

    # --- restore ----------------------------------------------------------------------------

    def stage(self, raw: dict) -> dict:
        """Fetch a member's image (or take the one this helper kept of it) and verify every checksum;
        nothing running is touched."""
        body = read_body("stage", raw)
        backend, member = self._member(body["member"])
        target, began = self._restore_dir(body), time.monotonic()
        with self.checking:  # on every core: hashing a kept image's files releases the GIL
            kept = self.kept.stage(body["member"], body["snapshot"], body["files"], target)
            if kept is not None:
                self._staged(backend, member, body, kept["files"], target, "kept")
        if kept is None:
            with self.staging:  # the controller asks for every member at once; this helper takes them in turn
                shutil.rmtree(target, ignore_errors=True)
                files = self.store(body["server"]).download_dir(body["snapshot"], body["member"], target)
                self._staged(backend, member, body, files, target, "server")
        return {"staged": body["member"], "files": len(body["files"]), "restores_paused": backend.restores_paused,
                "from": "server" if kept is None else "kept", "stage_ms": round((time.monotonic() - began) * 1000, 1)}

    @staticmethod
    def _staged(backend: Backend, member, body: dict, files: List[dict], target: str, source: str) -> None:
        """The staged ``files`` are the ones the snapshot recorded, and the backend takes them."""
        if {(f["name"], f["sha256"]) for f in files} != {(f.get("name"), f.get("sha256")) for f in body["files"]}:
            raise Failed("the %s image of %s/%s is not the one the snapshot recorded"
                         % ("kept" if source == "kept" else "server's", body["snapshot"], body["member"]))
        backend.stage(member, target)

    def restore(self, raw: dict) -> dict:
        """Replace the running member by the staged image, left stopped until ``resume``."""
        body = read_body("member", raw)
        backend, member = self._member(body["member"])
        images = self._restore_dir(body)
        if not os.path.isdir(images):
            raise UnknownMember("%s/%s is not staged" % (body["snapshot"], body["member"]))
        restored = backend.restore(member, images)
        if self.registrar is not None:  # restored onto this helper: the controller knows it here (if it changed)
            self.registrar.want(body["member"])
        return dict(restored.details, restored=body["member"], iface=restored.port,
                    attachment=self.attachment(restored.port), restore_ms=round(restored.restore_ms, 1))

    def resume(self, raw: dict) -> dict:
        body = read_body("member", raw)
        backend, member = self._member(body["member"])
        backend.resume(member)
        return {"resumed": body["member"]}

    def stop(self, raw: dict) -> dict:
        """Stop the member here for good: it is being restored on another host."""
        body = read_body("member", raw)
        backend, member = self._member(body["member"])
        backend.stop(member)
        if self.registrar is not None:  # it is restored on another helper, which registers it there
            self.registrar.forget(body["member"])
        return {"stopped": body["member"]}
