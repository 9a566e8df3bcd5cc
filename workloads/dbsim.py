"""A database-like writer: a data directory of table files that it keeps appending to, at a steady rate.

    python -m workloads.dbsim DIR [--size-mib 128] [--rate-kib 512] [--seed 1]

It first fills DIR with ``--size-mib`` of table segments (``seg-NNNN.dat``, 8 MiB each, rows of
text-like records) unless they are there, then appends ``--rate-kib`` KiB of rows per second to the
last segment (starting a new one past 8 MiB) and rewrites the small ``meta.json`` (row count, last
segment) atomically, like a database's log and its control file. Rows are deterministic for a seed.
It is what issue 12's benchmark snapshots (``scripts/bench_storage.py``); ``DbSim`` does the same
in-process (``fill``, ``advance(seconds)``) so the benchmark can step it without a clock.
"""

import argparse
import hashlib
import json
import os
import sys
import time

SEGMENT = 8 << 20


class DbSim:
    def __init__(self, directory: str, size: int = 128 << 20, seed: int = 1, rate: int = 512 << 10):
        self.directory, self.size, self.seed, self.rate = directory, size, seed, rate
        self.rows = 0

    def row(self, n: int) -> bytes:
        digest = hashlib.blake2b(b"%d:%d" % (self.seed, n), digest_size=16).hexdigest()
        return b"%010d,%s,customer-%05d,%d.%02d,status=%s\n" % (
            n, digest.encode(), n % 50000, n % 9973, n % 100, (b"open", b"paid", b"shipped")[n % 3])

    def rows_of(self, size: int) -> bytes:
        out, total = [], 0
        while total < size:
            data = self.row(self.rows)
            self.rows += 1
            out.append(data)
            total += len(data)
        return b"".join(out)

    def segments(self):
        return sorted(n for n in os.listdir(self.directory) if n.startswith("seg-"))

    def fill(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        for index in range(self.size // SEGMENT):
            with open(os.path.join(self.directory, "seg-%04d.dat" % index), "wb") as handle:
                handle.write(self.rows_of(SEGMENT))
        self._meta()

    def append(self, size: int) -> None:
        last = self.segments()[-1]
        path = os.path.join(self.directory, last)
        if os.path.getsize(path) >= SEGMENT:
            path = os.path.join(self.directory, "seg-%04d.dat" % (int(last[4:8]) + 1))
        with open(path, "ab") as handle:
            handle.write(self.rows_of(size))
            handle.flush()
        self._meta()

    def advance(self, seconds: float) -> None:
        self.append(int(self.rate * seconds))

    def _meta(self) -> None:
        tmp = os.path.join(self.directory, ".meta.json.tmp")
        with open(tmp, "w") as handle:
            json.dump({"rows": self.rows, "segments": self.segments(), "time": time.time()}, handle)
        os.replace(tmp, os.path.join(self.directory, "meta.json"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dbsim", description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--rate-kib", type=int, default=512, help="KiB appended per second")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.size_mib < 8 or args.rate_kib <= 0:
        parser.error("--size-mib must be >= 8 and --rate-kib > 0")
    db = DbSim(args.directory, args.size_mib << 20, args.seed, args.rate_kib << 10)
    if not os.path.exists(os.path.join(args.directory, "meta.json")):
        db.fill()
    while True:
        time.sleep(0.2)
        db.advance(0.2)


if __name__ == "__main__":
    sys.exit(main())
