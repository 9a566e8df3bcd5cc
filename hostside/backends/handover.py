"""CRIU's post-dump hand-over to the helper, for any backend that has CRIU dump a member live.

CRIU runs the action script at ``post-dump`` while the member's tasks are still
frozen. The script (``criu.HOOK``) writes to one FIFO and waits on another; a
thread of ours reads the first, runs ``on_frozen`` (the cut: files captured,
marker, controller) and answers ``ok`` (or ``fail``: CRIU then fails the dump
and lets the tasks run unharmed). The script gives up after
``criu.HOOK_TIMEOUT_S``, so a helper that died never leaves a member frozen.

Used by the podman backend (runc reads the script from the container's CRIU
configuration file); the mechanism is ``criu.PostDumpHook``, which ``criu.dump``
uses too, so both backends run the same builtin-only script.
"""

import contextlib
from typing import Callable, Dict, Iterator

from hostside.backends.criu import HOOK_TIMEOUT_S, PostDumpHook


class HandOver:
    """What a ``frozen_hand_over`` block gives: the script to hand CRIU and, live, what happened."""

    def __init__(self, hook: PostDumpHook):
        self._hook = hook
        self.script = hook.script

    @property
    def fired(self) -> bool:
        return self._hook.fired

    @property
    def outcome(self) -> Dict[str, object]:
        """``hook_ms`` once the hook answered, ``error`` if on_frozen raised."""
        outcome: Dict[str, object] = {}
        if self.fired:
            outcome["hook_ms"] = self._hook.hook_ms
        if self._hook.error is not None:
            outcome["error"] = self._hook.error
        return outcome

    def raise_error(self) -> None:
        if self._hook.error is not None:
            raise self._hook.error


@contextlib.contextmanager
def frozen_hand_over(on_frozen: Callable[[], None], timeout: float = HOOK_TIMEOUT_S) -> Iterator[HandOver]:
    """Within the block, run CRIU with ``handover.script``; ``on_frozen`` runs while the tasks are frozen.
    After the block, ``handover.outcome`` says what happened (``raise_error()`` re-raises on_frozen's error)."""
    with PostDumpHook(on_frozen, timeout) as hook:
        yield HandOver(hook)
