"""CRIU's post-dump hand-over to the helper, for any backend that has CRIU dump a member live.

CRIU runs the action script at ``post-dump`` while the member's tasks are still
frozen. The script writes to one FIFO and waits on another; a thread of ours
reads the first, runs ``on_frozen`` (the cut: files captured, marker,
controller) and answers ``ok`` (or ``fail``: CRIU then fails the dump and lets
the tasks run unharmed). The script gives up after ``criu.HOOK_TIMEOUT_S``, so a
helper that died never leaves a member frozen.

The mechanism (FIFOs, thread) is ``criu.PostDumpHook``, which ``criu.dump``
uses too. The script is ``posthook.c`` compiled once (static) and cached, where
a C compiler is at hand, else ``criu.HOOK`` (bash, builtins only): CRIU runs its
action script for every action, three of them (network-lock, post-dump,
network-unlock) inside the freeze, each a fork and exec there, and bash's start
is most of each. Used by the podman backend (runc reads the script from the
container's CRIU configuration file).
"""

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Callable, Dict, Iterator, Optional

from hostside.backends.criu import HOOK_TIMEOUT_S, PostDumpHook

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "posthook.c")
CACHE = os.environ.get("VIOLIN_HOOK_CACHE", "/var/cache/violin-snapshot/posthook")
CC = os.environ.get("CC", "cc")
_built: Dict[str, Optional[str]] = {}  # cache key -> the binary (None: cannot be built here)


def native_hook(timeout: int = HOOK_TIMEOUT_S, cache: Optional[str] = None) -> Optional[str]:
    """The compiled hook for ``timeout`` (built on first use, cached by source and timeout); None
    when it cannot be built here (no compiler): the bash hook serves then."""
    cache = cache or CACHE
    try:
        with open(SOURCE, "rb") as handle:
            key = hashlib.sha256(handle.read() + b"\0%d" % timeout).hexdigest()[:16]
    except OSError:  # an install without the source
        return None
    if (cache, key) in _built:
        return _built[(cache, key)]
    binary = os.path.join(cache, "violin-posthook-%s" % key)
    if not os.access(binary, os.X_OK):
        try:
            os.makedirs(cache, exist_ok=True)
            partial = tempfile.mkdtemp(prefix=".build-", dir=cache)
        except OSError:  # e.g. not root: no cache to build into
            _built[(cache, key)] = None
            return None
        try:
            out = os.path.join(partial, "hook")
            for static in (["-static"], []):  # static: no dynamic linking inside the freeze
                try:
                    built = subprocess.run([CC, "-O2", *static, "-DVIOLIN_HOOK_TIMEOUT_S=%d" % timeout, "-o", out,
                                            SOURCE], capture_output=True, timeout=60)
                except (OSError, subprocess.TimeoutExpired):
                    break
                if built.returncode == 0:
                    os.replace(out, binary)  # atomically: a concurrent builder finds it whole or not at all
                    break
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    _built[(cache, key)] = binary if os.access(binary, os.X_OK) else None
    return _built[(cache, key)]


class HandOver:
    """What a ``frozen_hand_over`` block gives: the script to hand CRIU and, live, what happened."""

    def __init__(self, hook: PostDumpHook, script: Optional[str] = None):
        self._hook = hook
        self.script = script or hook.script
        self.native = script is not None

    @property
    def fired(self) -> bool:
        return self._hook.fired

    @property
    def outcome(self) -> Dict[str, object]:
        """``hook_ms`` once the hook answered, ``error`` if on_frozen raised, ``resumed_after_ms`` when
        the tasks were seen to run again after it."""
        outcome: Dict[str, object] = {}
        if self.fired:
            outcome["hook_ms"] = self._hook.hook_ms
        if self._hook.error is not None:
            outcome["error"] = self._hook.error
        if self._hook.resumed_after_ms is not None:
            outcome["resumed_after_ms"] = round(self._hook.resumed_after_ms, 3)
        return outcome

    def raise_error(self) -> None:
        """Re-raise what on_predump raised, else what on_frozen raised, else what on_resumed raised
        (call after the block)."""
        if self._hook.predump_error is not None:
            raise self._hook.predump_error
        if self._hook.error is not None:
            raise self._hook.error
        if self._hook.resumed_error is not None:
            raise self._hook.resumed_error


@contextlib.contextmanager
def frozen_hand_over(on_frozen: Callable[[], None], timeout: float = HOOK_TIMEOUT_S,
                     native: bool = True, on_resumed: Optional[Callable[[], None]] = None,
                     watch_pid: Optional[int] = None, on_predump: Optional[Callable[[], None]] = None) -> Iterator[HandOver]:
    """Within the block, run CRIU with ``handover.script``; ``on_frozen`` runs while the tasks are frozen.
    ``on_resumed`` (if given) runs once they run again after a successful hook: as soon as CRIU has let
    ``watch_pid`` go (its tracer gone), at the latest when the block ends; ``on_predump`` (if given) just
    before CRIU freezes them (``PostDumpHook``). After the block,
    ``handover.outcome`` says what happened (``raise_error()`` re-raises on_frozen's or on_resumed's error).
    ``native``: the compiled hook if it can be had (``handover.native`` says), else the bash one."""
    with PostDumpHook(on_frozen, timeout, on_resumed, watch_pid, on_predump) as hook:
        binary = native_hook(int(timeout)) if native else None
        script = None
        if binary:  # it finds the FIFOs beside the path CRIU runs it by
            script = os.path.join(hook.control, "posthook")
            os.symlink(binary, script)
        yield HandOver(hook, script)
