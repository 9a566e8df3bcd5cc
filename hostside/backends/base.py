"""The host-side Backend interface and the registry of backends.

A backend knows how to stop, capture, put back and restart one kind of member
(a CRIU process tree, a libvirt VM...). The helper's orchestration
(hostside/orchestration.py) is the same for every backend: it calls these
methods and never asks which backend it holds. A new backend subclasses
``Backend``, sets the class attributes, implements the abstract methods and is
registered with ``@register``; its member spec schema then becomes a variant of
the helper config's ``members`` (chosen by each member's ``backend`` key).

What a backend must provide:

``name``              the value of ``backend:`` in a member spec
``sends_marker``      True if the member's link carries a cut marker frame sent
                      while the member is stopped (then the cut call says
                      ``marker: true``); a VM's synchronous cut proves its tap
                      drained instead
``restores_paused``   True if a restored member comes back paused with its clock
                      stopped (the controller restores those first)
``SCHEMA``            a ``violin_core.schema.Schema`` of the member spec (without
                      the ``backend`` key)
``Spec``              the dataclass a validated spec becomes (``name`` first)
``quiet_proof``       context manager opened before the controller's prepare,
                      yielding the proof that nothing the member sent before the
                      cut is still on its way (send the marker / wait for the tap
                      to drain), run at the cut while the member is stopped
``snapshot``          capture the member into an ``ImageSink``, calling
                      ``at_cut()`` exactly once while it is stopped, and resume it
``cuts_async``        True if ``snapshot`` also calls ``resumed()`` once the member
                      runs again after ``at_cut`` (before its image is stored):
                      the helper then asks for an asynchronous cut (its marker
                      confirmed at the cut, the flip after the member resumed),
                      unless the proof says ``marks`` False (this member cannot
                      send a marker: a VM whose tap cannot be written)
``flips_stopped``     True if frames released to the member while it is still
                      stopped wait for it unharmed (a VM's tap, which QEMU reads
                      once the guest runs): its in-band cut request then goes
                      right after the marker, at the cut, not once it runs
                      (CRIU's network lock would drop them)
``prepares_itself``   False (default): the helper calls the controller's prepare
                      (frames to the member held from then on) before
                      ``snapshot``; True: the backend calls ``prepare()`` itself,
                      as late as it can but before the member stops (a VM: just
                      before the migration's switchover, not before its pre-copy;
                      CRIU and podman members: at CRIU's pre-dump action)
``locate``            where the member is *now* (pid, namespaces, interface,
                      MAC), found afresh for each operation: a restored member's
                      pid or namespace can change
``restore``           replace the running member by a staged image, left stopped
``resume``, ``stop``  run a restored member on / stop it for good here
``start`` (optional)  once, when the helper starts serving
``stage`` (optional)  check a downloaded image before anything is touched
"""

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Type

from violin_core.schema import Schema, Variant


@dataclass
class HostSettings:
    """What a backend may need of the helper's config."""
    work_dir: str = "/var/lib/violin-helper"
    libvirt_uri: str = "qemu:///system"
    vm_max_bandwidth: int = 4 << 30  # bytes/s a VM's migration stream may take
    vm_hold: str = "switchover"  # frames to a VM held from just before its switchover, or "precopy"


@dataclass
class Located:
    """Where a member is right now, as its backend found it (None: not known or not applicable)."""
    mac: Optional[str]  # the MAC the switch learns it by
    iface: Optional[str] = None  # its interface, in ``netns`` (a VM's: the tap on the host)
    pid: Optional[int] = None  # root of its process tree (a VM: QEMU's pid)
    netns: Optional[str] = None  # path of its network namespace
    mntns: Optional[str] = None
    port: Optional[str] = None  # the switch port its link plugs into
    details: Dict[str, Any] = field(default_factory=dict)  # backend-specific (container id, domain uuid...)


@dataclass
class ImageReport:
    """A stored member image, as the done report tells the controller."""
    pause_ms: float  # how long the member was stopped
    bytes: int
    files: List[dict]  # {name, bytes, sha256} of each stored file
    details: Dict[str, Any] = field(default_factory=dict)  # backend-specific timings, shown under ``image``


@dataclass
class Restored:
    restore_ms: float
    port: Optional[str]  # the name of the switch port the member plugs into here (None: cannot be told)
    details: Dict[str, Any] = field(default_factory=dict)  # shown in the restore answer


