"""The podman backend without podman: member specs, command lines, inspect parsing, the archive rebuilt
with the files of the cut, the namespace retargeted for a restore elsewhere, a container's tasks."""

import io
import json
import os
import re
import subprocess
import tarfile
import time

import pytest

from hostside import backends, helper
from hostside.backends import podman
from hostside.backends.base import HostSettings, ImageSink, Located

GOOD = {"listen": "127.0.0.1:7001", "token": "t", "controller_token": "c", "servers": ["http://10.0.0.5:7070"],
        "server_token": "s"}

INSPECT = {
    "Id": "c0ffee", "OCIRuntime": "runc",
    "State": {"Status": "running", "Pid": 4242},
    "HostConfig": {"NetworkMode": "ns:/run/netns/vabch1"},
    "Config": {"Annotations": {"org.criu.config": "/run/violin-podman/c1.conf", "other": "x"}},
    "GraphDriver": {"Name": "overlay", "Data": {"UpperDir": "/var/lib/containers/storage/overlay/ab/diff"}},
    "Mounts": [{"Type": "volume", "Name": "c1-data", "Source": "/var/lib/containers/storage/volumes/c1-data/_data",
                "Destination": "/data"},
               {"Type": "bind", "Source": "/work/workloads", "Destination": "/opt/violin/workloads"}],
}


def test_a_container_member_is_named_and_nothing_else():
    config = helper.parse_config(dict(GOOD, members={
        "c1": {"backend": "podman", "container": "lab-c1"},
        "c2": {"backend": "podman"},
        "c3": {"backend": "podman", "container": "c3", "netns": "/run/netns/h3", "ip": "10.0.0.3/8", "iface": "h3-eth0"}}),
        environ={})
    assert config.backends["c1"].name == "podman" and config.members["c1"].container_name == "lab-c1"
    assert config.members["c2"].container_name == "c2"  # by default the member's own name
    assert config.members["c3"].netns == "/run/netns/h3" and config.members["c3"].ip == "10.0.0.3/8"
    assert "podman" in backends.names() and backends.get("podman").sends_marker


@pytest.mark.parametrize("spec,needle", [
    ({"pid": 10}, r"members.c1: unknown key\(s\) pid"),
    ({"container": 5}, "members.c1.container"),
    ({"container": " c1"}, "members.c1.container"),
    ({"netns": "h1"}, "members.c1.netns"),
    ({"ip": "10.0.0.1"}, "members.c1.ip"),
])
def test_bad_container_specs_are_refused_with_the_key(spec, needle):
    with pytest.raises(helper.HelperConfigError, match=needle):
        helper.parse_config(dict(GOOD, members={"c1": dict(spec, backend="podman")}), environ={})


