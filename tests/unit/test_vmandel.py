"""guest/vmandel.c, the Mandelbrot demo in C for the VM guests: its pixels and its wire protocol match mandelbrot.py."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from workloads import mandelbrot

SCRIPT = mandelbrot.__file__
SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "guest", "vmandel.c")
W, H, ITERATIONS = 64, 48, 200
CFLAGS = ["-O2", "-ffp-contract=off", "-Wall"]


@pytest.fixture(scope="module")
def vmandel(tmp_path_factory):
    """The path of vmandel built as scripts/build_guest.sh builds it (static), or dynamically if static fails."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build guest/vmandel.c")
    binary = str(tmp_path_factory.mktemp("vmandel") / "vmandel")
    build = None
    for extra in (["-static"], []):
        build = subprocess.run([gcc] + extra + CFLAGS + ["-o", binary, SOURCE], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True)
        if build.returncode == 0:
            return binary, build.stdout
    pytest.fail("gcc cannot build vmandel.c:\n" + build.stdout)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_ports(count):
    ports = set()
    while len(ports) < count:
        ports.add(_free_port())
    return sorted(ports)


def _c_master(binary, tmp_path, port, image_port, workers):
    log = open(str(tmp_path / "master.log"), "w")
    try:
        return subprocess.Popen([binary, "master", "--bind", "127.0.0.1", "--port", str(port), "--width", str(W),
                                 "--height", str(H), "--iterations", str(ITERATIONS), "--workers", str(workers),
                                 "--image-port", str(image_port)], stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _py_master(tmp_path, port, workers):
    return subprocess.Popen([sys.executable, SCRIPT, "master", "--bind", "127.0.0.1", "--port", str(port),
                             "--width", str(W), "--height", str(H), "--iterations", str(ITERATIONS),
                             "--workers", str(workers), "--out", "image.png", "--progress", "progress.json"],
                            cwd=str(tmp_path))


def _c_worker(binary, port, ident, delay_ms=0):
    return subprocess.Popen([binary, "worker", "--master", "127.0.0.1:%d" % port, "--id", str(ident),
                             "--delay-ms", str(delay_ms)], stdout=subprocess.DEVNULL)


def _py_worker(port, ident, delay_ms=0):
    return subprocess.Popen([sys.executable, SCRIPT, "worker", "--master", "127.0.0.1:%d" % port,
                             "--id", str(ident), "--delay-ms", str(delay_ms)])


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


def _kill(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()  # by pid
            process.wait()


def _fetch(image_port, until_rows, timeout=10):
    """fetch_image from the C master, polled until at least `until_rows` rows are done."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            image = mandelbrot.fetch_image("127.0.0.1", image_port, timeout=5)
            if image[3] >= until_rows or time.monotonic() >= deadline:
                return image
        except OSError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.02)


def _png(image):
    width, height, iterations, rows_done, pixels = image
    assert (width, height, iterations, rows_done) == (W, H, ITERATIONS, H)
    assert pixels is not None and len(pixels) == W * H
    return mandelbrot.encode_png(W, H, [pixels[y * W:(y + 1) * W] for y in range(H)])


def _stop(master):
    """SIGTERM the C master (it serves its image until then) and expect a clean exit."""
    assert master.poll() is None, "the C master exited by itself"
    master.send_signal(signal.SIGTERM)
    assert _reap(master, timeout=5) == [0]


def test_builds_without_warnings(vmandel):
    _, output = vmandel
    assert "warning" not in output, output


@pytest.mark.parametrize("width,height,iterations", [(16, 12, 50), (W, H, ITERATIONS), (1, 1, 1), (97, 31, 1000),
                                                     (33, 7, 3)])
def test_pixels_are_bit_identical_to_render_row(vmandel, width, height, iterations):
    binary, _ = vmandel
    raw = subprocess.run([binary, "render", "--width", str(width), "--height", str(height), "--iterations",
                          str(iterations)], stdout=subprocess.PIPE, check=True).stdout
    assert raw == b"".join(mandelbrot.render_row(y, width, height, iterations) for y in range(height))


def test_python_master_and_two_c_workers(vmandel, tmp_path):
    binary, _ = vmandel
    port = _free_port()
    workers = [_c_worker(binary, port, i) for i in (1, 2)]  # first: they retry until the master listens
    try:
        time.sleep(0.3)
        master = _py_master(tmp_path, port, workers=2)
        assert _reap(master, *workers) == [0, 0, 0]
    finally:
        _kill(workers)
    assert (tmp_path / "image.png").read_bytes() == mandelbrot.expected_image(W, H, ITERATIONS)


def test_c_master_with_a_c_and_a_python_worker(vmandel, tmp_path):
    binary, _ = vmandel
    port, image_port = _free_ports(2)
    master = _c_master(binary, tmp_path, port, image_port, workers=2)
    workers = []
    try:
        # Before two workers said hello no row is handed out: the image port says 0 rows and sends no pixels.
        assert _fetch(image_port, 0) == (W, H, ITERATIONS, 0, None)
        workers = [_c_worker(binary, port, 1), _py_worker(port, 2)]
        assert _reap(*workers) == [0, 0]  # DONE, as from the Python master
        assert _png(_fetch(image_port, H)) == mandelbrot.expected_image(W, H, ITERATIONS)
        # The same image, again, through the CLI (atomic write, no temp file left).
        out = tmp_path / "out" / "image.png"
        out.parent.mkdir()
        fetch = subprocess.run([sys.executable, SCRIPT, "fetch", "--master", "127.0.0.1:%d" % image_port,
                                "--out", str(out)], timeout=15)
        assert fetch.returncode == 0
        assert out.read_bytes() == mandelbrot.expected_image(W, H, ITERATIONS)
        assert os.listdir(str(out.parent)) == ["image.png"]
        _stop(master)
    finally:
        _kill([master] + workers)
    log = (tmp_path / "master.log").read_text()
    assert "image complete, %d/%d rows, reassigned 0" % (H, H) in log, log


def test_fetch_cli_refuses_an_incomplete_image(vmandel, tmp_path):
    binary, _ = vmandel
    port, image_port = _free_ports(2)
    master = _c_master(binary, tmp_path, port, image_port, workers=1)
    try:
        _fetch(image_port, 0)  # it listens
        fetch = subprocess.run([sys.executable, SCRIPT, "fetch", "--master", "127.0.0.1:%d" % image_port,
                                "--out", str(tmp_path / "image.png")], stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=15)
        assert fetch.returncode == 1 and "0 of %d rows" % H in fetch.stderr
        assert not (tmp_path / "image.png").exists()
        _stop(master)
    finally:
        _kill([master])


@pytest.mark.parametrize("master_kind", ["c", "python"])
def test_a_killed_c_workers_row_is_reassigned_and_the_image_is_unchanged(vmandel, tmp_path, master_kind):
    binary, _ = vmandel
    port, image_port = _free_ports(2)
    if master_kind == "c":
        master = _c_master(binary, tmp_path, port, image_port, workers=3)
    else:
        master = _py_master(tmp_path, port, workers=3)
    workers = [_c_worker(binary, port, i, delay_ms=60) for i in (1, 2, 3)]
    try:
        deadline = time.monotonic() + 10
        rows_done = 0
        while time.monotonic() < deadline and rows_done < 6:
            time.sleep(0.02)
            if master_kind == "c":
                rows_done = _fetch(image_port, 0)[3]
            else:
                try:
                    with open(str(tmp_path / "progress.json")) as handle:
                        rows_done = json.load(handle)["rows_done"]
                except (OSError, ValueError):
                    pass
        assert 6 <= rows_done < H
        workers[1].kill()  # mid-row: it is sleeping (or computing) with a row assigned
        assert _reap(workers[0], workers[2]) == [0, 0]
        if master_kind == "c":
            assert _png(_fetch(image_port, H)) == mandelbrot.expected_image(W, H, ITERATIONS)
            _stop(master)
        else:
            assert _reap(master) == [0]
            assert (tmp_path / "image.png").read_bytes() == mandelbrot.expected_image(W, H, ITERATIONS)
    finally:
        _kill([master] + workers)
    if master_kind == "c":
        log = (tmp_path / "master.log").read_text()
        assert "worker 2 gone, row" in log, log
        summary = re.search(r"reassigned (\d+), rows by worker(( \d+:\d+)+)", log)
        assert summary, log
        by_worker = dict(pair.split(":") for pair in summary.group(2).split())
        assert int(summary.group(1)) >= 1 and sum(map(int, by_worker.values())) == H
        assert int(by_worker.get("2", 0)) < H // 2
    else:
        progress = json.loads((tmp_path / "progress.json").read_text())
        assert progress["done"] and progress["rows_done"] == H and progress["reassigned"] >= 1
        assert progress["rows_by_worker"].get("2", 0) < H // 2
