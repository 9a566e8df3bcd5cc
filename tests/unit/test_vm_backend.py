"""The libvirt backend's pure parts: save-file header, disk check, the tap drain proof's reading,
the check that a QEMU keeps every guest write in a live migration."""

import hashlib
import os

import pytest

from hostside.backends import libvirt as vm

XML = "<domain type='qemu'><name>v1</name><devices>%s</devices></domain>"


def test_save_header_is_libvirts_92_bytes_then_the_xml():
    head = vm.save_header(XML % "")
    assert head[:16] == b"LibvirtQemudSave" and vm.SAVE_HEADER.size == 92
    assert head.endswith(b"</domain>\0")
    assert vm.read_save_header(head + b"QEVM...") == XML % ""


@pytest.mark.parametrize("data,needle", [(b"short", "92|bytes"), (b"X" * 200, "not a libvirt save file")])
def test_a_file_that_is_no_save_file_is_refused(data, needle):
    with pytest.raises(vm.VmError, match=needle):
        vm.read_save_header(data)


def test_writable_disks_are_found_and_readonly_ones_ignored():
    disks = ("<disk type='file' device='disk'><target dev='vda'/></disk>"
             "<disk type='file' device='cdrom'><target dev='sdb'/><readonly/></disk>"
             "<disk type='file' device='disk'><target dev='vdb'/><readonly/></disk>")
    assert vm.writable_disks(XML % disks) == ["vda"]
    assert vm.writable_disks(XML % "") == []


def test_only_writable_file_disks_can_be_captured():
    disks = ("<disk type='file' device='disk'><source file='/img/a.qcow2'/><target dev='vda'/></disk>"
             "<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdb'/></disk>"
             "<disk type='network' device='disk'><target dev='vdc'/><readonly/></disk>")
    assert vm.uncapturable_disks(XML % disks) == ["vdb (type block)"]
    assert vm.disk_sources(XML % disks) == {"vda": "/img/a.qcow2"}


def test_a_restored_disk_comes_back_on_its_standalone_image():
    disks = ("<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/img/a.raw'/>"
             "<backingStore type='file'><source file='/img/base'/></backingStore><target dev='vda'/></disk>"
             "<disk type='file' device='disk'><source file='/img/b.qcow2'/><target dev='vdb'/></disk>")
    xml = vm.retarget_disks(XML % disks, {"vda": "/img/v1-vda.restored-1.qcow2"})
    assert vm.disk_sources(xml) == {"vda": "/img/v1-vda.restored-1.qcow2", "vdb": "/img/b.qcow2"}
    assert "type=\"qcow2\"" in xml and "/img/base" not in xml and "<backingStore />" in xml
    with pytest.raises(vm.VmError, match="no disk vdz"):
        vm.retarget_disks(XML % disks, {"vdz": "/x"})


@pytest.mark.parametrize("inserted, filename", [
    ({"file": "/img/a.qcow2"}, "/img/a.qcow2"),
    ({"file": 'json:{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": "/img/r.qcow2"}}'},
     "/img/r.qcow2"),
])
def test_the_image_file_of_a_block_node_is_read_from_either_form(inserted, filename):
    assert vm._image_filename(inserted) == filename


def test_a_block_node_without_a_local_file_is_refused():
    with pytest.raises(vm.VmError, match="cannot tell the image file"):
        vm._image_filename({"node-name": "n1", "file": "nbd://server/export"})


def test_packet_socket_backlog_sums_the_sockets_on_one_interface(tmp_path):
    table = tmp_path / "packet"
    table.write_text(
        "sk               RefCnt Type Proto  Iface R Rmem   User   Inode\n"
        "ffff8881 3      3    0003   7     1 0      0      1001\n"
        "ffff8882 3      3    0003   9     1 2304   0      1002\n"
        "ffff8883 3      3    0003   9     1 768    0      1003\n")
    assert vm.packet_socket_backlog(9, str(table)) == 3072
    assert vm.packet_socket_backlog(7, str(table)) == 0
    assert vm.packet_socket_backlog(8, str(table)) is None  # nobody reads it: no drain proof possible


def test_a_restored_nic_is_moved_to_the_new_hosts_tap():
    xml = XML % ("<interface type='ethernet'><mac address='52:54:00:00:00:11'/>"
                 "<target dev='tapA' managed='no'/><model type='virtio'/></interface>")
    moved = vm.retarget_nic(xml, "52:54:00:00:00:11", "tapB")
    assert "tapB" in moved and "tapA" not in moved
    assert vm.retarget_nic(xml, "52:54:00:00:00:11", "tapA") == xml
    with pytest.raises(vm.VmError, match="which NIC"):
        vm.retarget_nic(xml, "52:54:00:00:00:99", "tapB")


