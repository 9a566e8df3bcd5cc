"""The libvirt backend's pure parts: save-file header, disk check, the tap drain proof's reading."""

import pytest

from hostside import vm

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
