#!/usr/bin/env python3
"""A member of the consistency experiments: sequence-numbered UDP and TCP to every peer, and a log of what arrived.

One process per member (so pausing the process pauses both directions).
Every ``1/rate`` seconds it sends one datagram to each peer carrying
(sender id, receiver id, seq); it logs every datagram it receives with the
kernel's arrival timestamp ("sender seq arrival_ns"). Unless ``--no-tcp``, it
also keeps one TCP connection to each peer's port 47001 and appends one
16-byte record ("VTCP", sender, receiver, seq) to it per tick; records read
from accepted connections are logged as "t sender seq arrival_ns". A TCP
connection that broke is never re-opened: that stream just stops. TCP
sockets close with a reset (SO_LINGER 0): a killed member leaves no
TIME-WAIT socket holding the address pair its restored connection needs.

Its progress is in a small shared file that a supervisor reads while the
process is paused: for each peer the seq it is about to send and the last
seq whose ``sendto`` returned (they differ only if it was paused in
between); then, for TCP, the last seq appended to the user-space buffer and
the last one the kernel took completely. One thread, ``select`` only: CRIU
dumps and restores it (``--tcp-established``). Python 3 standard library only.

    seqstream.py --id 1 --bind 10.0.0.1 --peers 2=10.0.0.2,3=10.0.0.3 \\
                 --rate 500 --progress /tmp/m1.progress --log /tmp/m1.log
"""

import argparse
import errno
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time

PORT = 47000
DATAGRAM = struct.Struct("!4sHHQ")  # magic, sender id, receiver id, seq
MAGIC = b"VSEQ"
TCP_PORT = 47001
TCP_MAGIC = b"VTCP"  # TCP records: DATAGRAM with this magic, 16 bytes, no padding
SLOT = struct.Struct("<qq")  # per peer: about-to-send seq, last sent seq
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
RETRY_S = 0.2  # a refused outgoing TCP connection is attempted again this often until it is up
PENDING_S = 3.0  # ... and one still handshaking is given this long (round trips reach 300 ms on a busy host)


def read_progress(path, peers, tcp=False):
    """{peer id: (about_to_send, last_sent)} from a progress file (UDP slots, or TCP ones: {} if it has none)."""
    with open(path, "rb") as handle:
        data = handle.read()
    base = len(peers) if tcp else 0
    if len(data) < (base + len(peers)) * SLOT.size:
        return {}
    return {peer: SLOT.unpack_from(data, (base + i) * SLOT.size) for i, peer in enumerate(peers)}


def parse_log(path, tcp=False):
    """[(sender, seq, arrival_ns)] from a receive log: UDP lines, or with ``tcp`` the "t ..." lines."""
    records = []
    with open(path) as handle:
        for line in handle:
            parts = line.split()
            if tcp and len(parts) == 4 and parts[0] == "t":
                parts = parts[1:]
            elif tcp or len(parts) != 3 or parts[0] == "t":
                continue
            records.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return records


def send(sock, data, address, attempts=50):
    """Send one datagram, waiting for room in the socket buffer rather than dropping it."""
    for _ in range(attempts):
        try:
            sock.sendto(data, address)
            return True
        except BlockingIOError:
            select.select([], [sock], [], 0.01)
        except OSError:
            return False  # e.g. no route yet: a loss the receiver will show
    return False


