"""``Spool``: a FIFO of byte strings that never blocks its writer and holds a bounded amount in memory.

A VM's migration stream must be drained at full speed while the guest is paused (a slow sink must
never stall QEMU's last writes), yet must not sit in memory without bound. The writer ``put``s what
it reads; past ``memory`` bytes held, data goes to an unlinked temp file on local disk instead (and
keeps going there until the end), and the reader's ``get`` takes it back in order. File reads and
writes happen outside the lock (``pwrite``/``pread`` at offsets the lock hands out), so a reader busy
with the disk never holds the writer up. ``put``/``get`` are the calls of the ``queue.Queue`` it
replaces (``get`` gives b"" at the end: the writer ``put``s b"" or calls ``close``).
"""

import collections
import os
import tempfile
import threading


class Spool:
    def __init__(self, directory: str = None, memory: int = 32 << 20):
        self.directory, self.memory = directory, memory
        self.held = collections.deque()  # in memory, in order, before everything in the file
        self.held_bytes = 0
        self.fd = None  # the spill file, once memory is full
        self.written = 0  # bytes in the file, readable (published after each pwrite)
        self.read_at = 0
        self.spilled = 0
        self.peak = 0  # most bytes held in memory at once
        self.ended = False
        self.cond = threading.Condition()

    def put(self, data: bytes) -> None:
        if not data:
            return self.close()
        with self.cond:
            if self.fd is None and self.held_bytes + len(data) <= self.memory:
                self.held.append(data)
                self.held_bytes += len(data)
                self.peak = max(self.peak, self.held_bytes)
                self.cond.notify_all()
                return None
            if self.fd is None:
                self.fd, path = tempfile.mkstemp(dir=self.directory, prefix="violin-spool-")
                os.unlink(path)  # gone from the directory: freed when closed, whatever happens
            fd, offset = self.fd, self.written
        # Only the writer appends, so nobody else writes at this offset; the reader reads below
        # ``written``, which moves only after the bytes are there.
        view = memoryview(data)
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done
        with self.cond:
            self.written = offset
            self.spilled += len(data)
            self.cond.notify_all()
        return None

    def close(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def get(self, size: int = 1 << 20) -> bytes:
        """The next bytes in order (at most ``size`` from the file), waiting for them; b"" at the end."""
        with self.cond:
            while not self.held and self.read_at >= self.written and not self.ended:
                self.cond.wait()
            if self.held:
                data = self.held.popleft()
                self.held_bytes -= len(data)
                return data
            if self.read_at >= self.written:  # ended, everything read
                self._close_file()
                return b""
            fd, offset, length = self.fd, self.read_at, min(size, self.written - self.read_at)
            self.read_at += length
        return os.pread(fd, length, offset)

    def _close_file(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        with self.cond:
            self.held.clear()
            self.held_bytes = 0
            self.ended = True
            self.read_at = self.written
            self.cond.notify_all()

    def __del__(self):
        try:
            self._close_file()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
