"""A database-like member: it keeps appending numbered records to a file in its working directory.

``python -m workloads.appender --dir D [--prefill-mib 128] [--record-bytes 4096] [--rate 1000]``
writes a ``--prefill-mib`` header (one ``#`` line) to ``D/data.log`` at start, then record 1, 2, ...
(each ``--record-bytes`` long, its number first), ``--rate`` per second, through one ``O_APPEND``
descriptor. Its count lives in its memory only, so a restored member whose file was taken at another
instant than its memory shows it: ``check(path)`` finds a gap (file taken earlier than memory) or a
repeated number (file taken later). The process opens nothing else in ``D`` (CRIU restores the
descriptor and checks the file's size).
"""

import argparse
import os
import time

NAME = "data.log"


def record(number: int, size: int) -> bytes:
    head = b"%012d " % number
    return head + b"r" * (size - len(head) - 1) + b"\n"


def check(path: str):
    """(records, problems): the numbers after the header must be 1, 2, 3... each once, whole."""
    problems, expected = [], 1
    with open(path, "rb") as handle:
        for line in handle:
            if line.startswith(b"#"):
                continue
            if not line.endswith(b"\n"):
                problems.append("a partial record at the end: %r" % line[:20])
                break
            number = int(line.split(b" ", 1)[0])
            if number != expected:
                problems.append("record %d where %d was due (%s)" % (
                    number, expected, "repeated: the file is later than the memory" if number < expected
                    else "missing: the file is earlier than the memory"))
                if len(problems) > 5:
                    break
            expected = number + 1
    return expected - 1, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--prefill-mib", type=float, default=0.0)
    parser.add_argument("--record-bytes", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1000.0)
    args = parser.parse_args(argv)
    fd = os.open(os.path.join(args.dir, NAME), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
    prefill = int(args.prefill_mib * (1 << 20))
    chunk = b"#" * (1 << 20)
    while prefill > 1:
        part = chunk[:min(len(chunk), prefill - 1)]
        os.write(fd, part)
        prefill -= len(part)
    if args.prefill_mib:
        os.write(fd, b"\n")
    number, interval, due = 0, 1.0 / args.rate, time.monotonic()
    while True:
        number += 1
        os.write(fd, record(number, args.record_bytes))
        due += interval
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        elif pause < -1.0:  # was frozen or starved: do not catch up in a burst
            due = time.monotonic()


if __name__ == "__main__":
    raise SystemExit(main())
