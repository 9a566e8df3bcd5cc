"""The controller's pure core: everything the RyuApp and REST shims delegate to.

OpenFlow handlers take the event and return the messages to send. Work that
must wait (barrier replies, flow statistics, timers, calls to helpers) goes
through an injected ``io`` object: the RyuApp passes one built on eventlet,
unit tests a synchronous fake over a simulated network. ``build_rest_app``
wires the REST routes to it.
"""

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from . import __version__, of
from .catalogue import Catalogue
from . import channel
from .channel import ChannelFrame
from .config import Config
from .fabric import Fabric
from .rest import HttpError, RestApp
from .snapshot import COMPLETE, RUNNING, Coordinator, SnapshotError, parse_member

LOG = logging.getLogger("violin.controller")
SNAPSHOT_ROLES = (of.ROLE_MARKER, of.ROLE_HOLD, of.ROLE_RECORD, of.ROLE_FLOOD_CUT)


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

    def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def spawn(self, function, *args) -> None:
        raise NotImplementedError

    def post_json(self, url: str, body: Optional[dict], timeout: float, token: Optional[str] = None,
                  method: str = "POST") -> Tuple[int, object]:
        """(status, parsed answer) of an HTTP call; status None when the peer is unreachable."""
        raise NotImplementedError


@dataclass
class RestoreJob:
    """A whole-slice restore: stage (verify) -> quarantine -> restore paused -> re-inject -> resume."""

    id: str
    snapshot: str
    epoch: int
    members: Dict[str, dict]  # name -> {"helper": url, "state": ..., "image": {...}}
    started: float
    state: str = "running"  # running -> complete | failed
    phase: str = "staging"
    reason: Optional[str] = None
    finished: Optional[float] = None
    timings_ms: Dict[str, float] = field(default_factory=dict)
    reinjected: int = 0

    def view(self) -> dict:
        return {"id": self.id, "snapshot": self.snapshot, "epoch": self.epoch, "state": self.state,
                "phase": self.phase, "reason": self.reason, "started": self.started, "finished": self.finished,
                "members": self.members, "timings_ms": self.timings_ms, "reinjected_frames": self.reinjected}


@dataclass
class Schedule:
    """Periodic snapshots: every ``interval_s``, keeping the newest ``keep`` scheduled ones."""

    interval_s: Optional[float] = None
    keep: int = 5
    members: Optional[List[str]] = None
    base_url: str = ""
    next_at: Optional[float] = None  # monotonic
    taken: int = 0
    skipped: List[str] = field(default_factory=list)  # the last few reasons a turn was skipped

    def view(self, now: float) -> dict:
        return {"enabled": self.interval_s is not None, "interval_s": self.interval_s, "keep": self.keep,
                "members": self.members, "taken": self.taken, "skipped": self.skipped[-5:],
                "next_in_s": None if self.next_at is None else round(max(0.0, self.next_at - now), 3)}

    def persistable(self) -> dict:
        return {"interval_s": self.interval_s, "keep": self.keep, "members": self.members, "base_url": self.base_url}


SCHEDULE_LABEL = "scheduled"