def _abortive(sock):
    """Close with a reset, leaving no TIME-WAIT or FIN-WAIT socket behind (a restore needs the address pair)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.setblocking(False)
    return sock


class TcpOut:
    """The one outgoing TCP stream to a peer: connecting, up, or broken for good."""

    def __init__(self, bind, address):
        self.bind, self.address = bind, address
        self.sock, self.up, self.broken = None, False, False
        self.retry_at, self.seq, self.taken = 0.0, 0, 0  # taken: bytes the kernel accepted
        self.buffer = bytearray()

    def connect(self, now):
        """Start an attempt when due: RETRY_S after a refusal, PENDING_S after one that never finished."""
        if self.up or self.broken or now < self.retry_at:
            return
        self.close()
        self.retry_at = now + PENDING_S
        self.sock = _abortive(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock.bind((self.bind, 0))
            error = self.sock.connect_ex((self.address, TCP_PORT))
        except OSError as failure:
            error = failure.errno
        if error == 0:
            self.up = True
        elif error != errno.EINPROGRESS:
            self.close()
            self.retry_at = now + RETRY_S

    def connected(self):
        """The pending connect finished (the socket turned writable): up, or failed until the next retry."""
        if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            self.up = True
        else:
            self.close()
            self.retry_at = min(self.retry_at, time.monotonic() + RETRY_S)

    def flush(self):
        """Write what the kernel takes; the highest record it took completely is "last sent"."""
        try:
            taken = self.sock.send(self.buffer) if self.buffer else 0
        except BlockingIOError:
            return
        except OSError:
            self.close()
            self.up, self.broken = False, True
            return
        del self.buffer[:taken]
        self.taken += taken

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--peers", default="", help="id=ip,id=ip,...")
    parser.add_argument("--rate", type=float, default=500.0, help="datagrams per second per peer")
    parser.add_argument("--size", type=int, default=120, help="datagram size in bytes")
    parser.add_argument("--no-tcp", action="store_true", help="UDP only: no TCP streams")
    parser.add_argument("--progress", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    peers = [(int(p.split("=")[0]), p.split("=")[1]) for p in args.peers.split(",") if p]
    tcp = not args.no_tcp

    slots = len(peers) * (2 if tcp else 1)
    with open(args.progress, "wb") as handle:
        handle.write(b"\0" * max(SLOT.size * slots, 16))
    progress_file = open(args.progress, "r+b")
    progress = mmap.mmap(progress_file.fileno(), 0)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind((args.bind, PORT))
    sock.setblocking(False)
    listener, outs, incoming = None, [], {}  # incoming: accepted socket -> its partial record
    if tcp:
        listener = _abortive(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((args.bind, TCP_PORT))
        listener.listen(64)
        outs = [TcpOut(args.bind, address) for _peer, address in peers]
    log = open(args.log, "w", buffering=1 << 16)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    seq, interval = 0, 1.0 / args.rate if args.rate > 0 else None
    next_send = time.monotonic()
    padding = b"\0" * max(0, args.size - DATAGRAM.size)
    while not stop:
        now = time.monotonic()
        for out in outs:
            out.connect(now)
        if interval and now >= next_send:
            seq += 1
            for i, (peer, address) in enumerate(peers):
                struct.pack_into("<q", progress, i * SLOT.size, seq)
                send(sock, DATAGRAM.pack(MAGIC, args.id, peer, seq) + padding, (address, PORT))
                struct.pack_into("<q", progress, i * SLOT.size + 8, seq)
            for i, ((peer, _address), out) in enumerate(zip(peers, outs)):
                if out.up:
                    out.seq += 1
                    out.buffer += DATAGRAM.pack(TCP_MAGIC, args.id, peer, out.seq)
                    struct.pack_into("<q", progress, (len(peers) + i) * SLOT.size, out.seq)
            # Keep the pace, but never burst to catch up after a pause (a snapshot, a restore).
            next_send = max(next_send + interval, now - 2 * interval)
        for i, out in enumerate(outs):
            if out.up:
                out.flush()
                struct.pack_into("<q", progress, (len(peers) + i) * SLOT.size + 8, out.taken // DATAGRAM.size)
        wake = [next_send] if interval else [now + 0.2]
        wake += [out.retry_at for out in outs if not out.up and not out.broken]
        timeout = max(0.0, min(wake) - time.monotonic())
        writers = [out.sock for out in outs if out.sock is not None and (out.buffer or not out.up)]
        readers = [sock] + ([listener] if listener else []) + list(incoming)
        ready, writable, _ = select.select(readers, writers, [], timeout)
        for out in outs:
            if out.sock in writable and not out.up:
                out.connected()
        if sock in ready:
            receive_datagrams(sock, log)
        if listener in ready:
            accept(listener, incoming)
        for conn in [c for c in ready if c in incoming]:
            receive_records(conn, incoming, log)
    log.flush()
    os.fsync(log.fileno())
    return 0


def receive_datagrams(sock, log):
    """Log every datagram waiting in the UDP socket, with the kernel's arrival time."""
    while True:
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(2048, 64)
        except BlockingIOError:
            return
        if len(data) < DATAGRAM.size or data[:4] != MAGIC:
            continue
        _, sender, _receiver, got = DATAGRAM.unpack_from(data)
        arrival = time.time_ns()
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", value[:16])
                arrival = sec * 1_000_000_000 + nsec
        log.write("%d %d %d\n" % (sender, got, arrival))


def accept(listener, incoming):
    while True:
        try:
            conn, _addr = listener.accept()
        except BlockingIOError:
            return
        incoming[_abortive(conn)] = bytearray()


def receive_records(conn, incoming, log):
    """Read what arrived on one accepted connection and log its complete records; end it at EOF or error."""
    try:
        data = conn.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        del incoming[conn]
        conn.close()
        return
    arrival, buffer = time.time_ns(), incoming[conn]
    buffer += data
    end = len(buffer) - len(buffer) % DATAGRAM.size
    for offset in range(0, end, DATAGRAM.size):
        magic, sender, _receiver, got = DATAGRAM.unpack_from(buffer, offset)
        if magic == TCP_MAGIC:
            log.write("t %d %d %d\n" % (sender, got, arrival))
    del buffer[:end]


if __name__ == "__main__":
    sys.exit(main())
