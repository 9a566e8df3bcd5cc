"""Members of a test slice: ``seqstream`` processes in Mininet hosts, paused and resumed like a helper would.

Used by the integration tests and benchmarks to play the host-side helper:
pause a member's process (SIGSTOP, waiting until the kernel says it stopped),
read how far it got, send its cut marker down its own link, call the
controller's cut endpoint, resume it (SIGCONT), report done. ``check_cut``
then verifies the cut from the receivers' logs and the recorded channel state.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List

from workloads import seqstream
from hostside.ovs import wait_datapath
from violin_core import channel

SEQSTREAM = seqstream.__file__


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP is asynchronous: wait until the task really is stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/%d/stat" % pid) as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.0005)
    raise RuntimeError("process %d did not stop" % pid)


@dataclass
class CutRecord:
    progress: Dict[int, tuple]  # peer id -> (about to send, last sent) at the pause
    paused: float  # wall clock when the member was seen stopped
    flip_started: float
    cut_time: float
    pause_ms: float
    resumed_ms_after_flip: float = 0.0


@dataclass
class ProcessMembers:
    """One seqstream member per host; ids are 1..n in host order."""

    hosts: list
    workdir: str
    rate: float = 500.0
    extra_peers: Dict[int, str] = field(default_factory=dict)  # id -> IP of members that are no host (VMs)
    tcp: bool = True  # a TCP stream to every peer besides the UDP one
    processes: Dict[str, subprocess.Popen] = field(default_factory=dict)
    markers: Dict[str, subprocess.Popen] = field(default_factory=dict)
    cuts: Dict[str, CutRecord] = field(default_factory=dict)

    def __post_init__(self):
        self.ids = {host.name: i for i, host in enumerate(self.hosts, 1)}
        self.pids: Dict[str, int] = {}
        self._reaping = threading.Event()

    def _reap(self):
        """Reap members that die (killed by a restore), so their PIDs are free for CRIU to reuse."""
        while not self._reaping.wait(0.02):
            for process in list(self.processes.values()):
                process.poll()

    def peers_of(self, host) -> List[int]:
        return [self.ids[h.name] for h in self.hosts if h is not host] + sorted(self.extra_peers)

    def peer_addresses(self, host) -> str:
        """``--peers`` of ``host``'s seqstream, in ``peers_of`` order."""
        pairs = [(self.ids[h.name], h.IP()) for h in self.hosts if h is not host] + sorted(self.extra_peers.items())
        return ",".join("%d=%s" % pair for pair in pairs)

    def start(self):
        for host in self.hosts:
            peers = self.peer_addresses(host)
            open(self._path(host, "stdin"), "a").close()
            with open(self._path(host, "id"), "w") as handle:  # for the oracle: who it is, its peers in order
                json.dump([self.ids[host.name], self.peers_of(host)], handle)
            # Open its stdio and working directory from inside the host (its own mount namespace):
            # files, not pipes or descriptors of ours, so CRIU can dump and restore it.
            command = " ".join(shlex.quote(a) for a in [
                sys.executable, SEQSTREAM, "--id", str(self.ids[host.name]), "--bind", host.IP(),
                "--peers", peers, "--rate", str(self.rate), "--progress", self._path(host, "progress"),
                "--log", self._path(host, "log")] + ([] if self.tcp else ["--no-tcp"]))
            self.processes[host.name] = host.popen(
                ["sh", "-c", "cd %s && exec %s <%s >%s 2>&1" % (
                    shlex.quote(self.member_dir(host)), command, shlex.quote(self._path(host, "stdin")),
                    shlex.quote(self._path(host, "output")))],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.pids[host.name] = self.processes[host.name].pid
            marker = host.popen([sys.executable, "-m", "hostside.marker", "serve", "--iface",
                                 str(host.defaultIntf()), "--src", host.MAC()],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.markers[host.name] = marker
        for name, marker in self.markers.items():
            if marker.stdout.readline().strip() != b"ready":
                raise RuntimeError("marker sender for %s did not start: %s" % (name, marker.stderr.read()))
        threading.Thread(target=self._reap, daemon=True).start()

    def member_dir(self, host):
        """The member's own working directory (its files are part of its state)."""
        path = os.path.join(self.workdir, host.name)
        os.makedirs(path, exist_ok=True)
        return path

    def _path(self, host, kind):
        return os.path.join(self.member_dir(host), "member.%s" % kind)

    def member_specs(self, marker=True):
        return [{"name": h.name, "macs": [h.MAC()], "marker": marker, "backend": "manual"} for h in self.hosts]

    def progress(self, host):
        return seqstream.read_progress(self._path(host, "progress"), self.peers_of(host))

    def tcp_behind(self) -> Dict[str, int]:
        """{"a->b/tcp": datagrams sent to b minus TCP records appended for b}: the oracle's
        ``behind_udp``, now. None for a stream whose connection is not up yet."""
        found = {}
        for host in self.hosts:
            peers = self.peers_of(host)
            path = self._path(host, "progress")
            udp, tcp = seqstream.read_progress(path, peers), seqstream.read_progress(path, peers, tcp=True)
            for peer in peers:
                if peer in tcp and peer in udp:
                    found["%d->%d/tcp" % (self.ids[host.name], peer)] = (udp[peer][1] - tcp[peer][0]
                                                                         if tcp[peer][0] else None)
        return found

    def wait_tcp_up(self, timeout: float = 30.0) -> Dict[str, int]:
        """Wait until every TCP stream carries records (connections come up slowly on a busy host);
        returns ``tcp_behind()`` then, the figure a stream that stays up keeps ({} without TCP)."""
        if not self.tcp:
            return {}
        deadline = time.monotonic() + timeout
        while True:
            behind = self.tcp_behind()
            if behind and all(v is not None for v in behind.values()):
                return behind
            if time.monotonic() > deadline:
                raise RuntimeError("TCP streams not up after %.0f s: %s" % (
                    timeout, sorted(k for k, v in behind.items() if v is None)))
            time.sleep(0.1)

    def cut(self, controller, snapshot_id, host, marker=True, hold_s=0.0):
        """Play the helper for one member: prepare, pause, marker, cut, resume, done.

        Around the pause the helper waits for the local datapath to apply the new
        rules (``wait_datapath``): before pausing (frames for the member are held),
        and before resuming (its frames carry the new colour).
        """
        process = self.processes[host.name]
        base = "/violin/snapshots/%s/members/%s" % (snapshot_id, host.name)
        status, answer = controller.request("POST", base + "/prepare")
        if status != 200:
            raise AssertionError("prepare of %s failed: %s %s" % (host.name, status, answer))
        wait_datapath()
        paused_at = time.monotonic()
        os.kill(process.pid, signal.SIGSTOP)
        wait_stopped(process.pid)
        paused_wall = time.time()
        progress = self.progress(host)
        if marker:
            self.markers[host.name].stdin.write(("%s %s\n" % (snapshot_id, host.name)).encode())
            self.markers[host.name].stdin.flush()
            self.markers[host.name].stdout.readline()
        status, answer = controller.request("POST", base + "/cut")
        if hold_s:
            time.sleep(hold_s)
        wait_datapath()
        os.kill(process.pid, signal.SIGCONT)
        resumed = time.time()
        pause_ms = (time.monotonic() - paused_at) * 1000
        if status != 200:
            raise AssertionError("cut of %s failed: %s %s" % (host.name, status, answer))
        self.cuts[host.name] = CutRecord(progress, paused_wall, answer["flip_started"], answer["cut_time"], pause_ms,
                                         (resumed - answer["cut_time"]) * 1000)
        status, answer = controller.request("POST", base + "/done",
                                            {"pause_ms": round(pause_ms, 3), "note": "seqstream process"})
        if status != 200:
            raise AssertionError("done of %s failed: %s %s" % (host.name, status, answer))
        return answer

    def pause_only(self, host, hold_s=0.05):
        """An uncoordinated snapshot of one member: pause, note the instant, resume; no controller."""
        process = self.processes[host.name]
        os.kill(process.pid, signal.SIGSTOP)
        wait_stopped(process.pid)
        paused = time.time()
        progress = self.progress(host)
        time.sleep(hold_s)
        os.kill(process.pid, signal.SIGCONT)
        self.cuts[host.name] = CutRecord(progress, paused, paused, paused, hold_s * 1000)

    def alive(self, host) -> bool:
        try:
            with open("/proc/%d/cmdline" % self.pids[host.name]) as handle:
                return "seqstream" in handle.read()
        except OSError:
            return False

    def stop(self):
        """Stop the members (they flush their logs) and the marker senders (end of input).

        By PID: after a restore a member is no child of ours any more."""
        self._reaping.set()
        for host in self.hosts:
            if host.name in self.pids and self.alive(host):
                os.kill(self.pids[host.name], signal.SIGCONT)
                os.kill(self.pids[host.name], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(self.alive(h) for h in self.hosts if h.name in self.pids) and time.monotonic() < deadline:
            for process in self.processes.values():
                process.poll()
            time.sleep(0.02)
        for marker in self.markers.values():
            marker.stdin.close()
        for process in list(self.processes.values()) + list(self.markers.values()):
            try:
                process.wait(10 if process in self.markers.values() else 1)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()

    def logs(self):
        return {h.name: seqstream.parse_log(self._path(h, "log")) for h in self.hosts}


def pcap_datagrams(path):
    """{receiver name: [(sender id, seq)]} in recorded order, from a channel pcapng."""
    found = {}
    if not os.path.exists(path):
        return found
    with open(path, "rb") as handle:
        for item in channel.decode(handle.read()):
            data = item.frame[42:]
            if item.frame[12:14] == b"\x08\x00" and data[:4] == seqstream.MAGIC:
                _, sender, _receiver, seq = seqstream.DATAGRAM.unpack_from(data)
                found.setdefault(item.receiver, []).append((sender, seq))
    return found


def check_cut(members: ProcessMembers, recorded: Dict[str, list], slack: float = 0.002) -> List[str]:
    """Every violation of the cut, in words (an empty list means a consistent cut).

    A member's state is what reached its socket before it was paused (later
    arrivals wait in a queue that is not part of its image). For receiver d
    paused at ``paused`` and sender m paused after sending seq ``last`` to d:
      - a post frame (seq > last) must not reach d before d's flip started;
      - a pre frame reaching d after d's pause must be in d's channel state;
      - a pre frame reaching d more than ``slack`` before d's pause must not be;
      - nothing reaches d between its pause and its flip (all held);
      - the channel state holds pre frames only, in the order they were sent.
    """
    problems, names = [], {i: n for n, i in members.ids.items()}
    logs = members.logs()
    for receiver in members.hosts:
        d, flip = members.ids[receiver.name], members.cuts[receiver.name]
        channel_state = recorded.get(receiver.name, [])
        in_channel = set(channel_state)
        for sender_id, seq, arrival_ns in logs[receiver.name]:
            sender = names[sender_id]
            about, last = members.cuts[sender].progress[d]
            arrival = arrival_ns / 1e9
            post = seq > max(about, last)
            pre = seq <= last
            if post and arrival < flip.flip_started:
                problems.append("post frame %s#%d reached %s %.1f ms before its flip (sender resumed %.1f ms "
                                "after its own flip)" % (sender, seq, receiver.name,
                                                         (flip.flip_started - arrival) * 1000,
                                                         members.cuts[sender].resumed_ms_after_flip))
            if pre and arrival > flip.paused and (sender_id, seq) not in in_channel:
                problems.append("pre frame %s#%d reached %s %.1f ms after its pause but is not recorded"
                                % (sender, seq, receiver.name, (arrival - flip.paused) * 1000))
            if pre and arrival < flip.paused - slack and (sender_id, seq) in in_channel:
                problems.append("pre frame %s#%d reached %s before its pause but was recorded"
                                % (sender, seq, receiver.name))
            if flip.paused + slack < arrival < flip.flip_started:
                problems.append("frame %s#%d reached %s while it was paused, before its flip"
                                % (sender, seq, receiver.name))
        last_seen = {}
        for sender_id, seq in channel_state:
            about, last = members.cuts[names[sender_id]].progress[d]
            if seq > max(about, last):
                problems.append("post frame %s#%d is in %s's channel state" % (names[sender_id], seq, receiver.name))
            if seq <= last_seen.get(sender_id, 0):
                problems.append("channel state of %s out of order at %s#%d" % (receiver.name, names[sender_id], seq))
            last_seen[sender_id] = seq
    return problems


def received_fraction(members: ProcessMembers, since: Dict[str, Dict[int, tuple]], until: Dict[str, Dict[int, tuple]]):
    """Per stream, the share of datagrams sent between two progress readings that arrived."""
    logs = members.logs()
    worst = 1.0
    for receiver in members.hosts:
        d = members.ids[receiver.name]
        got = {(s, q) for s, q, _ in logs[receiver.name]}
        for sender in members.hosts:
            if sender is receiver:
                continue
            first, last = since[sender.name][d][1] + 1, until[sender.name][d][1]
            if last >= first:
                arrived = sum(1 for q in range(first, last + 1) if (members.ids[sender.name], q) in got)
                worst = min(worst, arrived / (last - first + 1))
    return worst


__all__ = ["ProcessMembers", "check_cut", "pcap_datagrams", "received_fraction"]
