"""Podman backend: a member is a container, named as podman knows it.

A member spec names the container and nothing about where it runs::

    c1: {backend: podman, container: c1}
    c1: {backend: podman, container: c1, netns: /run/netns/h3, ip: 10.0.0.1/8}   # restored here, elsewhere

Everything else (the container's id and pid, its network namespace, interface
and MAC, its CRIU configuration file, its overlay upper directory and volumes)
is found by ``locate`` from ``podman inspect``, afresh for every operation: a
restored container has a new pid.

**Network.** A podman member joins a network namespace of the topology
(``podman run --network ns:/run/netns/NAME``), e.g. a Mininet host's (named
with ``ip netns attach NAME PID``): the namespace's interface is the member's
link, an Open vSwitch port of the topology, and the member's MAC and address
are that interface's. We chose this over a veth the helper plugs into a bridge
because the namespace outlives the container (a restore needs no new port, the
switch sees the same port and MAC throughout), CRIU restores the container's
sockets into it (runc passes the namespace of the container's spec to CRIU as
external), and nothing in the helper has to manage ports. Restored on another
host, the archive's namespace path is rewritten to the one of the member spec
(``netns``) and the member's MAC and address (as recorded at the snapshot, or
``ip``) go onto that namespace's interface first, as for CRIU members.

**Runtime.** runc 1.1.5 (Debian 12's default). crun 1.8.1 cannot even start a
container here: "cgroups in hybrid mode not supported" (this machine has cgroup
v1 controllers beside a v2 mount). runc runs our CRIU 4.2.1 (``--runtime-flag
criu=...``, and it first on PATH for podman's own check) rather than Debian's
3.17, which fails on this kernel.

**Snapshot.** ``podman container checkpoint --leave-running --tcp-established
--file-locks --export`` (uncompressed). runc takes CRIU options from the file
the container's ``org.criu.config`` annotation names (set at ``podman run``;
one file per container, rewritten by the backend around each operation), so
the action script of ``handover.frozen_hand_over`` runs at CRIU's post-dump,
while the container's tasks are frozen (a small compiled program where a C
compiler is at hand: CRIU runs it at two more actions inside the freeze, and
bash's start there cost about 10 ms each under load). There the backend copies the
container's filesystem changes (its overlay upper directory) and its named
volumes, sends the marker and calls the cut. Podman itself tars those after
the checkpoint, with the container running again: the stored archive carries
ours instead (``rootfs-diff.tar``, ``deleted.files``, ``volumes/*.tar``), so
files and memory are of the same instant (CRIU checks the sizes of open files
at restore). The pause reported is CRIU's frozen time (``--print-stats``).

**Restore.** ``podman container restore --import ... --tcp-established`` with
``leave-stopped`` in the CRIU configuration file: the container comes back with
its tasks stopped (``restores_paused`` is False: its clock runs), after the old
container and its named volumes were removed; ``resume`` sends SIGCONT to every
task of its cgroup.
"""

import contextlib
import io
import json
import logging
import os
import signal
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from hostside.backends import criu
from hostside.backends.base import Backend, ImageReport, Located, Restored, register
from hostside.backends.handover import frozen_hand_over, native_hook
from violin_core.packets import build_cut_request, build_marker
from violin_core.schema import Field, Schema, matches

LOG = logging.getLogger("violin-helper")

PODMAN = os.environ.get("VIOLIN_PODMAN", "podman")
ARCHIVE = "container.tar"  # the stored checkpoint, in podman's export format
IDENTITY = "member.json"  # where the member was at the snapshot: netns, iface, mac, addresses, volumes
CONFIG_ANNOTATION = "org.criu.config"
COMMAND_TIMEOUT_S = 120
ROOTFS_DIFF, DELETED = "rootfs-diff.tar", "deleted.files"


class PodmanError(RuntimeError):
    """A podman operation failed; the message says which and why."""


@dataclass
class ContainerMember:
    """A podman member of the helper config: the container by name."""
    name: str
    container: Optional[str] = None  # podman's name for it (default: the member's name)
    netns: Optional[str] = None  # the network namespace it joins when restored here (default: its own)
    iface: Optional[str] = None  # its interface in that namespace (default: the only one besides lo)
    ip: Optional[str] = None  # address/prefix to take when restored here (default: the one it had)

    @property
    def container_name(self) -> str:
        return self.container or self.name


# --- command lines and parsing (pure) ----------------------------------------------------------

