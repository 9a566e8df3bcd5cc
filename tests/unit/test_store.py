"""FileStore through the Store interface: atomic puts, index, open, delete, listing; the store registry."""

import hashlib
import json
import os

import pytest

from hostside.store import STORES, open_store, store_class
from hostside.store.base import ChecksumMismatch, FileInfo, InvalidName, NotFound, Store
from hostside.store.files import FileStore


@pytest.fixture
def store(tmp_path) -> Store:
    return open_store("file:%s" % (tmp_path / "images"))


def content(store, *where):
    chunks, info = store.open(*where)
    return b"".join(chunks), info


def leftovers(root):
    return [name for _, _, names in os.walk(root) for name in names if ".part" in name]


def test_a_put_is_visible_with_its_size_and_checksum(store):
    data = [b"a" * 1000, b"b" * 7]
    info = store.put("s1", "h1", "pages.img", iter(data), hashlib.sha256(b"".join(data)).hexdigest().upper())
    assert info == FileInfo("pages.img", 1007, hashlib.sha256(b"".join(data)).hexdigest())
    assert content(store, "s1", "h1", "pages.img") == (b"".join(data), info)
    assert store.index("s1", "h1") == [info]


def test_the_layout_on_disk_is_the_one_the_server_always_had(store):
    info = store.put("s1", "h1", "core.img", [b"xyz"])
    member = os.path.join(store.root, "s1", "h1")
    assert open(os.path.join(member, "core.img"), "rb").read() == b"xyz"
    assert json.load(open(os.path.join(member, "index.json"))) == {
        "snapshot": "s1", "member": "h1", "files": [info.as_dict()]}
    assert FileStore(store.root).index("s1", "h1") == [info]  # a store opened again reads it


def test_a_put_that_fails_mid_stream_leaves_nothing(store):
    def broken():
        yield b"x" * 4096
        raise ValueError("the body ended after 4096 of 9999 bytes")

    with pytest.raises(ValueError, match="body ended"):
        store.put("s1", "h1", "pages.img", broken())
    assert store.index("s1", "h1") is None
    with pytest.raises(NotFound):
        store.open("s1", "h1", "pages.img")
    assert not leftovers(store.root)
    assert not os.path.exists(os.path.join(store.root, "s1", "h1", "pages.img"))


def test_a_wrong_checksum_leaves_nothing_and_keeps_the_previous_version(store):
    first = store.put("s1", "h1", "pages.img", [b"old"])
    with pytest.raises(ChecksumMismatch, match="checksum mismatch for pages.img"):
        store.put("s1", "h1", "pages.img", [b"new"], "0" * 64)
    assert content(store, "s1", "h1", "pages.img") == (b"old", first)
    assert store.index("s1", "h1") == [first]
    assert not leftovers(store.root)


def test_a_second_put_replaces_the_file_in_place_in_the_index(store):
    store.put("s1", "h1", "a.img", [b"1"])
    store.put("s1", "h1", "b.img", [b"2"])
    again = store.put("s1", "h1", "a.img", [b"3!"])
    assert [f.name for f in store.index("s1", "h1")] == ["b.img", "a.img"]
    assert content(store, "s1", "h1", "a.img") == (b"3!", again)


def test_missing_things_are_not_found(store):
    store.put("s1", "h1", "a.img", [b"1"])
    for where in (("s1", "h1", "b.img"), ("s1", "h2", "a.img"), ("s2", "h1", "a.img")):
        with pytest.raises(NotFound):
            store.open(*where)
    assert store.index("s1", "h2") is None
    assert store.delete("s2") is False


def test_delete_forgets_a_snapshot_and_only_it(store):
    store.put("s1", "h1", "a.img", [b"1"])
    store.put("s2", "h1", "a.img", [b"22"])
    assert store.snapshots() == ["s1", "s2"]
    assert store.totals() == {"snapshots": 2, "files": 2, "bytes": 3}
    assert store.delete("s1") is True
    assert store.snapshots() == ["s2"] and store.index("s1", "h1") is None
    assert store.totals() == {"snapshots": 1, "files": 1, "bytes": 2}


@pytest.mark.parametrize("where", [("..", "h1", "a.img"), ("s1", "a/b", "a.img"), ("s1", "h1", ".hidden"),
                                   ("s1", "h1", "index.json"), ("s1", "h1", "")])
def test_names_that_would_escape_the_layout_are_refused_before_reading(store, where):
    def never():
        raise AssertionError("the body was read")
        yield b""  # pragma: no cover

    with pytest.raises(InvalidName):
        store.put(*where, never())
    assert store.snapshots() == []


def test_stores_are_chosen_by_scheme(tmp_path):
    from hostside.store.chunks import ChunkStore
    assert STORES == {"file": FileStore, "chunks": ChunkStore}
    assert store_class("file:/x") == (FileStore, "/x") and store_class("chunks:/x") == (ChunkStore, "/x")
    for bad in ("/just/a/path", "blocks:/x", "file:"):
        with pytest.raises(ValueError, match="scheme one of chunks, file"):
            store_class(bad)
    assert isinstance(open_store("file:%s" % tmp_path), FileStore)


def test_deletes_of_one_snapshot_at_once_delete_it_once(store):
    """Found by fuzzing with two workers: the second rmtree of a directory the first removed raised."""
    import threading
    for round_ in range(20):
        store.put("s%d" % round_, "m", "f", [b"x" * 4096])
        gate, answers = threading.Barrier(4), []

        def delete(snapshot="s%d" % round_):
            gate.wait()
            answers.append(store.delete(snapshot))
        threads = [threading.Thread(target=delete) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        assert sorted(answers) == [False, False, False, True]


def test_a_tree_is_removed_even_while_files_keep_coming_in(tmp_path):
    """A snapshot deleted while a file of it comes in: the delete wins (it was a 500, found by the API fuzz)."""
    import threading
    import time
    from hostside.store.files import remove_tree
    root = tmp_path / "snap"
    (root / "member").mkdir(parents=True)
    stop = threading.Event()

    def writer():
        index = 0
        while not stop.is_set():
            try:
                (root / "member" / ("f%d" % index)).write_bytes(b"x")
            except FileNotFoundError:
                pass  # the directory went: as a PUT finds it, "deleted meanwhile"
            index += 1
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            (root / "member").mkdir(parents=True, exist_ok=True)
            time.sleep(0.0005)  # let files come in
            remove_tree(str(root))  # shutil.rmtree: "Directory not empty" or a file gone under it
            assert not root.exists()  # (the writer makes files, never directories)
    finally:
        stop.set()
        thread.join()
