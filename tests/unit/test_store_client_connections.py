"""The client's downloads reuse kept-alive connections (one TLS handshake per thread, not one per request),
survive a kept-alive connection the server dropped, and leave none open; answers go out without Nagle's wait."""

import hashlib
import json
import socket
import threading
import urllib.request

import pytest

from hostside.httpd import JsonHandler, listen
from hostside.store import open_store
from hostside.store import server as srv
from hostside.store.client import ImageServer


def data_of(size, seed):
    out, block = bytearray(), hashlib.sha256(b"%d" % seed).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 4
    return bytes(out[:size])


@pytest.fixture(params=["chunks", "file"])
def url(request, tmp_path):
    server = listen("127.0.0.1", 0, srv.make_handler(open_store("%s:%s" % (request.param, tmp_path / "images")),
                                                      "tok"), "test")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


def image(tmp_path, files=12):
    source = tmp_path / "img"
    source.mkdir()
    for index in range(files):
        (source / ("f%02d.img" % index)).write_bytes(data_of(300 + index * 5000, index))
    (source / "pages-1.img").write_bytes(data_of(3 * 1024 * 1024, 99))
    return source


class Counting(ImageServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = 0

    def _connect(self):
        self.connections += 1
        return super()._connect()


def test_a_download_reuses_its_connections_and_closes_them_after(url, tmp_path):
    source = image(tmp_path)
    ImageServer(url, "tok").upload_dir("s1", "m1", str(source))
    client = Counting(url, "tok")
    files = client.download_dir("s1", "m1", str(tmp_path / "back"))
    assert len(files) == 13
    for entry in files:
        assert (tmp_path / "back" / entry["name"]).read_bytes() == (source / entry["name"]).read_bytes()
    assert client.connections <= 2  # the caller's and the chunk fetcher's, not one per file (was 28 here)
    assert client._idle == [] and client._keeping == 0


def test_a_kept_alive_connection_the_server_dropped_is_replaced(url, tmp_path):
    source = image(tmp_path, files=3)
    ImageServer(url, "tok").upload_dir("s1", "m1", str(source))
    client = Counting(url, "tok")
    real_call = client._call

    dropped = []

    def call_then_drop(*args, **kwargs):  # once, after the first call that leaves a connection kept
        answer = real_call(*args, **kwargs)
        if not dropped and client._idle:
            for connection in client._idle:  # as if the server had hung up while the connection was idle
                connection.sock.shutdown(socket.SHUT_RDWR)
                dropped.append(connection)
        return answer

    client._call = call_then_drop
    files = client.download_dir("s1", "m1", str(tmp_path / "back"))
    assert {f["name"] for f in files} == {p.name for p in source.iterdir()}
    assert dropped and client.connections >= 2  # the dropped one and its replacement


def test_connections_outside_a_download_are_closed_after_each_request(url, tmp_path):
    client = Counting(url, "tok")
    client.upload_dir("s1", "m1", str(image(tmp_path, files=2)))
    assert client._idle == []


def test_answers_are_sent_without_nagle(tmp_path):
    class Handler(JsonHandler):
        def do_GET(self):
            self.send_json(200, {"nodelay": self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)})

    server = listen("127.0.0.1", 0, Handler, "test")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/" % server.server_address[1], timeout=10) as answer:
            assert json.load(answer)["nodelay"] != 0
    finally:
        server.shutdown()
        server.server_close()
