"""A directory stored as the tar of its per-file chunks (``hostside.store.tree``): the same archive as
``tarfile.add``, unchanged files not read again (stat cache, racily-clean rule, re-verified against the
server), the chunk-list checksum checked by commit, download and verify, the file-store fallback,
the tree pointer of the CRIU backend's image, and the parallel verified download."""

import io
import json
import os
import tarfile
import time

import pytest

from hostside import workdir
from hostside.orchestration import StoreSink
from hostside.store import chunking, tree
from hostside.store.base import ChecksumMismatch
from hostside.store.client import ChecksumError, ImageServer, takes_trees
from hostside.store.files import FileStore

from test_chunk_store import client, corrupt, data_of, serve, store, write  # noqa: F401 - fixtures

OLD = 1_600_000_000  # an mtime well past the racily-clean window


def make_tree(root, old=True):
    write(os.path.join(root, "seg-0.dat"), data_of(900_000, seed=1))
    write(os.path.join(root, "seg-1.dat"), data_of(500_000, seed=2))
    write(os.path.join(root, "sub", "small.txt"), b"tiny\n")
    os.makedirs(os.path.join(root, "sub", "empty"))
    open(os.path.join(root, "zero"), "w").close()
    os.symlink("seg-0.dat", os.path.join(root, "link"))
    os.link(os.path.join(root, "seg-1.dat"), os.path.join(root, "hard"))
    os.chmod(os.path.join(root, "sub", "small.txt"), 0o600)
    if old:
        age(root)


def age(root, when=OLD):
    for directory, dirs, files in os.walk(root):
        for name in files + dirs:
            os.utime(os.path.join(directory, name), (when, when), follow_symlinks=False)


def tar_of(root):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(root, arcname=".")
    return buffer.getvalue()


def test_the_pieces_make_the_archive_tarfile_add_makes(tmp_path):
    root = str(tmp_path / "w")
    make_tree(root)
    expected = tar_of(root)
    assert b"".join(tree.tar_bytes(root)) == expected
    walk = tree.TreeTar(root, chunking.Packer())
    pieces = list(walk.pieces())
    assert b"".join(p.data for p in pieces) == expected
    assert all(p.id == chunking.chunk_id(p.data) and 0 < p.size <= chunking.MAX for p in pieces)
    assert walk.stats["files"] == 3 and walk.stats["bytes"] == len(expected)


def test_a_tree_is_restored_exactly_and_a_later_upload_reads_only_what_changed(client, store, tmp_path):  # noqa: F811
    root = str(tmp_path / "w")
    make_tree(root)
    first = client.upload_tree("s1", "m1", "workdir.tar", root)
    assert first["files_read"] == 3 and first["logical_bytes"] == len(tar_of(root))
    entry = store.manifest("s1", "m1", "workdir.tar")
    assert entry["checksum"] == chunking.LIST_CHECKSUM and entry["sha256"] == chunking.list_checksum(entry["chunks"])
    with open(os.path.join(root, "seg-1.dat"), "ab") as handle:  # an append: size and mtime move
        handle.write(b"appended rows\n" * 100)
    age(root, OLD + 10)  # every mtime moved: all read again (a utime moves ctime too)
    second = client.upload_tree("s2", "m1", "workdir.tar", root)
    assert second["files_read"] == 3
    with open(os.path.join(root, "seg-1.dat"), "ab") as handle:
        handle.write(b"more rows\n" * 100)
    os.utime(os.path.join(root, "seg-1.dat"), (OLD + 20, OLD + 20))
    third = client.upload_tree("s3", "m1", "workdir.tar", root)
    assert third["files_read"] == 1 and third["bytes_read"] == os.path.getsize(os.path.join(root, "seg-1.dat"))
    assert third["sent_bytes"] < first["sent_bytes"] * 0.3 and third["stored_bytes"] < first["stored_bytes"] * 0.3
    out = tmp_path / "out"
    files = client.download_dir("s3", "m1", str(out))
    assert (out / "workdir.tar").read_bytes() == tar_of(root)
    assert files[0]["sha256"] == store.manifest("s3", "m1", "workdir.tar")["sha256"]
    extracted = tmp_path / "x"
    with tarfile.open(str(out / "workdir.tar")) as archive:
        archive.extractall(str(extracted))
    assert os.readlink(str(extracted / "link")) == "seg-0.dat" and (extracted / "sub" / "empty").is_dir()
    assert os.stat(str(extracted / "sub" / "small.txt")).st_mode & 0o777 == 0o600
    assert os.stat(str(extracted / "hard")).st_ino == os.stat(str(extracted / "seg-1.dat")).st_ino
    assert os.stat(str(extracted / "seg-0.dat")).st_mtime == OLD + 10
    assert store.verify()["ok"]


