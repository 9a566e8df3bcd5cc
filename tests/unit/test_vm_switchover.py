"""The VM switchover hold (hostside/backends/libvirt.py SwitchoverHold) against a fake QEMU: frames to a
VM are held only from just before QEMU stops it, never through the pre-copy, and never too late."""

import pytest

from hostside.backends.libvirt import HoldTooLate, SwitchoverHold, VmError, _basic_packets


class FakeQemu:
    """A pre-copy whose first pass sends ``rate`` bytes/s while the helper reads its pipe, and which stops
    the guest itself when what remains fits in its downtime limit (20 ms); a shut gate blocks it at once."""

    def __init__(self, remaining=128 << 20, rate=200e6, unread_after_prepare=0, reads_tap=True):
        self.now, self.remaining, self.rate = 0.0, remaining, rate
        self.prepared_at = None
        self.gate_open, self.stopped, self.log = True, False, []
        self.unread_now, self.unread_after_prepare, self.reads_tap = 0, unread_after_prepare, reads_tap

    def sleep(self, seconds):
        self.advance(seconds)

    def advance(self, seconds):
        if self.gate_open and not self.stopped:
            self.remaining = max(0, self.remaining - int(self.rate * seconds))
            if self.remaining <= self.rate * 0.020:
                self.stopped = True
                self.log.append("qemu stops the guest")
        if not self.stopped and self.reads_tap and self.unread_now:
            self.unread_now -= 1  # QEMU reads a frame from its tap while the guest runs
        self.now += seconds

    def clock(self):
        return self.now

    def migration(self):
        self.advance(0.0005)  # a QMP round trip
        if self.stopped:
            return {"status": "pre-switchover", "ram": {"remaining": 0}}
        return {"status": "active", "ram": {"remaining": self.remaining}}

    def running(self):
        self.advance(0.0005)
        return not self.stopped

    def gate(self, opened):
        self.gate_open = opened
        self.log.append("gate open" if opened else "gate shut")

    def blocked(self):
        return not self.gate_open

    def prepare(self):
        self.log.append("prepare (running)" if not self.stopped else "prepare (stopped)")
        self.prepared_at = self.now
        self.advance(0.012)  # the controller's prepare: HTTP, flow-mods, barrier, purge
        self.unread_now += self.unread_after_prepare  # frames that reached the tap just before the hold

    def unread(self):
        return self.unread_now

    def hold(self, **kwargs):
        return SwitchoverHold(self.migration, self.running, self.gate, self.blocked, self.prepare, self.unread,
                              clock=self.clock, sleep=self.sleep, **kwargs)


def test_frames_are_held_from_just_before_qemu_stops_the_guest_not_through_the_pre_copy():
    qemu = FakeQemu()
    hold = qemu.hold()
    hold.run(deadline=10.0)
    assert qemu.log == ["gate shut", "prepare (running)", "gate open"]
    assert hold.timings["precopy_ms"] > 500  # the pre-copy (128 MiB at 200 MB/s) ran with nothing held
    # The pass had only a few ms left when the gate shut: QEMU stops the guest soon after it opens.
    assert qemu.rate * 0.020 < qemu.remaining <= qemu.rate * 0.030
    while not qemu.stopped:
        qemu.advance(0.0005)
    assert qemu.now - qemu.prepared_at < 0.012 + 0.010  # the prepare itself, then the pass's last ms
    hold.verify_at_cut()


def test_a_pass_that_ends_before_the_gate_fails_the_snapshot_instead_of_holding_too_late():
    qemu = FakeQemu(remaining=4 << 20, rate=20e9)  # the whole pass is gone within one poll
    with pytest.raises(HoldTooLate, match="before frames to it were held"):
        qemu.hold().run(deadline=10.0)
    assert qemu.gate_open  # QEMU's pipe is read again whatever happened: it can finish or be cancelled


def test_qemu_stopping_the_guest_while_the_hold_is_prepared_is_caught():
    qemu = FakeQemu()
    qemu.blocked = lambda: None  # cannot tell that QEMU's thread waits on the pipe...
    qemu.gate = lambda opened: qemu.log.append("gate %s" % opened)  # ...and the gate does not hold it

    def slow_prepare():
        qemu.log.append("prepare")
        qemu.advance(0.5)  # QEMU reaches the end of its pass meanwhile and stops the guest
    qemu.prepare = slow_prepare
    with pytest.raises(HoldTooLate, match="before frames to it were held"):
        qemu.hold().run(deadline=10.0)


def test_frames_that_reached_the_tap_before_the_hold_are_read_by_qemu_before_it_stops():
    qemu = FakeQemu(unread_after_prepare=3)
    hold = qemu.hold()
    hold.run(deadline=10.0)
    assert qemu.unread_now == 0 and hold.floor == 0 and hold.timings["tap_drain_ms"] > 0


