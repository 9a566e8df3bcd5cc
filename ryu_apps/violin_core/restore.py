"""Whole-slice restore: stage (verify) -> quarantine -> restore paused -> re-inject -> resume.

Everything that can be checked is checked before anything running is touched: the
manifest, the placement, the channel state's checksum, and every helper's fetch and
verification of its member's image (``stage``). Only then are the members cut off the
network, replaced by their images (left stopped), their epochs reset, the recorded
channel state re-injected to each receiver in order, and all resumed together.

Jobs are kept in the catalogue directory (``restores.json``), written at every step: a job
found running when the controller starts was cut short by a restart; it is marked failed
("controller restarted") and the members it had restored (left stopped) are resumed.
"""

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from . import channel, schema
from .channel import ChannelFrame
from .coordinator import State
from .errors import Refused, reason_of

LOG = logging.getLogger("violin.restore")
JOBS_FILE = "restores.json"
RESUME_PATIENCE_S, RESUME_RETRY_S = 30.0, 0.5  # a helper restarting is asked again to resume its members
KEEP_JOBS = 50  # finished jobs kept on disk (the newest)

RESTORE_BODY = schema.Schema({
    "placement": schema.Field((dict, type(None)), None, lambda v: None if all(
        isinstance(k, str) and isinstance(u, str) and schema.http_url(u) is None for k, u in v.items())
        else "a mapping of member names to helper URLs", help="members to restore on another helper"),
}, allow_none=False)
ATTACHMENT = schema.Schema({
    "dpid": schema.Field(str, check=schema.matches(r"^[0-9a-fA-F]{1,16}$", "a datapath id in hex")),
    "port": schema.Field(int, check=schema.between(1, 0xFFFFFF00)),
}, allow_none=False)


class RestoreState(State):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


class RestorePhase(State):
    STAGING = "staging"
    RESTORING = "restoring"
    REINJECTING = "reinjecting"
    RESUMING = "resuming"
    COMPLETE = "complete"


@dataclass
class RestoreJob:
    id: str
    snapshot: str
    epoch: int
    members: Dict[str, dict]  # name -> {"helper": url, "state": ..., "server", "files", ...}
    started: float
    state: RestoreState = RestoreState.RUNNING
    phase: RestorePhase = RestorePhase.STAGING
    reason: Optional[str] = None
    finished: Optional[float] = None
    timings_ms: Dict[str, float] = field(default_factory=dict)
    reinjected: int = 0

    def view(self) -> dict:
        """The job as the API shows it and as it is saved: the members' image file lists (40 a CRIU member,
        in the snapshot's manifest already) left out. With them, saving every job at each member's step
        (JSON encoded, two fsyncs, on the controller's one event loop) took 0.5 s of an 8-member restore."""
        members = {name: {k: v for k, v in info.items() if k != "files"} for name, info in self.members.items()}
        return {"id": self.id, "snapshot": self.snapshot, "epoch": self.epoch, "state": self.state,
                "phase": self.phase, "reason": self.reason, "started": self.started, "finished": self.finished,
                "members": members, "timings_ms": self.timings_ms, "reinjected_frames": self.reinjected}

    @classmethod
    def from_view(cls, view: dict) -> "RestoreJob":
        return cls(view["id"], view["snapshot"], view.get("epoch", 0), view.get("members") or {},
                   view.get("started") or 0.0, RestoreState(view.get("state", "failed")),
                   RestorePhase(view.get("phase", "staging")), view.get("reason"), view.get("finished"),
                   view.get("timings_ms") or {}, view.get("reinjected_frames") or 0)


