"""The distributed Mandelbrot member: deterministic rows, a valid PNG, and runs on loopback (with a worker killed)."""

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest

from workloads import mandelbrot

SCRIPT = mandelbrot.__file__
W, H, ITERATIONS = 64, 48, 200


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _chunks(data):
    offset, chunks = 8, []
    while offset < len(data):
        length, = struct.unpack_from("!I", data, offset)
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        crc, = struct.unpack_from("!I", data, offset + 8 + length)
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc
        chunks.append((kind, body))
        offset += 12 + length
    return chunks


def test_render_row_is_deterministic_and_pinned():
    rows = [mandelbrot.render_row(y, W, H, ITERATIONS) for y in range(H)]
    assert rows == [mandelbrot.render_row(y, W, H, ITERATIONS) for y in range(H)]
    assert all(isinstance(row, bytes) and len(row) == W for row in rows)
    middle = rows[H // 2]
    assert 0 in middle and max(middle) > 100  # the set is black, its edge is bright
    assert rows[0] == rows[-1]  # the window is symmetric about the real axis, and so are pixel centres
    # The formula is part of the demo's contract: a change shows here.
    raw = b"".join(mandelbrot.render_row(y, 16, 12, 50) for y in range(12))
    assert hashlib.sha256(raw).hexdigest() == "3080eed2690a1927e93c22fe22261884f7c71aceefac64a1cb964dfd1dcd3c34"
    with pytest.raises(ValueError):
        mandelbrot.render_row(H, W, H, ITERATIONS)


def test_png_is_valid_and_holds_the_rows(tmp_path):
    rows = [mandelbrot.render_row(y, W, H, ITERATIONS) for y in range(H)]
    path = tmp_path / "image.png"
    mandelbrot.write_png(str(path), W, H, rows)
    data = path.read_bytes()
    assert data == mandelbrot.expected_image(W, H, ITERATIONS)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks = _chunks(data)
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack("!IIBBBBB", chunks[0][1]) == (W, H, 8, 0, 0, 0, 0)
    raw = zlib.decompress(chunks[1][1])
    assert raw == b"".join(b"\x00" + row for row in rows)
    assert mandelbrot.read_png(data) == (W, H, rows)
    assert sorted(os.listdir(tmp_path)) == ["image.png"]  # no temp file left behind


def _start_master(tmp_path, port, workers=3):
    return subprocess.Popen([sys.executable, SCRIPT, "master", "--bind", "127.0.0.1", "--port", str(port),
                             "--width", str(W), "--height", str(H), "--iterations", str(ITERATIONS),
                             "--workers", str(workers), "--out", "image.png", "--progress", "progress.json"],
                            cwd=str(tmp_path))


def _start_worker(tmp_path, port, ident, delay_ms=0):
    return subprocess.Popen([sys.executable, SCRIPT, "worker", "--master", "127.0.0.1:%d" % port,
                             "--id", str(ident), "--delay-ms", str(delay_ms)], cwd=str(tmp_path))


def _progress(tmp_path):
    try:
        with open(os.path.join(str(tmp_path), "progress.json")) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _reap(*processes, timeout=15):
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            codes.append("hung")
    return codes


def test_master_and_three_workers_on_loopback(tmp_path):
    port = _free_port()
    # Workers first: they retry until the master listens.
    workers = [_start_worker(tmp_path, port, i) for i in (1, 2, 3)]
    time.sleep(0.3)
    master = _start_master(tmp_path, port)
    assert _reap(master, *workers) == [0, 0, 0, 0]
    assert (tmp_path / "image.png").read_bytes() == mandelbrot.expected_image(W, H, ITERATIONS)
    progress = _progress(tmp_path)
    assert (progress["rows_done"], progress["rows_total"], progress["done"]) == (H, H, True)
    assert sum(progress["rows_by_worker"].values()) == H
    assert sorted(os.listdir(str(tmp_path))) == ["image.png", "progress.json"]


def test_a_killed_workers_row_is_reassigned_and_the_image_is_unchanged(tmp_path):
    port = _free_port()
    master = _start_master(tmp_path, port)
    workers = [_start_worker(tmp_path, port, i, delay_ms=60) for i in (1, 2, 3)]
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            progress = _progress(tmp_path)
            if progress and progress["rows_done"] >= 6:
                break
            time.sleep(0.02)
        assert progress and progress["rows_done"] < H, progress
        workers[1].kill()  # mid-row: it is sleeping (or computing) with a row assigned
        assert _reap(master, workers[0], workers[2]) == [0, 0, 0]
    finally:
        for process in [master] + workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert (tmp_path / "image.png").read_bytes() == mandelbrot.expected_image(W, H, ITERATIONS)
    progress = _progress(tmp_path)
    assert progress["done"] and progress["rows_done"] == H
    assert progress["reassigned"] >= 1
    assert progress["rows_by_worker"].get("2", 0) < H // 2