class ViolinController:
    def __init__(self, config: Config, clock: Callable[[], float], wall_clock: Callable[[], float],
                 io: Optional[ControllerIO] = None):
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.io = io
        self.fabric = Fabric(config.fabric)
        self.coordinator = Coordinator(self.fabric, config.snapshot)
        self.catalogue = Catalogue(config.state_directory).open()
        self.coordinator.last_epoch = self.catalogue.max_epoch()
        for spec in config.members:
            self.coordinator.add_member(parse_member(spec))
        self.started_at = clock()
        self.connected: set = set()
        self.errors: dict = {}
        self.restores: Dict[str, RestoreJob] = {}
        self.schedule = Schedule()
        saved = self.catalogue.load_extra("schedule.json")
        if saved and saved.get("interval_s"):
            self.schedule = Schedule(saved["interval_s"], saved.get("keep", 5), saved.get("members"),
                                     saved.get("base_url", ""), clock() + saved["interval_s"])

    # --- OpenFlow events (the shim converts ryu events into these calls) ------

    def switch_up(self, dpid: int, ports: Iterable[Tuple[int, str, bool]]) -> List[of.Message]:
        self.connected.add(dpid)
        return self.fabric.switch_up(self.clock(), dpid, ports)

    def switch_down(self, dpid: int) -> List[of.Message]:
        self.connected.discard(dpid)
        return self.fabric.switch_down(self.clock(), dpid)

    def port_changed(self, dpid: int, port_no: int, name: str, up: bool, deleted: bool) -> List[of.Message]:
        return self.fabric.port_changed(self.clock(), dpid, port_no, name, up, deleted)

    def packet_in(self, dpid: int, in_port: int, data: bytes, role: Optional[int] = None) -> List[of.Message]:
        if role in SNAPSHOT_ROLES:
            late_record = role == of.ROLE_RECORD and not self.coordinator.running()
            messages = self.coordinator.packet_in(self.clock(), self.wall_clock(), dpid, in_port, data, role)
            if late_record:
                self._late_record()
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
        if self.schedule.next_at is not None and now >= self.schedule.next_at:
            self.schedule.next_at = now + self.schedule.interval_s
            self.io.spawn(self._scheduled_snapshot)
        return messages

    # --- periodic snapshots ------------------------------------------------------

    def set_schedule(self, body: dict, base_url: str) -> dict:
        unknown = sorted(set(body) - {"interval_s", "keep", "members"})
        if unknown:
            raise HttpError(400, "unknown field(s) %s; known: interval_s, keep, members" % ", ".join(unknown))
        interval, keep, members = body.get("interval_s"), body.get("keep", 5), body.get("members")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 1 <= interval <= 86400 * 7:
            raise HttpError(400, "interval_s must be a number of seconds between 1 and 604800")
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= 1000:
            raise HttpError(400, "keep must be a whole number from 1 to 1000")
        if members is not None and (not isinstance(members, list) or not all(isinstance(m, str) for m in members)):
            raise HttpError(400, "members must be a list of member names")
        for name in members or []:
            self.coordinator.get_member(name)
        self.schedule = Schedule(float(interval), keep, members, base_url, self.clock() + float(interval))
        self.catalogue.save_extra("schedule.json", self.schedule.persistable())
        return self.schedule.view(self.clock())

    def clear_schedule(self) -> dict:
        self.schedule = Schedule()
        self.catalogue.save_extra("schedule.json", self.schedule.persistable())
        return self.schedule.view(self.clock())

    def _scheduled_snapshot(self) -> None:
        if any(job.state == "running" for job in self.restores.values()):
            self._skip("a restore is running")
            return
        body = {"label": SCHEDULE_LABEL}
        if self.schedule.members is not None:
            body["members"] = self.schedule.members
        try:
            self.start_snapshot(body, self.schedule.base_url)
            self.schedule.taken += 1
        except (HttpError, SnapshotError) as error:
            self._skip(getattr(error, "reason", str(error)))

    def _skip(self, reason: str) -> None:
        self.schedule.skipped = (self.schedule.skipped + ["%.0f: %s" % (self.wall_clock(), reason)])[-20:]
        LOG.info("scheduled snapshot skipped: %s", reason)

    def prune(self) -> List[str]:
        """Keep the newest ``keep`` complete scheduled snapshots; delete the older scheduled ones.

        Aborted scheduled snapshots newer than the oldest one kept stay for inspection.
        """
        scheduled = [m for m in self.catalogue.list() if m.get("label") == SCHEDULE_LABEL and m["state"] != RUNNING]
        complete = [m for m in scheduled if m["state"] == COMPLETE]
        if len(complete) <= self.schedule.keep:
            return []
        oldest_kept = complete[-self.schedule.keep]
        doomed = [m for m in scheduled if (m.get("created") or 0) < (oldest_kept.get("created") or 0)]
        for manifest in doomed:
            self._delete_snapshot(manifest)
        return [m["id"] for m in doomed]

    def _delete_snapshot(self, manifest: dict) -> None:
        servers = {m.get("server") for m in manifest.get("members", []) if m.get("server")}
        for server in sorted(servers):
            self.io.post_json("%s/images/%s" % (server.rstrip("/"), manifest["id"]), None, 10.0,
                              self.config.server_token, method="DELETE")
        self.catalogue.delete(manifest["id"])

    # --- snapshots -------------------------------------------------------------

    def start_snapshot(self, body: dict, base_url: str) -> dict:
        members, label, timeout = body.get("members"), body.get("label", ""), body.get("timeout_s")
        unknown = sorted(set(body) - {"members", "label", "timeout_s"})
        if unknown:
            raise HttpError(400, "unknown field(s) %s; known: members, label, timeout_s" % ", ".join(unknown))
        if members is not None and (not isinstance(members, list) or not all(isinstance(m, str) for m in members)):
            raise HttpError(400, "members must be a list of member names")
        snapshot, messages = self.coordinator.start(self.clock(), self.wall_clock(), members, label, timeout)
        self._persist()
        dpids = set(self.fabric.switches)
        if not self.io.send_and_barrier(messages, dpids, self.config.snapshot.barrier_timeout):
            self._abort("the switches did not confirm the snapshot rules within %.1f s"
                        % self.config.snapshot.barrier_timeout)
            raise HttpError(504, self.coordinator.current.reason)
        for name in snapshot.participants:
            member = self.coordinator.members[name]
            if member.helper_url:
                self.io.spawn(self._notify_helper, snapshot.id, member.name, member.helper_url, base_url)
        return self.snapshot_view(snapshot.id)

    def cut(self, snapshot_id: str, name: str) -> dict:
        """A helper's member is paused: flip it once its marker is in; answer when rules are in force."""
        settings = self.config.snapshot
        _, cut = self.coordinator.require(snapshot_id, name)
        if cut.state not in ("pending", "prepared"):
            raise HttpError(409, "%s was already cut in snapshot %s" % (name, snapshot_id))
        if self.coordinator.members[name].marker and not cut.marker_seen:
            self.io.wait_until(lambda: cut.marker_seen or not self.coordinator.running(), settings.marker_timeout)
            self.coordinator.require(snapshot_id, name)
            if not cut.marker_seen:
                self._abort("no cut marker from %s within %.1f s (is its helper sending one on the member's "
                            "link, or should the member be registered with marker: false?)"
                            % (name, settings.marker_timeout))
                raise HttpError(409, self.coordinator.current.reason)
        started, started_wall = self.clock(), self.wall_clock()
        member = self.coordinator.members[name]
        dpids = self.coordinator.switches_of(member)
        rules, releases = self.coordinator.flip(started, snapshot_id, name, started_wall)
        if not self.io.send_and_barrier(rules, dpids, settings.barrier_timeout):
            self.io.send(releases)
            self._abort("the switch did not confirm the cut of %s within %.1f s" % (name, settings.barrier_timeout))
            raise HttpError(504, self.coordinator.current.reason)
        flip_ms = (self.clock() - started) * 1000.0
        self.io.send(releases)  # queued behind the answer's rules; the member resumes meanwhile
        self.coordinator.cut_done(self.wall_clock(), snapshot_id, name, flip_ms)
        self._persist()
        return {"snapshot": snapshot_id, "member": name, "epoch": member.epoch,
                "flip_started": started_wall, "cut_time": cut.cut_time, "flip_ms": cut.flip_ms}

    def prepare(self, snapshot_id: str, name: str) -> dict:
        """The helper is about to pause the member: answer once frames for it are held."""
        member = self.coordinator.get_member(name)
        messages = self.coordinator.prepare(self.clock(), snapshot_id, name)
        if not self.io.send_and_barrier(messages, self.coordinator.switches_of(member),
                                        self.config.snapshot.barrier_timeout):
            self._abort("the switch did not confirm holding frames for %s" % name)
            raise HttpError(504, self.coordinator.current.reason)
        return {"snapshot": snapshot_id, "member": name, "state": "prepared"}

    def done(self, snapshot_id: str, name: str, report: dict) -> dict:
        if self.coordinator.done(snapshot_id, name, report):
            self.io.spawn(self.drain_and_complete, snapshot_id)
        self._persist()
        return self.snapshot_view(snapshot_id)

    def failed(self, snapshot_id: str, name: str, body: dict) -> dict:
        self.coordinator.require(snapshot_id, name)
        reason = body.get("reason") if isinstance(body.get("reason"), str) else "no reason given"
        self._abort("helper for %s failed: %s" % (name, reason[:500]))
        return self.snapshot_view(snapshot_id)

    def abort(self, snapshot_id: str, body: dict) -> dict:
        self.coordinator.require(snapshot_id)
        reason = body.get("reason") if isinstance(body.get("reason"), str) else "aborted by request"
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
        self.catalogue.save(snapshot.manifest(), frames)
        LOG.info("snapshot %s complete: %d members, %d frames of channel state (drain by %s)",
                 snapshot.id, len(snapshot.participants), len(frames), method)
        if snapshot.label == SCHEDULE_LABEL:
            self.prune()

    # --- restore ---------------------------------------------------------------

    def start_restore(self, snapshot_id: str, body: dict) -> dict:
        """Check everything that can be checked before anything running is touched, then go."""
        unknown = sorted(set(body) - {"placement"})
        if unknown:
            raise HttpError(400, "unknown field(s) %s; known: placement" % ", ".join(unknown))
        placement = body.get("placement") or {}
        if not isinstance(placement, dict) or not all(isinstance(v, str) and v.startswith("http")
                                                      for v in placement.values()):
            raise HttpError(400, "placement maps member names to helper URLs")
        manifest = self.catalogue.get(snapshot_id)
        if manifest is None:
            raise HttpError(404, "no snapshot %s" % snapshot_id)
        if not manifest.get("restorable"):
            raise HttpError(409, "snapshot %s is %s and is not offered for restore%s" % (
                snapshot_id, manifest.get("state"), ": " + manifest["reason"] if manifest.get("reason") else ""))
        if self.coordinator.running():
            raise HttpError(409, "snapshot %s is running; restore after it ends" % self.coordinator.current.id)
        if any(job.state == "running" for job in self.restores.values()):
            raise HttpError(409, "a restore is already running")
        members = {}
        for entry in manifest["members"]:
            name = entry["name"]
            member = self.coordinator.members.get(name)
            if member is None:
                raise HttpError(409, "member %s of the snapshot is not registered" % name)
            helper = placement.get(name) or member.helper_url
            if not helper or not entry.get("server") or not (entry.get("image") or {}).get("files"):
                raise HttpError(409, "member %s has no helper or no stored image to restore from" % name)
            members[name] = {"helper": helper, "state": "pending", "server": entry["server"],
                             "files": entry["image"]["files"]}
        unknown_placement = sorted(set(placement) - set(members))
        if unknown_placement:
            raise HttpError(400, "placement names members not in the snapshot: %s" % ", ".join(unknown_placement))
        job = RestoreJob("restore-%s-%s" % (snapshot_id, os.urandom(2).hex()), snapshot_id, manifest["epoch"],
                         members, self.wall_clock())
        self.restores[job.id] = job
        self.io.spawn(self._run_restore, job.id)
        return job.view()

    def _helper_call(self, job: RestoreJob, name: str, action: str, extra: Optional[dict] = None) -> dict:
        info = job.members[name]
        body = dict({"snapshot": job.snapshot, "member": name}, **(extra or {}))
        status, answer = self.io.post_json(info["helper"].rstrip("/") + "/" + action, body, 60.0,
                                           self.config.helper_token)
        if status is None or not 200 <= status < 300:
            reason = answer.get("reason", answer) if isinstance(answer, dict) else answer
            raise RuntimeError("%s of %s at %s failed: %s %s" % (action, name, info["helper"], status, reason))
        info["state"] = action + ("d" if action.endswith("e") else "ed")
        return answer

    def _restore_member(self, job: RestoreJob, name: str) -> None:
        """Restore one member where the job places it; a member moving to another helper is
        first stopped where it runs now (if that host still answers), then located at its new port."""
        info, member = job.members[name], self.coordinator.members[name]
        if member.helper_url and info["helper"].rstrip("/") != member.helper_url.rstrip("/"):
            info["moved_from"] = member.helper_url
            status, answer = self.io.post_json(member.helper_url.rstrip("/") + "/stop",
                                               {"snapshot": job.snapshot, "member": name}, 30.0,
                                               self.config.helper_token)
            if status is None or not 200 <= status < 300:  # a dead host is a reason to move, not to fail
                reason = answer.get("reason", answer) if isinstance(answer, dict) else answer
                info["previous"] = "not stopped: %s %s" % (status, reason)
                LOG.warning("restore %s: %s at %s not stopped: %s", job.id, name, member.helper_url, reason)
            else:
                info["previous"] = "stopped"
        answer = self._helper_call(job, name, "restore")
        iface = answer.get("iface") if isinstance(answer, dict) else None
        if iface:
            where = self.fabric.port_named(iface)
            if where is None:
                raise RuntimeError("%s was restored behind %s, which no switch of the slice has" % (name, iface))
            for mac in member.macs:
                self.fabric.place_host(mac, where)
        member.helper_url = info["helper"]

    def _restore_order(self, names: List[str]) -> List[str]:
        """VMs first, processes last: a restored process's kernel retransmits its TCP segments into
        the quarantine until the resume and backs off; restored last, it waits the least (a VM
        comes back paused, its clock stopped). Seen with 2 VMs and 2 processes over 5 restores: a
        TCP stream between the processes stalled 23 s with the processes restored first, none did
        (TCP resumed with UDP) with the VMs first."""
        return sorted(names, key=lambda name: (self.coordinator.members[name].backend != "libvirt", name))

    def _run_restore(self, job_id: str) -> None:
        job, names = self.restores[job_id], sorted(self.restores[job_id].members)
        settings, quarantined, resumed = self.config.snapshot, False, False

        def timed(phase, work):
            job.phase, began = phase, self.clock()
            result = work()
            job.timings_ms[phase] = round((self.clock() - began) * 1000, 1)
            return result

        try:
            frames = timed("staging", lambda: self._stage(job, names))
            quarantine = self.coordinator.quarantine(self.clock(), names)
            quarantined = True
            if not self.io.send_and_barrier(quarantine, set(self.fabric.switches), settings.barrier_timeout):
                raise RuntimeError("the switches did not confirm the quarantine")
            timed("restoring", lambda: [self._restore_member(job, n) for n in self._restore_order(names)])
            rules, injections = self.coordinator.restored(self.clock(), job.epoch, names, frames)
            quarantined = False

            def reinject():
                if not self.io.send_and_barrier(rules, set(self.fabric.switches), settings.barrier_timeout):
                    raise RuntimeError("the switches did not confirm the restored members' rules")
                self.io.send_and_barrier(injections, {m.dpid for m in injections}, settings.barrier_timeout)
                job.reinjected = len(injections)
            timed("reinjecting", reinject)
            timed("resuming", lambda: [self._helper_call(job, n, "resume") for n in names])
            resumed = True
            job.state, job.phase = "complete", "complete"
        except (RuntimeError, SnapshotError, HttpError, OSError) as error:
            job.state, job.reason = "failed", str(getattr(error, "reason", error))
            if quarantined:
                self.io.send(self.coordinator.lift_quarantine(self.clock()))
            if not resumed:  # what was restored already runs on rather than stay frozen
                for name in names:
                    if job.members[name]["state"] == "restored":
                        try:
                            self._helper_call(job, name, "resume")
                        except RuntimeError:
                            pass
            LOG.warning("restore %s failed: %s", job.id, job.reason)
        job.finished = self.wall_clock()

    def _stage(self, job: RestoreJob, names: List[str]) -> List[ChannelFrame]:
        """Verify the channel state and have every helper fetch and verify its member's image."""
        manifest = self.catalogue.get(job.snapshot)
        frames = []
        if manifest.get("channel"):
            path = self.catalogue.channel_path(job.snapshot)
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError as error:
                raise RuntimeError("channel state of %s unreadable: %s" % (job.snapshot, error.strerror))
            if hashlib.sha256(data).hexdigest() != manifest["channel"]["sha256"]:
                raise RuntimeError("channel state of %s is corrupt (checksum mismatch)" % job.snapshot)
            frames = channel.decode(data)
        for name in names:
            info = job.members[name]
            self._helper_call(job, name, "stage", {"server": info["server"], "files": info["files"]})
        return frames

    def _abort(self, reason: str) -> None:
        messages = self.coordinator.abort(self.clock(), self.wall_clock(), reason)
        if self.io is not None:
            self.io.send(messages)
        self._persist()
        LOG.warning("snapshot %s aborted: %s", self.coordinator.current.id, reason)

    def _late_record(self) -> None:
        """A pre-snapshot frame reached a post receiver after completion: the snapshot lacks it."""
        snapshot = self.coordinator.current
        if snapshot is not None and snapshot.state == COMPLETE:
            manifest = dict(self.catalogue.get(snapshot.id) or snapshot.manifest())
            manifest.update(state="aborted", phase="aborted", restorable=False,
                            reason="a pre-snapshot frame reached a post-snapshot receiver after completion "
                                   "(drain too short); its channel state is incomplete")
            snapshot.state, snapshot.reason = "aborted", manifest["reason"]
            self.catalogue.save(manifest)

    def _persist(self) -> None:
        snapshot = self.coordinator.current
        if snapshot is not None and snapshot.state != COMPLETE:
            self.catalogue.save(snapshot.manifest())

    def _notify_helper(self, snapshot_id: str, name: str, helper_url: str, base_url: str) -> None:
        callbacks = "%s/violin/snapshots/%s/members/%s" % (base_url.rstrip("/"), snapshot_id, name)
        body = {"snapshot": snapshot_id, "member": name, "epoch": self.coordinator.current.epoch,
                "cut_url": callbacks + "/cut", "done_url": callbacks + "/done", "failed_url": callbacks + "/failed"}
        try:
            status, answer = self.io.post_json(helper_url.rstrip("/") + "/snapshot", body, 10.0,
                                               self.config.helper_token)
        except OSError as error:
            status, answer = None, str(error)
        if status is None or not 200 <= status < 300:
            if self.coordinator.running() and self.coordinator.current.id == snapshot_id:
                self._abort("helper of %s at %s did not take the snapshot request: %s"
                            % (name, helper_url, status or answer))

    # --- views ---------------------------------------------------------------

    def snapshot_view(self, snapshot_id: str) -> dict:
        current = self.coordinator.current
        if current is not None and current.id == snapshot_id and current.state == RUNNING:
            return current.manifest()
        manifest = self.catalogue.get(snapshot_id)
        if manifest is None:
            raise HttpError(404, "no snapshot %s" % snapshot_id)
        return manifest

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


