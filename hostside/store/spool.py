"""``Spool``: a FIFO of byte strings that never blocks its writer and holds a bounded amount in memory.

A VM's migration stream must be drained at full speed while the guest is paused (a slow sink must
never stall QEMU's last writes), yet must not sit in memory without bound. The writer ``put``s what
it reads; past ``memory`` bytes held, data goes to an unlinked temp file on local disk instead, and
the reader's ``get`` takes it back in order. ``put``/``get``/``close`` are the calls of the
``queue.Queue`` it replaces (``get`` gives b"" at the end: the writer ``put``s b"" or calls ``close``).
"""

import collections
import tempfile
import threading


class Spool:
    def __init__(self, directory: str = None, memory: int = 32 << 20):
        self.directory, self.memory = directory, memory
        self.held = collections.deque()  # in memory, in order, before what is on disk
        self.held_bytes = 0
        self.file = None  # the spill file: written at write_at, read at read_at
        self.write_at = self.read_at = 0
        self.spilled = 0  # total bytes that went through the file
        self.peak = 0  # most bytes held in memory at once
        self.ended = False
        self.cond = threading.Condition()

    def put(self, data: bytes) -> None:
        if not data:
            return self.close()
        with self.cond:
            if self.file is None and self.held_bytes + len(data) <= self.memory:
                self.held.append(data)
                self.held_bytes += len(data)
                self.peak = max(self.peak, self.held_bytes)
            else:
                if self.file is None:
                    self.file = tempfile.TemporaryFile(dir=self.directory, prefix="violin-spool-")
                self.file.seek(self.write_at)
                self.file.write(data)
                self.write_at += len(data)
                self.spilled += len(data)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def get(self, size: int = 1 << 20) -> bytes:
        """The next bytes in order (at most ``size`` from the file), waiting for them; b"" at the end."""
        with self.cond:
            while not self.held and self.read_at >= self.write_at and not self.ended:
                self.cond.wait()
            if self.held:
                data = self.held.popleft()
                self.held_bytes -= len(data)
                return data
            if self.read_at < self.write_at:
                self.file.seek(self.read_at)
                data = self.file.read(min(size, self.write_at - self.read_at))
                self.read_at += len(data)
                if self.read_at == self.write_at:  # caught up: the file can start over, memory again
                    self.file.seek(0)
                    self.file.truncate()
                    self.read_at = self.write_at = 0
                    self.file.close()
                    self.file = None
                return data
            return b""

    def discard(self) -> None:
        with self.cond:
            self.held.clear()
            self.held_bytes = 0
            if self.file is not None:
                self.file.close()
                self.file = None
            self.ended = True
            self.cond.notify_all()
