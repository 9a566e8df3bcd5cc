"""hostside/workdir.py: the delta planning, the append-only rule, copy-on-write detection (no root)."""

import os
import tarfile

import pytest

from hostside import workdir
from hostside.workdir import Entry, plan_delta


def f(size, mtime=1, ino=7, ctime=None, mode=0o644):
    return Entry("file", size, mtime, mtime if ctime is None else ctime, ino, mode)


def test_unchanged_files_are_not_copied():
    before = {"a": f(10), "d": Entry("dir", mode=0o755)}
    assert plan_delta(before, dict(before)).empty()


def test_a_new_or_replaced_file_is_copied_whole():
    delta = plan_delta({"a": f(10, ino=1)}, {"a": f(10, ino=2), "b": f(3)})
    assert sorted(delta.whole) == ["a", "b"] and not delta.tails


def test_a_grown_file_is_copied_from_its_old_end_only_when_its_writers_only_append():
    before, now = {"log": f(100, mtime=1)}, {"log": f(150, mtime=2)}
    assert plan_delta(before, now, {"log"}).tails == [("log", 100)]
    assert plan_delta(before, now).whole == ["log"]  # a writer without O_APPEND: in place, maybe


def test_a_shrunk_or_rewritten_file_is_copied_whole_even_if_append_only():
    assert plan_delta({"log": f(100)}, {"log": f(60, mtime=2)}, {"log"}).whole == ["log"]
    assert plan_delta({"log": f(100)}, {"log": f(100, mtime=2)}, {"log"}).whole == ["log"]


def test_removed_paths_go_children_first_and_new_dirs_parents_first():
    before = {"d": Entry("dir", mode=0o755), os.path.join("d", "x"): f(1)}
    now = {"e": Entry("dir", mode=0o755), os.path.join("e", "f"): Entry("dir", mode=0o700)}
    delta = plan_delta(before, now)
    assert delta.remove == [os.path.join("d", "x"), "d"] and delta.dirs == ["e", os.path.join("e", "f")]


def test_a_path_that_changed_kind_is_removed_then_made():
    delta = plan_delta({"p": f(5)}, {"p": Entry("link", target="q")})
    assert delta.remove == ["p"] and delta.links == ["p"]


def test_delta_bytes_count_tails_from_their_offset():
    now = {"a": f(10), "b": f(50)}
    delta = workdir.Delta(whole=["a"], tails=[("b", 40)])
    assert delta.bytes(now) == 20


def test_writers_tell_append_only_descriptors_from_others(tmp_path):
    appended, rewritten = tmp_path / "appended", tmp_path / "rewritten"
    with open(appended, "a") as log, open(rewritten, "r+" if rewritten.exists() else "w") as db:
        append, other, mapped = workdir.writers([os.getpid()], str(tmp_path))
        keys = lambda path: (os.stat(path).st_dev, os.stat(path).st_ino)  # noqa: E731
        assert keys(appended) in append and keys(appended) not in other
        assert keys(rewritten) in other and keys(rewritten) not in append
        scanned = workdir.scan(str(tmp_path))
        assert workdir.append_only_files(scanned, str(tmp_path), [os.getpid()]) == {"appended"}
        log.write("x")
        db.write("y")


def test_precopy_copies_only_the_tail_of_an_appended_file_while_frozen(tmp_path):
    member = tmp_path / "member"
    member.mkdir()
    (member / "static").write_bytes(b"s" * 5000)
    os.utime(member / "static", ns=(10**9, 10**9))  # long before the scans: not racily clean
    with open(member / "data.log", "ab") as log:
        log.write(b"a" * 300000)
        log.flush()
        capture = workdir.PrecopyCapture(str(member), lambda: [os.getpid()], small=1)
        capture.prepare()
        log.write(b"b" * 1000)
        log.flush()
        capture.at_freeze()
        assert capture.frozen_bytes == 1000  # the appended tail, nothing else
        images = tmp_path / "images"
        images.mkdir()
        capture.finish(str(images))
    with tarfile.open(images / workdir.ARCHIVE) as archive:
        assert archive.extractfile("./data.log").read() == b"a" * 300000 + b"b" * 1000
        assert archive.extractfile("./static").read() == b"s" * 5000
    assert not os.path.exists(capture.stage)


