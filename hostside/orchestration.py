"""What the helper does for every member, whatever its backend (hostside/backends/).

Snapshot (in the background, one job per snapshot and member)::

    open the backend's quiet proof (CRIU: the marker socket in the member's namespace)
    -> controller prepare (frames for the member are held from now on) -> purge the datapath
       (a backend that ``prepares_itself`` calls this step later, just before the member stops)
    -> backend.snapshot(member, sink, at_cut), where at_cut, run while the member is stopped, is:
           quiet proof (marker sent / tap drained) -> controller cut {"marker": sends_marker}
           -> purge the datapath
       and the backend stores the image through the sink (a snapshot server)
    -> controller done {pause_ms, bytes, server, image{backend, files, storage{logical_bytes,
       stored_bytes, sent_bytes}, ...}}
    or, on any failure at any step, controller failed {reason} and the job "failed" with it.

Stage fetches the image and checks every checksum, restore replaces the running
member by it (left stopped), resume and stop act on the member: the same calls
for every backend. Everything with an outside effect is injected: the
controller poster, the datapath purge, the store client factory, the switch
port lookup, the clock and the thread that runs a job.
"""

import logging
import os
import shutil
import threading
import time
import traceback
import zlib
from typing import Callable, Dict, List, Optional, Tuple

from hostside.backends.base import Backend, ImageSink
from hostside.metrics import HelperMetrics
from violin_core.schema import Field, ListOf, Schema, SchemaError, matches, name

LOG = logging.getLogger("violin-helper")


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


