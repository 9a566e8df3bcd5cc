"""Host-side backends: one module per kind of member (criu.py: process trees, libvirt.py: QEMU VMs)."""
