"""The controller's pure core: everything the RyuApp and REST shims delegate to.

OpenFlow handlers take the event and return the messages to send. Work that
must wait (barriers, flow statistics, timers, calls to helpers) goes through an
injected ``io`` object: the RyuApp passes one built on eventlet, unit tests a
synchronous fake over a simulated network. ``ViolinController`` composes the
parts: the fabric (forwarding), the coordinator (members' epochs and the cut
rules, the fabric's policy), the restorer, the scheduler and the catalogue; it
runs a snapshot's life (start, prepare, cut, done, drain, abort). The REST
routes are in ``routes.py``.
"""

import logging
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from . import __version__, of, schema
from .catalogue import Catalogue
from .channel import ChannelFrame
from .config import Config
from .coordinator import Coordinator, CutState, SnapshotPhase, SnapshotState
from .errors import Refused, reason_of
from .fabric import Fabric
from .members import parse_member
from .metrics import ControllerMetrics
from .policy import Vids
from .restore import Restorer
from .schedule import SCHEDULE_LABEL, Scheduler

LOG = logging.getLogger("violin.controller")
SNAPSHOT_ROLES = (of.ROLE_MARKER, of.ROLE_HOLD, of.ROLE_RECORD, of.ROLE_FLOOD_CUT)
DEFAULT_ADVERTISE_URL = "http://127.0.0.1:8080"
PROGRESS_WRITE_DELAY_S = 0.1  # a running snapshot's manifest is written at most this often (_persist_soon)

SNAPSHOT_BODY = schema.Schema({
    "members": schema.Field((list, type(None)), None, lambda v: None if all(isinstance(m, str) for m in v)
                            else "a list of member names", help="a subset of the members (all when null)"),
    "label": schema.Field(str, "", lambda v: None if len(v) <= 200 else "at most 200 characters"),
    "timeout_s": schema.Field((float, type(None)), None, lambda v: None if 0 < v <= 86400
                              else "seconds in (0, 86400]"),
}, allow_none=False)
PREPARE_BODY = schema.Schema({
    "divert": schema.Field((bool, type(None)), None, help="an asynchronous cut: until its flip, the member's port "
                           "colours its frames by a flow the switch learns from its marker; the member may run "
                           "on once its marker came back down its link and the datapath was purged"),
}, allow_none=False)
CUT_BODY = schema.Schema({
    "marker": schema.Field((bool, type(None)), None, help="whether the helper sent a marker frame before this call"),
}, allow_none=False)
DONE_REPORT = schema.Schema({
    "image": schema.Field(dict, {}), "pause_ms": schema.Field(float, None), "bytes": schema.Field(int, 0),
    "server": schema.Field(str, None), "note": schema.Field(str, None),
}, allow_none=False)
REASON_BODY = schema.Schema({"reason": schema.Field(str, None)}, allow_none=False)


class Flag:
    """A settable flag: ``ControllerIO.new_event``'s default."""

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class ControllerIO:
    """What the core needs from the outside world (the RyuApp implements it on eventlet)."""

    def send(self, messages: List[of.Message]) -> None:
        raise NotImplementedError

    def send_and_barrier(self, messages: List[of.Message], dpids: Iterable[int], timeout: float) -> bool:
        """Send, then a barrier to each of ``dpids``; True once every reply is in."""
        raise NotImplementedError

    def flow_stats(self, dpids: Iterable[int], role: int, timeout: float) -> Optional[int]:
        """Packets matched by the flows of ``role`` on those switches, or None on time-out."""
        raise NotImplementedError

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        raise NotImplementedError

    def new_event(self) -> "Flag":
        """An event that ``wait_event`` sleeps on until it is set (the RyuApp: a hub event)."""
        return Flag()

    def wait_event(self, event: "Flag", timeout: float) -> bool:
        """Wait (giving up the core's lock) until ``event`` is set; whether it is. This default polls."""
        return self.wait_until(event.is_set, timeout)

    def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def run_blocking(self, function: Callable[[], object]) -> object:
        """``function()``'s result, run where its blocking (an fsync) stalls nothing else: the RyuApp
        runs it in a thread, giving up the core's lock meanwhile. This default calls it."""
        return function()

    def spawn(self, function, *args) -> None:
        raise NotImplementedError

    def gather(self, functions: List[Callable[[], object]]) -> List[object]:
        """Run ``functions`` concurrently (each with the core's lock, as a spawned job); when all have
        returned, their results in order, an exception standing for a function that raised one."""
        raise NotImplementedError

    def post_json(self, url: str, body: Optional[dict], timeout: float, token: Optional[str] = None,
                  method: str = "POST") -> Tuple[int, object]:
        """(status, parsed answer) of an HTTP call; status None when the peer is unreachable."""
        raise NotImplementedError