def test_checkpoint_and_restore_command_lines_use_our_criu():
    argv = podman.checkpoint_argv("c1", "/w/export.tar")
    assert argv[:3] == [podman.PODMAN, "--runtime-flag", "criu=%s" % podman.criu.CRIU]
    for flag in ("--leave-running", "--tcp-established", "--file-locks", "--print-stats"):
        assert flag in argv
    assert argv[argv.index("--export") + 1] == "/w/export.tar" and argv[-1] == "c1"
    assert argv[argv.index("--compress") + 1] == "none"
    restore = podman.restore_argv("/r/container.tar")
    assert restore[restore.index("--import") + 1] == "/r/container.tar" and "--tcp-established" in restore
    env = podman.podman_env({"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(podman.criu.CRIU)


def test_the_criu_config_file_carries_the_hook_or_leave_stopped():
    dump = podman.criu_config(action_script="/tmp/x/hook.sh")
    assert "action-script /tmp/x/hook.sh\n" in dump and "leave-stopped" not in dump
    assert "network-lock nftables" in dump
    restore = podman.criu_config(leave_stopped=True)
    assert "leave-stopped\n" in restore and "action-script" not in restore


def test_inspect_gives_what_the_backend_needs():
    found = podman.parse_inspect(INSPECT)
    assert (found.id, found.state, found.pid, found.netns) == ("c0ffee", "running", 4242, "/run/netns/vabch1")
    assert found.criu_config == "/run/violin-podman/c1.conf" and found.upper.endswith("/ab/diff")
    assert found.volumes == {"c1-data": "/var/lib/containers/storage/volumes/c1-data/_data"}
    assert podman.runnable_problem("c1", found) is None


@pytest.mark.parametrize("change,needle", [
    ({"State": {"Status": "exited", "Pid": 0}}, "exited, not running"),
    ({"HostConfig": {"NetworkMode": "bridge"}}, "network mode 'bridge'.*--network ns:"),
    ({"Config": {"Annotations": {}}}, "no org.criu.config annotation"),
    ({"OCIRuntime": "crun"}, "checkpoints need runc"),
])
def test_containers_the_backend_cannot_snapshot_are_refused_with_the_reason(change, needle):
    problem = podman.runnable_problem("c1", podman.parse_inspect(dict(INSPECT, **change)))
    assert problem and re.search(needle, problem), problem


def test_the_pause_is_criu_frozen_time_from_print_stats():
    stats = {"podman_checkpoint_duration": 345540, "container_statistics": [
        {"Id": "c0ffee", "runtime_checkpoint_duration": 296143,
         "criu_statistics": {"freezing_time": 805, "frozen_time": 206370, "memdump_time": 4816}}]}
    assert podman.frozen_ms_of(json.dumps(stats)) == pytest.approx(206.37)
    assert podman.frozen_ms_of("not json") is None and podman.frozen_ms_of("{}") is None


def test_the_member_interface_is_the_only_one_besides_lo_or_the_named_one():
    links = [{"ifname": "lo"}, {"ifname": "h1-eth0", "address": "00:00:00:00:00:01",
                                "addr_info": [{"family": "inet", "local": "10.0.0.1", "prefixlen": 8},
                                              {"family": "inet6", "local": "fe80::1", "prefixlen": 64}]}]
    assert podman.pick_iface(links, None)["ifname"] == "h1-eth0"
    assert podman.addresses_of(podman.pick_iface(links, "h1-eth0")) == ["10.0.0.1/8"]
    with pytest.raises(podman.PodmanError, match="no interface h9"):
        podman.pick_iface(links, "h9")
    with pytest.raises(podman.PodmanError, match="2 interfaces besides lo.*name the member's"):
        podman.pick_iface(links + [{"ifname": "oob"}], None)
    with pytest.raises(podman.PodmanError, match="no interfaces"):
        podman.pick_iface(links[:1], None)


def _tar(path, files):
    with tarfile.open(path, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _read(path):
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


def test_the_archive_gets_the_files_of_the_cut(tmp_path):
    _tar(tmp_path / "export.tar", {"config.dump": b"{}", "checkpoint/pages-1.img": b"P" * 100,
                                   "rootfs-diff.tar": b"late", "deleted.files": b'["/late"]',
                                   "volumes/data.tar": b"late volume"})
    podman.replace_in_archive(str(tmp_path / "export.tar"), str(tmp_path / "out.tar"), {
        "rootfs-diff.tar": b"at the cut", "deleted.files": None, "volumes/data.tar": b"volume at the cut",
        "volumes/new.tar": b"another"})
    assert _read(tmp_path / "out.tar") == {
        "config.dump": b"{}", "checkpoint/pages-1.img": b"P" * 100, "rootfs-diff.tar": b"at the cut",
        "volumes/data.tar": b"volume at the cut", "volumes/new.tar": b"another"}


def test_the_upper_directory_is_captured_as_podmans_rootfs_diff(tmp_path):
    upper = tmp_path / "diff"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_text("changed")
    (upper / "tmp").mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        deleted = podman.capture_upper(str(upper), archive)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as archive:
        names = archive.getnames()
        assert archive.extractfile("etc/motd").read() == b"changed"
    assert sorted(names) == ["etc", "etc/motd", "tmp"] and deleted == []
    if os.geteuid() == 0:  # a whiteout (char device 0:0) is a deleted file, not content
        os.mknod(str(upper / "etc" / "gone"), 0o020000 | 0o600, os.makedev(0, 0))
        with tarfile.open(fileobj=io.BytesIO(), mode="w") as archive:
            assert podman.capture_upper(str(upper), archive) == ["/etc/gone"]


def test_a_restore_elsewhere_retargets_the_network_namespace():
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/h1"}]},
            "annotations": {"x": "/run/netns/h1-not"}}
    config = {"networkMode": "ns:/run/netns/h1", "nested": [{"path": "/run/netns/h1"}]}
    assert json.loads(podman.retarget_netns(json.dumps(spec).encode(), "/run/netns/h1", "/run/netns/h3")) == {
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/h3"}]},
        "annotations": {"x": "/run/netns/h1-not"}}
    moved = json.loads(podman.retarget_netns(json.dumps(config).encode(), "/run/netns/h1", "/run/netns/h3"))
    assert moved == {"networkMode": "ns:/run/netns/h3", "nested": [{"path": "/run/netns/h3"}]}


def test_a_containers_tasks_are_its_cgroups(tmp_path):
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "cgroup").write_text("9:name=systemd:/libpod_parent/libpod-ab\n8:pids:/libpod_parent/libpod-ab\n"
                                        "0::/\n")
    (cgroups / "pids" / "libpod_parent" / "libpod-ab").mkdir(parents=True)
    (cgroups / "pids" / "libpod_parent" / "libpod-ab" / "cgroup.procs").write_text("77\n80\n91\n")
    assert podman.cgroup_tasks(77, str(proc), str(cgroups)) == [77, 80, 91]
    (proc / "78").mkdir()
    (proc / "78" / "cgroup").write_text("0::/nowhere\n")
    assert podman.cgroup_tasks(78, str(proc), str(cgroups)) == [78]  # unreadable: at least the init


class FakeRun:
    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        code, out, err = self.answers.get(argv[1:3] == ["container", "inspect"] and "inspect" or argv[-1], (0, "", ""))
        return subprocess.CompletedProcess(argv, code, out, err)


def test_a_missing_container_is_located_as_not_running_and_refused_for_operations():
    backend = podman.PodmanBackend(HostSettings(), run=FakeRun({"inspect": (125, "", "no such container")}))
    member = backend.member("c1", {"backend": "podman"})
    where = backend.locate(member)  # a helper that could host it after a restore elsewhere: not claimed
    assert where.mac is None and where.details["running"] is False and where.details["handle"] == "c1"
    with pytest.raises(podman.PodmanError, match="no container c1 on this host"):
        backend.running(member)
    with pytest.raises(podman.PodmanError, match="no container c1 on this host"):
        backend.resume(member)


def test_a_container_off_the_topology_is_refused_when_located():
    doc = dict(INSPECT, HostConfig={"NetworkMode": "slirp4netns"})
    backend = podman.PodmanBackend(HostSettings(), run=FakeRun({"inspect": (0, json.dumps([doc]), "")}))
    member = backend.member("c1", {"backend": "podman"})
    assert backend.locate(member).details["running"] is False
    with pytest.raises(podman.PodmanError, match="network mode 'slirp4netns'"):
        backend.running(member)


def test_a_container_in_another_namespace_than_the_members_is_not_claimed(tmp_path):
    """A placement target's spec names the namespace it would restore into: until then the container runs
    elsewhere (on this machine's other helper) and this helper must not register it."""
    here, there = tmp_path / "spare", tmp_path / "h3"
    here.write_text("")
    there.write_text("")
    doc = dict(INSPECT, HostConfig={"NetworkMode": "ns:%s" % there})
    backend = podman.PodmanBackend(HostSettings(), run=FakeRun({"inspect": (0, json.dumps([doc]), "")}))
    member = backend.member("c1", {"backend": "podman", "netns": str(here)})
    where = backend.locate(member)
    assert where.mac is None and where.details["running"] is False
    with pytest.raises(podman.PodmanError, match="runs in %s, not in this helper's %s" % (there, here)):
        backend.running(member)
    assert podman.same_netns(str(there), str(there)) and not podman.same_netns(str(here), str(there))
    assert podman.same_netns("/run/netns/none-such/../x", "/run/netns/x")  # not there: by path


def test_podman_missing_is_a_clear_error():
    def run(argv, **kwargs):
        raise FileNotFoundError(argv[0])
    backend = podman.PodmanBackend(HostSettings(), run=run)
    with pytest.raises(podman.PodmanError, match="podman is not installed"):
        backend.podman(["podman", "ps"])


def test_a_staged_image_must_be_of_the_member(tmp_path):
    backend = podman.PodmanBackend(HostSettings(), run=FakeRun({}))
    member = backend.member("c1", {"backend": "podman"})
    with pytest.raises(podman.PodmanError, match="no readable member.json"):
        backend.stage(member, str(tmp_path))
    (tmp_path / "member.json").write_text(json.dumps({"container": "c9"}))
    (tmp_path / "container.tar").write_bytes(b"")
    with pytest.raises(podman.PodmanError, match="container c9, not c1"):
        backend.stage(member, str(tmp_path))
    (tmp_path / "member.json").write_text(json.dumps({"container": "c1"}))
    backend.stage(member, str(tmp_path))


@pytest.fixture
def hook_cache(tmp_path, monkeypatch):
    from hostside.backends import handover
    monkeypatch.setattr(handover, "CACHE", str(tmp_path / "hook-cache"))
    return str(tmp_path / "hook-cache")


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("fails", [False, True])
def test_the_post_dump_hook_hands_over_and_answers(fails, native, hook_cache):
    """The action script (compiled, or bash) runs on_frozen at post-dump only; an error in it makes the
    script (so CRIU) fail."""
    from hostside.backends import handover as handovers
    frozen_hand_over = handovers.frozen_hand_over
    if native and handovers.native_hook(5, hook_cache) is None:
        pytest.skip("no C compiler here: the bash hook serves")
    ran = []

    def on_frozen():
        ran.append(True)
        if fails:
            raise RuntimeError("controller refused the cut")

    with frozen_hand_over(on_frozen, timeout=5, native=native) as handover:
        assert handover.native == native and os.access(handover.script, os.X_OK)
        other = subprocess.run([handover.script], env={"CRTOOLS_SCRIPT_ACTION": "network-lock", "PATH": os.defpath})
        assert other.returncode == 0 and not ran  # other actions pass through
        hook = subprocess.run([handover.script], env={"CRTOOLS_SCRIPT_ACTION": "post-dump", "PATH": os.defpath})
    assert ran and handover.fired and (hook.returncode != 0) == fails
    if fails:
        with pytest.raises(RuntimeError, match="refused the cut"):
            handover.raise_error()
    else:
        handover.raise_error()


def test_the_compiled_hook_gives_up_when_nobody_answers(tmp_path, hook_cache):
    """A helper that died never leaves a member frozen: no answer within the timeout, the hook fails."""
    from hostside.backends import handover
    binary = handover.native_hook(1, hook_cache)
    if binary is None:
        pytest.skip("no C compiler here: the bash hook serves")
    control = tmp_path / "control"
    control.mkdir()
    os.mkfifo(str(control / "request"))
    os.mkfifo(str(control / "reply"))
    os.symlink(binary, str(control / "posthook"))
    started = time.monotonic()
    gave_up = subprocess.run([str(control / "posthook")], env={"CRTOOLS_SCRIPT_ACTION": "post-dump"}, timeout=10)
    assert gave_up.returncode == 1 and 0.9 < time.monotonic() - started < 5
    assert handover.native_hook(1, hook_cache) == binary  # built once


def test_no_place_to_build_the_hook_means_the_bash_one(tmp_path, monkeypatch):
    from hostside.backends import handover
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert handover.native_hook(3, str(blocked / "cache")) is None
    monkeypatch.setattr(handover, "CACHE", str(blocked / "cache"))
    with handover.frozen_hand_over(lambda: None, timeout=3) as hand:
        assert not hand.native and open(hand.script).read().startswith("#!/bin/bash")


def test_a_hook_that_never_fires_leaves_nothing_waiting():
    from hostside.backends.handover import frozen_hand_over
    with frozen_hand_over(lambda: None, timeout=5) as handover:
        script = handover.script
    assert not handover.fired and not os.path.exists(script)


class _Turns:
    """Stands in for the helper's freeze slots: records whether a checkpoint ran inside one."""

    def __init__(self, steps):
        self.steps = steps

    def __enter__(self):
        self.steps.append("slot")

    def __exit__(self, *_exc):
        self.steps.append("slot freed")


def _checkpointing(tmp_path, monkeypatch, archive, pause_ms, steps):
    """A podman backend whose checkpoint (logged in ``steps``) writes ``archive``, and its member c1."""
    backend = podman.PodmanBackend(HostSettings(work_dir=str(tmp_path)), run=FakeRun({}))
    member = backend.member("c1", {"backend": "podman"})
    where = Located("02:00:00:00:00:01", iface="eth0", pid=4242, netns="/run/netns/vabch1", port="veth1",
                    details={"running": True, "addresses": [], "volumes": {}, "criu_config": "x"})
    monkeypatch.setattr(backend, "running", lambda m: where)

    def checkpoint(member, where, work, at_cut, cut_called, resumed, prepare):
        steps.append("checkpoint")
        with open(os.path.join(work, podman.ARCHIVE), "wb") as handle:
            handle.write(archive)
        return {"pause_ms": pause_ms}
    monkeypatch.setattr(backend, "_checkpoint", checkpoint)
    return backend, member


def test_a_checkpoint_takes_the_helpers_freeze_slot_and_stores_once_the_others_are_through(tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(podman.criu, "FREEZE_TURNS", _Turns(steps))
    backend, member = _checkpointing(tmp_path, monkeypatch, b"tar", 12.5, steps)

    class Sink(ImageSink):
        snapshot, member = "s1", "c1"

        def put_dir(self, directory):
            raise AssertionError("not used")

        def put_stream(self, name, reader):
            steps.append("store " + name)
            return {"name": name, "bytes": len(reader.read()), "sha256": "0"}

        def settle(self):
            steps.append("settle")
    report = backend.snapshot(member, Sink(), at_cut=lambda: None)
    assert steps == ["slot", "checkpoint", "slot freed", "settle", "store " + podman.IDENTITY, "store " + podman.ARCHIVE]
    assert report.pause_ms == 12.5


def test_a_checkpoint_stored_is_kept_here_as_stored(tmp_path, monkeypatch):
    """The identity and the archive, byte for byte as stored, go to the helper's kept images: a restore
    here stages them (checked by sha256) instead of downloading them."""
    import hashlib
    from hostside.kept import KeptImages
    backend, member = _checkpointing(tmp_path, monkeypatch, b"the checkpoint", 1.0, [])
    kept = KeptImages(str(tmp_path / "kept"))

    class Sink(ImageSink):
        snapshot, member = "s1", "c1"

        def put_dir(self, directory):
            raise AssertionError("not used")

        def put_stream(self, name, reader):
            data = reader.read()
            return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

        def keep(self, directory, files, trees=None):
            return kept.take(self.member, self.snapshot, directory, files, trees)
    report = backend.snapshot(member, Sink(), at_cut=lambda: None)
    assert kept.snapshots("c1") == ["s1"] and sorted(os.listdir(tmp_path / "s1")) == []
    assert kept.stage("c1", "s1", report.files, str(tmp_path / "restore")) is not None
    assert (tmp_path / "restore" / podman.ARCHIVE).read_bytes() == b"the checkpoint"
