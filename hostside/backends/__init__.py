"""Host-side backends: one class per kind of member, found by name in a registry (base.py).

Importing this package registers the backends shipped with violin-snapshot:
``criu`` (process trees, criu.py), ``libvirt`` (QEMU VMs, libvirt.py) and ``podman``
(containers, podman.py).
"""

from hostside.backends import criu, libvirt, podman  # noqa: F401  (registers them)
from hostside.backends.base import (Backend, HostSettings, ImageReport, ImageSink, Restored, get,  # noqa: F401
                                    member_schema, names, register, unregister)
