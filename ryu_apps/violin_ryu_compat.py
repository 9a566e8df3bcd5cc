"""Let stock Ryu 4.34 start with a Python-3.11-capable eventlet.

``ryu.app.wsgi`` does ``from eventlet.wsgi import ALREADY_HANDLED``, a name that
eventlet dropped after 0.30.2 (which itself does not run on Python 3.11). The
set-up script installs ``violin_ryu_compat.pth`` into the virtual environment;
it calls ``install()``, which adds an import hook that defines the missing name
the moment ``eventlet.wsgi`` is first imported. Nothing is imported eagerly, so
other programs in the venv pay nothing for it.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "eventlet.wsgi"


def patch_eventlet_wsgi(module) -> None:
    if not hasattr(module, "ALREADY_HANDLED"):
        module.ALREADY_HANDLED = object()


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        patch_eventlet_wsgi(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Idempotent: patch now if eventlet.wsgi is loaded, else hook its import."""
    if _TARGET in sys.modules:
        patch_eventlet_wsgi(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
