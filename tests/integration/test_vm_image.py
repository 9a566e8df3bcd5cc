"""The image a fake live migration stores is the guest's RAM at the cut, page for page.

At the cut (QEMU holds the guest paused before the switchover) the test saves the
guest's physical memory with QMP ``pmemsave``; then it restores the stored image,
paused, and saves the restored guest's memory the same way. Any page that differs
is a guest write the migration lost. Debian's QEMU 7.2 under TCG lost some in 2 of
10 images with this workload (stale pages; restored guests crashed), which is why
the guests run under scripts/install_qemu.sh's build.
"""

import os
import shutil
import subprocess
import threading

from hostside.backends import libvirt as vm
from lab import lab, vms

CYCLES = int(os.environ.get("VIOLIN_VM_IMAGE_CYCLES", 3))
PAGE = 4096
LEGACY_HOLE = range(0xA0, 0x100)  # VGA window and option ROMs: not RAM, read through devices


def differing_pages(path_a: str, path_b: str):
    """Page frame numbers whose contents differ between two memory dumps (outside the legacy hole)."""
    differing = []
    with open(path_a, "rb") as a, open(path_b, "rb") as b:
        pfn = 0
        while True:
            page_a, page_b = a.read(PAGE), b.read(PAGE)
            if not page_a and not page_b:
                return differing
            if page_a != page_b and pfn not in LEGACY_HOLE:
                differing.append(pfn)
            pfn += 1


def test_a_stored_image_is_the_guests_ram_at_the_cut(vm_ready):
    prefix = lab.run_prefix()
    bridge = prefix + "img"
    # QEMU (not root) writes the dumps: a directory of this test's own that it may write to.
    dumps = os.path.join(vms.RUN_DIR, prefix + "-dumps")
    # Each guest keeps writing fresh random bytes into one 4 MiB buffer: the kind of load that
    # exposed the stale pages (a page written again after the migration had sent it).
    guests = [vms.Guest("%simg%d" % (prefix, i), "10.77.0.%d/24" % (i + 1), "52:54:00:77:00:%02x" % (i + 1),
                        bridge, ["dd", "if=/dev/urandom", "of=/dev/null", "bs=4M"]) for i in range(2)]
    subprocess.run(["ovs-vsctl", "add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=netdev",
                    "fail_mode=standalone"], check=True)
    os.makedirs(dumps)
    os.chmod(dumps, 0o1777)
    try:
        with vms.guests(guests):
            libvirt = vm.Libvirt()
            memory = guests[0].memory_mib << 20
            lost = []
            for cycle in range(CYCLES):
                errors = {}

                def snapshot(guest):
                    def store(reader):
                        with open(os.path.join(dumps, guest.name + ".save"), "wb") as out:
                            for chunk in iter(lambda: reader.read(1 << 20), b""):
                                out.write(chunk)
                        return {}

                    def at_the_cut():
                        drained = vm.wait_tap_drained(guest.tap)
                        libvirt.qmp(libvirt.domain(guest.name), "pmemsave",
                                    {"val": 0, "size": memory, "filename": os.path.join(dumps, guest.name + ".cut")})
                        return drained
                    try:
                        libvirt.migrate_out(guest.name, store, at_the_cut)
                    except Exception as error:  # reported below, with the guest's name
                        errors[guest.name] = error

                # Both at once, as a helper snapshots all of its VMs.
                threads = [threading.Thread(target=snapshot, args=(g,)) for g in guests]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(180)
                assert not errors, errors
                for guest in guests:
                    libvirt.restore(os.path.join(dumps, guest.name + ".save"), guest.name)
                    restored = os.path.join(dumps, guest.name + ".restored")
                    libvirt.qmp(libvirt.domain(guest.name), "pmemsave", {"val": 0, "size": memory, "filename": restored})
                    pages = differing_pages(os.path.join(dumps, guest.name + ".cut"), restored)
                    if pages:
                        lost.append((cycle, guest.name, len(pages), [hex(p) for p in pages[:8]]))
                    libvirt.resume(guest.name)
                    for suffix in (".cut", ".restored"):
                        os.unlink(os.path.join(dumps, guest.name + suffix))
            assert not lost, "pages of the stored image differ from the guest's RAM at the cut: %s" % lost
            for guest in guests:
                assert vms.domain_state(guest.name) == "running"
                assert "Kernel panic" not in vms.console_text(guest), vms.console_text(guest)[-2000:]
    finally:
        subprocess.run(["ovs-vsctl", "--if-exists", "del-br", bridge], capture_output=True)
        shutil.rmtree(dumps, ignore_errors=True)
