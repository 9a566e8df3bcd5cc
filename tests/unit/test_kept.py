"""Images a helper keeps after storing them, and restores here staged from them (hostside.kept)."""

import hashlib
import os

import pytest

import fakebackend
from hostside import helper, kept, orchestration
from test_helper_orchestration import SNAPSHOT, Rig


def image(directory, **files):
    os.makedirs(directory, exist_ok=True)
    listing = []
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
        listing.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return listing


def test_a_kept_image_is_linked_into_the_restore_directory_and_checked(tmp_path):
    images = kept.KeptImages(str(tmp_path / "kept"))
    files = image(str(tmp_path / "dump"), **{"pages-1.img": b"p" * 3000, "identity.json": b"{}"})
    assert images.take("m1", "s1", str(tmp_path / "dump"), files)
    assert not (tmp_path / "dump").exists()  # moved, not copied
    staged = images.stage("m1", "s1", files, str(tmp_path / "restore"))
    assert staged["files"] == files and staged["check_ms"] >= 0
    assert sorted(os.listdir(tmp_path / "restore")) == ["identity.json", "pages-1.img"]
    assert (tmp_path / "restore" / "pages-1.img").read_bytes() == b"p" * 3000


def test_only_the_snapshot_recorded_is_staged(tmp_path):
    images = kept.KeptImages(str(tmp_path / "kept"))
    files = image(str(tmp_path / "dump"), memory=b"one")
    images.take("m1", "s1", str(tmp_path / "dump"), files)
    target = str(tmp_path / "restore")
    assert images.stage("m1", "s2", files, target) is None  # another snapshot
    assert images.stage("m2", "s1", files, target) is None  # another member
    other = [dict(files[0], sha256="0" * 64)]
    assert images.stage("m1", "s1", other, target) is None and not os.path.exists(target)  # another image
    assert images.stage("m1", "s1", files + [{"name": "x", "sha256": "1" * 64}], target) is None
    assert images.stage("m1", "s1", files, target) is not None


def test_a_kept_file_changed_on_disk_is_not_used_and_the_image_is_forgotten(tmp_path):
    images = kept.KeptImages(str(tmp_path / "kept"))
    files = image(str(tmp_path / "dump"), memory=b"the state")
    images.take("m1", "s1", str(tmp_path / "dump"), files)
    with open(tmp_path / "kept" / "m1" / "s1" / "memory", "r+b") as handle:
        handle.write(b"X")  # same size, other content
    target = str(tmp_path / "restore")
    assert images.stage("m1", "s1", files, target) is None
    assert not os.path.exists(target) and images.snapshots("m1") == []


def test_only_the_newest_are_kept(tmp_path):
    for keep in (1, 2):
        images = kept.KeptImages(str(tmp_path / ("kept%d" % keep)), keep=keep)
        for number in range(1, 4):
            files = image(str(tmp_path / "dump"), memory=b"state %d" % number)
            assert images.take("m1", "s%d" % number, str(tmp_path / "dump"), files)
            os.utime(str(tmp_path / ("kept%d" % keep) / "m1" / ("s%d.json" % number)), (number, number))
        assert images.snapshots("m1") == ["s3", "s2"][:keep][::-1]
        assert sorted(os.listdir(tmp_path / ("kept%d" % keep) / "m1")) == sorted(
            n for s in images.snapshots("m1") for n in (s, s + ".json"))


def test_nothing_is_kept_with_keep_0_or_when_the_directory_is_not_the_stored_files(tmp_path):
    files = image(str(tmp_path / "dump"), memory=b"state")
    assert not kept.KeptImages(str(tmp_path / "k0"), keep=0).take("m1", "s1", str(tmp_path / "dump"), files)
    images = kept.KeptImages(str(tmp_path / "kept"))
    (tmp_path / "dump" / "workdir.tar.tree").write_text("{}")  # a tree stored under another name
    assert not images.take("m1", "s1", str(tmp_path / "dump"), files + [{"name": "workdir.tar", "bytes": 1,
                                                                          "sha256": "0" * 64}])
    assert not images.take("m1", "s1", str(tmp_path / "dump"), files)  # an extra file
    os.unlink(tmp_path / "dump" / "workdir.tar.tree")
    os.makedirs(tmp_path / "dump" / "sub")
    assert not images.take("m1", "s1", str(tmp_path / "dump"), files)  # a subdirectory
    assert (tmp_path / "dump" / "memory").exists() and images.snapshots("m1") == []