def test_precopy_copies_a_file_changed_in_place_whole(tmp_path):
    member = tmp_path / "member"
    member.mkdir()
    (member / "db").write_bytes(b"0" * 8192)
    capture = workdir.PrecopyCapture(str(member), lambda: [], small=1)
    capture.prepare()
    with open(member / "db", "r+b") as db:
        db.seek(10)
        db.write(b"XY")
    os.utime(member / "db", ns=(1, 2))  # a changed mtime even where timestamps are coarse
    capture.at_freeze()
    assert capture.frozen_bytes == 8192
    with open(os.path.join(capture.stage, "db"), "rb") as copy:
        assert copy.read(12)[10:] == b"XY"
    capture.discard()


def test_a_truncated_and_regrown_append_only_file_fails_the_canary_and_is_copied_whole(tmp_path):
    member = tmp_path / "member"
    member.mkdir()
    with open(member / "log", "ab") as log:
        log.write(b"a" * 10000)
        log.flush()
        capture = workdir.PrecopyCapture(str(member), lambda: [os.getpid()], small=1)
        capture.prepare()
        log.truncate(0)
        log.write(b"c" * 12000)
        log.flush()
        capture.at_freeze()
    assert capture.frozen_bytes == 12000
    with open(os.path.join(capture.stage, "log"), "rb") as copy:
        assert copy.read() == b"c" * 12000
    capture.discard()


def test_removed_files_leave_the_copy(tmp_path):
    member = tmp_path / "member"
    (member / "sub").mkdir(parents=True)
    (member / "sub" / "gone").write_text("x")
    capture = workdir.PrecopyCapture(str(member), lambda: [])
    capture.prepare()
    (member / "sub" / "gone").unlink()
    os.symlink("elsewhere", member / "link")
    capture.at_freeze()
    assert sorted(os.listdir(os.path.join(capture.stage, "sub"))) == []
    assert os.readlink(os.path.join(capture.stage, "link")) == "elsewhere"
    capture.discard()


def test_capture_for_chooses_precopy_where_reflinks_fail(tmp_path, monkeypatch):
    member = tmp_path / "m"
    member.mkdir()
    monkeypatch.setattr(workdir, "can_reflink", lambda path: False)
    monkeypatch.setattr(workdir, "is_btrfs_subvolume", lambda path: False)
    assert isinstance(workdir.capture_for(str(member)), workdir.PrecopyCapture)
    with pytest.raises(workdir.WorkdirError, match="reflink"):
        workdir.capture_for(str(member), mode="clone")
    monkeypatch.setattr(workdir, "can_reflink", lambda path: True)
    capture = workdir.capture_for(str(member))
    assert isinstance(capture, workdir.CloneCapture) and capture.method == "reflink"
    with pytest.raises(ValueError, match="auto, clone or precopy"):
        workdir.capture_for(str(member), mode="fast")
    with pytest.raises(workdir.WorkdirError, match="not a directory"):
        workdir.capture_for(str(tmp_path / "missing"))


def test_can_reflink_is_tried_not_guessed(tmp_path, monkeypatch):
    def refuse(source, target):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(workdir, "reflink", refuse)
    assert workdir.can_reflink(str(tmp_path / "m")) is False
    assert os.listdir(tmp_path) == []  # the probe is gone


def test_btrfs_ioctl_arguments_are_the_kernels_layout():
    v2 = workdir._vol_args(5, "snap", True)
    assert len(v2) == 4096 and v2[:8] == (5).to_bytes(8, "little") and v2[56:60] == b"snap"
    v1 = workdir._vol_args(0, "snap", False)
    assert len(v1) == 4096 and v1[8:12] == b"snap"


def test_tree_pids_finds_this_process():
    assert os.getpid() in workdir.tree_pids(os.getpid())


def test_mapped_files_are_copied_whole_even_when_they_look_unchanged():
    before = {"progress": f(64), "log": f(10)}
    assert plan_delta(before, dict(before), always={"progress"}).whole == ["progress"]


def test_racily_clean_files_count_as_changed_unless_only_appended():
    before, now = {"db": f(64, mtime=1000), "log": f(10, mtime=1000)}, {"db": f(64, mtime=1000), "log": f(10, mtime=1000)}
    assert plan_delta(before, now, {"log"}, racy_since=1000).whole == ["db"]  # written in the scan's tick
    assert plan_delta(before, now, {"log"}, racy_since=1000 + 10 * workdir.RACY_NS).empty()


def test_a_shared_writable_mapping_is_seen(tmp_path):
    import mmap
    path = tmp_path / "progress"
    path.write_bytes(b"\0" * 4096)
    with open(path, "r+b") as handle:
        mapping = mmap.mmap(handle.fileno(), 0)
        try:
            scanned = workdir.scan(str(tmp_path))
            assert workdir.classify(scanned, str(tmp_path), [os.getpid()])[1] == {"progress"}
        finally:
            mapping.close()
