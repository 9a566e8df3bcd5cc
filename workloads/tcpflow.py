"""A paced TCP stream between two members, logged finely enough to see a snapshot's stall and recovery.

``python -m workloads.tcpflow recv --bind IP:PORT --log F`` accepts one connection and reads;
``python -m workloads.tcpflow send --to IP:PORT --rate BYTES_PER_S --log F`` sends, paced in 2 ms steps
(catching up at most ``--burst`` seconds after a stall). Each writes a line ``wall_ns total_bytes`` to
its log every 2 ms of its own (``--tick``): a member frozen by a snapshot shows as a gap in its own
ticks, and the receiver's totals give the stream's throughput over time (``read_log``, ``recovery``).
Only the log file and the socket are open (CRIU dumps and restores it).
"""

import argparse
import socket
import threading
import time

TICK_S = 0.002


def _ticker(path, counter, tick):
    with open(path, "a", buffering=1) as log:
        while True:
            log.write("%d %d\n" % (time.time_ns(), counter[0]))
            time.sleep(tick)


def recv(bind, path, tick):
    host, port = bind.rsplit(":", 1)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, int(port)))
    server.listen(1)
    conn, _ = server.accept()
    counter = [0]
    threading.Thread(target=_ticker, args=(path, counter, tick), daemon=True).start()
    while True:
        data = conn.recv(1 << 16)
        if not data:
            return
        counter[0] += len(data)


def send(to, rate, path, tick, burst):
    host, port = to.rsplit(":", 1)
    while True:
        try:
            conn = socket.create_connection((host, int(port)), timeout=5)
            break
        except OSError:
            time.sleep(0.1)
    conn.settimeout(None)
    counter = [0]
    threading.Thread(target=_ticker, args=(path, counter, tick), daemon=True).start()
    chunk, started = b"x" * 65536, time.monotonic()
    while True:
        due = int((time.monotonic() - started) * rate)
        if due - counter[0] > burst * rate:  # after a stall: do not send a burst of more than ``burst`` s
            started = time.monotonic() - (counter[0] + burst * rate) / rate
            due = int((time.monotonic() - started) * rate)
        if due > counter[0]:
            counter[0] += conn.send(chunk[:min(len(chunk), due - counter[0])])
        else:
            time.sleep(TICK_S)


def read_log(path):
    """[(wall seconds, total bytes)] of a tcpflow log."""
    rows = []
    with open(path) as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 2:
                rows.append((int(parts[0]) / 1e9, int(parts[1])))
    return rows


def gaps(rows, longer_than=0.015):
    """[(start, end)] where the process did not tick for longer than ``longer_than`` s: it was frozen."""
    return [(a[0], b[0]) for a, b in zip(rows, rows[1:]) if b[0] - a[0] > longer_than]


def rate_between(rows, start, end):
    inside = [r for r in rows if start <= r[0] <= end]
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def recovery(received, resumed, baseline, window=0.02, share=0.8, horizon=3.0):
    """Seconds from ``resumed`` until the received rate over ``window`` is back to ``share`` x
    ``baseline`` (bytes/s) and stays there for the next window; None if not within ``horizon``."""
    t = resumed
    while t < resumed + horizon:
        if rate_between(received, t, t + window) >= share * baseline and \
                rate_between(received, t + window, t + 2 * window) >= share * baseline:
            return max(0.0, t - resumed)
        t += 0.002
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", required=True)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--rate", type=float, default=20e6)
    s.add_argument("--burst", type=float, default=0.05)
    for p in (r, s):
        p.add_argument("--log", required=True)
        p.add_argument("--tick", type=float, default=TICK_S)
    args = parser.parse_args(argv)
    if args.mode == "recv":
        recv(args.bind, args.log, args.tick)
    else:
        send(args.to, args.rate, args.log, args.tick, args.burst)


if __name__ == "__main__":
    main()