def test_a_keep_cut_short_is_never_used_and_is_cleared_by_the_next(tmp_path):
    images = kept.KeptImages(str(tmp_path / "kept"))
    files = image(str(tmp_path / "kept" / "m1" / "s1"), memory=b"renamed, list never written")
    assert images.stage("m1", "s1", files, str(tmp_path / "restore")) is None and images.snapshots("m1") == []
    images.take("m1", "s2", str(tmp_path / "dump"), image(str(tmp_path / "dump"), memory=b"next"))
    assert sorted(os.listdir(tmp_path / "kept" / "m1")) == ["s2", "s2.json"]


def test_forget(tmp_path):
    images = kept.KeptImages(str(tmp_path / "kept"), keep=2)
    for snapshot in ("s1", "s2"):
        images.take("m1", snapshot, str(tmp_path / "dump"), image(str(tmp_path / "dump"), memory=snapshot.encode()))
    images.forget("m1", "s1")
    assert images.snapshots("m1") == ["s2"]
    images.forget("m1")
    assert images.snapshots("m1") == [] and not (tmp_path / "kept" / "m1").exists()


def keeping_rig(tmp_path, **config):
    rig = Rig(tmp_path)
    rig.backend.keeps = True
    if config:
        rig.helper.kept = kept.KeptImages(str(tmp_path / "kept"), **config)
    downloads = []
    client = rig.helper.store

    def store(url):
        made = client(url)
        original = made.download_dir
        made.download_dir = lambda *args: (downloads.append(args[:2]), original(*args))[1]
        return made
    rig.helper.store = store
    return rig, downloads


def stage_body(rig, snapshot="s1"):
    done = rig.reported("done")[-1]
    return {"snapshot": snapshot, "member": "f1", "server": done["server"], "files": done["image"]["files"]}


def test_the_helper_stages_its_own_last_image_without_downloading_it(tmp_path):
    with fakebackend.registered():
        rig, downloads = keeping_rig(tmp_path)
        rig.helper.start_snapshot(SNAPSHOT)
        assert rig.helper.kept.snapshots("f1") == ["s1"]
        answer = rig.helper.stage(stage_body(rig))
        assert answer["from"] == "kept" and downloads == []
        assert ("stage", "f1", ["memory"]) in rig.timeline
        assert rig.helper.restore({"snapshot": "s1", "member": "f1"})["restored"] == "f1"


def test_a_kept_image_that_differs_is_downloaded_instead(tmp_path):
    with fakebackend.registered():
        rig, downloads = keeping_rig(tmp_path)
        rig.helper.start_snapshot(SNAPSHOT)
        with open(tmp_path / "kept" / "f1" / "s1" / "memory", "ab") as handle:
            handle.write(b" changed")
        answer = rig.helper.stage(stage_body(rig))
        assert answer["from"] == "server" and downloads == [("s1", "f1")]
        assert (tmp_path / "restore" / "s1" / "f1" / "memory").read_bytes() == b"state of f1"


def test_keep_images_0_downloads_every_time(tmp_path):
    with fakebackend.registered():
        rig, downloads = keeping_rig(tmp_path, keep=0)
        rig.helper.start_snapshot(SNAPSHOT)
        assert rig.helper.stage(stage_body(rig))["from"] == "server" and len(downloads) == 1


def test_a_discarded_image_is_not_kept(tmp_path):
    with fakebackend.registered():
        rig, _ = keeping_rig(tmp_path)
        def post(url, body):  # the controller aborted the snapshot meanwhile: the image is discarded
            if url.endswith("/done"):
                raise orchestration.ControllerError("controller answered 409 to done: aborted", 409)
            return {}
        rig.helper.post = post
        rig.helper.start_snapshot(SNAPSHOT)
        assert rig.helper.kept.snapshots("f1") == []


def test_a_removed_member_has_nothing_kept(tmp_path):
    with fakebackend.registered():
        rig, _ = keeping_rig(tmp_path)
        rig.helper.start_snapshot(SNAPSHOT)
        rig.helper.remove_member("f1")
        assert not (tmp_path / "kept" / "f1").exists()