def test_the_cache_is_not_trusted_across_a_changed_stat_or_a_racily_clean_file(client, store, tmp_path):  # noqa: F811
    root = str(tmp_path / "w")
    make_tree(root)
    client.upload_tree("s1", "m1", "workdir.tar", root)
    path = os.path.join(root, "seg-0.dat")
    data = bytearray(open(path, "rb").read())
    data[1000:1004] = b"XXXX"  # same size, new content, the mtime put back: the ctime still moved
    write(path, bytes(data))
    os.utime(path, (OLD, OLD))
    again = client.upload_tree("s2", "m1", "workdir.tar", root)
    assert again["files_read"] == 1
    out = tmp_path / "out"
    client.download_dir("s2", "m1", str(out))
    assert (out / "workdir.tar").read_bytes() == tar_of(root)
    now = time.time()
    os.utime(path, (now, now))  # modified "just now": read this time and not cached for the next
    assert client.upload_tree("s3", "m1", "workdir.tar", root)["files_read"] == 1
    assert client.upload_tree("s4", "m1", "workdir.tar", root)["files_read"] == 1
    # A clone (inode numbers and ctimes new each time) is keyed on size, mtime, mode and owner only.
    copy = str(tmp_path / "clone")
    make_tree(copy)
    client.upload_tree("c1", "m2", "workdir.tar", copy, clone=True)
    os.rename(copy, copy + ".old")
    make_tree(copy)
    assert client.upload_tree("c2", "m2", "workdir.tar", copy, clone=True)["files_read"] == 0


def test_chunks_named_from_the_cache_but_collected_since_are_read_and_sent_again(client, store, tmp_path):  # noqa: F811
    root = str(tmp_path / "w")
    make_tree(root)
    client.upload_tree("s1", "m1", "workdir.tar", root)
    assert store.delete("s1") and store.totals()["chunks"] == 0  # every chunk collected
    again = client.upload_tree("s2", "m1", "workdir.tar", root)
    assert again["files_read"] == 3 and again["stored_bytes"] > 0
    out = tmp_path / "out"
    client.download_dir("s2", "m1", str(out))
    assert (out / "workdir.tar").read_bytes() == tar_of(root)
    assert client.upload_tree("s3", "m1", "workdir.tar", root)["files_read"] == 0


def test_the_chunk_list_checksum_is_checked_at_commit_download_and_verify(client, store, tmp_path):  # noqa: F811
    data = data_of(200_000)
    chunk = chunking.Packer().pack(data)
    store.store_chunks([chunk])
    entries = [[chunk.id, chunk.size]]
    with pytest.raises(ChecksumMismatch):
        store.commit("s1", "m1", "w.tar", len(data), "0" * 64, entries, checksum=chunking.LIST_CHECKSUM)
    with pytest.raises(ValueError):
        store.commit("s1", "m1", "w.tar", len(data), "0" * 64, entries, checksum="md5")
    store.commit("s1", "m1", "w.tar", len(data), chunking.list_checksum(entries), entries,
                 checksum=chunking.LIST_CHECKSUM)
    status, answer = client._call("PUT", "/manifests/s1/m1/x.tar", json.dumps(
        {"bytes": len(data), "sha256": "0" * 64, "chunks": entries, "checksum": "crc"}).encode())
    assert status == 400 and "checksum" in answer["reason"]
    corrupt(store, chunk.id)
    with pytest.raises(ChecksumError, match=chunk.id):
        client.download_dir("s1", "m1", str(tmp_path / "out"))
    assert [d["chunk"] for d in store.verify()["damaged"]] == [chunk.id]


def test_a_tree_goes_to_a_file_store_as_the_whole_archive(tmp_path):
    server = serve(FileStore(str(tmp_path / "plain")))
    try:
        plain = ImageServer("http://127.0.0.1:%d" % server.server_address[1], "tok")
        root = str(tmp_path / "w")
        make_tree(root)
        stored = plain.upload_tree("s1", "m1", "workdir.tar", root)
        assert stored["bytes"] == stored["sent_bytes"] == len(tar_of(root))
        plain.download_dir("s1", "m1", str(tmp_path / "out"))
        assert (tmp_path / "out" / "workdir.tar").read_bytes() == tar_of(root)
    finally:
        server.shutdown()
        server.server_close()


