"""The snapshot server and its client, in-process on loopback."""

import os
import threading

import pytest

from hostside.store import server as srv
from hostside.store.client import ChecksumError, ImageServer, StorageError


@pytest.fixture
def image_server(tmp_path):
    server = srv.serve("127.0.0.1", 0, str(tmp_path / "store"), "tok")
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
    import http.client
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
    with pytest.raises(StorageError, match="http://HOST:PORT"):
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