class Restorer:
    """Runs restore jobs against the coordinator, the fabric, the catalogue and the helpers."""

    def __init__(self, coordinator, catalogue, io, settings, helper_token: Optional[str],
                 clock: Callable[[], float], wall_clock: Callable[[], float], background: Callable,
                 started: Callable[[], None] = lambda: None, ended: Callable[[RestoreJob], None] = lambda job: None):
        self.coordinator, self.fabric, self.catalogue = coordinator, coordinator.fabric, catalogue
        self.io, self.settings, self.helper_token = io, settings, helper_token
        self.clock, self.wall_clock, self.background = clock, wall_clock, background
        self.started, self.ended = started, ended  # told when a job starts and ends (the metrics)
        self.jobs: Dict[str, RestoreJob] = {}

    # --- persistence: a restart must not leave a restore "running" or its members stopped ---------

    def save(self) -> None:
        """Write every job (the running one and the newest finished ones) to the catalogue directory."""
        jobs = sorted(self.jobs.values(), key=lambda j: (j.started, j.id))
        finished = [j for j in jobs if j.state != RestoreState.RUNNING][-KEEP_JOBS:]
        kept = [j for j in jobs if j.state == RestoreState.RUNNING or j in finished]
        try:
            self.catalogue.save_extra(JOBS_FILE, {"restores": [j.view() for j in kept]})
        except OSError as error:  # the restore itself goes on; only its record after a restart is lost
            LOG.warning("restore jobs not saved: %s", error)

    def recover(self) -> List[str]:
        """Load the saved jobs; one still running was cut short by a restart: fail it with that reason and
        resume (in the background) the members it had restored or was restoring, left stopped."""
        saved = self.catalogue.load_extra(JOBS_FILE) or {}
        interrupted = []
        for view in saved.get("restores") or []:
            try:
                job = RestoreJob.from_view(view)
            except (KeyError, ValueError, TypeError):
                continue  # unreadable: forgotten
            self.jobs[job.id] = job
            if job.state == RestoreState.RUNNING:
                job.state, job.finished = RestoreState.FAILED, self.wall_clock()
                job.reason = "controller restarted during the restore (phase %s)" % job.phase
                LOG.warning("restore %s failed: %s", job.id, job.reason)
                interrupted.append(job.id)
        if interrupted:
            self.save()
            for job_id in interrupted:
                self.background(self._resume_interrupted, job_id, on_failure=lambda reason: LOG.warning(
                    "resuming after a restart: %s", reason))
        return interrupted

    def _resume_interrupted(self, job_id: str) -> None:
        job = self.jobs[job_id]
        for name in sorted(job.members):
            info = job.members[name]
            if info.get("state") not in ("restoring", "restored"):
                continue  # never touched (or already resumed): it runs as it was
            info["after_restart"] = "resumed" if self._resume(job, name) else "not resumed"
        self.save()

    def running(self) -> Optional[RestoreJob]:
        return next((job for job in self.jobs.values() if job.state == RestoreState.RUNNING), None)

    def get(self, job_id: str) -> RestoreJob:
        if job_id not in self.jobs:
            raise Refused(404, "no restore %s" % job_id)
        return self.jobs[job_id]

    def start(self, snapshot_id: str, body: dict) -> dict:
        """Check everything that can be checked before anything running is touched, then go."""
        placement = schema.request_body(RESTORE_BODY, body)["placement"] or {}
        manifest = self.catalogue.get(snapshot_id)
        if manifest is None:
            raise Refused(404, "no snapshot %s" % snapshot_id)
        if not manifest.get("restorable"):
            raise Refused(409, "snapshot %s is %s and is not offered for restore%s" % (
                snapshot_id, manifest.get("state"), ": " + manifest["reason"] if manifest.get("reason") else ""))
        if self.coordinator.running():
            raise Refused(409, "snapshot %s is running; restore after it ends" % self.coordinator.current.id)
        if self.running() is not None:
            raise Refused(409, "a restore is already running")
        members = {}
        for entry in manifest["members"]:
            name = entry["name"]
            member = self.coordinator.members.find(name)
            if member is None:
                raise Refused(409, "member %s of the snapshot is not registered" % name)
            helper = placement.get(name) or member.helper_url
            if not helper or not entry.get("server") or not (entry.get("image") or {}).get("files"):
                raise Refused(409, "member %s has no helper or no stored image to restore from" % name)
            members[name] = {"helper": helper, "state": "pending", "server": entry["server"],
                             "files": entry["image"]["files"]}
        unknown_placement = sorted(set(placement) - set(members))
        if unknown_placement:
            raise Refused(400, "placement names members not in the snapshot: %s" % ", ".join(unknown_placement))
        job = RestoreJob("restore-%s-%s" % (snapshot_id, os.urandom(2).hex()), snapshot_id, manifest["epoch"],
                         members, self.wall_clock())
        self.jobs[job.id] = job
        self.started()
        self.save()
        self.background(self.run, job.id, on_failure=lambda reason: self._fail(job, reason))
        return job.view()

    def _call(self, url: str, action: str, body: dict, timeout: float):
        """(ok, answer) of one helper call; a failed call's answer is its status and reason."""
        status, answer = self.io.post_json(url.rstrip("/") + "/" + action, body, timeout, self.helper_token)
        if status is not None and 200 <= status < 300:
            return True, answer
        return False, "%s %s" % (status or "unreachable:", reason_of(answer))

    def _helper_call(self, job: RestoreJob, name: str, action: str, extra: Optional[dict] = None) -> dict:
        """One member's step at its helper. The job is saved before a wave of restores (``run``: from
        there a restart must resume the members) and at every phase, not after each member's step: at
        8 members those saves (JSON and two fsyncs each, on the controller's one event loop) were 24."""
        info = job.members[name]
        ok, answer = self._call(info["helper"], action, dict({"snapshot": job.snapshot, "member": name},
                                                             **(extra or {})), 60.0)
        if not ok:
            raise RuntimeError("%s of %s at %s failed: %s" % (action, name, info["helper"], answer))
        info["state"] = action + ("d" if action.endswith("e") else "ed")
        return answer if isinstance(answer, dict) else {}

    def _restore_wave(self, job: RestoreJob, wave: List[str]) -> None:
        for name in wave:  # from here each may be stopped: a restart must resume it
            job.members[name]["state"] = "restoring"
        self.save()
        self._all(wave, lambda n: self._restore_member(job, n))

    def _resume(self, job: RestoreJob, name: str) -> bool:
        """Let a member the job may have left stopped run; a helper that does not answer (restarting) is
        asked again for ``RESUME_PATIENCE_S``. One member's failure never keeps the others stopped."""
        info = job.members[name]
        deadline = self.clock() + RESUME_PATIENCE_S
        while True:
            try:
                status, answer = self.io.post_json(info["helper"].rstrip("/") + "/resume",
                                                   {"snapshot": job.snapshot, "member": name}, 30.0, self.helper_token)
            except Exception as error:  # noqa: BLE001 - one member's failure must not keep the others stopped
                status, answer = 500, "%s: %s" % (type(error).__name__, error)
            if status is not None and 200 <= status < 300:
                info["state"] = "resumed"
                return True
            later = self.running()  # a newer restore owns the members now: never resume one it left stopped
            if status is not None or self.clock() >= deadline or (later is not None and later is not job):
                info["state"] = "failed"  # e.g. killed for its restore, never restored: restore the slice again
                info["resume"] = "not resumed: %s %s" % (status or "unreachable:", reason_of(answer))
                LOG.warning("restore %s: %s %s", job.id, name, info["resume"])
                return False
            self.io.sleep(RESUME_RETRY_S)

    def _restore_member(self, job: RestoreJob, name: str) -> None:
        """Restore one member where the job places it; a member moving to another helper is
        first stopped where it runs now (if that host still answers), then located at the
        switch port its new helper names."""
        info, member = job.members[name], self.coordinator.members[name]
        if member.helper_url and info["helper"].rstrip("/") != member.helper_url.rstrip("/"):
            info["moved_from"] = member.helper_url
            ok, answer = self._call(member.helper_url, "stop", {"snapshot": job.snapshot, "member": name}, 30.0)
            if not ok:  # a dead host is a reason to move, not to fail
                info["previous"] = "not stopped: %s" % answer
                LOG.warning("restore %s: %s at %s not stopped: %s", job.id, name, member.helper_url, info["previous"])
            else:
                info["previous"] = "stopped"
        answer = self._helper_call(job, name, "restore")
        if isinstance(answer.get("restore_ms"), (int, float)):  # the backend's own (CRIU's, QEMU's) share
            info["restore_ms"] = answer["restore_ms"]
        if answer.get("attachment") is not None:
            try:
                port = ATTACHMENT.validate(answer["attachment"], "attachment")
            except schema.SchemaError as error:
                raise RuntimeError("the helper of %s named its switch port badly: %s" % (name, error)) from None
            where = (int(port["dpid"], 16), port["port"])
            if not self.fabric.has_port(where):
                raise RuntimeError("%s was restored behind port %d of switch %016x, which the slice does not have"
                                   % (name, where[1], where[0]))
            for mac in member.macs:
                self.fabric.place_host(mac, where)
        member.helper_url = info["helper"]

    @staticmethod
    def restore_waves(job: RestoreJob) -> List[List[str]]:
        """The members restored together, wave after wave: first those whose helpers said they come back
        paused (a VM's clock stops until the resume), then the others: a restored process's kernel
        retransmits its TCP segments into the quarantine until the resume and backs off; restored last,
        it waits the least. Seen with 2 VMs and 2 processes over 5 restores: a TCP stream between the
        processes stalled 23 s with the processes restored first, none did (TCP resumed with UDP) with
        the VMs first."""
        paused = sorted(n for n in job.members if job.members[n].get("restores_paused"))
        return [wave for wave in (paused, sorted(set(job.members) - set(paused))) if wave]

    def _all(self, names: List[str], call: Callable[[str], object]) -> List[object]:
        """``call(name)`` for every member at once (helpers work in parallel); the first failure, in
        name order, is raised once all have returned, so every member's state is known by then."""
        results = self.io.gather([lambda name=name: call(name) for name in names])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def run(self, job_id: str) -> None:
        job, names = self.jobs[job_id], sorted(self.jobs[job_id].members)
        settings = self.settings

        def timed(phase, work):
            job.phase, began = phase, self.clock()
            self.save()
            result = work()
            job.timings_ms[phase.value] = round((self.clock() - began) * 1000, 1)
            return result

        try:
            frames = timed(RestorePhase.STAGING, lambda: self._stage(job, names))
            quarantine = self.coordinator.quarantine(self.clock(), names)
            switches = set(self.fabric.switches)
            if not self.io.send_and_barrier(quarantine, switches, settings.barrier_timeout):
                raise RuntimeError("the switches did not confirm the quarantine")
            timed(RestorePhase.RESTORING, lambda: [self._restore_wave(job, wave) for wave in self.restore_waves(job)])
            rules, injections = self.coordinator.restored(self.clock(), job.epoch, names, frames)

            def reinject():
                if not self.io.send_and_barrier(rules, set(self.fabric.switches), settings.barrier_timeout):
                    raise RuntimeError("the switches did not confirm the restored members' rules")
                self.io.send_and_barrier(injections, {m.dpid for m in injections}, settings.barrier_timeout)
                job.reinjected = len(injections)
            timed(RestorePhase.REINJECTING, reinject)
            timed(RestorePhase.RESUMING, lambda: self._all(names, lambda n: self._helper_call(job, n, "resume")))
            job.state, job.phase = RestoreState.COMPLETE, RestorePhase.COMPLETE
            job.finished = self.wall_clock()
            self.ended(job)
            self.save()
        except (RuntimeError, Refused, OSError) as error:
            self._fail(job, str(getattr(error, "reason", error)))

    def _fail(self, job: RestoreJob, reason: str) -> None:
        """End ``job`` as failed: the quarantine lifted, what was restored already let run (rather than
        stay frozen), and later restores and snapshots free to start."""
        was_running = job.state == RestoreState.RUNNING
        job.state, job.reason, job.finished = RestoreState.FAILED, reason, self.wall_clock()
        if was_running:
            self.ended(job)
        LOG.warning("restore %s failed: %s", job.id, reason)
        if self.coordinator.quarantined:
            self.io.send(self.coordinator.lift_quarantine(self.clock()))
        for name in sorted(job.members):
            if job.members[name]["state"] in ("restoring", "restored"):  # restoring: its helper may have
                self._resume(job, name)                                   # restored it before failing
        self.save()

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

        def stage(name):
            info = job.members[name]
            answer = self._helper_call(job, name, "stage", {"server": info["server"], "files": info["files"]})
            info["restores_paused"] = answer.get("restores_paused") is True
            if "from" in answer:  # the image the helper kept, or the server's, and how long it took
                info["staged_from"], info["stage_ms"] = answer["from"], answer.get("stage_ms")

        # Every member at once: each helper bounds how many of its own it fetches at the same time.
        self._all(names, stage)
        return frames
