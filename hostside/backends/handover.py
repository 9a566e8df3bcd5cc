"""CRIU's post-dump hand-over to the helper, for any backend that has CRIU dump a member live.

CRIU runs the action script at ``post-dump`` while the member's tasks are still
frozen. The script (``criu.HOOK``) writes to one FIFO and waits on another; a
thread of ours reads the first, runs ``on_frozen`` (the cut: files captured,
marker, controller) and answers ``ok`` (or ``fail``: CRIU then fails the dump
and lets the tasks run unharmed). The script gives up after
``criu.HOOK_TIMEOUT_S``, so a helper that died never leaves a member frozen.

Used by the podman backend (runc reads the script from the container's CRIU
configuration file); ``criu.dump`` has the same steps inline and can move to
this function.
"""

import contextlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator

from hostside.backends.criu import HOOK, HOOK_TIMEOUT_S


@dataclass
class HandOver:
    script: str  # the action script to give CRIU (--action-script, or action-script in a config file)
    outcome: Dict[str, object] = field(default_factory=dict)  # "error" (what on_frozen raised), "hook_ms"

    @property
    def fired(self) -> bool:
        return "hook_ms" in self.outcome

    def raise_error(self) -> None:
        if "error" in self.outcome:
            raise self.outcome["error"]


@contextlib.contextmanager
def frozen_hand_over(on_frozen: Callable[[], None], timeout: float = HOOK_TIMEOUT_S) -> Iterator[HandOver]:
    """Within the block, run CRIU with ``handover.script``; ``on_frozen`` runs while the tasks are frozen.
    After the block, ``handover.outcome`` says what happened (``raise_error()`` re-raises on_frozen's error)."""
    control = tempfile.mkdtemp(prefix="violin-hook-")
    request, reply = os.path.join(control, "request"), os.path.join(control, "reply")
    os.mkfifo(request)
    os.mkfifo(reply)
    script = os.path.join(control, "hook.sh")
    with open(script, "w") as handle:
        handle.write(HOOK.format(request=request, reply=reply, timeout=int(timeout)))
    os.chmod(script, 0o755)
    handover = HandOver(script)

    def hand_over():
        with open(request) as fifo:  # blocks until the hook fires (or the block ends: EOF)
            if not fifo.read():
                return
        frozen_at = time.monotonic()
        try:
            on_frozen()
            answer = "ok"
        except BaseException as error:  # reported after the block; CRIU must still be answered
            handover.outcome["error"] = error
            answer = "fail"
        handover.outcome["hook_ms"] = (time.monotonic() - frozen_at) * 1000
        with open(reply, "w") as fifo:
            fifo.write(answer + "\n")

    waiter = threading.Thread(target=hand_over, daemon=True)
    waiter.start()
    try:
        yield handover
    finally:
        if waiter.is_alive():  # the hook never fired: release the reader
            try:
                os.close(os.open(request, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        waiter.join(5)
        shutil.rmtree(control, ignore_errors=True)
