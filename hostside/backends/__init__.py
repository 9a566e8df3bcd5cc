"""Host-side backends: one class per kind of member, found by name in a registry (base.py).

Importing this package registers the backends shipped with violin-snapshot:
``criu`` (process trees, criu.py) and ``libvirt`` (QEMU VMs, libvirt.py).
"""

from hostside.backends import criu, libvirt  # noqa: F401  (registers them)
from hostside.backends.base import (Backend, HostSettings, ImageReport, ImageSink, Restored, get,  # noqa: F401
                                    member_schema, names, register, unregister)