def test_keep_images_is_a_helper_setting(tmp_path):
    raw = {"token": "t", "controller_token": "c", "server_token": "s", "servers": ["http://store:7070"],
           "work_dir": str(tmp_path), "members": {}}
    assert helper.parse_config(raw, environ={}).keep_images == kept.KEEP_IMAGES == 1
    assert helper.parse_config(dict(raw, keep_images=0), environ={}).keep_images == 0
    with pytest.raises(helper.HelperConfigError, match="keep_images"):
        helper.parse_config(dict(raw, keep_images=-1), environ={})


def test_a_directory_stored_as_a_tree_is_kept_and_staged_as_the_tar_its_upload_sent(tmp_path):
    from hostside.store import chunking, tree
    root = tmp_path / "dump.workdir"
    (root / "sub").mkdir(parents=True)
    (root / "data").write_bytes(os.urandom(200000))
    (root / "sub" / "log").write_text("appended\n")
    entries = [(p.id, p.size) for p in tree.TreeTar(str(root), chunking.Packer(), None, trust=False).pieces()]
    files = image(str(tmp_path / "dump"), memory=b"pages")
    tree.write_pointer(str(tmp_path / "dump"), "workdir.tar", str(root))
    files.append({"name": "workdir.tar", "bytes": 1, "sha256": chunking.list_checksum(entries)})
    images = kept.KeptImages(str(tmp_path / "kept"))
    assert images.take("m1", "s1", str(tmp_path / "dump"), files, {"workdir.tar": str(root)})
    assert not root.exists() and not (tmp_path / "dump").exists()
    target = tmp_path / "restore"
    assert images.stage("m1", "s1", files, str(target)) is not None
    assert sorted(os.listdir(target)) == ["memory", "workdir.tar"]
    import tarfile
    with tarfile.open(target / "workdir.tar") as archive:
        assert archive.extractfile("./sub/log").read() == b"appended\n"
    # a change in the kept copy is caught by the chunk list's checksum
    (tmp_path / "kept" / "m1" / "s1" / kept.TREES / "workdir.tar" / "sub" / "log").write_text("appendeX\n")
    assert images.stage("m1", "s1", files, str(target)) is None and images.snapshots("m1") == []


def test_a_tree_that_cannot_be_moved_keeps_nothing(tmp_path):
    files = image(str(tmp_path / "dump"), memory=b"pages")
    from hostside.store import tree
    tree.write_pointer(str(tmp_path / "dump"), "workdir.tar", str(tmp_path / "gone"))
    files.append({"name": "workdir.tar", "bytes": 1, "sha256": "0" * 64})
    images = kept.KeptImages(str(tmp_path / "kept"))
    assert not images.take("m1", "s1", str(tmp_path / "dump"), files, {"workdir.tar": str(tmp_path / "gone")})
    assert (tmp_path / "dump" / "memory").exists() and os.listdir(tmp_path / "kept" / "m1") == []


def test_a_private_file_is_staged_as_a_copy_so_the_restored_member_cannot_write_to_the_kept_one(tmp_path):
    """A VM's disk is the restored guest's own file from then on: linking it would let the guest write
    into the kept image (which the next stage would then find changed, and download)."""
    images = kept.KeptImages(str(tmp_path / "kept"))
    files = image(str(tmp_path / "vm"), **{"vm.save": b"ram" * 1000, "disk-vda.qcow2": b"disk" * 1000})
    assert images.take("vm1", "s1", str(tmp_path / "vm"), files, private=["disk-vda.qcow2"])
    target = tmp_path / "restore"
    assert images.stage("vm1", "s1", files, str(target)) is not None
    kept_dir = tmp_path / "kept" / "vm1" / "s1"
    assert os.stat(target / "vm.save").st_ino == os.stat(kept_dir / "vm.save").st_ino  # linked
    assert os.stat(target / "disk-vda.qcow2").st_ino != os.stat(kept_dir / "disk-vda.qcow2").st_ino
    with open(target / "disk-vda.qcow2", "r+b") as handle:
        handle.write(b"guest writes")
    assert (kept_dir / "disk-vda.qcow2").read_bytes() == b"disk" * 1000
    assert images.stage("vm1", "s1", files, str(tmp_path / "again")) is not None  # still the snapshot's image
