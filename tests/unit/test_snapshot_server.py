"""The snapshot server and its client, in-process on loopback."""

import http.client
import json
import os
import threading
import time

import pytest

from hostside.httpd import listen
from hostside.store import server as srv
from hostside.store.client import ChecksumError, ImageServer, StorageError
from hostside.store.files import FileStore


@pytest.fixture
def image_server(tmp_path):
    server = listen("127.0.0.1", 0, srv.make_handler(FileStore(str(tmp_path / "store")), "tok"), "test")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1], tmp_path / "store"
    server.shutdown()
    server.server_close()


def make_dir(path, files):
    os.makedirs(path, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def test_upload_then_download_verifies_every_file(image_server, tmp_path):
    url, _ = image_server
    client = ImageServer(url, "tok")
    source = make_dir(tmp_path / "img", {"pages-1.img": os.urandom(3 * 1024 * 1024 + 5), "core.img": b"x" * 10})
    stored = client.upload_dir("snap-1", "h1", str(source))
    assert sorted(s["name"] for s in stored) == ["core.img", "pages-1.img"]
    files = client.download_dir("snap-1", "h1", str(tmp_path / "back"))
    assert len(files) == 2
    for name in ("pages-1.img", "core.img"):
        assert (tmp_path / "back" / name).read_bytes() == (source / name).read_bytes()


def test_corrupted_image_is_caught_on_download(image_server, tmp_path):
    url, store = image_server
    client = ImageServer(url, "tok")
    client.upload_dir("snap-1", "h1", str(make_dir(tmp_path / "img", {"pages.img": b"a" * 4096})))
    with open(store / "snap-1" / "h1" / "pages.img", "r+b") as handle:
        handle.write(b"b")
    with pytest.raises(ChecksumError, match="corrupt"):
        client.download_dir("snap-1", "h1", str(tmp_path / "back"))


def test_checksum_mismatch_on_upload_is_refused_and_nothing_kept(image_server, tmp_path):
    url, store = image_server
    connection = http.client.HTTPConnection(url.split("//")[1])
    connection.request("PUT", "/images/s/m/f.img", body=b"data",
                       headers={"Authorization": "Bearer tok", "X-Sha256": "0" * 64})
    response = connection.getresponse()
    assert response.status == 422 and b"checksum mismatch" in response.read()
    assert not (store / "s" / "m" / "f.img").exists()


def test_errors_are_clear(image_server, tmp_path):
    url, _ = image_server
    with pytest.raises(StorageError, match="401"):
        ImageServer(url, "wrong").upload_dir("s", "m", str(make_dir(tmp_path / "i", {"a": b"1"})))
    with pytest.raises(StorageError, match="no images"):
        ImageServer(url, "tok").index("nope", "m")
    with pytest.raises(StorageError, match="unreachable"):
        ImageServer("http://127.0.0.1:1", "tok").index("s", "m")
    with pytest.raises(StorageError, match=r"http\(s\)://HOST:PORT"):
        ImageServer("ftp://x", "tok")


def test_command_line_validation(capsys):
    with pytest.raises(SystemExit) as exit_info:
        srv.build_args(["--dir", "/tmp/x", "--listen", "nonsense", "--token", "t"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        srv.build_args(["--dir", "/tmp/x"])
    assert "token is required" in capsys.readouterr().err


class Trickle:
    """A reader of unknown length, like a VM's migration stream (odd-sized reads)."""

    def __init__(self, data, step=70001):
        self.data, self.step = data, step

    def read(self, _size):
        chunk, self.data = self.data[:self.step], self.data[self.step:]
        return chunk


def test_a_stream_of_unknown_size_is_stored_chunked_and_verified(image_server, tmp_path):
    url, store = image_server
    client = ImageServer(url, "tok")
    data = os.urandom(2 * 1024 * 1024 + 17)
    stored = client.upload_stream("snap-2", "vm1", "vm.save", Trickle(data))
    assert stored["bytes"] == len(data)
    client.download_dir("snap-2", "vm1", str(tmp_path / "back"))
    assert (tmp_path / "back" / "vm.save").read_bytes() == data
    assert not [p for p in (store / "snap-2" / "vm1").iterdir() if ".part" in p.name]


def test_a_stream_to_an_unreachable_server_fails_clearly():
    with pytest.raises(StorageError, match="streaming vm.save failed|unreachable"):
        ImageServer("http://127.0.0.1:9", "tok").upload_stream("s", "m", "vm.save", Trickle(b"x" * 10))


def test_a_stream_with_a_wrong_token_is_refused(image_server):
    url, _ = image_server
    with pytest.raises(StorageError, match="refused vm.save: 401"):
        ImageServer(url, "wrong").upload_stream("s", "m", "vm.save", Trickle(b"x" * 100))


def call(url, method, path, token="tok", body=None, headers=None):
    connection = http.client.HTTPConnection(url.split("//")[1], timeout=10)
    connection.request(method, path, body=body, headers=dict({"Authorization": "Bearer " + token}, **(headers or {})))
    response = connection.getresponse()
    try:
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("method, path, token, headers, status, error", [
    ("GET", "/images/s/m", "wrong", {}, 401, "unauthorized"),
    ("GET", "/nowhere", "tok", {}, 404, "not_found"),
    ("GET", "/images/s/../m", "tok", {}, 400, "bad_request"),
    ("GET", "/images/s/m/f.img", "tok", {}, 404, "not_found"),
    ("GET", "/images/s/m", "tok", {}, 404, "not_found"),
    ("PUT", "/images/s/m/index.json", "tok", {"Content-Length": "1"}, 400, "bad_request"),
    ("PUT", "/images/s/m", "tok", {"Content-Length": "1"}, 400, "bad_request"),
    ("PUT", "/images/s/m/f.img", "tok", {"Content-Length": "4", "X-Sha256": "0" * 64}, 422, "unprocessable"),
    ("DELETE", "/images/s", "tok", {}, 404, "not_found"),
    ("POST", "/images/s", "tok", {}, 405, "method_not_allowed"),
    ("PATCH", "/images/s", "tok", {}, 405, "method_not_allowed"),  # a client error, not a 5xx
])
def test_every_error_answers_the_one_json_shape(image_server, method, path, token, headers, status, error):
    url, _ = image_server
    body = b"data" if method == "PUT" else None
    answer = call(url, method, path, token, body, headers)
    assert answer[0] == status
    assert set(answer[1]) == {"error", "reason"} and answer[1]["error"] == error and answer[1]["reason"]


def test_an_unexpected_failure_is_a_json_500_without_a_traceback(tmp_path, capsys):
    class Broken(FileStore):
        def index(self, snapshot, member):
            raise RuntimeError("the disk caught fire")

    server = listen("127.0.0.1", 0, srv.make_handler(Broken(str(tmp_path)), "tok"), "test")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, answer = call("http://127.0.0.1:%d" % server.server_address[1], "GET", "/images/s/m")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 500 and answer == {"error": "internal", "reason": "internal error: RuntimeError: the disk caught fire"}
    assert "Traceback" in capsys.readouterr().err


def test_the_reason_of_a_refusal_reaches_the_client(image_server, tmp_path):
    url, _ = image_server
    source = make_dir(tmp_path / "img", {"index.json": b"{}"})
    with pytest.raises(StorageError, match="refused index.json: 400 .*store's own index"):
        ImageServer(url, "tok").upload_dir("s", "m", str(source))


def test_store_flag_and_dir_flag_name_the_same_store(capsys):
    assert srv.build_args(["--dir", "/tmp/x", "--token", "t"]).store == "file:/tmp/x"
    assert srv.build_args(["--store", "file:/tmp/y", "--token", "t"]).store == "file:/tmp/y"
    assert srv.build_args(["--store", "chunks:/tmp/y", "--token", "t"]).store == "chunks:/tmp/y"
    with pytest.raises(SystemExit):
        srv.build_args(["--store", "blocks:/tmp/y", "--token", "t"])
    assert "scheme one of chunks, file" in capsys.readouterr().err


def test_a_member_image_can_be_deleted_alone(image_server, tmp_path):
    url, root = image_server
    client = ImageServer(url, "tok")
    for member in ("m1", "m2"):
        client.upload_dir("s", member, str(make_dir(tmp_path / member, {"a": b"1"})))
    client.delete("s", "m1")  # a partial image after a failed upload: the others stay
    with pytest.raises(StorageError, match="no images"):
        client.index("s", "m1")
    assert [f["name"] for f in client.index("s", "m2")["files"]] == ["a"]
    client.delete("s", "m1")  # already gone: fine


def test_a_body_sent_with_a_delete_or_get_is_never_read_as_the_next_request(image_server):
    """Found by the API fuzz: a DELETE with a body (a PNG) was answered and the connection kept, so the
    unread body was parsed as the next request. Such a connection is closed after the answer."""
    for method in ("DELETE", "GET"):
        connection = http.client.HTTPConnection(image_server[0].split("//")[1], timeout=10)
        connection.request(method, "/chunks/upload", body=b"\x89PNG\r\n\x1a\n" + b"x" * 40,
                           headers={"Authorization": "Bearer tok", "Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        assert 400 <= response.status < 500 and json.loads(response.read())["reason"]
        assert response.will_close, method
        connection.close()


def test_a_file_whose_snapshot_is_deleted_while_it_comes_in_is_a_409_not_a_full_disk(image_server):
    """Found by the API fuzz (two workers): a PUT racing a DELETE of its snapshot answered 507."""
    url, root = image_server
    host = url.split("//")[1]
    call(url, "PUT", "/images/s1/m1/a.img", body=b"first")

    def body():
        yield b"x" * 1000
        deadline = time.monotonic() + 10  # the server has begun the file (on a loaded host, not at once)
        while not list((root / "s1" / "m1").glob(".b.img.part-*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert call(url, "DELETE", "/images/s1")[0] == 200  # the snapshot goes while the file comes in
        yield b"y" * 1000
    connection = http.client.HTTPConnection(host, timeout=10)
    connection.request("PUT", "/images/s1/m1/b.img", body=body(), encode_chunked=True,
                       headers={"Authorization": "Bearer tok"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 409 and "deleted meanwhile" in answer["reason"], answer
    assert call(url, "GET", "/images/s1/m1")[0] == 404


def test_the_servers_listen_with_room_for_many_members_at_once(image_server):
    """socketserver's backlog of 5 overflowed with eight members storing at once: SYN cookies, then
    resets ("Connection reset by peer"), and the snapshot aborted."""
    import shutil
    import subprocess
    if shutil.which("ss") is None:
        pytest.skip("no ss to read the listen backlog with")
    port = image_server[0].rsplit(":", 1)[1]
    line = subprocess.run(["ss", "-ltnH", "sport = :%s" % port], capture_output=True, text=True).stdout.split()
    with open("/proc/sys/net/core/somaxconn") as handle:
        cap = int(handle.read())
    assert int(line[2]) == min(1024, cap), line  # a listening socket's Send-Q is its backlog
