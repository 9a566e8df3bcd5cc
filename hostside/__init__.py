"""Host-side helper: snapshot backends and the snapshot server (grows with the CRIU and libvirt issues)."""