def _snapshot_errors(handler):
    """Turn the coordinator's refusals into HTTP errors."""
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except SnapshotError as error:
            raise HttpError(error.status, error.reason) from None
    return wrapped


def build_rest_app(controller: ViolinController) -> RestApp:
    app = RestApp(controller.config.api_token)
    route = lambda method, path: lambda f: app.route(method, path)(_snapshot_errors(f))  # noqa: E731
    coordinator = controller.coordinator

    @route("GET", "/health")
    def health(_req, _body):
        return controller.health()

    @route("GET", "/topology")
    def topology(_req, _body):
        return controller.topology()

    @route("GET", "/topology/switches/{dpid}")
    def switch(_req, _body, dpid):
        try:
            number = int(dpid, 16)
        except ValueError:
            raise HttpError(400, "dpid must be hexadecimal, got %r" % dpid) from None
        for entry in controller.topology()["switches"]:
            if int(entry["dpid"], 16) == number:
                return entry
        raise HttpError(404, "no switch with dpid %s" % dpid)

    @route("GET", "/members")
    def members(_req, _body):
        return {"members": [m.describe(controller.fabric) for m in coordinator.members.values()]}

    @route("POST", "/members")
    def add_member(_req, body):
        return 201, coordinator.add_member(parse_member(body)).describe(controller.fabric)

    @route("GET", "/members/{name}")
    def member(_req, _body, name):
        return coordinator.get_member(name).describe(controller.fabric)

    @route("DELETE", "/members/{name}")
    def remove_member(_req, _body, name):
        return coordinator.remove_member(name).describe(controller.fabric)

    @route("GET", "/snapshots")
    def snapshots(_req, _body):
        listed = {m["id"]: m for m in controller.catalogue.list()}
        current = coordinator.current
        if current is not None and current.state == RUNNING:
            listed[current.id] = current.manifest()
        return {"snapshots": sorted(listed.values(), key=lambda m: (m.get("created") or 0, m["id"]))}

    @route("POST", "/snapshots")
    def start(req, body):
        return 202, controller.start_snapshot(body, req.host_url)

    @route("GET", "/snapshots/{snapshot_id}")
    def snapshot(_req, _body, snapshot_id):
        return controller.snapshot_view(snapshot_id)

    @route("DELETE", "/snapshots/{snapshot_id}")
    def delete(_req, _body, snapshot_id):
        manifest = controller.snapshot_view(snapshot_id)
        if manifest["state"] == RUNNING:
            raise HttpError(409, "snapshot %s is running; abort it first" % snapshot_id)
        controller._delete_snapshot(manifest)
        return {"deleted": snapshot_id}

    @route("POST", "/snapshots/{snapshot_id}/restore")
    def restore(_req, body, snapshot_id):
        return 202, controller.start_restore(snapshot_id, body)

    @route("GET", "/schedule")
    def schedule(_req, _body):
        return controller.schedule.view(controller.clock())

    @route("PUT", "/schedule")
    def set_schedule(req, body):
        return controller.set_schedule(body, req.host_url)

    @route("DELETE", "/schedule")
    def clear_schedule(_req, _body):
        return controller.clear_schedule()

    @route("GET", "/restores")
    def restores(_req, _body):
        return {"restores": [job.view() for job in controller.restores.values()]}

    @route("GET", "/restores/{restore_id}")
    def restore_view(_req, _body, restore_id):
        job = controller.restores.get(restore_id)
        if job is None:
            raise HttpError(404, "no restore %s" % restore_id)
        return job.view()

    @route("POST", "/snapshots/{snapshot_id}/abort")
    def abort(_req, body, snapshot_id):
        return controller.abort(snapshot_id, body)

    @route("POST", "/snapshots/{snapshot_id}/members/{name}/prepare")
    def prepare(_req, _body, snapshot_id, name):
        return controller.prepare(snapshot_id, name)

    @route("POST", "/snapshots/{snapshot_id}/members/{name}/cut")
    def cut(_req, _body, snapshot_id, name):
        return controller.cut(snapshot_id, name)

    @route("POST", "/snapshots/{snapshot_id}/members/{name}/done")
    def done(_req, body, snapshot_id, name):
        return controller.done(snapshot_id, name, body)

    @route("POST", "/snapshots/{snapshot_id}/members/{name}/failed")
    def failed(_req, body, snapshot_id, name):
        return controller.failed(snapshot_id, name, body)

    return app