class ImageSink(abc.ABC):
    """Where a backend puts a member's image (one snapshot, one member)."""
    snapshot: str
    member: str

    @abc.abstractmethod
    def put_dir(self, directory: str) -> List[dict]:
        """Store every file of ``directory``; their {name, bytes, sha256}."""

    @abc.abstractmethod
    def put_stream(self, name: str, reader) -> dict:
        """Store what ``reader.read(n)`` gives until it is empty as file ``name``; its {name, bytes, sha256}."""

    def settle(self) -> None:
        """The member runs again and what follows is storing: a backend calls this first, so that the
        helper can hold the stores until its other members are through their freezes (which they
        would slow down). A sink that stores directly does nothing here."""

    keeps: bool = False  # whether ``keep`` may take an image: a backend that must write one to keep it asks first

    def keep(self, directory: str, files: List[dict], trees: Optional[Dict[str, str]] = None,
             private: Sequence[str] = ()) -> bool:
        """Once ``directory``'s files are stored as ``files``: whether the sink took ``directory`` (and the
        directories ``trees`` maps tree pointers' file names to) away to keep on this host
        (``hostside.kept``), so that a restore here checks them instead of downloading them;
        ``private``: the files a restore writes to (staged as copies). A backend removes what is left
        itself."""
        return False


class Backend(abc.ABC):
    name: ClassVar[str]
    sends_marker: ClassVar[bool]
    restores_paused: ClassVar[bool]
    prepares_itself: ClassVar[bool] = False
    flips_stopped: ClassVar[bool] = False
    cuts_async: ClassVar[bool] = False
    SCHEMA: ClassVar[Schema]
    Spec: ClassVar[type]

    def __init__(self, settings: HostSettings):
        self.settings = settings

    def member(self, name: str, spec: dict):
        """The member spec object of a validated spec (the ``backend`` key dropped)."""
        return self.Spec(name=name, **{k: v for k, v in spec.items() if k != "backend"})

    def start(self) -> None:
        """Once, before the helper serves."""

    @contextlib.contextmanager
    def quiet_proof(self, member, snapshot: str) -> Iterator[Callable[[], Any]]:
        """Yields what proves, at the cut, that the member's link holds nothing it sent earlier."""
        yield lambda: None

    def locate(self, member) -> Located:
        """Where ``member`` is now; the default reads the spec's own fields (pid, netns, iface, mac...)."""
        return Located(**{key: getattr(member, key, None) for key in ("mac", "iface", "pid", "netns", "mntns")})

    @abc.abstractmethod
    def snapshot(self, member, sink: ImageSink, at_cut: Callable[[], Any],
                 prepare: Callable[[], None] = lambda: None, resumed: Optional[Callable[[], None]] = None) -> ImageReport:
        """Capture ``member`` into ``sink``; ``at_cut()`` runs once while it is stopped (if it raises,
        the snapshot fails and the member runs on). The member runs again when this returns.
        ``prepare()`` (idempotent) is for backends that set ``prepares_itself``: call it before the
        member stops; ``at_cut`` calls it too if it was not. A backend that ``cuts_async`` calls
        ``resumed()`` (if given) as soon as the member runs again after its cut (raising what it raises)."""

    def stage(self, member, directory: str) -> None:
        """Check a downloaded image in ``directory`` (checksums are already verified)."""

    @abc.abstractmethod
    def restore(self, member, directory: str) -> Restored:
        """Replace the running member by the image staged in ``directory``, left stopped."""

    @abc.abstractmethod
    def resume(self, member) -> None:
        """Let a restored member run."""

    @abc.abstractmethod
    def stop(self, member) -> None:
        """Stop the member here for good (it is restored on another host)."""


_REGISTRY: Dict[str, Type[Backend]] = {}


def register(cls: Type[Backend]) -> Type[Backend]:
    """Class decorator: make ``cls`` the backend of members with ``backend: <cls.name>``."""
    for attribute in ("name", "sends_marker", "restores_paused", "SCHEMA", "Spec"):
        if not hasattr(cls, attribute):
            raise TypeError("backend %s lacks %s" % (cls.__name__, attribute))
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Type[Backend]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LookupError("no backend %r (registered: %s)" % (name, ", ".join(names()))) from None


def names() -> List[str]:
    return sorted(_REGISTRY)


def member_schema(default: str = "criu") -> Variant:
    """A member spec: the schema of its ``backend`` (``default`` when not given)."""
    return Variant("backend", {name: cls.SCHEMA for name, cls in _REGISTRY.items()}, default=default,
                   help="which backend snapshots the member: " + ", ".join(names()))