def podman_env(environ=os.environ) -> Dict[str, str]:
    """Podman checks for CRIU on PATH: ours first."""
    return dict(environ, PATH=os.path.dirname(criu.CRIU) + os.pathsep + environ.get("PATH", "/usr/bin:/bin"))


def checkpoint_argv(container: str, export: str) -> List[str]:
    return [PODMAN, "--runtime-flag", "criu=%s" % criu.CRIU, "container", "checkpoint", "--leave-running",
            "--tcp-established", "--file-locks", "--print-stats", "--compress", "none", "--export", export, container]


def restore_argv(archive: str) -> List[str]:
    return [PODMAN, "--runtime-flag", "criu=%s" % criu.CRIU, "container", "restore", "--import", archive,
            "--tcp-established", "--file-locks", "--print-stats"]


def criu_config(action_script: Optional[str] = None, leave_stopped: bool = False) -> str:
    """The container's CRIU configuration file for one operation (runc reads it at checkpoint and restore)."""
    lines = ["network-lock %s" % criu.NETWORK_LOCK]
    if action_script:
        lines.append("action-script %s" % action_script)
    if leave_stopped:
        lines.append("leave-stopped")
    return "\n".join(lines) + "\n"


def netns_of(network_mode: str) -> Optional[str]:
    """The namespace path of podman's ``ns:PATH`` network mode (None for any other mode)."""
    return network_mode[3:] if network_mode.startswith("ns:") and len(network_mode) > 3 else None


@dataclass
class Inspected:
    id: str
    state: str  # running, exited, paused...
    pid: int
    netns: Optional[str]
    network_mode: str
    criu_config: Optional[str]  # the file org.criu.config names
    upper: Optional[str]  # the overlay upper directory: the container's filesystem changes
    volumes: Dict[str, str]  # named volume -> its directory on this host
    runtime: str


def parse_inspect(doc: dict) -> Inspected:
    """What the backend needs of one ``podman inspect`` entry."""
    state = doc.get("State") or {}
    host = doc.get("HostConfig") or {}
    config = doc.get("Config") or {}
    annotations = config.get("Annotations") or {}
    mode = host.get("NetworkMode") or ""
    volumes = {m["Name"]: m["Source"] for m in doc.get("Mounts") or [] if m.get("Type") == "volume" and m.get("Name")}
    return Inspected(doc.get("Id", ""), state.get("Status", "unknown"), int(state.get("Pid") or 0), netns_of(mode),
                     mode, annotations.get(CONFIG_ANNOTATION) or None,
                     ((doc.get("GraphDriver") or {}).get("Data") or {}).get("UpperDir"), volumes,
                     doc.get("OCIRuntime") or "")


def runnable_problem(name: str, found: Inspected) -> Optional[str]:
    """Why the backend cannot snapshot this container (None: it can)."""
    if found.state != "running":
        return "container %s is %s, not running" % (name, found.state)
    if not found.netns:
        return ("container %s has network mode %r: a podman member joins a network namespace of the topology "
                "(podman run --network ns:/run/netns/NAME)" % (name, found.network_mode))
    if not found.criu_config:
        return ("container %s has no %s annotation: create it with --annotation %s=/run/violin-podman/%s.conf "
                "(one file per container; the helper writes it)" % (name, CONFIG_ANNOTATION, CONFIG_ANNOTATION, name))
    if found.runtime and found.runtime != "runc":
        return "container %s runs under %s: checkpoints need runc (podman run --runtime runc)" % (name, found.runtime)
    return None


