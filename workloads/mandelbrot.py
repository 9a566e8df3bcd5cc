#!/usr/bin/env python3
"""A distributed Mandelbrot renderer for the GENI-VIOLIN demo: a master hands out rows over TCP, workers compute them.

The master keeps all of its state in memory: the rows still to hand out, the
row each connected worker is computing, and the rows that came back. A worker
whose connection closes loses its row to the next idle worker. When every row
is in, the master writes a grayscale PNG (temp file, fsync, rename), tells
every worker it is done, waits for them to hang up (at most 30 s) and exits 0.
The image depends only on (width, height, iterations): pixels are plain IEEE
double arithmetic on a fixed view window and an integer palette, so a run's
PNG is bit-identical to ``expected_image`` whoever computed which row.

Made to be checkpointed by CRIU (``--tcp-established``) and restored: one
thread, blocking or select-driven TCP sockets without short timeouts, no pipes,
files only in the working directory. Python 3 standard library only.

    mandelbrot.py master --bind 10.0.0.1 --port 47100 --width 320 --height 240 \\
                  --iterations 500 --workers 3 --out image.png --progress progress.json
    mandelbrot.py worker --master 10.0.0.1:47100 --id 1 --delay-ms 200
    mandelbrot.py fetch --master 10.0.0.1:47101 --out image.png   # from guest/vmandel.c's image port
"""

import argparse
import collections
import json
import os
import select
import socket
import struct
import sys
import time
import zlib

PORT = 47100
RE_MIN, RE_MAX = -2.0, 1.0  # the fixed view window
IM_MIN, IM_MAX = -1.2, 1.2

# Framing: magic, message type, payload length; then the payload.
HEADER = struct.Struct("!4sBI")
MAGIC = b"VMB1"
HELLO = 1  # worker -> master: !I worker id; asks for work
RESULT = 2  # worker -> master: !I row, then `width` pixel bytes; asks for more work
ROW = 3  # master -> worker: !IIII row, width, height, iterations
DONE = 4  # master -> worker: empty; the image is complete, exit
MAX_PAYLOAD = 1 << 24

# The image port of a VM master (guest/vmandel.c, which has no file system to write the PNG to): a client
# that connects gets IMAGE_MAGIC, then width, height, iterations, rows done; then, once every row is in,
# the width * height pixel bytes (row 0 first); then the master closes the connection.
IMAGE_MAGIC = b"VMBI"
IMAGE_HEADER = struct.Struct("!IIII")

CONNECT_WINDOW_S = 30.0  # a worker retries connecting to the master this long
CONNECT_TIMEOUT_S = 30.0  # one connection attempt (only a silent, unreachable master takes this long)
RETRY_INTERVAL_S = 0.2
PROGRESS_INTERVAL_S = 0.2
LINGER_S = 30.0  # after the image is written, how long the master waits for workers to hang up
KEEPALIVE = (60, 10, 6)  # idle, interval, count: a peer gone silent is given up after ~2 min, never across a freeze

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- the image -------------------------------------------------------------