class ViolinController:
    def __init__(self, config: Config, clock: Callable[[], float], wall_clock: Callable[[], float],
                 io: Optional[ControllerIO] = None, metrics: Optional[ControllerMetrics] = None):
        self.config = config
        self.metrics = ControllerMetrics() if metrics is None else metrics  # its own registry unless given
        self.metrics.watch(lambda: self.coordinator.current)
        self.clock = clock
        self.wall_clock = wall_clock
        self.io = io
        self.advertise_url = (config.advertise_url or DEFAULT_ADVERTISE_URL).rstrip("/")
        self.fabric = Fabric(config.fabric)
        self.coordinator = Coordinator(self.fabric, Vids(config.fabric.tag_vid), config.snapshot)
        self.fabric.use_policy(self.coordinator)
        self.catalogue = Catalogue(config.state_directory).open()
        self.coordinator.last_epoch = self.catalogue.max_epoch()
        for spec in config.members:
            self.coordinator.add_member(parse_member(spec))
        self.started_at = clock()
        self.connected: set = set()
        self.errors: dict = {}
        self.flip_queue: Dict[str, Tuple[float, float]] = {}  # cuts waiting to be flipped: name -> (since, wall)
        self.flip_results: Dict[str, object] = {}  # name -> the cut's answer, or the Refused to raise
        self.flipping = False  # a batch of flips is in the switches
        self.batch_done = None  # set when the batch in the switches has its answers (io.new_event)
        self.persist_pending = None  # the snapshot whose progress write is queued in the background
        self.restorer = Restorer(self.coordinator, self.catalogue, io, config.snapshot, config.helper_token,
                                 clock, wall_clock, background=self.background,
                                 started=self.metrics.restore_started, ended=self.metrics.restore_ended)
        if io is not None:  # a restore cut short by a restart: failed, its restored members resumed
            self.restorer.recover()
        self.scheduler = Scheduler(self.catalogue, clock, wall_clock, take=self.start_snapshot,
                                   delete=self.delete_snapshot, busy=self._busy_for_schedule)

    # --- OpenFlow events (the shim converts ryu events into these calls) ------

    def switch_up(self, dpid: int, ports: Iterable[Tuple[int, str, bool]]) -> List[of.Message]:
        self.connected.add(dpid)
        self.metrics.switches_connected(len(self.connected))
        return self.fabric.switch_up(self.clock(), dpid, ports)

    def switch_down(self, dpid: int) -> List[of.Message]:
        self.connected.discard(dpid)
        self.metrics.switches_connected(len(self.connected))
        return self.fabric.switch_down(self.clock(), dpid)

    def port_changed(self, dpid: int, port_no: int, name: str, up: bool, deleted: bool) -> List[of.Message]:
        return self.fabric.port_changed(self.clock(), dpid, port_no, name, up, deleted)

    def packet_in(self, dpid: int, in_port: int, data: bytes, role: Optional[int] = None) -> List[of.Message]:
        self.metrics.packet_in(role)
        if role in SNAPSHOT_ROLES:
            late_record = role == of.ROLE_RECORD and not self.coordinator.running()
            messages = self.coordinator.packet_in(self.clock(), self.wall_clock(), dpid, in_port, data, role)
            if late_record:
                self._late_record()
            for name in self.coordinator.take_cut_requests():  # flipped off the packet-in path, together
                snapshot_id = self.coordinator.current.id
                self.background(self._cut_in_band, snapshot_id, name, on_failure=self._abort_snapshot(snapshot_id))
            return messages
        return self.fabric.packet_in(self.clock(), dpid, in_port, data)

    def switch_error(self, dpid: int) -> None:
        """A switch refused a message: count it, so health shows it."""
        self.errors[dpid] = self.errors.get(dpid, 0) + 1

    def tick(self) -> List[of.Message]:
        now = self.clock()
        messages = self.fabric.tick(now)
        was_running = self.coordinator.running()
        messages += self.coordinator.tick(now, self.wall_clock())
        if was_running and not self.coordinator.running():
            self._persist()
            self.metrics.snapshot_ended(self.coordinator.current)
        if self.scheduler.due(now):
            self.background(self.scheduler.turn, on_failure=self.scheduler.skip)
        return messages

    # --- a snapshot's life -------------------------------------------------------

    def start_snapshot(self, body: dict) -> dict:
        values = schema.request_body(SNAPSHOT_BODY, body)
        snapshot, messages = self.coordinator.start(self.clock(), self.wall_clock(), values["members"],
                                                    values["label"], values["timeout_s"])
        self.flip_queue, self.flip_results = {}, {}  # nothing of an earlier snapshot's cuts carries over
        self.metrics.snapshot_started(snapshot.participants)
        self._persist()
        if not self.io.send_and_barrier(messages, set(self.fabric.switches), self.config.snapshot.barrier_timeout):
            self._abort("the switches did not confirm the snapshot rules within %.1f s"
                        % self.config.snapshot.barrier_timeout)
            raise Refused(504, self.coordinator.current.reason)
        for name in snapshot.participants:
            member = self.coordinator.members[name]
            if member.helper_url:
                self.background(self._notify_helper, snapshot.id, member.name, member.helper_url,
                                on_failure=self._abort_snapshot(snapshot.id))
        return self.snapshot_view(snapshot.id)

    def prepare(self, snapshot_id: str, name: str, body: Optional[dict] = None) -> dict:
        """The helper is about to pause the member: answer once frames for it are held (and, with
        ``{"divert": true}``, once its port takes the new colour from its marker on)."""
        divert = bool(schema.request_body(PREPARE_BODY, body or {})["divert"])
        member = self.coordinator.members.get(name)
        messages = self.coordinator.prepare(self.clock(), snapshot_id, name, divert)
        switches = self.coordinator.switches_of(member)
        refused = lambda: sum(self.errors.get(dpid, 0) for dpid in switches)  # noqa: E731
        refused_before = refused()
        if not self.io.send_and_barrier(messages, switches, self.config.snapshot.barrier_timeout):
            self._abort("the switch did not confirm holding frames for %s" % name)
            raise Refused(504, self.coordinator.current.reason)
        diverted = self.coordinator.current.cuts[name].diverted
        # A switch answers a refused flow-mod before the barrier after it. A switch without Open vSwitch's
        # learn and resubmit would leave the member's frames the old colour after its marker: no snapshot.
        if diverted and refused() > refused_before:
            self._abort("the switch refused the rules of %s's asynchronous cut (they need Open vSwitch's learn "
                        "and resubmit actions; VIOLIN_CUT=sync on its helper cuts it without them)" % name)
            raise Refused(502, self.coordinator.current.reason)
        # cut_frame: an asynchronous member's helper may ask for the flip by a frame down the member's link
        # once it runs again (no cut call); its done report then flips it if that frame never came.
        return {"snapshot": snapshot_id, "member": name, "state": CutState.PREPARED,
                "divert": diverted, "cut_frame": diverted}

    def cut(self, snapshot_id: str, name: str, body: Optional[dict] = None) -> dict:
        """A helper's member is paused: flip it once its marker is in; answer when rules are in force.

        The cut waits for a marker when the helper says it sent one (``{"marker": true}``), or,
        when it does not say, when the member was registered with ``marker: true``."""
        settings = self.config.snapshot
        said = schema.request_body(CUT_BODY, body or {})["marker"]
        _, cut = self.coordinator.require(snapshot_id, name)
        if cut.state not in (CutState.PENDING, CutState.PREPARED):
            raise Refused(409, "%s was already cut in snapshot %s" % (name, snapshot_id))
        member = self.coordinator.members[name]
        if (member.marker if said is None else said) and not cut.marker_seen:
            self.io.wait_until(lambda: cut.marker_seen or not self.coordinator.running(), settings.marker_timeout)
            self.coordinator.require(snapshot_id, name)
            if not cut.marker_seen:
                self._abort("no cut marker from %s within %.1f s (is its helper sending one on the member's "
                            "link, or should the member be registered with marker: false?)"
                            % (name, settings.marker_timeout))
                raise Refused(409, self.coordinator.current.reason)
        if name in self.flip_queue or name in self.flip_results:
            raise Refused(409, "a cut of %s is already under way in snapshot %s" % (name, snapshot_id))
        self.flip_queue[name] = (self.clock(), self.wall_clock())
        while name not in self.flip_results:
            if name not in self.flip_queue and not self.flipping:  # a batch took it and said nothing: a bug
                raise Refused(500, "the cut of %s was lost; see the controller log" % name)
            if self.flipping:  # another cut's batch is in the switches: ours goes in the next one
                # Sleep until that batch is answered, not poll: 63 cuts polling every millisecond
                # took the controller's one core from the batch they wait for.
                self.io.wait_event(self.batch_done, 2 * settings.barrier_timeout)
            else:
                self._flip_batch(snapshot_id)
        outcome = self.flip_results.pop(name)
        if isinstance(outcome, Refused):
            raise outcome
        return outcome

    def _cut_in_band(self, snapshot_id: str, name: str) -> None:
        """The cut a helper asked for by a frame on the member's link (its marker came before it)."""
        try:
            self.cut(snapshot_id, name, {"marker": True})
        except Refused as refusal:  # e.g. aborted meanwhile, or its done report flipped it first
            LOG.info("in-band cut of %s in %s not made: %s", name, snapshot_id, refusal.reason)

    def _cut_before_done(self, snapshot_id: str, name: str) -> None:
        """A member cut asynchronously, still prepared at its done report, is cut now (its image is stored).

        Its marker and cut request may still be queued behind other packet-ins on the switch's
        connection (the helper saw the marker's echo, not its packet-in): the report waits for the
        marker, up to the marker timeout, and for a cut already under way."""
        settings = self.config.snapshot
        _, cut = self.coordinator.require(snapshot_id, name)
        if cut.state != CutState.PREPARED or not cut.diverted:
            return
        self.io.wait_until(lambda: cut.marker_seen or cut.state != CutState.PREPARED
                           or not self.coordinator.running(), settings.marker_timeout)
        self.coordinator.require(snapshot_id, name)
        if cut.state == CutState.PREPARED and (name in self.flip_queue or name in self.flip_results):
            self.io.wait_until(lambda: cut.state != CutState.PREPARED or not self.coordinator.running(),
                               2 * settings.barrier_timeout)
            self.coordinator.require(snapshot_id, name)
        if cut.state != CutState.PREPARED:
            return
        if not cut.marker_seen:
            self._abort("no cut marker from %s within %.1f s of its done report (is its helper sending one "
                        "on the member's link?)" % (name, settings.marker_timeout))
            raise Refused(409, self.coordinator.current.reason)
        LOG.info("%s reported done in %s before its in-band cut request came in: cut now", name, snapshot_id)
        self.cut(snapshot_id, name, {"marker": True})  # no yield since the checks: nothing else took it

    def _flip_batch(self, snapshot_id: str) -> None:
        """Flip every cut waiting now, with one flow-table pass and one barrier per switch.

        Cuts that arrive together (many members paused at once) would otherwise each wait for the
        previous ones' reconcile and barrier, and every member's pause would grow with their number.
        Those arriving while a batch is in the switches form the next batch. A batch the switches do
        not confirm aborts the snapshot; every cut in it is answered with the reason."""
        self.flipping, self.batch_done = True, self.io.new_event()
        batch: Dict[str, Tuple[float, float]] = {}
        try:
            # No yield before taking the batch: it would let every queued packet-in run first (held and
            # recorded frames under traffic), and a lone cut's flip went from 2.6 to 39 ms p50 (bench_cut).
            batch, self.flip_queue = self.flip_queue, {}
            self._flip(snapshot_id, batch)
        except Refused as refusal:
            self.flip_results.update(dict.fromkeys(batch, refusal))
        except Exception as error:  # noqa: BLE001 - never leave a paused member without an answer
            LOG.exception("flipping %s failed", ", ".join(sorted(batch)))
            self._abort_snapshot(snapshot_id)("internal error while flipping %s: %s: %s" % (
                ", ".join(sorted(batch)), type(error).__name__, error))
            self.flip_results.update(dict.fromkeys(batch, Refused(500, "internal error while flipping; "
                                                                      "the snapshot is aborted")))
        finally:
            self.flipping = False
            self.batch_done.set()

    def _flip(self, snapshot_id: str, batch: Dict[str, Tuple[float, float]]) -> None:
        settings = self.config.snapshot
        self.coordinator.require(snapshot_id)  # not running: every cut in the batch is refused alike
        for name in list(batch):  # a cut refused on its own (already cut) leaves the others' flips alone
            cut = self.coordinator.require(snapshot_id, name)[1]
            if cut.state not in (CutState.PENDING, CutState.PREPARED):
                self.flip_results[name] = Refused(409, "%s was already cut in snapshot %s" % (name, snapshot_id))
                del batch[name]
        if not batch:
            return
        rules, releases, tidying = self.coordinator.flip_many(self.clock(), snapshot_id, list(batch), self.wall_clock())
        dpids = set().union(*(self.coordinator.switches_of(self.coordinator.members[n]) for n in batch))
        if not self.io.send_and_barrier(rules, dpids, settings.barrier_timeout):
            self.io.send(tidying + releases)
            self._abort("the switches did not confirm the cut of %s within %.1f s"
                        % (", ".join(sorted(batch)), settings.barrier_timeout))
            raise Refused(504, self.coordinator.current.reason)
        confirmed, cut_wall = self.clock(), self.wall_clock()
        self.io.send(releases)  # queued behind the answer's rules; the members resume meanwhile
        released = self.clock()  # a prepared member's deaf time ends here: its frames flow again
        self.io.send(tidying)  # off the flip's path: those members' frames have the new colour already
        for name, (began, began_wall) in batch.items():
            flip_ms = (confirmed - began) * 1000.0
            cut = self.coordinator.cut_done(cut_wall, snapshot_id, name, flip_ms, released)
            self.metrics.member_held(name, cut.held_ms)
            self.metrics.member_cut(name, flip_ms)
            self.flip_results[name] = {"snapshot": snapshot_id, "member": name,
                                       "epoch": self.coordinator.members[name].epoch, "flip_started": began_wall,
                                       "cut_time": cut.cut_time, "flip_ms": cut.flip_ms, "held_ms": cut.held_ms,
                                       "batch": len(batch)}
        self.metrics.frames_counted(self.coordinator.current)
        self._persist_soon()  # not before the answers: two fsyncs would stall every call in the event loop

    def done(self, snapshot_id: str, name: str, report: dict) -> dict:
        report = {k: v for k, v in schema.request_body(DONE_REPORT, report).items() if k in report}
        self._cut_before_done(snapshot_id, name)
        finished = self.coordinator.done(snapshot_id, name, report)
        self.metrics.member_done(name, report)
        if finished:
            self.background(self.drain_and_complete, snapshot_id, on_failure=self._abort_snapshot(snapshot_id))
        # In the background and coalesced: 64 members' done calls each wrote the whole manifest with two
        # fsyncs while the event loop (and every cut still arriving) waited (a third of the controller's
        # time in bench_cut --scale, py-spy). A running manifest is aborted at restart either way.
        self._persist_soon()
        return self.snapshot_view(snapshot_id)

    def failed(self, snapshot_id: str, name: str, body: dict) -> dict:
        reason = schema.request_body(REASON_BODY, body)["reason"] or "no reason given"
        self.coordinator.require(snapshot_id, name)
        self._abort("helper for %s failed: %s" % (name, reason[:500]))
        return self.snapshot_view(snapshot_id)

    def abort(self, snapshot_id: str, body: dict) -> dict:
        reason = schema.request_body(REASON_BODY, body)["reason"] or "aborted by request"
        self.coordinator.require(snapshot_id)
        self._abort(reason[:500])
        return self.snapshot_view(snapshot_id)

    def drain_and_complete(self, snapshot_id: str) -> None:
        """Wait until no pre-snapshot frame can still be in flight, then seal the snapshot.

        Every participant is post now, so a pre-colour frame still in the network can
        only end at a record rule. Poll those rules' packet counters (OpenFlow flow
        statistics) until they and the controller's own record count stand still,
        at least ``drain_min`` after the last flip; after ``drain_timeout`` complete
        anyway and say so in the manifest. (OVS credits a datapath flow's unpushed
        packets to the rule it translates to *after* a rule change, so the switch's
        count can exceed the frames really recorded: it shows motion, not a sum.)
        A record copy that still arrives after completion marks the snapshot
        incomplete (``_late_record``).
        """
        settings, coordinator = self.config.snapshot, self.coordinator
        snapshot = coordinator.current
        began, history, method = self.clock(), [], "timeout"
        while coordinator.running() and snapshot.id == snapshot_id:
            total = self.io.flow_stats(coordinator.participant_switches(), of.ROLE_RECORD, settings.barrier_timeout)
            history.append((total, snapshot.counts["recorded"]))
            quiet = (total is not None and len(history) >= 2 and history[-2] == history[-1]
                     and self.clock() - (snapshot.last_flip or began) >= settings.drain_min)
            if quiet:
                method = "counters"
                break
            if self.clock() - began >= settings.drain_timeout:
                break
            self.io.sleep(settings.drain_poll)
        if not coordinator.running() or snapshot.id != snapshot_id:
            return
        drain = {"method": method, "polls": len(history), "waited_ms": round((self.clock() - began) * 1000, 1),
                 "switch_record_rule_packets": history[-1][0] if history else None,
                 "controller_recorded": snapshot.counts["recorded"]}
        self.io.send(coordinator.complete(self.clock(), self.wall_clock(), drain))
        frames = [ChannelFrame(r.receiver, r.time, r.frame) for r in coordinator.recorded]
        try:
            self.catalogue.save(snapshot.manifest(), frames)
        except Exception as error:  # never offered for restore: aborted, as the catalogue says after a restart
            snapshot.state, snapshot.phase = SnapshotState.ABORTED, SnapshotPhase.ABORTED
            snapshot.reason = "the snapshot could not be sealed: %s: %s" % (type(error).__name__, error)
            LOG.warning("snapshot %s aborted: %s", snapshot.id, snapshot.reason)
            self.metrics.snapshot_ended(snapshot)
            return
        self.metrics.snapshot_ended(snapshot)
        LOG.info("snapshot %s complete: %d members, %d frames of channel state (drain by %s)",
                 snapshot.id, len(snapshot.participants), len(frames), method)
        if snapshot.label == SCHEDULE_LABEL:
            self.scheduler.prune()

    def delete_snapshot(self, manifest: dict) -> None:
        """Remove a finished snapshot: its images on every snapshot server, then its manifest."""
        servers = {m.get("server") for m in manifest.get("members", []) if m.get("server")}
        for server in sorted(servers):
            self.io.post_json("%s/images/%s" % (server.rstrip("/"), manifest["id"]), None, 10.0,
                              self.config.server_token, method="DELETE")
        self.catalogue.delete(manifest["id"])

    def background(self, work: Callable, *args, on_failure: Callable[[str], None]) -> None:
        """Run ``work`` in the background; whatever it raises ends its job through ``on_failure`` with
        the reason (a snapshot aborted, every hold released; a restore failed), so nothing waits for
        it and later work is never blocked."""
        def contained():
            try:
                work(*args)
            except Exception as error:  # noqa: BLE001 - any failure must end the job, not leave it running
                LOG.exception("background %s failed", getattr(work, "__name__", work))
                try:
                    on_failure("internal error in %s: %s: %s" % (
                        getattr(work, "__name__", "background work").strip("_"), type(error).__name__, error))
                except Exception:  # noqa: BLE001 - the cleanup's own failure is logged, never raised
                    LOG.exception("cleaning up after %s failed", getattr(work, "__name__", work))
        self.io.spawn(contained)

    def _abort_snapshot(self, snapshot_id: str) -> Callable[[str], None]:
        """Abort ``snapshot_id`` with a reason, if it is still the one running."""
        def abort(reason: str) -> None:
            if self.coordinator.running() and self.coordinator.current.id == snapshot_id:
                self._abort(reason)
        return abort

    def _busy_for_schedule(self) -> Optional[str]:
        return "a restore is running" if self.restorer.running() is not None else None

    def _abort(self, reason: str) -> None:
        messages = self.coordinator.abort(self.clock(), self.wall_clock(), reason)
        if self.io is not None:
            self.io.send(messages)
        self._persist()
        self.metrics.snapshot_ended(self.coordinator.current)
        LOG.warning("snapshot %s aborted: %s", self.coordinator.current.id, reason)
        manifest = self.coordinator.current.manifest()
        if self.io is not None and any(m.get("server") for m in manifest.get("members", [])):
            # the images members stored before the abort are never restored: no part of them stays offered
            self.background(self._delete_images, manifest, on_failure=lambda why: LOG.warning(
                "images of aborted snapshot %s not deleted: %s", manifest["id"], why))

    def _delete_images(self, manifest: dict) -> None:
        for server in sorted({m["server"] for m in manifest.get("members", []) if m.get("server")}):
            self.io.post_json("%s/images/%s" % (server.rstrip("/"), manifest["id"]), None, 10.0,
                              self.config.server_token, method="DELETE")

    def _late_record(self) -> None:
        """A pre-snapshot frame reached a post receiver after completion: the snapshot lacks it."""
        snapshot = self.coordinator.current
        if snapshot is not None and snapshot.state == SnapshotState.COMPLETE:
            manifest = dict(self.catalogue.get(snapshot.id) or snapshot.manifest())
            manifest.update(state=SnapshotState.ABORTED, phase=SnapshotPhase.ABORTED, restorable=False,
                            reason="a pre-snapshot frame reached a post-snapshot receiver after completion "
                                   "(drain too short); its channel state is incomplete")
            snapshot.state, snapshot.reason = SnapshotState.ABORTED, manifest["reason"]
            self.catalogue.save(manifest)

    def _persist_soon(self) -> None:
        """Write the running snapshot's manifest in the background, PROGRESS_WRITE_DELAY_S after the
        first ask, once for any number of asks meanwhile, its fsyncs off the event loop.

        Its cuts' progress is news for a reader on disk, not for the cut (the API answers from the
        running snapshot itself): a controller that stops before the write finds the snapshot running
        at restart and aborts it as it would anyway. A snapshot that ended meanwhile was written when
        it ended (with its channel state): that write stands, even over a progress write still out."""
        snapshot_id = self.coordinator.current.id
        if self.persist_pending == snapshot_id or self.io is None:
            return
        self.persist_pending = snapshot_id

        def write():
            # The rest of a burst of cuts and dones joins this write: written among them, with its
            # fsyncs on the event loop, it held them 2-20 ms (64 in-band cuts at once 20 -> 16 ms p50).
            self.io.sleep(PROGRESS_WRITE_DELAY_S)
            if self.persist_pending == snapshot_id:
                self.persist_pending = None
            snapshot = self.coordinator.current
            if self.coordinator.running() and snapshot.id == snapshot_id:  # not a later snapshot's
                self.catalogue.save_later(snapshot.manifest(), self.io.run_blocking)
        self.background(write, on_failure=lambda why: LOG.warning("manifest not written: %s", why))

    def _persist(self) -> None:
        snapshot = self.coordinator.current
        if snapshot is not None and snapshot.state != SnapshotState.COMPLETE:
            self.catalogue.save(snapshot.manifest())

    def callback_urls(self, snapshot_id: str, name: str) -> dict:
        """Where a member's helper reports, from ``api.advertise_url`` (never a caller's Host header)."""
        base = "%s/violin/snapshots/%s/members/%s" % (self.advertise_url, snapshot_id, name)
        return {step + "_url": base + "/" + step for step in ("prepare", "cut", "done", "failed")}

    def _notify_helper(self, snapshot_id: str, name: str, helper_url: str) -> None:
        body = dict({"snapshot": snapshot_id, "member": name, "epoch": self.coordinator.current.epoch},
                    **self.callback_urls(snapshot_id, name))
        try:
            status, answer = self.io.post_json(helper_url.rstrip("/") + "/snapshot", body, 10.0,
                                               self.config.helper_token)
        except OSError as error:
            status, answer = None, str(error)
        if status is None or not 200 <= status < 300:
            if self.coordinator.running() and self.coordinator.current.id == snapshot_id:
                self._abort("helper of %s at %s did not take the snapshot request: %s %s"
                            % (name, helper_url, status or "", reason_of(answer)))

    # --- views ---------------------------------------------------------------

    def snapshot_view(self, snapshot_id: str) -> dict:
        current = self.coordinator.current
        if current is not None and current.id == snapshot_id and current.state == SnapshotState.RUNNING:
            return current.manifest()
        manifest = self.catalogue.get(snapshot_id)
        if manifest is None:
            raise Refused(404, "no snapshot %s" % snapshot_id)
        return manifest

    def snapshots(self) -> List[dict]:
        listed = {m["id"]: m for m in self.catalogue.list()}
        current = self.coordinator.current
        if current is not None and current.state == SnapshotState.RUNNING:
            listed[current.id] = current.manifest()
        return sorted(listed.values(), key=lambda m: (m.get("created") or 0, m["id"]))

    def health(self) -> dict:
        now = self.clock()
        fabric = self.fabric
        current = self.coordinator.current
        return {
            "status": "ok",
            "app": "violin_snapshot",
            "version": __version__,
            "uptime_s": round(now - self.started_at, 3),
            "switches": len(fabric.switches),
            "links": len(fabric.links) // 2,
            "hosts": len(fabric.hosts),
            "members": len(self.coordinator.members),
            "settled": fabric.settled(now),
            "counters": dict(fabric.counters),
            "switch_errors": sum(self.errors.values()),
            "snapshot": None if current is None else {"id": current.id, "state": current.state,
                                                       "phase": current.phase},
        }

    def topology(self) -> dict:
        return self.fabric.describe(self.clock())