QEMU_72_DEBIAN = {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}


def test_a_tcg_guest_of_an_unfixed_qemu_is_refused_with_the_reason():
    reason = vm.precopy_loses_writes(False, QEMU_72_DEBIAN)
    assert reason and "7.2.22" in reason and "loses guest writes" in reason and "install_qemu.sh" in reason


@pytest.mark.parametrize("kvm, version", [
    (True, QEMU_72_DEBIAN),  # KVM's dirty log is not affected
    (False, {"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": ""}),  # fixed upstream
    (False, {"qemu": {"major": 10, "minor": 1, "micro": 2}, "package": "Debian 1:10.1"}),
    (False, {"qemu": {"major": 7, "minor": 2, "micro": 22},
             "package": " (Debian 1:7.2+dfsg-7+deb12u18 + violin TCG dirty-bitmap fix)"}),  # install_qemu.sh
])
def test_qemus_that_track_every_write_are_accepted(kvm, version):
    assert vm.precopy_loses_writes(kvm, version) is None


def test_the_fix_mark_is_the_one_install_qemu_builds_with():
    script = open(os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "install_qemu.sh")).read()
    assert 'FIX_MARK="%s"' % vm.TCG_MIGRATION_FIX_MARK in script


def test_staged_disk_images_are_found_by_their_target(tmp_path):
    for name in ("vm.save", "disk-vda.qcow2", "disk-vdb.qcow2", "disk-.qcow2", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert vm.staged_disks(str(tmp_path)) == {"vda": str(tmp_path / "disk-vda.qcow2"),
                                              "vdb": str(tmp_path / "disk-vdb.qcow2")}


def test_two_vms_of_one_snapshot_store_their_disks_at_once_each_in_its_own_scratch(tmp_path, monkeypatch):
    """After the upload gate every VM of a snapshot stores its disks at the same moment: one's cleanup
    must not take the other's scratch directory away (it did: "File exists" from makedirs)."""
    import threading

    from hostside.backends import libvirt as lv
    from hostside.backends.base import HostSettings
    backend = lv.LibvirtBackend(HostSettings(work_dir=str(tmp_path)))
    inside = threading.Barrier(2, timeout=5)

    def flatten(top, out):
        with open(out, "wb") as handle:
            handle.write(top.encode())
        inside.wait()  # both copies are under way together
        inside.wait()
    monkeypatch.setattr(lv, "flatten_disk", flatten)

    class Sink:
        snapshot = "s1"

        def put_stream(self, name, reader):
            return {"name": name, "data": reader.read()}
    stored, failures = {}, []

    def store(name):
        try:
            stored[name] = backend._store_disks(Sink(), lv.VmMember(name, domain=name),
                                                [{"target": "vda", "frozen": "frozen-" + name}])
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(error)
    threads = [threading.Thread(target=store, args=(n,)) for n in ("vm1", "vm2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert failures == [] and {n: [f["data"] for f in files] for n, files in stored.items()} == {
        "vm1": [b"frozen-vm1"], "vm2": [b"frozen-vm2"]}
    assert backend._store_disks(Sink(), lv.VmMember("vm3", domain="vm3"), []) == []


def test_a_kept_vm_image_is_the_stream_as_uploaded_with_its_disks_copied_not_linked(tmp_path, monkeypatch):
    """With a sink that keeps images, the backend writes the migration stream it uploads and the disks'
    copies into one directory, offers it to keep (disks private), and leaves nothing else behind."""
    from hostside.backends import libvirt as lv
    from hostside.backends.base import HostSettings
    backend = lv.LibvirtBackend(HostSettings(work_dir=str(tmp_path)))
    monkeypatch.setattr(lv, "flatten_disk", lambda top, out: open(out, "wb").write(b"disk at the cut"))

    class FakeLibvirt:
        def migrate_out(self, domain, sink, at_cut, max_bandwidth, prepare, hold_late=True, tee=None, resumed=None):
            class Reader:
                parts = [b"header+stream", b""]

                def read(self, size=0):
                    data = self.parts.pop(0)
                    if tee and data:
                        with open(tee, "ab") as handle:
                            handle.write(data)
                    return data
            stored = sink(Reader())
            return lv.MigrationReport(20.0, 5.0, 1.0, 700.0, 10.0, 800.0, 13, "x", stored=stored, teed=tee,
                                      disks=[{"target": "vda", "frozen": "f", "overlay": "o"}])
    backend._libvirt = FakeLibvirt()

    class Sink:
        snapshot, keeps = "s1", True

        def __init__(self):
            self.kept = None

        def put_stream(self, name, reader):
            data = b"".join(iter(lambda: reader.read(1 << 16), b""))
            return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

        def settle(self):
            pass

        def keep(self, directory, files, trees=None, private=()):
            self.kept = ({n: open(os.path.join(directory, n), "rb").read() for n in os.listdir(directory)},
                         [f["name"] for f in files], list(private))
            return True
    sink = Sink()
    report = backend.snapshot(lv.VmMember("vm1", domain="vm1"), sink, lambda: 0.0)
    contents, names, private = sink.kept
    assert contents == {"vm.save": b"header+stream", "disk-vda.qcow2": b"disk at the cut"}
    assert names == ["vm.save", "disk-vda.qcow2"] and private == ["disk-vda.qcow2"]
    assert report.details["kept"] is True and "teed" not in report.details
    assert os.listdir(tmp_path / "vm-images") == []  # the directory was offered; what keep left is gone
    (tmp_path / "vm-images" / "s0-vm1-left").mkdir()  # a helper stopped mid-snapshot left it
    backend.start()
    assert not (tmp_path / "vm-images").exists()
    sink.keeps, sink.kept = False, None
    assert "kept" not in backend.snapshot(lv.VmMember("vm1", domain="vm1"), sink, lambda: 0.0).details
    assert sink.kept is None and not (tmp_path / "disks" / "s1" / "vm1").exists()


def test_kill_qemu_kills_only_the_domains_qemu_and_waits_until_it_is_reaped(tmp_path, monkeypatch):
    """A process whose command line names the domain is killed and reaped before kill_qemu returns;
    one that does not (a pid libvirt's pid file names but reused since) is left alone."""
    import subprocess
    import sys

    from hostside.backends import libvirt as lv
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name", "guest=vm1,debug-threads=on"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name", "guest=vm10"])
    try:
        pids = {"vm1": fake.pid, "vm10x": other.pid}
        monkeypatch.setattr(lv, "_qemu_pid", lambda name: pids.get(name))
        import threading
        reaper = threading.Thread(target=fake.wait)  # the process's parent reaps it, as libvirt's would
        reaper.start()
        assert lv.kill_qemu("vm1") is True
        assert not lv._zombie(fake.pid)  # reaped before it returned
        reaper.join(1)
        assert fake.returncode == -9
        assert lv.kill_qemu("vm10x") is False and other.poll() is None  # "guest=vm10" is not vm10x's
        assert lv.kill_qemu("vm2") is False  # no pid file
    finally:
        other.kill()
        other.wait()
        if fake.poll() is None:
            fake.kill()
            fake.wait()