def test_frames_left_in_the_tap_fail_the_snapshot_before_and_at_the_cut():
    qemu = FakeQemu(unread_after_prepare=2, reads_tap=False)  # QEMU does not read its tap (rx ring full)
    with pytest.raises(VmError, match="2 frames stay unread"):
        qemu.hold(drain_timeout=0.01).run(deadline=10.0)
    assert qemu.gate_open
    qemu = FakeQemu()
    hold = qemu.hold()
    hold.run(deadline=10.0)
    qemu.unread_now = 1  # with the guest stopped, one frame waits in the tap
    with pytest.raises(VmError, match="1 frames reached the VM's tap"):
        hold.verify_at_cut()


def test_the_tap_counters_offset_is_the_fewest_frames_ever_seen_waiting():
    qemu = FakeQemu()
    qemu.unread_now = -5  # tx_dropped counts frames dropped before the qdisc (while no reader was attached)
    qemu.reads_tap = False
    hold = qemu.hold()
    hold.run(deadline=10.0)
    assert hold.floor == -5
    hold.verify_at_cut()
    qemu.unread_now = -4
    with pytest.raises(VmError):
        hold.verify_at_cut()


def test_a_migration_that_fails_or_vanishes_during_the_pre_copy_ends_the_wait():
    qemu = FakeQemu()
    qemu.migration = lambda: {"status": "failed", "error-desc": "Unable to write to file"}
    with pytest.raises(VmError, match="Unable to write"):
        qemu.hold().run(deadline=10.0)
    qemu = FakeQemu()

    def gone():
        raise VmError("migration of vm1 stopped: domain vm1 stopped")
    hold = SwitchoverHold(qemu.migration, qemu.running, qemu.gate, qemu.blocked, qemu.prepare, qemu.unread,
                          check=gone, clock=qemu.clock, sleep=qemu.sleep)
    with pytest.raises(VmError, match="domain vm1 stopped"):
        hold.run(deadline=10.0)
    assert "prepare (running)" not in qemu.log


def test_qdisc_stats2_basic_packets_are_parsed():
    import struct
    basic = struct.pack("=QL", 12345, 77) + b"\0" * 4
    stats2 = struct.pack("=HH", 4 + len(basic), 1) + basic
    attributes = struct.pack("=HH", 4 + 8, 1) + b"pfifo_fa" + struct.pack("=HH", 4 + len(stats2), 7) + stats2
    assert _basic_packets(attributes, 7, 1) == 77
    assert _basic_packets(b"", 7, 1) is None


def test_a_hold_too_late_takes_the_snapshot_again_with_frames_held_from_the_start():
    from hostside.backends.base import HostSettings
    from hostside.backends.libvirt import LibvirtBackend, MigrationReport

    calls = []

    class FakeLibvirt:
        def migrate_out(self, domain, sink, at_cut, max_bandwidth, prepare, hold_late=True, tee=None, resumed=None):
            calls.append(hold_late)
            if hold_late:
                raise HoldTooLate("QEMU stopped the guest before frames to it were held")
            prepare()
            return MigrationReport(20.0, 5.0, 1.0, 700.0, 10.0, 800.0, 10, "x", hold={"at": "start"})

    backend = LibvirtBackend(HostSettings())
    backend._libvirt = FakeLibvirt()
    assert LibvirtBackend.prepares_itself
    prepared = []
    report = backend._migrate("vm1", None, lambda: 0.0, lambda: prepared.append(True))
    assert calls == [True, False] and prepared == [True]
    assert report.hold["at"] == "start" and "before frames" in report.hold["retried"]


class ScriptedQmp:
    """QEMU's side of migrate_out over a fake QMP: a pre-copy that writes its stream into the helper's
    pipe (blocking when the helper stops reading), stops the guest itself when little remains, waits at
    pre-switchover, and completes on migrate-continue. It logs the commands and what the guest did."""

    STREAM = 256 * 4096  # bytes of pre-copy; "remaining" falls as they are written

    def __init__(self, events, stop_at=64 * 1024):
        import threading
        self.events, self.stop_at, self.log = events, stop_at, []
        self.fd, self.written, self.state, self.running = None, 0, "none", True
        self.continued, self.lock = threading.Event(), threading.Lock()
        self.cut_done_before_cont = None

    def __call__(self, dom, command, arguments=None, files=None):
        import os
        import threading
        self.log.append(command)
        if command == "getfd":
            self.fd = os.dup(files[0])
        elif command == "query-kvm":
            return {"enabled": True}
        elif command == "query-version":
            return {"qemu": {"major": 9, "minor": 0}}
        elif command == "query-block":
            return []
        elif command == "migrate":
            self.state = "active"
            threading.Thread(target=self.precopy, daemon=True).start()
        elif command == "query-migrate":
            with self.lock:
                return {"status": self.state, "ram": {"remaining": max(0, self.STREAM - self.written)}}
        elif command == "query-status":
            return {"status": "running" if self.running else "paused"}
        elif command == "stop":
            self.stop_guest("helper")
        elif command == "migrate-continue":
            self.continued.set()
        elif command == "cont":
            self.running = True
            self.log.append("guest runs")
        return {}

    def stop_guest(self, who):
        with self.lock:
            if self.running:
                self.running = False
                self.log.append("guest stopped by " + who)
                self.state = "pre-switchover"
                self.events.put(("migration", "pre-switchover"))

    def precopy(self):
        import os
        import time
        while self.STREAM - self.written > self.stop_at and self.running:
            os.write(self.fd, b"p" * 4096)  # blocks while the helper's gate is shut
            with self.lock:
                self.written += 4096
            time.sleep(0.001)
        self.stop_guest("qemu")
        self.continued.wait(10)
        os.write(self.fd, b"final")
        os.close(self.fd)
        with self.lock:
            self.state = "completed"
        self.events.put(("migration", "completed"))


