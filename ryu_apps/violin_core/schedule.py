"""Periodic snapshots: every ``interval_s`` a snapshot labelled ``scheduled``; older scheduled ones pruned.

The scheduler only decides *when*; taking, deleting and the catalogue are passed in,
so it runs the same under the RyuApp and in unit tests.
"""

import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from . import schema
from .coordinator import SnapshotState
from .errors import Refused

LOG = logging.getLogger("violin.schedule")
SCHEDULE_LABEL = "scheduled"
SCHEDULE_FILE = "schedule.json"

SCHEDULE_BODY = schema.Schema({
    "interval_s": schema.Field(float, check=schema.between(1, 86400 * 7), help="seconds between snapshots"),
    "keep": schema.Field(int, 5, schema.between(1, 1000), help="complete scheduled snapshots kept"),
    "members": schema.Field((list, type(None)), None, lambda v: None if all(isinstance(m, str) for m in v)
                            else "a list of member names", help="a subset of the members (all when null)"),
}, allow_none=False)


@dataclass
class Schedule:
    """Periodic snapshots: every ``interval_s``, keeping the newest ``keep`` scheduled ones."""

    interval_s: Optional[float] = None
    keep: int = 5
    members: Optional[List[str]] = None
    next_at: Optional[float] = None  # monotonic
    taken: int = 0
    skipped: List[str] = field(default_factory=list)  # the last few reasons a turn was skipped

    def view(self, now: float) -> dict:
        return {"enabled": self.interval_s is not None, "interval_s": self.interval_s, "keep": self.keep,
                "members": self.members, "taken": self.taken, "skipped": self.skipped[-5:],
                "next_in_s": None if self.next_at is None else round(max(0.0, self.next_at - now), 3)}

    def persistable(self) -> dict:
        return {"interval_s": self.interval_s, "keep": self.keep, "members": self.members}


class Scheduler:
    """Owns the schedule; ``take(body)`` starts a snapshot, ``delete(manifest)`` removes one."""

    def __init__(self, catalogue, clock: Callable[[], float], wall_clock: Callable[[], float],
                 take: Callable[[dict], dict], delete: Callable[[dict], None], busy: Callable[[], Optional[str]]):
        self.catalogue, self.clock, self.wall_clock = catalogue, clock, wall_clock
        self.take, self.delete, self.busy = take, delete, busy
        self.schedule = Schedule()
        saved = catalogue.load_extra(SCHEDULE_FILE)
        if saved and saved.get("interval_s"):
            self.schedule = Schedule(saved["interval_s"], saved.get("keep", 5), saved.get("members"),
                                     clock() + saved["interval_s"])

    def view(self) -> dict:
        return self.schedule.view(self.clock())

    def set(self, body: dict, known_member: Callable[[str], object]) -> dict:
        values = schema.request_body(SCHEDULE_BODY, body)
        for name in values["members"] or []:
            known_member(name)
        self.schedule = Schedule(values["interval_s"], values["keep"], values["members"],
                                 self.clock() + values["interval_s"])
        self.catalogue.save_extra(SCHEDULE_FILE, self.schedule.persistable())
        return self.view()

    def clear(self) -> dict:
        self.schedule = Schedule()
        self.catalogue.save_extra(SCHEDULE_FILE, self.schedule.persistable())
        return self.view()

    def due(self, now: float) -> bool:
        """True (once) when a turn is due; the caller then runs ``turn`` in the background."""
        if self.schedule.next_at is None or now < self.schedule.next_at:
            return False
        self.schedule.next_at = now + self.schedule.interval_s
        return True

    def turn(self) -> None:
        busy = self.busy()
        if busy:
            self.skip(busy)
            return
        body = {"label": SCHEDULE_LABEL}
        if self.schedule.members is not None:
            body["members"] = self.schedule.members
        try:
            self.take(body)
            self.schedule.taken += 1
        except Refused as error:
            self.skip(error.reason)

    def skip(self, reason: str) -> None:
        self.schedule.skipped = (self.schedule.skipped + ["%.0f: %s" % (self.wall_clock(), reason)])[-20:]
        LOG.info("scheduled snapshot skipped: %s", reason)

    def prune(self) -> List[str]:
        """Keep the newest ``keep`` complete scheduled snapshots; delete the older scheduled ones.

        Aborted scheduled snapshots newer than the oldest one kept stay for inspection.
        """
        scheduled = [m for m in self.catalogue.list()
                     if m.get("label") == SCHEDULE_LABEL and m["state"] != SnapshotState.RUNNING]
        complete = [m for m in scheduled if m["state"] == SnapshotState.COMPLETE]
        if len(complete) <= self.schedule.keep:
            return []
        oldest_kept = complete[-self.schedule.keep]
        doomed = [m for m in scheduled if (m.get("created") or 0) < (oldest_kept.get("created") or 0)]
        for manifest in doomed:
            self.delete(manifest)
        return [m["id"] for m in doomed]