def test_destroy_waits_until_libvirt_has_let_go_of_the_domain(monkeypatch):
    """After QEMU is killed, libvirt removes a transient domain in a worker of its own: destroy answers
    "no domain" (or "not running") and returns only once the name is free for the restore."""
    from hostside.backends import libvirt as lv

    class LibvirtError(Exception):
        def __init__(self, code):
            self.code = code

        def get_error_code(self):
            return self.code
    module = type("M", (), {"libvirtError": LibvirtError, "VIR_ERR_OPERATION_INVALID": 55, "VIR_ERR_NO_DOMAIN": 42})
    lookups = []

    class Dom:
        def destroy(self):
            raise LibvirtError(42)  # removed by libvirt's own handling of QEMU's death

        def isActive(self):
            return False

        def isPersistent(self):
            return False  # transient: "being removed" until the lookup fails

    class Conn:
        def lookupByName(self, name):
            lookups.append(name)
            if len(lookups) > 3:
                raise LibvirtError(42)
            return Dom()
    conn = lv.Libvirt.__new__(lv.Libvirt)
    conn.libvirt, conn.conn = module, Conn()
    killed = []
    monkeypatch.setattr(lv, "kill_qemu", lambda name: killed.append(name) or True)
    assert conn.destroy("vm1") is True and killed == ["vm1"] and len(lookups) == 4
    lookups.clear()
    lookups.extend(["x"] * 3)
    assert conn.destroy("vm1") is False  # no such domain: nothing to do

    class Refused(Dom):
        def destroy(self):
            raise LibvirtError(1)
    Conn.lookupByName = lambda self, name: Refused()
    with pytest.raises(lv.VmError, match="stopping vm1"):
        conn.destroy("vm1")


def test_our_own_packet_socket_on_the_tap_is_not_counted_as_the_switchs_backlog(tmp_path):
    table = tmp_path / "packet"
    table.write_text(
        "sk               RefCnt Type Proto  Iface R Rmem   User   Inode\n"
        "ffff8882 3      3    0003   9     1 0      0      1002\n"
        "ffff8883 3      3    0003   9     1 768    0      1003\n")
    assert vm.packet_socket_backlog(9, str(table)) == 768
    assert vm.packet_socket_backlog(9, str(table), exclude=(1003,)) == 0


