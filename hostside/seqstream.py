#!/usr/bin/env python3
"""A member of the consistency experiments: sequence-numbered UDP to every peer, and a log of what arrived.

One process per member (so pausing the process pauses both directions).
Every ``1/rate`` seconds it sends one datagram to each peer carrying
(sender id, receiver id, seq); it logs every datagram it receives with the
kernel's arrival timestamp. Its progress is in a small shared file that a
supervisor reads while the process is paused: for each peer the seq it is
about to send and the last seq whose ``sendto`` returned (they differ only
if it was paused in between). Python 3 standard library only.

    seqstream.py --id 1 --bind 10.0.0.1 --peers 2=10.0.0.2,3=10.0.0.3 \\
                 --rate 500 --progress /tmp/m1.progress --log /tmp/m1.log
"""

import argparse
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
SLOT = struct.Struct("<qq")  # per peer: about-to-send seq, last sent seq
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33


def read_progress(path, peers):
    """{peer id: (about_to_send, last_sent)} from a progress file."""
    with open(path, "rb") as handle:
        data = handle.read()
    return {peer: SLOT.unpack_from(data, i * SLOT.size) for i, peer in enumerate(peers)}


def parse_log(path):
    """[(sender, seq, arrival_ns)] from a receive log."""
    records = []
    with open(path) as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3:
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--peers", default="", help="id=ip,id=ip,...")
    parser.add_argument("--rate", type=float, default=500.0, help="datagrams per second per peer")
    parser.add_argument("--size", type=int, default=120, help="datagram size in bytes")
    parser.add_argument("--progress", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    peers = [(int(p.split("=")[0]), p.split("=")[1]) for p in args.peers.split(",") if p]

    with open(args.progress, "wb") as handle:
        handle.write(b"\0" * max(SLOT.size * len(peers), 16))
    progress_file = open(args.progress, "r+b")
    progress = mmap.mmap(progress_file.fileno(), 0)
    for i in range(len(peers)):
        SLOT.pack_into(progress, i * SLOT.size, 0, 0)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind((args.bind, PORT))
    sock.setblocking(False)
    log = open(args.log, "w", buffering=1 << 16)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    seq, interval = 0, 1.0 / args.rate if args.rate > 0 else None
    next_send = time.monotonic()
    padding = b"\0" * max(0, args.size - DATAGRAM.size)
    while not stop:
        now = time.monotonic()
        if interval and now >= next_send:
            seq += 1
            for i, (peer, address) in enumerate(peers):
                struct.pack_into("<q", progress, i * SLOT.size, seq)
                send(sock, DATAGRAM.pack(MAGIC, args.id, peer, seq) + padding, (address, PORT))
                struct.pack_into("<q", progress, i * SLOT.size + 8, seq)
            # Keep the pace, but never burst to catch up after a pause (a snapshot, a restore).
            next_send = max(next_send + interval, now - 2 * interval)
        timeout = max(0.0, next_send - time.monotonic()) if interval else 0.2
        ready, _, _ = select.select([sock], [], [], timeout)
        while ready:
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(2048, 64)
            except BlockingIOError:
                break
            if len(data) < DATAGRAM.size or data[:4] != MAGIC:
                continue
            _, sender, _receiver, got = DATAGRAM.unpack_from(data)
            arrival = time.time_ns()
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    arrival = sec * 1_000_000_000 + nsec
            log.write("%d %d %d\n" % (sender, got, arrival))
    log.flush()
    os.fsync(log.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