def test_the_capture_points_the_image_at_its_directory_for_the_store_client(client, store, tmp_path):  # noqa: F811
    member = str(tmp_path / "member")
    make_tree(member)
    capture = workdir.PrecopyCapture(member, stage=str(tmp_path / "stage"))
    capture.prepare()
    capture.at_freeze()
    images = tmp_path / "dump"
    images.mkdir()
    write(str(images / "pages-1.img"), data_of(100_000))
    sink = StoreSink(client, "s1", "m1")
    assert takes_trees(sink) and not takes_trees(object())
    capture.finish_tree(str(images))
    assert sorted(os.listdir(str(images))) == ["pages-1.img", "workdir.tar.tree"]
    files = sink.put_dir(str(images))
    capture.discard()
    assert [f["name"] for f in files] == ["pages-1.img", "workdir.tar"]
    out = tmp_path / "out"
    client.download_dir("s1", "m1", str(out))
    with tarfile.open(str(out / "workdir.tar")) as archive:
        archive.extractall(str(tmp_path / "x"))
    assert (tmp_path / "x" / "seg-0.dat").read_bytes() == open(os.path.join(member, "seg-0.dat"), "rb").read()
    assert tree.read_pointer(str(images / "pages-1.img")) is None
    with pytest.raises(tree.TreeChanged, match="not a directory"):  # the capture discarded: an error, not a file
        tree.read_pointer(str(images / "workdir.tar.tree"))


def test_a_large_file_downloads_through_parallel_fetches_in_order(client, store, tmp_path, monkeypatch):  # noqa: F811
    from hostside.store import client as client_module
    monkeypatch.setattr(client_module, "FETCH_CHUNKS", 2)
    data = data_of(3_000_000, seed=7)
    write(str(tmp_path / "img" / "big.img"), data)
    client.upload_dir("s1", "m1", str(tmp_path / "img"))
    assert len(store.manifest("s1", "m1", "big.img")["chunks"]) > 8
    client.download_dir("s1", "m1", str(tmp_path / "out"))
    assert (tmp_path / "out" / "big.img").read_bytes() == data


def test_the_chunk_level_comes_from_the_environment_and_bad_values_say_why(monkeypatch):
    monkeypatch.setenv("VIOLIN_CHUNK_LEVEL", "-1")
    assert chunking.Packer().level == -1
    monkeypatch.setenv("VIOLIN_CHUNK_LEVEL", "fast")
    with pytest.raises(ValueError, match="VIOLIN_CHUNK_LEVEL"):
        chunking.Packer()
    monkeypatch.delenv("VIOLIN_CHUNK_LEVEL")
    assert chunking.Packer().level == chunking.LEVEL


def test_a_precopy_stage_keeps_the_members_mtimes_so_a_later_snapshot_reads_only_what_changed(
        client, store, tmp_path):  # noqa: F811
    member = str(tmp_path / "member")
    make_tree(member)
    os.unlink(os.path.join(member, "hard"))  # (a pre-copy copies a hard link's files apart)

    def snapshot(label):
        capture = workdir.PrecopyCapture(member, stage=str(tmp_path / ("stage-" + label)))  # a fresh copy each time
        capture.prepare()
        capture.at_freeze()
        images = tmp_path / ("dump-" + label)
        images.mkdir()
        capture.finish_tree(str(images))
        stage = capture.captured()
        assert os.stat(os.path.join(stage, "seg-0.dat")).st_mtime_ns == os.stat(os.path.join(member, "seg-0.dat")).st_mtime_ns
        try:
            return StoreSink(client, label, "db").client.upload_dir(label, "db", str(images))[0]
        finally:
            capture.discard()

    assert snapshot("s1")["files_read"] == 3
    with open(os.path.join(member, "seg-1.dat"), "ab") as handle:
        handle.write(b"rows\n" * 1000)
    os.utime(os.path.join(member, "seg-1.dat"), (OLD + 5, OLD + 5))
    second = snapshot("s2")
    assert second["files_read"] == 1 and second["bytes_read"] == os.path.getsize(os.path.join(member, "seg-1.dat"))
    client.download_dir("s2", "db", str(tmp_path / "out"))
    with tarfile.open(str(tmp_path / "out" / "workdir.tar")) as archive:
        archive.extractall(str(tmp_path / "x"))
    for name in ("seg-0.dat", "seg-1.dat", "sub/small.txt"):  # the member's bytes and mtimes (directories: the stage's)
        here, there = os.path.join(member, name), str(tmp_path / "x" / name)
        assert open(here, "rb").read() == open(there, "rb").read()
        assert int(os.stat(here).st_mtime) == int(os.stat(there).st_mtime)