def test_migrate_out_holds_frames_just_before_the_guest_stops_and_cuts_while_qemu_completes(monkeypatch, tmp_path):
    """migrate_out's phases with a fake QMP: the pre-copy runs with nothing held, the prepare comes
    while the guest still runs and its pass is nearly done, the cut runs while the guest is stopped,
    and the guest runs again only after the cut answered."""
    import queue
    import threading

    from hostside.backends import libvirt as lv

    class Dom:
        def name(self):
            return "vm1"

        def isActive(self):
            return True

        def XMLDesc(self, flags):
            return ("<domain><devices><interface type='ethernet'><target dev='tvm1'/></interface>"
                    "</devices></domain>")

    conn = lv.Libvirt.__new__(lv.Libvirt)
    conn.libvirt = type("L", (), {"VIR_DOMAIN_XML_MIGRATABLE": 1, "VIR_DOMAIN_XML_SECURE": 2})
    conn.events_lock, conn.files_lock, conn.listeners = threading.Lock(), threading.Lock(), {}
    conn.domain = lambda name: Dom()
    events = queue.Queue()
    qmp = ScriptedQmp(events)
    conn.qmp = qmp
    # The fake QEMU's events go to the queue migrate_out listens on (libvirt's callbacks would put them there).
    conn.listeners = type("Listeners", (dict,), {
        "__setitem__": lambda self, key, value: dict.__setitem__(self, key, (events, value[1]))})()
    monkeypatch.setattr(lv, "tap_unread", lambda tap: 0)
    monkeypatch.setattr(lv, "_qemu_pid", lambda name: None)
    stored = {}

    def sink(reader):
        stored["data"] = b"".join(iter(lambda: reader.read(1 << 16), b""))
        return {"bytes": len(stored["data"]), "sha256": "x"}

    def prepare():
        qmp.log.append("prepare while %s, %d bytes left" % ("running" if qmp.running else "stopped",
                                                              qmp.STREAM - qmp.written))

    def at_cut():
        qmp.log.append("cut while %s" % ("running" if qmp.running else "stopped"))
        qmp.continued.wait(5)  # the cut overlaps QEMU's completion: migrate-continue is not waiting for it
        qmp.log.append("cut answered after migrate-continue" if qmp.continued.is_set() else "cut answered")
        return 0.5

    def resumed():
        qmp.log.append("flip asked while %s" % ("running" if qmp.running else "stopped"))

    report = conn.migrate_out("vm1", sink, at_cut, prepare=prepare, timeout=20, tee=str(tmp_path / "vm.save"),
                              resumed=resumed)
    assert report.teed == str(tmp_path / "vm.save")  # the local copy is the image as uploaded
    assert (tmp_path / "vm.save").read_bytes() == stored["data"]
    steps = [entry for entry in qmp.log if not entry.startswith("query-")]
    prepared = next(i for i, e in enumerate(steps) if e.startswith("prepare"))
    assert steps.index("migrate") < prepared  # the pre-copy ran with nothing held
    assert steps[prepared].startswith("prepare while running")
    left = int(steps[prepared].split(", ")[1].split()[0])
    assert left < ScriptedQmp.STREAM / 4  # ...until its pass was nearly done
    stopped = next(i for i, e in enumerate(steps) if e.startswith("guest stopped"))
    cut = steps.index("cut while stopped")
    assert prepared < stopped < cut < steps.index("guest runs")
    assert steps.index("migrate-continue") < steps.index("cont")
    assert steps.index("cut answered after migrate-continue") < steps.index("cont")  # resumed only after the cut
    assert steps.index("guest runs") < steps.index("flip asked while running")  # an asynchronous cut's request
    assert report.hold["at"] == "switchover" and report.tap_dropped == 0 and stored["data"].endswith(b"final")


