"""A backend that snapshots nothing, for unit tests of the helper's orchestration (no root).

It records every call in ``calls`` and fails where told: ``fail[step] = exception`` for
step ``locate`` (finding the member), ``quiet_open`` (opening the quiet proof), ``quiet`` (the proof at the cut), ``before_cut``
(capture fails before calling at_cut), ``after_cut``, ``stage``, ``restore``, ``resume``, ``stop``.
"""

import contextlib
import os
from dataclasses import dataclass

from hostside.backends.base import Backend, ImageReport, Located, Restored, register, unregister
from violin_core.schema import Field, Schema, unicast_mac


@dataclass
class FakeMember:
    name: str
    iface: str
    mac: str


class FakeBackend(Backend):
    name = "fake"
    sends_marker = True
    restores_paused = True
    Spec = FakeMember
    SCHEMA = Schema({"iface": Field(str, "fake-eth0"), "mac": Field(str, "00:00:00:00:00:0a", check=unicast_mac)},
                    allow_none=False)

    keeps = False  # whether it offers its image directory to the sink to keep (``ImageSink.keep``)

    def __init__(self, settings):
        super().__init__(settings)
        self.calls, self.fail = [], {}

    def locate(self, member):
        """Where it is: the spec's iface and MAC, running unless ``fail["locate"]`` (or ``gone`` holds it)."""
        self.located = getattr(self, "located", 0) + 1
        if "locate" in self.fail:
            raise self.fail["locate"]
        return Located(member.mac, member.iface, port=member.iface,
                       details={"running": member.name not in getattr(self, "gone", ()), "handle": "fake " + member.name})

    def _step(self, step: str, *details):
        self.calls.append((step,) + details)
        if step in self.fail:
            raise self.fail[step]

    @contextlib.contextmanager
    def quiet_proof(self, member, snapshot):
        self._step("quiet_open", member.name, snapshot)
        try:
            yield _Proof(self, member.name)
        finally:
            self.calls.append(("quiet_close", member.name))

    def snapshot(self, member, sink, at_cut, prepare=None, resumed=None):
        self._step("before_cut", member.name)
        proof = at_cut()
        self._step("after_cut", member.name, proof)
        if resumed is not None and self.cuts_async:
            resumed()
            self._step("resumed", member.name)
        directory = os.path.join(self.settings.work_dir, "fake", member.name)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "memory"), "wb") as handle:
            handle.write(b"state of " + member.name.encode())
        sink.settle()
        files = sink.put_dir(directory)
        if self.keeps:  # as the CRIU backend: the directory is kept here for a restore (moved), or stays
            sink.keep(directory, files)
        return ImageReport(pause_ms=1.25, bytes=sum(f["bytes"] for f in files), files=files, details={"fake_ms": 2.0})

    def stage(self, member, directory):
        self._step("stage", member.name, sorted(os.listdir(directory)))

    def restore(self, member, directory):
        self._step("restore", member.name)
        return Restored(3.21, member.iface, {"fake": True})

    def resume(self, member):
        self._step("resume", member.name)

    def stop(self, member):
        self._step("stop", member.name)


class _Proof:
    """The quiet proof: ``proof(confirm)`` (the marker, waited for with ``confirm``), ``request_cut()``."""

    def __init__(self, backend, name):
        self.backend, self.name = backend, name
        self.marks = getattr(backend, "proof_marks", True)  # False: this member cannot send a marker (a VM's tap)

    def __call__(self, confirm=False):
        return self.backend._step("quiet_confirmed" if confirm else "quiet", self.name) or 0.5

    def request_cut(self):
        self.backend._step("cut_request", self.name)


class FakeAsyncBackend(FakeBackend):
    """The fake backend, cutting asynchronously (as CRIU and podman members do)."""
    name = "fake-async"
    cuts_async = True


@contextlib.contextmanager
def registered():
    """The fake backend in the registry for the duration (so a helper config can name it)."""
    register(FakeBackend)
    register(FakeAsyncBackend)
    try:
        yield FakeBackend
    finally:
        unregister(FakeBackend.name)
        unregister(FakeAsyncBackend.name)
