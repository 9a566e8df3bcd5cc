"""ChunkStore, its HTTP calls and the client: dedup, send only what is missing, verified restore,
GC under concurrent uploads, crash leftovers, verify, the old layout, the file-store fallback, the spool."""

import hashlib
import io
import json
import os
import threading

import pytest

from hostside.httpd import listen
from hostside.orchestration import StoreSink
from hostside.store import chunking, open_store
from hostside.store import server as srv
from hostside.store.base import ChecksumMismatch, NotFound
from hostside.store.chunks import ChunkStore, MissingChunks
from hostside.store.client import ChecksumError, ImageServer, StorageError
from hostside.store.files import FileStore
from hostside.store.spool import Spool


def data_of(size, seed=0):
    out, block = bytearray(), hashlib.sha256(b"%d" % seed).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 4  # compressible a little, unique everywhere
    return bytes(out[:size])


@pytest.fixture
def store(tmp_path):
    return open_store("chunks:%s" % (tmp_path / "images"))


def serve(store):
    server = listen("127.0.0.1", 0, srv.make_handler(store, "tok"), "test")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def client(store):
    server = serve(store)
    yield ImageServer("http://127.0.0.1:%d" % server.server_address[1], "tok")
    server.shutdown()
    server.server_close()


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def corrupt(store, cid):
    pack, offset, length, _size = store.where[cid]
    with open(os.path.join(store.pack_dir, pack), "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(length))


def drop_pack(store, cid):
    os.unlink(os.path.join(store.pack_dir, store.where[cid][0]))


def content(store, *where):
    chunks, info = store.open(*where)
    return b"".join(chunks), info


def test_the_store_is_registered_and_keeps_the_store_rules(store):
    assert isinstance(store, ChunkStore)
    data = data_of(700_000)
    info = store.put("s1", "m1", "pages.img", [data[:1000], data[1000:]], hashlib.sha256(data).hexdigest())
    assert info.bytes == len(data) and content(store, "s1", "m1", "pages.img") == (data, info)
    assert store.index("s1", "m1") == [info] and store.snapshots() == ["s1"]
    with pytest.raises(ChecksumMismatch):
        store.put("s1", "m1", "other.img", [b"x"], "0" * 64)
    assert store.index("s1", "m1") == [info]


def test_identical_content_is_stored_once_whatever_snapshot_or_member(store):
    data = data_of(2_000_000)
    store.put("s1", "m1", "a.img", [data])
    first = store.totals()["chunk_bytes"]
    store.put("s2", "m2", "b.img", [data])
    store.put("s2", "m3", "c.img", [b"prefix" + data])
    totals = store.totals()
    assert totals["logical_bytes"] == 3 * len(data) + 6
    assert totals["chunk_bytes"] < first * 1.3  # an insertion moves only the chunks around it


def test_the_client_sends_only_what_the_server_lacks_and_reports_the_bytes(client, store, tmp_path):
    data = data_of(3_000_000)
    write(str(tmp_path / "img" / "pages.img"), data)
    first = client.upload_dir("s1", "m1", str(tmp_path / "img"))[0]
    assert first["logical_bytes"] == len(data) and first["sent_bytes"] >= first["stored_bytes"] > 0
    write(str(tmp_path / "img" / "pages.img"), data + b"appended")
    second = client.upload_dir("s2", "m1", str(tmp_path / "img"))[0]
    assert second["logical_bytes"] == len(data) + 8
    assert second["sent_bytes"] < first["sent_bytes"] * 0.2 and second["stored_bytes"] < first["stored_bytes"] * 0.2
    restored = tmp_path / "restored"
    files = client.download_dir("s2", "m1", str(restored))
    assert (restored / "pages.img").read_bytes() == data + b"appended"
    assert files[0]["sha256"] == hashlib.sha256(data + b"appended").hexdigest()


def test_a_stream_is_chunked_as_it_comes_and_the_sink_adds_up_the_bytes(client, store):
    data = data_of(1_500_000, seed=3)
    sink = StoreSink(client, "s1", "vm1")
    entry = sink.put_stream("vm.img", io.BytesIO(data))
    assert entry == {"name": "vm.img", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    again = StoreSink(client, "s2", "vm1")
    again.put_stream("vm.img", io.BytesIO(data))
    assert sink.storage()["logical_bytes"] == len(data) and sink.storage()["stored_bytes"] > 0
    assert again.storage()["stored_bytes"] == 0 and again.storage()["sent_bytes"] < 10_000


def test_a_corrupt_or_missing_chunk_fails_the_download_naming_member_file_and_chunk(client, store, tmp_path):
    data = data_of(600_000)
    store.put("s1", "m1", "pages.img", [data])
    chunks = store.manifest("s1", "m1", "pages.img")["chunks"]
    cid = chunks[1][0]
    corrupt(store, cid)
    with pytest.raises(ChecksumError, match="chunk %s.*pages.img.*m1" % cid):
        client.download_dir("s1", "m1", str(tmp_path / "out"))
    report = store.verify()
    assert not report["ok"] and report["damaged"][0]["chunk"] == cid and report["damaged"][0]["file"] == "pages.img"
    drop_pack(store, cid)
    with pytest.raises(StorageError, match="chunk %s is missing.*pages.img.*m1" % chunks[0][0]):
        client.download_dir("s1", "m1", str(tmp_path / "out2"))


def test_delete_frees_only_the_chunks_nothing_else_uses(store):
    shared, own = data_of(400_000, 1), data_of(400_000, 2)
    store.put("s1", "m1", "a.img", [shared])
    store.put("s1", "m1", "b.img", [own])
    store.put("s2", "m1", "a.img", [shared])
    before = store.totals()["chunks"]
    assert store.delete("s1")
    assert store.totals()["chunks"] < before
    assert content(store, "s2", "m1", "a.img")[0] == shared
    assert store.verify()["ok"]
    assert not store.delete("s1")


def test_a_chunk_reported_present_is_not_swept_before_its_manifest_commits(store):
    data = data_of(300_000, 5)
    store.put("s1", "m1", "a.img", [data])
    entries = store.manifest("s1", "m1", "a.img")["chunks"]
    ids = [cid for cid, _ in entries]
    assert store.missing(ids) == []  # an uploader is told the server has them all...
    store.delete("s1")  # ...then the only snapshot naming them goes, and GC runs
    info = store.commit("s2", "m1", "a.img", len(data), hashlib.sha256(data).hexdigest(), entries)
    assert content(store, "s2", "m1", "a.img") == (data, info)


def test_a_commit_naming_a_chunk_the_store_lacks_is_refused_naming_it(store):
    missing = chunking.chunk_id(b"never sent")
    with pytest.raises(MissingChunks) as caught:
        store.commit("s1", "m1", "a.img", 10, "0" * 64, [[missing, 10]])
    assert caught.value.ids == [missing] and store.index("s1", "m1") is None


def test_gc_keeps_young_unreferenced_chunks_for_another_process_and_sweeps_them_later(store):
    store.store_chunks([chunking.Packer().pack(b"orphan" * 100)])
    other = ChunkStore(store.root)  # another process: none of this server's leases
    assert other.gc(min_age=3600)["swept"] == 0
    assert other.gc(min_age=0)["swept"] == 1


def test_a_crash_mid_upload_leaves_nothing_listed_and_gc_removes_the_leftovers(store):
    # chunks stored, manifest never committed (the server died), a temp file half written
    store.store_chunks([chunking.Packer().pack(data_of(100_000, 7))])
    tmp = os.path.join(store.pack_dir, "." + "ab" * 16 + ".pack.tmp")
    write(tmp, b"half")
    os.utime(tmp, (0, 0))
    assert store.snapshots() == [] and store.index("s1", "m1") is None
    fresh = ChunkStore(store.root)  # restarted: the leases are gone
    assert fresh.gc()["swept"] == 1 and not os.path.exists(tmp)
    assert fresh.verify()["ok"]


def test_the_old_file_store_layout_in_the_same_directory_stays_readable(tmp_path, client, store):
    old = FileStore(store.root)
    info = old.put("old1", "m1", "core.img", [b"from the file store"])
    assert store.snapshots() == ["old1"] and store.index("old1", "m1") == [info]
    assert content(store, "old1", "m1", "core.img")[0] == b"from the file store"
    client.download_dir("old1", "m1", str(tmp_path / "out"))
    assert (tmp_path / "out" / "core.img").read_bytes() == b"from the file store"
    assert store.verify()["ok"] and store.verify()["files"] == 1
    assert store.delete("old1") and store.snapshots() == []


def test_a_new_client_falls_back_to_whole_files_on_a_file_store_server(tmp_path):
    server = serve(FileStore(str(tmp_path / "plain")))
    try:
        client = ImageServer("http://127.0.0.1:%d" % server.server_address[1], "tok")
        write(str(tmp_path / "img" / "a.img"), b"abc" * 1000)
        stored = client.upload_dir("s1", "m1", str(tmp_path / "img"))[0]
        assert client.chunked is False and stored["sent_bytes"] == stored["stored_bytes"] == 3000
        assert client.upload_stream("s1", "m1", "b.img", io.BytesIO(b"xyz"))["bytes"] == 3
        client.download_dir("s1", "m1", str(tmp_path / "out"))
        assert (tmp_path / "out" / "a.img").read_bytes() == b"abc" * 1000
    finally:
        server.shutdown()
        server.server_close()


class CountingRequests(ImageServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests = []

    def _request(self, method, path, body=None, headers=None):
        self.requests.append((method, path))
        return super()._request(method, path, body, headers)


def test_a_download_asks_for_all_manifests_at_once_and_fetches_small_files_together(client, store, tmp_path):
    files = {"core-%d.img" % i: data_of(200 + 700 * i, i) for i in range(30)}
    files.update({"empty.img": b"", "pages-1.img": data_of(900_000, 99)})
    for name, data in files.items():
        write(str(tmp_path / "img" / name), data)
    client.upload_dir("s1", "m1", str(tmp_path / "img"))
    counting = CountingRequests(client.url, "tok")
    got = counting.download_dir("s1", "m1", str(tmp_path / "out"))
    assert {f["name"] for f in got} == set(files)
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    fetches = [path for _, path in counting.requests if path == "/chunks/fetch"]
    assert ("GET", "/manifests/s1/m1") in counting.requests
    assert len(counting.requests) <= 2 + len(fetches) and len(fetches) <= 2  # was 2 requests a file


def test_a_corrupt_chunk_among_small_files_names_its_file(client, store, tmp_path):
    for i in range(5):
        store.put("s1", "m1", "f%d.img" % i, [data_of(1000 + i, i)])
    cid = store.manifest("s1", "m1", "f3.img")["chunks"][0][0]
    corrupt(store, cid)
    with pytest.raises(ChecksumError, match="chunk %s.*f3.img.*m1" % cid):
        client.download_dir("s1", "m1", str(tmp_path / "out"))
    drop_pack(store, cid)
    with pytest.raises(StorageError, match="chunk %s is missing.*f3.img.*m1" % cid):
        client.download_dir("s1", "m1", str(tmp_path / "out2"))


def test_a_download_from_a_server_without_the_manifests_call_asks_file_by_file(client, store, tmp_path):
    for i in range(3):
        store.put("s1", "m1", "f%d.img" % i, [data_of(5000, i)])
    counting = CountingRequests(client.url, "tok")
    real_call = counting._call

    def older_server(method, path, *rest):  # an older server routes /manifests/<s>/<m> nowhere: 404
        if method == "GET" and path == "/manifests/s1/m1":
            return 404, {"error": "not_found", "reason": "expected /images/..."}
        return real_call(method, path, *rest)

    counting._call = older_server
    got = counting.download_dir("s1", "m1", str(tmp_path / "out"))
    assert [f["name"] for f in got] == ["f0.img", "f1.img", "f2.img"]
    assert all((tmp_path / "out" / ("f%d.img" % i)).read_bytes() == data_of(5000, i) for i in range(3))
    assert ("GET", "/manifests/s1/m1/f2.img") in counting.requests


def test_the_chunk_calls_refuse_bad_input_with_json_errors(client, store):
    import http.client
    port = client.port

    def call(method, path, body):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request(method, path, body=body, headers={"Authorization": "Bearer tok"})
        response = connection.getresponse()
        try:
            return response.status, json.loads(response.read() or b"{}")
        finally:
            connection.close()

    assert call("POST", "/chunks/missing", b'{"chunks": ["nothex"]}')[0] == 400
    assert call("POST", "/chunks/missing", b"not json")[0] == 400
    bad = chunking.frame(chunking.Chunk(chunking.chunk_id(b"a"), 1, chunking.Packer().pack(b"b").packed))
    assert call("POST", "/chunks/upload", bad)[0] == 400  # content that is not its id: never stored
    status, answer = call("PUT", "/manifests/s1/m1/a.img", json.dumps(
        {"bytes": 1, "sha256": "0" * 64, "chunks": [[chunking.chunk_id(b"a"), 1]]}).encode())
    assert status == 409 and answer["missing"] == [chunking.chunk_id(b"a")]
    status, answer = call("POST", "/chunks/fetch", json.dumps({"chunks": [chunking.chunk_id(b"a")]}).encode())
    assert status == 404 and answer["missing"]
    assert call("GET", "/manifests/nosuch/m1", None)[0] == 404
    assert call("PUT", "/manifests/s1/m1", b"{}")[0] == 400  # a commit names its file
    status, totals = call("GET", "/stats", None)
    assert status == 200 and {"stored_bytes", "logical_bytes", "chunks"} <= set(totals)


def test_the_verify_command_reports_json_and_exits_1_on_damage(store, capsys):
    store.put("s1", "m1", "a.img", [data_of(200_000)])
    assert srv.main(["verify", "--store", "chunks:" + store.root]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    cid = store.manifest("s1", "m1", "a.img")["chunks"][0][0]
    drop_pack(store, cid)
    assert srv.main(["verify", "--store", "chunks:" + store.root]) == 1
    assert json.loads(capsys.readouterr().out)["damaged"][0]["chunk"] == cid
    with pytest.raises(SystemExit):
        srv.main(["verify", "--store", "file:" + store.root])


def test_the_spool_keeps_order_and_bounds_its_memory(tmp_path):
    spool = Spool(str(tmp_path), memory=1000)
    pieces = [bytes([i]) * 300 for i in range(20)]
    for piece in pieces:
        spool.put(piece)
    spool.put(b"")
    out = b"".join(iter(spool.get, b""))
    assert out == b"".join(pieces) and spool.peak <= 1000 and spool.spilled > 0


def test_the_spool_never_blocks_its_writer_while_the_reader_waits(tmp_path):
    spool = Spool(str(tmp_path), memory=100)
    got = []
    reader = threading.Thread(target=lambda: got.extend(iter(spool.get, b"")))
    reader.start()
    for i in range(50):
        spool.put(b"%03d" % i * 10)
    spool.close()
    reader.join(10)
    assert b"".join(got) == b"".join(b"%03d" % i * 10 for i in range(50))


def test_not_found_is_not_found(store):
    with pytest.raises(NotFound):
        store.open("s1", "m1", "a.img")
    assert store.index("s1", "m1") is None


def test_show_and_list_give_logical_stored_and_sent_bytes():
    from violin_client import cli
    manifest = {"id": "snap-1", "state": "complete", "members": [
        {"name": "h1", "state": "done", "image": {"files": [], "storage": {
            "logical_bytes": 4 << 20, "stored_bytes": 1 << 20, "sent_bytes": 2 << 20}}},
        {"name": "h2", "state": "done", "image": {"files": [], "storage": {
            "logical_bytes": 4 << 20, "stored_bytes": 0, "sent_bytes": 1024}}}]}
    shown = cli.format_snapshot(manifest)
    assert "storage    logical 8.0 MiB, newly stored 1.0 MiB, sent 2.0 MiB" in shown
    assert "STORED" in shown and "SENT" in shown
    listed = cli.format_list([manifest]).splitlines()
    assert listed[0].split()[-3:] == ["LOGICAL", "STORED", "SENT"]
    assert listed[1].split()[-6:] == ["8.0", "MiB", "1.0", "MiB", "2.0", "MiB"]


def test_the_documented_chunk_routes_are_served_with_documented_statuses(client, store, tmp_path):
    import http.client

    import yaml
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "openapi-server.yaml")) as handle:
        spec = yaml.safe_load(handle)
    store.put("s1", "m1", "a.img", [b"abc"])
    cid = store.manifest("s1", "m1", "a.img")["chunks"][0][0]
    calls = [("GET", "/stats", "/stats", None), ("POST", "/chunks/missing", "/chunks/missing", {"chunks": [cid]}),
             ("POST", "/chunks/fetch", "/chunks/fetch", {"chunks": [cid]}),
             ("GET", "/manifests/{snapshot}/{member}/{file}", "/manifests/s1/m1/a.img", None),
             ("GET", "/manifests/{snapshot}/{member}", "/manifests/s1/m1", None),
             ("PUT", "/manifests/{snapshot}/{member}/{file}", "/manifests/s1/m1/b.img",
              {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest(), "chunks": [[cid, 3]]})]
    for method, template, path, body in calls:
        connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
        connection.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                           headers={"Authorization": "Bearer tok"})
        response = connection.getresponse()
        response.read()
        connection.close()
        assert response.status in (200, 201), (method, path, response.status)
        assert str(response.status) in spec["paths"][template][method.lower()]["responses"], (method, path)
    assert content(store, "s1", "m1", "b.img")[0] == b"abc"


def test_gc_rewrites_a_pack_that_is_mostly_dead_and_verify_names_a_torn_pack(store):
    keep, drop = data_of(100_000, 8), data_of(900_000, 9)
    store.put("s1", "m1", "both.img", [keep + drop])
    store.put("s2", "m1", "keep.img", [keep])  # shares the first chunks with s1's file
    packs_before = set(os.listdir(store.pack_dir))
    store.delete("s1")
    assert content(store, "s2", "m1", "keep.img")[0] == keep
    assert set(os.listdir(store.pack_dir)) != packs_before and store.verify()["ok"]
    with open(os.path.join(store.pack_dir, sorted(p for p in os.listdir(store.pack_dir) if p.endswith(".pack"))[0]),
              "ab") as handle:
        handle.write(b"\x00" * 10)  # a torn tail (never written by the store: it renames whole packs)
    report = ChunkStore(store.root).verify()
    assert not report["ok"] and "pack" in report["damaged"][-1]


def test_a_server_killed_mid_upload_keeps_every_complete_snapshot_and_lists_no_half_one(tmp_path):
    """A real server process, SIGKILLed while a client streams a big image: after a restart the
    complete snapshot restores byte for byte, the half one is not listed, verify is clean, GC frees the rest."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = str(tmp_path / "images")

    def start():
        process = subprocess.Popen([sys.executable, "-m", "hostside.store.server", "--listen", "127.0.0.1:%d" % port,
                                    "--store", "chunks:" + root, "--token", "tok"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=1).read()
                return process
            except OSError:
                time.sleep(0.1)
        raise AssertionError("server did not start")

    complete = data_of(3_000_000, 11)
    server = start()
    try:
        client = ImageServer("http://127.0.0.1:%d" % port, "tok")
        client.upload_stream("s1", "m1", "a.img", io.BytesIO(complete))

        class Endless:  # new data forever: the upload is mid-way when the server dies
            def __init__(self):
                self.n = 0

            def read(self, size):
                self.n += 1
                if self.n == 40:
                    server.send_signal(signal.SIGKILL)
                return data_of(size, 1000 + self.n)

        with pytest.raises(StorageError):
            client.upload_stream("s2", "m1", "b.img", Endless())
        server.wait(10)
        server = start()
        client = ImageServer("http://127.0.0.1:%d" % port, "tok")
        client.download_dir("s1", "m1", str(tmp_path / "out"))
        assert (tmp_path / "out" / "a.img").read_bytes() == complete
        store = ChunkStore(root)
        assert store.snapshots() == ["s1"] and store.index("s2", "m1") is None
        assert store.verify()["ok"]
        assert store.gc()["referenced"] == len({c for c, _ in store.manifest("s1", "m1", "a.img")["chunks"]})
    finally:
        server.kill()
        server.wait(10)