def same_netns(a: str, b: str) -> bool:
    """Whether two namespace paths name the same namespace (the same nsfs inode; else the same path)."""
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return os.path.normpath(a) == os.path.normpath(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def frozen_ms_of(print_stats: str) -> Optional[float]:
    """CRIU's frozen time of a checkpoint, from podman's ``--print-stats`` output (milliseconds)."""
    try:
        stats = json.loads(print_stats)
        return stats["container_statistics"][0]["criu_statistics"]["frozen_time"] / 1000.0
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _stat(print_stats: str, key: str) -> Optional[float]:
    """A duration of podman's ``--print-stats`` output, in milliseconds (it gives microseconds)."""
    try:
        return round(json.loads(print_stats)[key] / 1000.0, 1)
    except (ValueError, KeyError, TypeError):
        return None


def pick_iface(links: List[dict], wanted: Optional[str]) -> dict:
    """The member's interface among ``ip -j link`` entries: ``wanted``, else the only one besides lo."""
    candidates = [l for l in links if l.get("ifname") != "lo"]
    if wanted:
        candidates = [l for l in candidates if l.get("ifname") == wanted]
        if not candidates:
            raise PodmanError("no interface %s in the container's network namespace" % wanted)
    if len(candidates) != 1:
        raise PodmanError("the container's network namespace has %s interfaces besides lo (%s): name the member's "
                          "with iface" % (len(candidates) or "no", ", ".join(l.get("ifname", "?") for l in candidates)))
    return candidates[0]


def addresses_of(addr_entry: dict) -> List[str]:
    return ["%s/%s" % (a["local"], a["prefixlen"]) for a in addr_entry.get("addr_info", []) if a.get("family") == "inet"]


def capture_upper(upper: str, archive: tarfile.TarFile) -> List[str]:
    """Add the container's filesystem changes (overlay upper directory) to ``archive`` as podman's
    rootfs-diff does (paths relative to /); returns the deleted paths (whiteouts), as ``deleted.files``."""
    deleted = []
    for root, dirs, files in os.walk(upper):
        for entry in sorted(dirs) + sorted(files):
            path = os.path.join(root, entry)
            rel = os.path.relpath(path, upper)
            info = os.lstat(path)
            if (info.st_mode & 0o170000) == 0o020000 and info.st_rdev == 0:  # a whiteout: deleted
                deleted.append("/" + rel)
                continue
            archive.add(path, arcname=rel, recursive=False)
    return deleted


def replace_in_archive(source: str, target: str, replacements: Dict[str, Optional[bytes]]) -> None:
    """Copy the tar ``source`` to ``target`` with the members named in ``replacements`` replaced by the
    given bytes (None: dropped); replacements naming no member are added."""
    pending = dict(replacements)
    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        for info in src:
            if info.name in pending:
                data = pending.pop(info.name)
                if data is not None:
                    info.size = len(data)
                    dst.addfile(info, io.BytesIO(data))
                continue
            dst.addfile(info, src.extractfile(info) if info.isfile() else None)
        for name, data in sorted(pending.items()):
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
                dst.addfile(info, io.BytesIO(data))


def retarget_netns(dump: bytes, old: str, new: str) -> bytes:
    """A container's config.dump or spec.dump with every reference to namespace ``old`` made ``new``."""
    def walk(value):
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if value == old:
            return new
        if value == "ns:" + old:
            return "ns:" + new
        return value
    return json.dumps(walk(json.loads(dump))).encode()


def write_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


# --- the backend ---------------------------------------------------------------------------------

@register
class PodmanBackend(Backend):
    """Containers in a network namespace of the topology, checkpointed by podman/runc/CRIU."""
    name = "podman"
    sends_marker = True  # the marker goes down the namespace's interface while the tasks are frozen
    cuts_async = True  # as for CRIU members: the tasks run on once the switch sent the marker back
    prepares_itself = True  # at CRIU's pre-dump, not before podman (and runc, and CRIU) even start
    restores_paused = False  # restored with its tasks stopped (CRIU leave-stopped); its clock runs on
    Spec = ContainerMember
    SCHEMA = Schema({
        "container": Field((str, type(None)), None, check=lambda v: None if v is None or v.strip() == v and v
                           else "a container name", help="the podman container (default: the member's name)"),
        "netns": Field((str, type(None)), None, check=lambda v: None if v is None or v.startswith("/") else
                       "a path, e.g. /run/netns/h1", help="network namespace it joins when restored here "
                       "(default: the one it had)"),
        "iface": Field((str, type(None)), None, help="its interface there (default: the only one besides lo)"),
        "ip": Field((str, type(None)), None, check=lambda v: None if v is None else matches(
            r"^\d+\.\d+\.\d+\.\d+/\d+$", "address/prefix, e.g. 10.0.0.1/8")(v),
            help="address/prefix to take when restored here (default: the one it had)"),
    }, allow_none=False)
    retry_delay = 0.05
    native_hook = True  # the compiled action script (handover.native_hook) where it can be built; else bash

    def __init__(self, settings, run=subprocess.run):
        super().__init__(settings)
        self.run = run  # injected: unit tests see the command lines

    def start(self) -> None:
        criu.become_subreaper()  # conmon re-parents to us when podman exits; its exit is ours to reap
        if self.native_hook:
            native_hook()  # built now (once, cached), not in a snapshot's time

    # -- podman --

    def podman(self, argv: List[str], timeout: float = COMMAND_TIMEOUT_S, check: bool = True):
        try:
            result = self.run(argv, capture_output=True, text=True, timeout=timeout, env=podman_env(),
                              stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise PodmanError("%s timed out after %.0f s" % (" ".join(argv[:4]), timeout)) from None
        except FileNotFoundError:
            raise PodmanError("podman is not installed (scripts/setup.sh installs it)") from None
        if check and result.returncode != 0:
            words = [a for a in argv[1:] if not a.startswith("-") and not a.startswith("criu=")]
            raise PodmanError("podman %s failed: %s" % (" ".join(words[:2]), _tail(result.stderr)))
        return result

    def inspect(self, container: str) -> Optional[Inspected]:
        result = self.podman([PODMAN, "container", "inspect", container], check=False, timeout=30)
        if result.returncode != 0:
            return None
        docs = json.loads(result.stdout or "[]")
        return parse_inspect(docs[0]) if docs else None

    def locate(self, member: ContainerMember) -> Located:
        """Where the container is now. A container that is not here or not running is located as not
        running (``details["running"]`` False, ``details["problem"]`` why): a helper that can host a member
        restored onto it does not claim it before. ``running`` locates or raises with the reason."""
        found = self.inspect(member.container_name)
        if found is None:
            return Located(mac=None, details={"running": False, "handle": member.container_name,
                                              "problem": "no container %s on this host" % member.container_name})
        problem = runnable_problem(member.container_name, found)
        if not problem and member.netns and found.netns and not same_netns(found.netns, member.netns):
            # A helper that would host it in another namespace (placement) finds it running elsewhere.
            problem = "container %s runs in %s, not in this helper's %s" % (member.container_name, found.netns,
                                                                            member.netns)
        if problem:
            return Located(mac=None, pid=found.pid or None, netns=found.netns,
                           details={"running": False, "handle": member.container_name, "id": found.id,
                                    "problem": problem})
        link = pick_iface(json.loads(criu.in_netns(found.netns, "ip", "-j", "addr", "show") or "[]"), member.iface)
        return Located(mac=link.get("address"), iface=link["ifname"], pid=found.pid, netns=found.netns,
                       details={"running": True, "handle": member.container_name, "id": found.id,
                                "criu_config": found.criu_config, "upper": found.upper,
                                "volumes": found.volumes, "addresses": addresses_of(link)})

    def running(self, member: ContainerMember) -> Located:
        """``locate``, for operations that need the container running here: raises with the reason otherwise."""
        where = self.locate(member)
        if not where.details.get("running"):
            raise PodmanError(where.details["problem"])
        return where

    # -- snapshot --

    @contextlib.contextmanager
    def quiet_proof(self, member: ContainerMember, snapshot: str):
        where = self.running(member)
        marker = criu.MarkerLink(criu.open_marker_socket(where.netns, where.iface),  # before any pause
                                 build_marker(where.mac, snapshot, member.name),
                                 cut_request=build_cut_request(where.mac, snapshot, member.name))
        try:
            yield marker
        finally:
            marker.close()

    def snapshot(self, member: ContainerMember, sink, at_cut, prepare=None, resumed=None) -> ImageReport:
        work = os.path.join(self.settings.work_dir, sink.snapshot, member.name)
        cut_called = []
        try:
            for attempt in range(1, criu.DUMP_ATTEMPTS + 1):
                shutil.rmtree(work, ignore_errors=True)
                os.makedirs(work)
                where = self.running(member)
                try:
                    with criu.FREEZE_TURNS:  # one freeze at a time in this helper, CRIU members included
                        report = self._checkpoint(member, where, work, at_cut, cut_called, resumed, prepare)
                    break
                except PodmanError:
                    # As for CRIU members: a checkpoint that failed before its cut left the container
                    # running: try again, never after the cut was taken.
                    if cut_called or attempt == criu.DUMP_ATTEMPTS:
                        raise
                    time.sleep(self.retry_delay)
            identity = {"container": member.container_name, "netns": where.netns, "iface": where.iface,
                        "mac": where.mac, "addresses": where.details["addresses"],
                        "volumes": sorted(where.details["volumes"]), "criu_config": where.details["criu_config"]}
            sink.settle()  # stored once the helper's other members are through their freezes
            described = json.dumps(identity, indent=1).encode()
            stored = [sink.put_stream(IDENTITY, io.BytesIO(described))]
            with open(os.path.join(work, ARCHIVE), "rb") as archive:
                stored.append(sink.put_stream(ARCHIVE, archive))
            self._keep(sink, work, described, stored)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(work + ".image", ignore_errors=True)
        return ImageReport(pause_ms=round(report["pause_ms"], 3), bytes=sum(f["bytes"] for f in stored),
                           files=stored, details={k: v for k, v in report.items() if k != "pause_ms"})

    @staticmethod
    def _keep(sink, work: str, described: bytes, stored) -> None:
        """Offer the stored image (its two files, as stored) to the sink to keep on this host."""
        image = work + ".image"
        try:
            os.makedirs(image)
            with open(os.path.join(image, IDENTITY), "wb") as handle:
                handle.write(described)
            os.rename(os.path.join(work, ARCHIVE), os.path.join(image, ARCHIVE))
        except OSError as error:
            LOG.warning("image %s/%s not kept: %s", sink.snapshot, sink.member, error)
            return
        sink.keep(image, stored)

    def _checkpoint(self, member: ContainerMember, where: Located, work: str, at_cut, cut_called,
                    resumed=None, prepare=None) -> dict:
        """One ``podman container checkpoint``: the cut in CRIU's post-dump, the archive rebuilt with
        the files as they were then; returns the timings."""
        cut_dir = os.path.join(work, "cut")
        os.makedirs(cut_dir)
        export, conf = os.path.join(work, "export.tar"), where.details["criu_config"]
        captured: Dict[str, Optional[bytes]] = {}

        def take_files():
            started = time.monotonic()
            rootfs = io.BytesIO()
            with tarfile.open(fileobj=rootfs, mode="w") as archive:
                deleted = capture_upper(where.details["upper"], archive) if where.details["upper"] else []
            captured[ROOTFS_DIFF] = rootfs.getvalue()
            captured[DELETED] = json.dumps(deleted).encode() if deleted else None
            for volume, source in where.details["volumes"].items():
                data = io.BytesIO()
                with tarfile.open(fileobj=data, mode="w") as archive:
                    archive.add(source, arcname=".")
                captured["volumes/%s.tar" % volume] = data.getvalue()
            captured["files_ms"] = (time.monotonic() - started) * 1000

        def on_frozen():
            cut_called.append(True)
            criu.side_by_side(take_files, at_cut)

        started = time.monotonic()
        drain = {}

        def on_predump():  # just before CRIU freezes the tasks: frames held from here on, sockets read
            if prepare is not None:
                prepare()
            drain["udp_drain_ms"], left = criu.wait_udp_drained(where.pid)
            if left:
                drain["udp_unread_bytes"] = left

        with frozen_hand_over(on_frozen, native=self.native_hook, on_resumed=resumed, watch_pid=where.pid,
                              on_predump=on_predump) as handover:
            write_atomically(conf, criu_config(action_script=handover.script))
            try:
                result = self.podman(checkpoint_argv(member.container_name, export), check=False)
            finally:
                write_atomically(conf, "")  # a plain `podman container checkpoint` by hand works as usual
        checkpoint_ms = (time.monotonic() - started) * 1000
        handover.raise_error()
        if result.returncode != 0:
            raise PodmanError("podman checkpoint of %s failed%s: %s" % (
                member.container_name, "" if handover.fired else " (before its cut)", _tail(result.stderr)))
        if not handover.fired:
            raise PodmanError("podman checkpoint of %s never ran the cut hook (is %s the file of its %s "
                              "annotation?)" % (member.container_name, conf, CONFIG_ANNOTATION))
        files_ms = captured.pop("files_ms")
        started = time.monotonic()
        replace_in_archive(export, os.path.join(work, ARCHIVE), captured)
        os.unlink(export)
        frozen_ms = frozen_ms_of(result.stdout)
        hook_ms = handover.outcome["hook_ms"]
        return {"pause_ms": frozen_ms if frozen_ms is not None else hook_ms, "hook_ms": round(hook_ms, 3),
                "podman_checkpoint_ms": _stat(result.stdout, "podman_checkpoint_duration"),
                "files_ms": round(files_ms, 3), "checkpoint_ms": round(checkpoint_ms, 1),
                "hook_script": "native" if handover.native else "bash",
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in drain.items()},
                **({"resumed_after_ms": handover.outcome["resumed_after_ms"]}
                   if "resumed_after_ms" in handover.outcome else {}),
                "rebuild_ms": round((time.monotonic() - started) * 1000, 1)}

    # -- restore --

    def stage(self, member: ContainerMember, directory: str) -> None:
        identity = self._identity(directory)
        if not os.path.exists(os.path.join(directory, ARCHIVE)):
            raise PodmanError("the image of %s has no %s" % (member.name, ARCHIVE))
        if identity.get("container") != member.container_name:
            raise PodmanError("the image is of container %s, not %s" % (identity.get("container"),
                                                                      member.container_name))

    @staticmethod
    def _identity(directory: str) -> dict:
        try:
            with open(os.path.join(directory, IDENTITY)) as handle:
                return json.load(handle)
        except (OSError, ValueError) as error:
            raise PodmanError("the image has no readable %s: %s" % (IDENTITY, error)) from None

    def _link(self, member: ContainerMember, netns: str, identity: dict):
        """The member's link here (as criu.py's helpers take it) and the address it takes there."""
        links = json.loads(criu.in_netns(netns, "ip", "-j", "addr", "show") or "[]")
        iface = pick_iface(links, member.iface or (identity["iface"] if any(
            l.get("ifname") == identity["iface"] for l in links) else None))["ifname"]
        ip = member.ip or (identity["addresses"][0] if identity.get("addresses") else None)
        return Located(mac=identity["mac"], iface=iface, netns=netns), ip

    def restore(self, member: ContainerMember, directory: str) -> Restored:
        started = time.monotonic()
        identity = self._identity(directory)
        netns = member.netns or identity["netns"]
        link, ip = self._link(member, netns, identity)
        self._remove(member.container_name)
        if identity.get("volumes"):  # podman's import brings them back, as they were at the cut
            self.podman([PODMAN, "volume", "rm", "--force"] + identity["volumes"], check=False, timeout=60)
        criu.clear_orphan_sockets(netns)
        if ip:  # away from home, or back after a stop there: its MAC and address on this interface
            criu.take_identity(link, link.mac, ip)
        archive = os.path.join(directory, ARCHIVE)
        if netns != identity["netns"]:  # restored into another namespace: the archive's spec names it
            with tarfile.open(archive) as tar:
                dumps = {name: retarget_netns(tar.extractfile(name).read(), identity["netns"], netns)
                         for name in ("config.dump", "spec.dump")}
            moved = os.path.join(directory, "retargeted.tar")
            replace_in_archive(archive, moved, dumps)
            archive = moved
        conf = identity["criu_config"]
        write_atomically(conf, criu_config(leave_stopped=True))
        try:
            result = self.podman(restore_argv(archive), check=False)
        finally:
            write_atomically(conf, "")
        if result.returncode != 0:
            raise PodmanError("podman restore of %s failed: %s" % (member.container_name, _tail(result.stderr)))
        return Restored((time.monotonic() - started) * 1000, criu.switch_port_of(link),
                        {"netns": netns, "podman_restore_ms": _stat(result.stdout, "podman_restore_duration")})

    def _remove(self, container: str) -> None:
        self.podman([PODMAN, "container", "rm", "--force", "--ignore", "--time", "0", container], timeout=60)

    def tasks(self, member: ContainerMember) -> List[int]:
        """Every task of the container (its cgroup's processes)."""
        return cgroup_tasks(self.running(member).pid)

    def resume(self, member: ContainerMember) -> None:
        where = self.running(member)
        criu.forget_unresolved_neighbours(where)
        for pid in cgroup_tasks(where.pid):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self, member: ContainerMember) -> None:
        found = self.inspect(member.container_name)
        self._remove(member.container_name)
        if found is not None and found.netns:
            criu.clear_orphan_sockets(found.netns)
            try:
                iface = pick_iface(json.loads(criu.in_netns(found.netns, "ip", "-j", "link", "show") or "[]"),
                                   member.iface)["ifname"]
                criu.in_netns(found.netns, "ip", "link", "set", iface, "down")  # its MAC and IP live elsewhere now
            except (PodmanError, RuntimeError):
                pass


def cgroup_tasks(pid: int, proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> List[int]:
    """The processes of ``pid``'s cgroup (v1: its pids or freezer hierarchy; v2: the unified one)."""
    with open(os.path.join(proc, str(pid), "cgroup")) as handle:
        lines = [line.strip().split(":", 2) for line in handle if line.strip()]
    paths = []
    for _hier, controllers, path in lines:
        for name in ("pids", "freezer", "name=systemd"):
            if name in controllers.split(","):
                paths.append(os.path.join(cgroup_root, name.replace("name=", ""), path.lstrip("/")))
        if controllers == "":
            paths.append(os.path.join(cgroup_root, path.lstrip("/")))
    for path in paths:
        try:
            with open(os.path.join(path, "cgroup.procs")) as handle:
                return sorted({int(line) for line in handle if line.strip()} | {pid})
        except OSError:
            continue
    return [pid]