def test_cont_waits_out_qemus_finish_migrate_state_and_raises_anything_else():
    """The "completed" event comes a moment before QEMU leaves finish-migrate; a cont in between is
    refused and is asked again, while any other refusal is raised at once."""
    import time

    import pytest
    from hostside.backends import libvirt as lv
    conn = lv.Libvirt.__new__(lv.Libvirt)
    calls = []

    def qmp(dom, command, arguments=None, files=None):
        calls.append(command)
        if len(calls) < 3:
            raise lv.VmError("QMP cont on vm1: Migration is not finalized yet")
        return {}
    conn.qmp = qmp
    conn._cont_after_migration("dom", time.monotonic() + 5)
    assert calls == ["cont"] * 3

    def refuse(dom, command, arguments=None, files=None):
        calls.append(command)
        raise lv.VmError("QMP cont on vm1: Resetting the Virtual Machine is required")
    conn.qmp, calls[:] = refuse, []
    with pytest.raises(lv.VmError, match="Resetting"):
        conn._cont_after_migration("dom", time.monotonic() + 5)
    assert calls == ["cont"]


class ZeroPageQemu(FakeQemu):
    """QEMU 7.2's stopping rule with a guest whose RAM ends in zero pages: the first 60 MB of the pass
    go at 0.5 MB/ms (normal pages: as many stream bytes), the rest at 3 MB/ms for almost no stream bytes.
    QEMU has no threshold until its first 100 ms window ends, then the stream's bandwidth over the window
    times 20 ms (reported as ``mbps``); it stops when what is left falls under the threshold, or at the
    pass's end."""

    def __init__(self, total=130 << 20, normal=60 << 20, **kwargs):
        super().__init__(remaining=total, rate=0.5e9, **kwargs)
        self.total, self.normal, self.sent, self.mbps = total, normal, 0, 0.0
        self.window_start, self.window_sent, self.threshold = 0.0, 0, 0.0

    def advance(self, seconds):
        step = 0.0001
        while seconds > 1e-12:
            dt = min(step, seconds)
            seconds -= dt
            if self.gate_open and not self.stopped and self.remaining > 0:
                done = self.total - self.remaining
                fast = done >= self.normal
                moved = min(self.remaining, int((3e9 if fast else 0.5e9) * dt))
                self.remaining -= moved
                self.sent += moved // 400 if fast else moved
                if self.remaining < self.threshold or self.remaining == 0:
                    self.stopped = True
                    self.log.append("qemu stops the guest")
            self.now += dt
            if self.now >= self.window_start + 0.1 and not self.stopped:
                bandwidth = (self.sent - self.window_sent) / (self.now - self.window_start)
                self.threshold, self.mbps = bandwidth * 0.020, bandwidth * 8 / 1e6
                self.window_start, self.window_sent = self.now, self.sent

    def migration(self):
        self.advance(0.003)  # a QMP round trip through libvirt
        if self.stopped:
            return {"status": "pre-switchover", "ram": {"remaining": self.remaining, "mbps": self.mbps}}
        return {"status": "active", "ram": {"remaining": self.remaining, "mbps": self.mbps, "transferred": self.sent}}


@pytest.mark.parametrize("normal_mb", [20, 60, 100])
def test_a_pass_that_speeds_up_in_zero_pages_is_gated_before_qemu_stops_and_close_to_it(normal_mb):
    """Polls that slept on the first rate seen missed the end of such a pass (2 of 8 snapshots, 12-03);
    counting QEMU's threshold as the pass's own rate times the limit shut the gate with up to 35 ms of
    the pass left. Now neither: QEMU stops a few ms after the gate opens again."""
    qemu = ZeroPageQemu(normal=normal_mb << 20)
    hold = qemu.hold()
    hold.run(deadline=10.0)
    assert qemu.log == ["gate shut", "prepare (running)", "gate open"]
    opened = qemu.now
    while not qemu.stopped:
        qemu.advance(0.0005)
    assert qemu.now - opened < 0.015


def test_one_slow_poll_does_not_make_the_gate_shut_early_for_the_rest_of_the_pass():
    """With 3 VMs migrating on 2 cores a query-migrate can take 50-90 ms; three times the slowest poll
    as the lead shut the gate with 60 MB of the pass left, and the VM was deaf for 300 ms (12-03)."""
    qemu = ZeroPageQemu(normal=60 << 20)
    polls = []
    fast_migration = qemu.migration

    def migration():
        polls.append(qemu.now)
        if len(polls) == 1:
            qemu.advance(0.08)  # libvirt and QEMU's main loop busy elsewhere
        return fast_migration()
    qemu.migration = migration
    hold = qemu.hold()
    hold.run(deadline=10.0)
    opened = qemu.now
    while not qemu.stopped:
        qemu.advance(0.0005)
    assert qemu.now - opened < 0.015