def test_qemus_descriptors_on_a_tap_are_found_by_their_fdinfo(tmp_path):
    fdinfo = tmp_path / "42" / "fdinfo"
    fdinfo.mkdir(parents=True)
    (fdinfo / "3").write_text("pos:\t0\nflags:\t02004002\nmnt_id:\t27\nino:\t1050\n")
    (fdinfo / "31").write_text("pos:\t0\nflags:\t02004002\nmnt_id:\t27\nino:\t155\niff:\ttap10\n")
    (fdinfo / "32").write_text("pos:\t0\nflags:\t02004002\nmnt_id:\t27\nino:\t155\niff:\ttap1\n")
    (fdinfo / "9").write_text("pos:\t0\nflags:\t02004002\nmnt_id:\t27\nino:\t155\niff:\ttap1")
    assert vm.tun_fds(42, "tap1", proc=str(tmp_path)) == [9, 32]  # not tap10's
    assert vm.tun_fds(42, "tap2", proc=str(tmp_path)) == []


@pytest.mark.parametrize("flags, size, prefix", [
    (vm.IFF_NO_PI, 12, b""),  # what QEMU's tap wants without a vnet header
    (vm.IFF_NO_PI | vm.IFF_VNET_HDR, 12, bytes(12)),  # virtio-net 1.0 / mergeable buffers
    (vm.IFF_NO_PI | vm.IFF_VNET_HDR, 10, bytes(10)),
    (vm.IFF_VNET_HDR, 10, bytes(4) + bytes(10)),  # tun_pi first, then the vnet header
])
def test_a_frame_written_into_a_tap_gets_the_headers_the_tap_expects(flags, size, prefix):
    assert vm.tun_write_prefix(flags, size) == prefix


def test_receive_steering_on_a_tap_is_seen(tmp_path):
    queues = tmp_path / "tap1" / "queues"
    (queues / "rx-0").mkdir(parents=True)
    (queues / "tx-0").mkdir(parents=True)
    (queues / "rx-0" / "rps_cpus").write_text("0\n")
    (queues / "rx-0" / "rps_flow_cnt").write_text("0\n")
    (queues / "tx-0" / "xps_cpus").write_text("3\n")
    assert not vm.receive_steered("tap1", str(tmp_path))
    (queues / "rx-0" / "rps_cpus").write_text("00000000,00000002\n")
    assert vm.receive_steered("tap1", str(tmp_path))
    (queues / "rx-0" / "rps_cpus").write_text("0\n")
    (queues / "rx-0" / "rps_flow_cnt").write_text("256\n")
    assert vm.receive_steered("tap1", str(tmp_path))


def test_a_vm_whose_qemu_is_not_found_gets_a_synchronous_cut_with_the_reason(monkeypatch):
    monkeypatch.setattr(vm, "_qemu_pid", lambda name: None)
    with vm.vm_cut_proof("vm1", "tap1", "52:54:00:00:00:01", "snap-1", "vm1") as proof:
        assert not proof.marks and "not found" in proof.why_not
        with pytest.raises(vm.VmError, match="no marker can be written into tap1"):
            proof(confirm=True)


def test_a_vms_marker_is_written_into_its_tap_and_confirmed_by_the_switchs_copy_going_out():
    """MarkerLink over a tap seen from the host: the marker written in comes back in (our own write,
    not the answer); the switch's copy goes out to the guest."""
    import socket

    from hostside.backends import criu
    from violin_core.packets import build_marker
    marker = build_marker("52:54:00:00:00:01", "snap-1", "vm1")
    written = []

    class TapSocket:
        def __init__(self):
            self.after = [(marker, socket.PACKET_HOST), (marker, socket.PACKET_OUTGOING)]

        def setblocking(self, _flag):
            pass

        def settimeout(self, _timeout):
            pass

        def recv(self, _size):
            raise BlockingIOError()

        def recvfrom(self, _size):
            if not written or not self.after:
                raise socket.timeout()
            data, kind = self.after.pop(0)
            return data, ("tap1", 0x88B5, kind, 1, b"")

    sock = TapSocket()
    link = criu.MarkerLink(sock, marker, timeout=1.0, send=written.append, echo_outgoing=True, error=vm.VmError)
    proof = vm.VmCutProof("tap1", link)
    assert proof.marks and proof(confirm=True) > 0 and written == [marker] and sock.after == []
    only_ours = TapSocket()
    only_ours.after = [(marker, socket.PACKET_HOST)]  # the switch never sent it back
    with pytest.raises(vm.VmError, match="did not send the cut marker back"):
        criu.MarkerLink(only_ours, marker, timeout=0.05, send=written.append, echo_outgoing=True,
                        error=vm.VmError).prove(confirm=True)