def _isqrt(n):
    """floor(sqrt(n)) for an int n >= 0 (math.isqrt exists only from Python 3.8)."""
    if n < 2:
        return n
    x = 1 << ((n.bit_length() + 1) // 2)
    while True:
        y = (x + n // x) // 2
        if y >= x:
            return x
        x = y


_PALETTES = {}


def palette(iterations):
    """Gray level for each escape count 0..iterations: 255 * (n / iterations) ** (1/4), in integers; inside is black."""
    table = _PALETTES.get(iterations)
    if table is None:
        levels = [_isqrt(_isqrt(n * 255 ** 4 // iterations)) for n in range(iterations)]
        table = bytes(levels + [0])
        _PALETTES[iterations] = table
    return table


def render_row(y, width, height, iterations):
    """The `width` gray pixels of row `y` (row 0 is the top, im = IM_MAX side)."""
    if not (0 <= y < height and width > 0 and iterations > 0):
        raise ValueError("row %r outside a %dx%d image, or no iterations" % (y, width, height))
    levels = palette(iterations)
    ci = IM_MAX - (IM_MAX - IM_MIN) * (2 * y + 1) / (2 * height)  # pixel centres
    ci2 = ci * ci
    out = bytearray(width)
    for x in range(width):
        cr = RE_MIN + (RE_MAX - RE_MIN) * (2 * x + 1) / (2 * width)
        # Main cardioid and period-2 bulb: inside, no need to iterate (a fixed test, so still deterministic).
        xq = cr - 0.25
        q = xq * xq + ci2
        if q * (q + xq) <= 0.25 * ci2 or (cr + 1.0) * (cr + 1.0) + ci2 <= 0.0625:
            out[x] = levels[iterations]
            continue
        zr = zi = zr2 = zi2 = 0.0
        n = 0
        while n < iterations and zr2 + zi2 <= 4.0:
            zi = 2.0 * zr * zi + ci
            zr = zr2 - zi2 + cr
            zr2 = zr * zr
            zi2 = zi * zi
            n += 1
        out[x] = levels[n]
    return bytes(out)


def _chunk(kind, data):
    return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width, height, rows):
    """PNG bytes of a grayscale 8-bit image given as `height` rows of `width` bytes (filter 0, zlib level 9)."""
    rows = list(rows)
    if len(rows) != height or any(len(row) != width for row in rows):
        raise ValueError("need %d rows of %d bytes" % (height, width))
    raw = b"".join(b"\x00" + bytes(row) for row in rows)
    ihdr = struct.pack("!IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, deflate, filter 0, no interlace
    return (PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b""))


def _write_atomically(path, data, sync):
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, "." + os.path.basename(path) + ".tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())
    os.replace(temp, path)
    if sync:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_png(path, width, height, rows):
    """Write the image to `path` atomically (temp file in the same directory, fsync, rename)."""
    _write_atomically(path, encode_png(width, height, rows), sync=True)


def expected_image(width, height, iterations):
    """The PNG bytes a correct run of the master writes for these parameters."""
    return encode_png(width, height, [render_row(y, width, height, iterations) for y in range(height)])


def read_png(data):
    """(width, height, rows) of a PNG this module wrote (8-bit gray, filter 0); raises ValueError otherwise."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG")
    offset, chunks = 8, []
    while offset < len(data):
        length, = struct.unpack_from("!I", data, offset)
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        crc, = struct.unpack_from("!I", data, offset + 8 + length)
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError("bad CRC in %r" % kind)
        chunks.append((kind, body))
        offset += 12 + length
    if chunks[0][0] != b"IHDR" or chunks[-1][0] != b"IEND":
        raise ValueError("IHDR must come first and IEND last")
    width, height, depth, color, _, _, interlace = struct.unpack("!IIBBBBB", chunks[0][1])
    if (depth, color, interlace) != (8, 0, 0):
        raise ValueError("not 8-bit gray without interlace")
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width + 1
    if len(raw) != stride * height or any(raw[i * stride] != 0 for i in range(height)):
        raise ValueError("unexpected image data")
    return width, height, [raw[i * stride + 1:(i + 1) * stride] for i in range(height)]


# --- the wire ----------------------------------------------------------------

def _message(kind, payload=b""):
    return HEADER.pack(MAGIC, kind, len(payload)) + payload


def _keepalive(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), KEEPALIVE):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _parse(buffer):
    """Complete messages at the head of `buffer` (removed from it) as [(type, payload)]."""
    messages = []
    while len(buffer) >= HEADER.size:
        magic, kind, length = HEADER.unpack_from(buffer)
        if magic != MAGIC or length > MAX_PAYLOAD:
            raise ValueError("garbage on the connection")
        if len(buffer) < HEADER.size + length:
            break
        messages.append((kind, bytes(buffer[HEADER.size:HEADER.size + length])))
        del buffer[:HEADER.size + length]
    return messages


def _recv_exact(sock, count):
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return bytes(data)


def _recv_message(sock):
    magic, kind, length = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if magic != MAGIC or length > MAX_PAYLOAD:
        raise ConnectionError("garbage from the master")
    return kind, _recv_exact(sock, length)


def fetch_image(host, port, timeout=30.0):
    """(width, height, iterations, rows_done, pixels) from a master's image port; pixels is None until complete."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        head = _recv_exact(sock, len(IMAGE_MAGIC) + IMAGE_HEADER.size)
        if head[:len(IMAGE_MAGIC)] != IMAGE_MAGIC:
            raise ValueError("not a Mandelbrot image port at %s:%d" % (host, port))
        width, height, iterations, rows_done = IMAGE_HEADER.unpack_from(head, len(IMAGE_MAGIC))
        pixels = _recv_exact(sock, width * height) if rows_done == height else None
    return width, height, iterations, rows_done, pixels


# --- the master --------------------------------------------------------------

class Master:
    def __init__(self, width, height, iterations, workers, out, progress=None):
        self.width, self.height, self.iterations = width, height, iterations
        self.expected_workers, self.out, self.progress = workers, out, progress
        self.pending = collections.deque(range(height))  # rows not handed out, in order
        self.done = {}  # row -> pixels
        self.conns = {}  # socket -> {"buffer", "id", "row"}
        self.idle = []  # sockets of workers waiting for a row (in arrival order)
        self.per_worker = collections.Counter()
        self.seen_workers = set()
        self.reassigned = 0
        self.started = workers <= 0
        self.finished = False

    # State changes.

    def _send(self, sock, data):
        try:
            sock.sendall(data)
            return True
        except OSError:
            self._drop(sock)
            return False

    def _drop(self, sock):
        state = self.conns.pop(sock, None)
        if state is None:
            return
        if sock in self.idle:
            self.idle.remove(sock)
        try:
            sock.close()
        except OSError:
            pass
        row = state["row"]
        if row is not None and row not in self.done:
            self.pending.appendleft(row)
            self.reassigned += 1
            self._hand_out()

    def _hand_out(self):
        """Give pending rows to idle workers (once started)."""
        while self.started and self.idle and not self.finished:
            while self.pending and self.pending[0] in self.done:
                self.pending.popleft()
            if not self.pending:
                return
            sock = self.idle.pop(0)
            row = self.pending.popleft()
            self.conns[sock]["row"] = row
            if not self._send(sock, _message(ROW, struct.pack("!IIII", row, self.width, self.height,
                                                                    self.iterations))):
                continue  # _drop put the row back

    def _wants_work(self, sock):
        if self.finished:
            self._send(sock, _message(DONE))
        elif self.conns[sock]["row"] is None:  # a worker asks for one row at a time
            self.idle.append(sock)
            self._hand_out()

    def _handle(self, sock, kind, payload):
        state = self.conns[sock]
        if kind == HELLO and len(payload) == 4 and state["id"] is None:
            state["id"], = struct.unpack("!I", payload)
            self.seen_workers.add(state["id"])
            if not self.started and len(self.seen_workers) >= self.expected_workers:
                self.started = True
            self._wants_work(sock)
        elif kind == RESULT and len(payload) == 4 + self.width and state["id"] is not None:
            row, = struct.unpack_from("!I", payload)
            if row >= self.height:
                raise ValueError("row out of range")
            if state["row"] == row:
                state["row"] = None
            if row not in self.done:
                self.done[row] = payload[4:]
                self.per_worker[state["id"]] += 1
            if len(self.done) == self.height and not self.finished:
                self._finish()
            if sock in self.conns:
                self._wants_work(sock)
        else:
            raise ValueError("unexpected message %d" % kind)

    def _finish(self):
        write_png(self.out, self.width, self.height, [self.done[y] for y in range(self.height)])
        self.finished = True
        self.write_progress()
        for sock in list(self.conns):  # the idle ones; the one that sent the last row is answered by _handle
            if sock in self.idle:
                self.idle.remove(sock)
                self._send(sock, _message(DONE))

    # Reporting.

    def status(self):
        return {"rows_done": len(self.done), "rows_total": self.height, "done": self.finished,
                "started": self.started, "width": self.width, "height": self.height,
                "iterations": self.iterations, "workers_expected": self.expected_workers,
                "workers_connected": sum(1 for s in self.conns.values() if s["id"] is not None),
                "reassigned": self.reassigned,
                "rows_by_worker": {str(k): v for k, v in sorted(self.per_worker.items())},
                "image": self.out if self.finished else None, "pid": os.getpid()}

    def write_progress(self):
        if self.progress:
            _write_atomically(self.progress, (json.dumps(self.status(), sort_keys=True) + "\n").encode(),
                              sync=False)

    # The loop.

    def serve(self, listener):
        listener.setblocking(False)
        next_progress = time.monotonic()
        finished_at = None
        while True:
            now = time.monotonic()
            if now >= next_progress:
                self.write_progress()
                next_progress = now + PROGRESS_INTERVAL_S
            if self.finished:
                finished_at = finished_at or now
                if not self.conns or now - finished_at >= LINGER_S:
                    break
            timeout = max(0.0, next_progress - time.monotonic())
            readable, _, _ = select.select([listener] + list(self.conns), [], [], timeout)
            for sock in readable:
                if sock is listener:
                    self._accept(listener)
                elif sock in self.conns:
                    self._read(sock)
        for sock in list(self.conns):
            sock.close()
        self.conns.clear()
        self.write_progress()

    def _accept(self, listener):
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        sock.setblocking(True)  # reads only after select says so; writes are a few bytes
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _keepalive(sock)
        self.conns[sock] = {"buffer": bytearray(), "id": None, "row": None}

    def _read(self, sock):
        try:
            data = sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        state = self.conns[sock]
        state["buffer"] += data
        try:
            for kind, payload in _parse(state["buffer"]):
                if sock not in self.conns:
                    break
                self._handle(sock, kind, payload)
        except (ValueError, struct.error):
            self._drop(sock)


def run_master(args):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(64)
    master = Master(args.width, args.height, args.iterations, args.workers, args.out, args.progress)
    try:
        master.serve(listener)
    finally:
        listener.close()
    return 0


# --- the worker --------------------------------------------------------------

def _connect(host, port, window=CONNECT_WINDOW_S):
    """A connected socket to the master, retrying for `window` seconds; None if it never answered."""
    deadline = time.monotonic() + window
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keepalive(sock)
            return sock
        except OSError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(RETRY_INTERVAL_S)


def run_worker(args):
    host, _, port = args.master.rpartition(":")
    port = int(port)
    delay = max(0, args.delay_ms) / 1000.0
    while True:  # one connection per pass; a lost connection is retried (the master re-assigned our row)
        sock = _connect(host, port)
        if sock is None:
            sys.stderr.write("mandelbrot worker %d: no master at %s\n" % (args.id, args.master))
            return 1
        try:
            sock.sendall(_message(HELLO, struct.pack("!I", args.id)))
            while True:
                kind, payload = _recv_message(sock)
                if kind == DONE:
                    sock.close()
                    return 0
                if kind != ROW or len(payload) != 16:
                    raise ConnectionError("unexpected message %d" % kind)
                row, width, height, iterations = struct.unpack("!IIII", payload)
                pixels = render_row(row, width, height, iterations)
                if delay:
                    time.sleep(delay)
                sock.sendall(_message(RESULT, struct.pack("!I", row) + pixels))
        except OSError:  # includes ConnectionError
            try:
                sock.close()
            except OSError:
                pass
            time.sleep(RETRY_INTERVAL_S)


def run_fetch(args):
    host, _, port = args.master.rpartition(":")
    width, height, iterations, rows_done, pixels = fetch_image(host, int(port), args.timeout)
    if pixels is None:
        sys.stderr.write("mandelbrot fetch: %d of %d rows done at %s\n" % (rows_done, height, args.master))
        return 1
    write_png(args.out, width, height, [pixels[y * width:(y + 1) * width] for y in range(height)])
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role")
    roles.required = True
    master = roles.add_parser("master", help="hand out rows and assemble the image")
    master.add_argument("--bind", default="0.0.0.0")
    master.add_argument("--port", type=int, default=PORT)
    master.add_argument("--width", type=int, default=320)
    master.add_argument("--height", type=int, default=240)
    master.add_argument("--iterations", type=int, default=500)
    master.add_argument("--workers", type=int, default=1, help="hand out no row before this many workers said hello")
    master.add_argument("--out", default="mandelbrot.png")
    master.add_argument("--progress", help="JSON file rewritten every 0.2 s (rows done/total, ...)")
    worker = roles.add_parser("worker", help="compute rows for a master")
    worker.add_argument("--master", required=True, help="IP:PORT")
    worker.add_argument("--id", type=int, required=True)
    worker.add_argument("--delay-ms", type=int, default=0, help="sleep this long per row (to make a demo last)")
    fetch = roles.add_parser("fetch", help="write the PNG of a VM master's complete image (guest/vmandel.c)")
    fetch.add_argument("--master", required=True, help="IP:IMAGEPORT (the master's port + 1 by default)")
    fetch.add_argument("--out", default="mandelbrot.png")
    fetch.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT_S, help="seconds (default 30)")
    args = parser.parse_args(argv)
    if args.role == "master":
        if args.width <= 0 or args.height <= 0 or args.iterations <= 0:
            parser.error("width, height and iterations must be positive")
        return run_master(args)
    if args.role == "fetch":
        return run_fetch(args)
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
