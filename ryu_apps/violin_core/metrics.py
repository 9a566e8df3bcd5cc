"""Prometheus metrics of the controller (``GET /violin/metrics``), Faucet-style.

Every metric lives in a ``CollectorRegistry`` given to the metrics object (a
fresh one per object unless one is passed), so each controller, and each unit
test, has its own and nothing is global. The controller calls these methods
where states change (a switch connects, a packet-in, a cut, a member done, a
snapshot or a restore ends); nothing here reads the core on its own. Names have
the ``violin_`` prefix and base units (seconds, bytes); README "Metrics" lists
them all. ``prometheus_client`` is pure Python: the core still never imports ryu.
"""

from typing import Dict, Iterable, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from . import of

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # Prometheus text exposition format 0.0.4
# A pause or a flip takes milliseconds to a few seconds; a snapshot or a restore up to minutes.
SHORT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LONG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FRAME_ACTIONS = ("held", "released", "recorded", "dropped", "late_released")
ROLE_NAMES = {of.ROLE_FORWARD: "forward", of.ROLE_LEARN: "learn", of.ROLE_PROBE: "probe",
              of.ROLE_MARKER: "marker", of.ROLE_HOLD: "hold", of.ROLE_RECORD: "record",
              of.ROLE_FLOOD_CUT: "flood_cut", of.ROLE_LEARNED: "learned"}


class Metrics:
    """A registry and its text exposition; subclasses declare their metrics on ``self.registry``."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry

    def exposition(self) -> Tuple[str, bytes]:
        """(content type, body) of a scrape."""
        return CONTENT_TYPE, generate_latest(self.registry)

    def value(self, name: str, **labels) -> Optional[float]:
        """One sample's value (None when absent): for tests and the odd check."""
        return self.registry.get_sample_value(name, labels)