def read_body(kind: str, body) -> dict:
    """The keys of ``body`` that ``kind`` knows, validated (others are ignored: newer controllers)."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    schema = BODIES[kind]
    try:
        return schema.validate({k: v for k, v in body.items() if k in schema.fields})
    except SchemaError as error:
        raise BadRequest(str(error)) from None


class StoreSink(ImageSink):
    """An ImageSink on one store client (a snapshot server); ``storage()`` adds up what its uploads
    cost: logical bytes (the image's size), stored bytes (newly stored by the server, compressed:
    a chunk store keeps only chunks it lacked) and sent bytes (over the wire)."""

    COUNTS = ("logical_bytes", "stored_bytes", "sent_bytes")

    def __init__(self, client, snapshot: str, member: str):
        self.client, self.snapshot, self.member = client, snapshot, member
        self.counts = dict.fromkeys(self.COUNTS, 0)

    def _count(self, stored: dict) -> dict:
        for key in self.COUNTS:
            self.counts[key] += int(stored.get(key, stored.get("bytes", 0)))
        return _file_entry(stored)

    def put_dir(self, directory: str) -> List[dict]:
        return [self._count(f) for f in self.client.upload_dir(self.snapshot, self.member, directory)]

    def put_stream(self, name: str, reader) -> dict:
        return self._count(dict(self.client.upload_stream(self.snapshot, self.member, name, reader), name=name))

    def storage(self) -> dict:
        return dict(self.counts)

    def discard(self) -> None:
        self.client.delete(self.snapshot, self.member)


def _file_entry(stored: dict) -> dict:
    return {"name": stored["name"], "bytes": stored["bytes"], "sha256": stored["sha256"]}


def spawn_thread(target: Callable[[], None]) -> None:
    threading.Thread(target=target, daemon=True).start()


class Orchestrator:
    """The helper's work, backend-neutral. ``members``: name -> (backend, member spec)."""

    def __init__(self, members: Dict[str, Tuple[Backend, object]], servers: List[str], work_dir: str,
                 post: Callable[[str, dict], object], store: Callable[[str], object],
                 purge: Callable[[], object] = lambda: None,
                 attachment: Callable[[Optional[str]], Optional[dict]] = lambda port: None,
                 clock: Callable[[], float] = time.time, spawn: Callable[[Callable[[], None]], None] = spawn_thread,
                 metrics: Optional[HelperMetrics] = None):
        self.members, self.servers, self.work_dir = members, servers, work_dir
        self.metrics = HelperMetrics() if metrics is None else metrics  # its own registry unless given
        self.post, self.store, self.purge, self.attachment = post, store, purge, attachment
        self.clock, self.spawn = clock, spawn
        self.jobs: Dict[str, dict] = {}
        self.lock = threading.Lock()

    def backends(self) -> List[Backend]:
        seen = {}
        for backend, _spec in self.members.values():
            seen[id(backend)] = backend
        return list(seen.values())

    def _member(self, name: str) -> Tuple[Backend, object]:
        try:
            return self.members[name]
        except KeyError:
            raise UnknownMember("this helper hosts no member %s" % name) from None

    def server_for(self, member: str) -> str:
        return self.servers[zlib.crc32(member.encode()) % len(self.servers)]

    def _restore_dir(self, body: dict) -> str:
        return os.path.join(self.work_dir, "restore", body["snapshot"], body["member"])

    # --- snapshot ---------------------------------------------------------------------------

    def start_snapshot(self, raw: dict) -> dict:
        body = read_body("snapshot", raw)
        backend, member = self._member(body["member"])
        key = "%s/%s" % (body["snapshot"], body["member"])
        with self.lock:
            if key in self.jobs:
                raise Conflict("already snapshotting %s" % key)
            self.jobs[key] = {"state": "running", "started": self.clock()}
        self.spawn(lambda: self._run_snapshot(body, backend, member, key))
        return {"accepted": key}

    def _run_snapshot(self, body: dict, backend: Backend, member, key: str) -> None:
        """The whole snapshot of one member; whatever goes wrong ends in ``failed``, never escapes."""
        try:
            self._snapshot(body, backend, member)
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
                LOG.warning("snapshot %s: failed not reported: %s", key, post_error)

    def _snapshot(self, body: dict, backend: Backend, member) -> None:
        prepare_url = body["prepare_url"] or body["cut_url"].rsplit("/", 1)[0] + "/prepare"
        server = self.server_for(body["member"])
        sink = StoreSink(self.store(server), body["snapshot"], body["member"])
        with backend.quiet_proof(member, body["snapshot"]) as prove_quiet:
            prepared = []

            def prepare():
                if not prepared:  # frames to the member are held from here on: as late as the backend can
                    self.post(prepare_url, {})
                    self.purge()
                    prepared.append(True)

            if not backend.prepares_itself:
                prepare()

            def at_cut():
                prepare()
                proof = prove_quiet()
                self.post(body["cut_url"], {"marker": backend.sends_marker})
                self.purge()
                return proof

            began = self.clock()
            try:
                report = backend.snapshot(member, sink, at_cut, prepare)
            except BaseException:  # e.g. the server's disk filled up: never leave part of an image offered
                self._discard(sink, body)
                raise
            seconds = self.clock() - began
        try:
            self.post(body["done_url"], {
                "pause_ms": report.pause_ms, "bytes": report.bytes, "server": server,
                "image": dict(report.details, backend=backend.name, files=report.files, storage=sink.storage())})
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
        """Fetch a member's image and verify every checksum; nothing running is touched."""
        body = read_body("stage", raw)
        backend, member = self._member(body["member"])
        target = self._restore_dir(body)
        shutil.rmtree(target, ignore_errors=True)
        files = self.store(body["server"]).download_dir(body["snapshot"], body["member"], target)
        expected = {(f.get("name"), f.get("sha256")) for f in body["files"]}
        if {(f["name"], f["sha256"]) for f in files} != expected:
            raise Failed("the server's image of %s/%s is not the one the snapshot recorded"
                         % (body["snapshot"], body["member"]))
        backend.stage(member, target)
        return {"staged": body["member"], "files": len(files), "restores_paused": backend.restores_paused}

    def restore(self, raw: dict) -> dict:
        """Replace the running member by the staged image, left stopped until ``resume``."""
        body = read_body("member", raw)
        backend, member = self._member(body["member"])
        images = self._restore_dir(body)
        if not os.path.isdir(images):
            raise UnknownMember("%s/%s is not staged" % (body["snapshot"], body["member"]))
        restored = backend.restore(member, images)
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
        return {"stopped": body["member"]}