class ControllerMetrics(Metrics):
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        super().__init__(registry)
        r = self.registry
        self._current = lambda: None  # the running snapshot, given by watch()
        r.register(_BeforeEachRead(self))  # first: every read of the registry sees the frame counts of now
        self.snapshots = Counter("violin_snapshots", "snapshots ended, by final state (complete, aborted)",
                                 ["state"], registry=r)
        self.snapshots_running = Gauge("violin_snapshots_running", "snapshots running now (0 or 1)", registry=r)
        self.snapshot_duration = Histogram("violin_snapshot_duration_seconds",
                                           "a snapshot's start to its end, by final state", ["state"],
                                           buckets=LONG_BUCKETS, registry=r)
        self.member_pause = Histogram("violin_member_pause_seconds",
                                      "how long a member was stopped for its snapshot (the helper's done report)",
                                      ["member"], buckets=SHORT_BUCKETS, registry=r)
        self.member_flip = Histogram("violin_member_flip_seconds",
                                     "a member's cut: cut request to the switches' barrier replies", ["member"],
                                     buckets=SHORT_BUCKETS, registry=r)
        self.member_deaf = Histogram("violin_member_held_seconds",
                                     "a prepared member's deaf time: its prepare (every frame for it held from then on) "
                                     "to its cut's release of them", ["member"], buckets=SHORT_BUCKETS, registry=r)
        self.frames = Counter("violin_snapshot_frames", "frames handled by the cut rules, by action (held, "
                              "released, recorded, dropped over the hold bound, late_released)", ["action"],
                              registry=r)
        self.channel_bytes = Counter("violin_snapshot_channel_bytes", "bytes of frames recorded as channel state",
                                     registry=r)
        self.restores = Counter("violin_restores", "restores ended, by final state (complete, failed)", ["state"],
                                registry=r)
        self.restores_running = Gauge("violin_restores_running", "restores running now", registry=r)
        self.restore_duration = Histogram("violin_restore_duration_seconds", "a restore's start to its end, "
                                          "by final state", ["state"], buckets=LONG_BUCKETS, registry=r)
        self.packet_ins = Counter("violin_packet_ins", "packet-ins, by the role of the flow that sent them up",
                                  ["role"], registry=r)
        self.switches = Gauge("violin_switches_connected", "switches connected now", registry=r)
        for action in FRAME_ACTIONS:  # every series exists from the start, at 0
            self.frames.labels(action)
        for state in ("complete", "aborted"):
            self.snapshots.labels(state)
        for state in ("complete", "failed"):
            self.restores.labels(state)
        self._packet_in_children: Dict[Optional[int], object] = {}
        self._counted: Dict[str, int] = {}  # the current snapshot's counts already added to the counters
        self._counted_id: Optional[str] = None
        self._ended: Optional[str] = None  # id of the last snapshot whose end was counted

    # --- called by the controller where states change ----------------------------------------

    def watch(self, current) -> None:
        """``current()`` is the snapshot whose frame counts a read of the registry brings up to date."""
        self._current = current

    def switches_connected(self, count: int) -> None:
        self.switches.set(count)

    def packet_in(self, role: Optional[int]) -> None:
        """On every packet-in, so it must cost nothing: the labelled child is looked up once per role
        (a labels() call per packet-in doubled a held frame's cost, 8.8 -> 17 us, and under traffic a
        lone cut waits behind the packet-ins holding the core's lock)."""
        child = self._packet_in_children.get(role)
        if child is None:
            child = self._packet_in_children[role] = self.packet_ins.labels(
                ROLE_NAMES.get(role, "learn" if role is None else str(role)))
        child.inc()

    def snapshot_started(self, members: Iterable[str] = ()) -> None:
        """A snapshot of ``members`` began: their series are made now, not at their flips (a histogram
        series of a name not seen before took 0.5-2.7 ms each to make, 70 ms in one 26-member batch)."""
        self.snapshots_running.set(1)
        for name in members:
            for histogram in (self.member_flip, self.member_deaf, self.member_pause):
                histogram.labels(name)

    def frames_counted(self, snapshot) -> None:
        """Add what the snapshot's counts gained since the last call (held, released, recorded...)."""
        if snapshot is None:
            return
        if snapshot.id != self._counted_id:
            self._counted_id, self._counted = snapshot.id, {}
        for key, count in snapshot.counts.items():
            gained = count - self._counted.get(key, 0)
            if gained > 0:
                if key == "recorded_bytes":
                    self.channel_bytes.inc(gained)
                else:
                    self.frames.labels(key).inc(gained)
                self._counted[key] = count

    def member_cut(self, member: str, flip_ms: float) -> None:
        self.member_flip.labels(member).observe(flip_ms / 1000.0)

    def member_held(self, member: str, held_ms: Optional[float]) -> None:
        if held_ms is not None:  # None: the member was cut without a prepare, nothing was held for it alone
            self.member_deaf.labels(member).observe(held_ms / 1000.0)

    def member_done(self, member: str, report: dict) -> None:
        if isinstance(report.get("pause_ms"), (int, float)):
            self.member_pause.labels(member).observe(report["pause_ms"] / 1000.0)

    def snapshot_ended(self, snapshot) -> None:
        """Once per snapshot, whichever path ended it (completion, abort, timeout, a failed seal)."""
        if snapshot is None or snapshot.id == self._ended or str(snapshot.state) == "running":
            return
        self._ended = snapshot.id
        self.frames_counted(snapshot)
        state = str(snapshot.state)
        self.snapshots.labels(state).inc()
        self.snapshots_running.set(0)
        if snapshot.completed is not None:
            self.snapshot_duration.labels(state).observe(max(0.0, snapshot.completed - snapshot.created))

    def restore_started(self) -> None:
        self.restores_running.inc()

    def restore_ended(self, job) -> None:
        state = str(job.state)
        self.restores.labels(state).inc()
        self.restores_running.dec()
        if job.finished is not None:
            self.restore_duration.labels(state).observe(max(0.0, job.finished - job.started))


class _BeforeEachRead:
    """A collector that yields nothing and, when the registry is read, adds what the running snapshot's
    frame counts gained: the counters are live for a scrape without work on every packet-in."""

    def __init__(self, metrics: "ControllerMetrics"):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        self.metrics.frames_counted(self.metrics._current())
        return []
