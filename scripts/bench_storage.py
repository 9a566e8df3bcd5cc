#!/usr/bin/env python3
"""Issue 12's storage benchmark: periodic snapshots into chunk stores and a file store, side by side.

Four real ``violin-snapshot-server`` processes on loopback take the same members' images from the
real client (``hostside.store.client.ImageServer.upload_dir``, what the helper's ``StoreSink``
calls), as the CRIU backend stores them (``STORES``): ``chunks``, today's path (the workdir as a tree
pointer, stored as its tar unwritten: per-file chunks, the stat cache; the default zstd level);
``file``, a file store (``workdir.tar`` written, then uploaded whole: a snapshot before); ``chunks_level1``,
today's path at zstd level 1; ``chunks_tar``, the chunk store's old path (the tar written, cut whole,
level 1). Members:

- ``db``: a database-like member (``workloads/dbsim.py``): a 128 MiB data directory appended to at
  a steady rate (``--rate-kib`` KiB/s, ``--interval`` seconds between snapshots), and 16 MiB of
  process memory of which ``--dirty`` is rewritten between snapshots;
- ``seq1``, ``seq2``: seqstream-like members: 4 MiB of memory each, 10 % rewritten, a tiny workdir.

Per snapshot it records logical bytes, bytes newly stored (chunk store: its chunk bytes; file store:
its bytes) and bytes sent, and the db member's wall time (making the image + uploading it) on each;
then ``--restores`` interleaved restores (``download_dir``, every chunk and checksum verified) of the
last snapshot from each; and the chunk + BLAKE3 + zstd rate on one core at several levels, in-process,
in the same run.

Not measured here (say so when quoting): real CRIU dumps and a VM's migration stream (the chunk
store takes those through the same client calls; ``tests/integration/test_chunk_store_live.py``
runs a real slice on it).

    python scripts/bench_storage.py [--snapshots 5] [--out docs/bench/bench_storage.json]
"""

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import benchkit  # noqa: E402  (puts the repository on sys.path)

from hostside.store import chunking, tree  # noqa: E402
from hostside.store.client import ImageServer  # noqa: E402
from lab import lab  # noqa: E402
from workloads.dbsim import DbSim  # noqa: E402

TOKEN = "bench-token"


def start_server(store: str):
    port = lab.free_port()
    process = subprocess.Popen([sys.executable, "-m", "hostside.store.server", "--listen", "127.0.0.1:%d" % port,
                                "--store", store, "--token", TOKEN], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d" % port
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise benchkit.BenchError("snapshot server %s did not start" % store)


def stats(url: str) -> dict:
    request = urllib.request.Request(url + "/stats", headers={"Authorization": "Bearer " + TOKEN})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


class Memory:
    """A process's memory as a page image: ``dirty`` of its 4 KiB pages rewritten per step, in runs
    of 8 pages (a heap's writes are local; scattered single pages would cost more chunks)."""

    def __init__(self, size: int, seed: int):
        self.rng = random.Random(seed)
        self.pages = bytearray(self.rng.randbytes(size // 2) + bytes(size // 2))  # half data, half zero

    def step(self, dirty: float) -> None:
        runs = len(self.pages) // (8 * 4096)
        for run in self.rng.sample(range(runs), max(1, int(runs * dirty))):
            self.pages[run * 8 * 4096:(run + 1) * 8 * 4096] = self.rng.randbytes(8 * 4096)


def make_image(directory: str, workdir: str, memory: Memory, tree_pointer: bool = False) -> float:
    """The CRIU backend's image of a member: its page image and its workdir, as ``workdir.tar`` (the
    archive written, what the helper did before) or as a tree pointer (what it does for a snapshot
    server's client now: ``Capture.finish_tree``). The seconds it took."""
    began = time.monotonic()
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    with open(os.path.join(directory, "pages-1.img"), "wb") as handle:
        handle.write(memory.pages)
    if tree_pointer:
        tree.write_pointer(directory, "workdir.tar", workdir, clone=True)  # as the helper does
    else:
        with tarfile.open(os.path.join(directory, "workdir.tar"), "w") as archive:
            archive.add(workdir, arcname=".")
    return time.monotonic() - began


def throughput(path: str, repeats: int = 3) -> dict:
    """On this one thread, in CPU time, over a file's bytes (best of ``repeats``, the settings interleaved):
    cutting + BLAKE3 of every chunk through a reader (what the client does), zstd of every chunk (what
    only new chunks cost: all of them here, as in a first snapshot) at today's level, level 1 (the old
    default) and -1, the three together; and the old path (level 1, plus the whole file's sha256)."""
    import hashlib
    with open(path, "rb") as handle:
        data = handle.read()
    best = {}

    def timed(key, work):
        began = time.process_time()
        value = work()
        best[key] = min(best.get(key, float("inf")), time.process_time() - began)
        return value

    levels = sorted({1, -1, -3, chunking.LEVEL}, reverse=True)  # 1: the old default; chunking.LEVEL: today's
    packers = {level: chunking.Packer(level=level) for level in levels}
    packed = {}
    for _ in range(repeats):
        pieces = timed("cut_stream", lambda: list(packers[1].pieces(io.BytesIO(data))))
        timed("cut_buffer", lambda: list(packers[1].buffer_pieces(data)))
        for level, packer in packers.items():
            packed[level] = timed("zstd%d" % level, lambda p=packer: sum(len(p.compress(x).packed) for x in pieces))
        timed("sha256", lambda: hashlib.sha256(data).hexdigest())
    rate = lambda seconds: round(len(data) / seconds / 1e6, 1)  # noqa: E731
    cut = best["cut_stream"]  # what the client does (a file or a stream through a reader)
    answer = {"bytes": len(data), "chunks": len(pieces), "repeats": repeats, "level": chunking.LEVEL,
              "cut_and_hash_mb_s": rate(cut), "cut_and_hash_buffer_mb_s": rate(best["cut_buffer"]),
              "chunk_hash_compress_mb_s": rate(cut + best["zstd%d" % chunking.LEVEL]),
              "compress_mb_s": rate(best["zstd%d" % chunking.LEVEL]),
              "old_path_mb_s": rate(cut + best["zstd1"] + best["sha256"]),
              "cpu": "one thread, CPU time, best of %d; all chunks new (compressed); old path: level 1 "
                     "and the file's sha256, as before" % repeats}
    for level in levels:
        answer["compressed_bytes_level_%d" % level] = packed[level]
        answer["compress_level_%d_mb_s" % level] = rate(best["zstd%d" % level])
        answer["chunk_hash_compress_level_%d_mb_s" % level] = rate(cut + best["zstd%d" % level])
    return answer


# The new path (default level), the file store, the new path at zstd level 1 (the old default), the chunk
# store's old path (the tar written, then cut whole, level 1): one server each.
STORES = ("chunks", "file", "chunks_level1", "chunks_tar")
LEVELS = {"chunks_level1": 1, "chunks_tar": 1}
TREE = ("chunks", "chunks_level1")


def run(args) -> dict:
    work = tempfile.mkdtemp(prefix="bench-storage-", dir=args.work)
    servers = []
    try:
        clients = {}
        for kind in STORES:
            servers.append(start_server(("file:" if kind == "file" else "chunks:") + os.path.join(work, kind)))
            clients[kind] = ImageServer(servers[-1][1], TOKEN, timeout=120, level=LEVELS.get(kind))
        db = DbSim(os.path.join(work, "db-data"), args.db_mib << 20, seed=1, rate=args.rate_kib << 10)
        db.fill()
        members = {"db": (db.directory, Memory(16 << 20, 1), args.dirty)}
        for name, seed in (("seq1", 2), ("seq2", 3)):
            workdir = os.path.join(work, name + "-work")
            os.makedirs(workdir)
            with open(os.path.join(workdir, "seqstream.log"), "w") as handle:
                handle.write("started\n")
            members[name] = (workdir, Memory(4 << 20, seed), 0.10)
        rows = []
        before = {kind: stats(client.url) for kind, client in clients.items()}
        for index in range(args.snapshots):
            if index:
                db.advance(args.interval)
                for workdir, memory, dirty in members.values():
                    memory.step(dirty)
                for name in ("seq1", "seq2"):
                    with open(os.path.join(members[name][0], "seqstream.log"), "a") as handle:
                        handle.write("frames %d\n" % (index * 1000))
            row = {"snapshot": index + 1, "members": {}}
            for name, (workdir, memory, _dirty) in members.items():
                tarred = os.path.join(work, "image-" + name)
                archive_s = make_image(tarred, workdir, memory)
                pointed = os.path.join(work, "pointer-" + name)
                pointer_s = make_image(pointed, workdir, memory, tree_pointer=True)
                entry = {}
                for kind, client in clients.items():
                    began = time.monotonic()
                    files = client.upload_dir("snap-%d" % (index + 1), name, pointed if kind in TREE else tarred)
                    upload_s = time.monotonic() - began
                    image_s = pointer_s if kind in TREE else archive_s
                    entry[kind] = {"wall_s": round(image_s + upload_s, 3), "upload_s": round(upload_s, 3),
                                   "image_s": round(image_s, 3),
                                   "logical_bytes": sum(f["logical_bytes"] for f in files),
                                   "stored_bytes": sum(f["stored_bytes"] for f in files),
                                   "sent_bytes": sum(f["sent_bytes"] for f in files)}
                    if kind in TREE:
                        entry[kind]["workdir_bytes_read"] = sum(f.get("bytes_read") or 0 for f in files)
                row["members"][name] = entry
            after = {kind: stats(client.url) for kind, client in clients.items()}
            for kind in clients:
                row[kind] = {
                    "logical_bytes": sum(m[kind]["logical_bytes"] for m in row["members"].values()),
                    "stored_bytes": (after[kind]["stored_bytes"] - before[kind].get("stored_bytes", before[kind]["bytes"]))
                    if kind != "file" else after[kind]["bytes"] - before[kind]["bytes"],
                    "sent_bytes": sum(m[kind]["sent_bytes"] for m in row["members"].values())}
            before = after
            rows.append(row)
            db_row = row["members"]["db"]
            print("snapshot %d: chunks stored %.1f MB sent %.1f MB (db %.2f s, read %.1f MB); file stored %.1f MB "
                  "(db %.2f s = tar %.2f + upload %.2f); chunks as a tar: db %.2f s" % (
                      index + 1, row["chunks"]["stored_bytes"] / 1e6, row["chunks"]["sent_bytes"] / 1e6,
                      db_row["chunks"]["wall_s"], db_row["chunks"]["workdir_bytes_read"] / 1e6,
                      row["file"]["stored_bytes"] / 1e6, db_row["file"]["wall_s"], db_row["file"]["image_s"],
                      db_row["file"]["upload_s"], db_row["chunks_tar"]["wall_s"]), flush=True)
        restore_runs = {kind: [] for kind in clients}
        for attempt in range(args.restores):  # interleaved, so that the host's load falls on each alike
            for kind, client in clients.items():
                target = os.path.join(work, "restore-%s-%d" % (kind, attempt))
                began = time.monotonic()
                client.download_dir("snap-%d" % args.snapshots, "db", target)
                restore_runs[kind].append(round(time.monotonic() - began, 3))
                shutil.rmtree(target)
        restore = {kind: sorted(runs)[len(runs) // 2] for kind, runs in restore_runs.items()}
        rate = throughput(os.path.join(work, "image-db", "workdir.tar"))
        first = rows[0]["chunks"]
        later = rows[1:]
        median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
        db_wall = {kind: median([r["members"]["db"][kind]["wall_s"] for r in (later if kind != "file" else rows)])
                   for kind in clients}
        db_upload_file = median([r["members"]["db"]["file"]["upload_s"] for r in rows])
        summary = {
            "max_later_stored_fraction": round(max(r["chunks"]["stored_bytes"] for r in later) / first["stored_bytes"], 4),
            "max_later_sent_fraction": round(max(r["chunks"]["sent_bytes"] for r in later) / first["sent_bytes"], 4),
            "file_store_growth_per_snapshot_bytes": round(sum(r["file"]["stored_bytes"] for r in rows) / len(rows)),
            "chunk_store_total_bytes": stats(clients["chunks"].url)["stored_bytes"],
            "chunk_store_tar_total_bytes": stats(clients["chunks_tar"].url)["stored_bytes"],
            "chunk_store_level1_total_bytes": stats(clients["chunks_level1"].url)["stored_bytes"],
            "file_store_total_bytes": stats(clients["file"].url)["bytes"],
            "db_snapshot_wall_s_chunks_later_median": db_wall["chunks"],
            "db_snapshot_wall_s_chunks_tar_later_median": db_wall["chunks_tar"],
            "db_snapshot_wall_s_chunks_level1_later_median": db_wall["chunks_level1"],
            "db_snapshot_wall_s_file_median": db_wall["file"],
            "db_upload_s_file_median": db_upload_file,
            "db_workdir_bytes_read_later_median": median([r["members"]["db"]["chunks"]["workdir_bytes_read"] for r in later]),
            "restore_s": restore,
            "restore_runs_s": restore_runs,
            "throughput": rate,
        }
        db_sent = {kind: median([r["members"]["db"][kind]["sent_bytes"] for r in later]) for kind in clients}
        summary["db_sent_bytes_later_median"] = db_sent
        summary["db_wire_s_at_1_gbit_computed"] = {kind: round(sent * 8 / 1e9, 3) for kind, sent in db_sent.items()}
        summary["db_wall_speedup"] = round(db_wall["file"] / max(db_wall["chunks"], 1e-6), 2)
        summary["db_wall_speedup_vs_file_upload_only"] = round(db_upload_file / max(db_wall["chunks"], 1e-6), 2)
        summary["db_wall_speedup_chunks_level1_vs_file_upload_only"] = round(
            db_upload_file / max(db_wall["chunks_level1"], 1e-6), 2)
        summary["db_wall_speedup_chunks_tar"] = round(db_wall["file"] / max(db_wall["chunks_tar"], 1e-6), 2)
        summary["goals"] = {
            "later_stored_le_15pct": summary["max_later_stored_fraction"] <= 0.15,
            "later_sent_le_20pct": summary["max_later_sent_fraction"] <= 0.20,
            "db_wall_3x_shorter": summary["db_wall_speedup_vs_file_upload_only"] >= 3,
            "restore_no_slower": restore["chunks"] <= restore["file"] * 1.1,
            "restore_no_slower_at_level_1": restore["chunks_level1"] <= restore["file"] * 1.1,
            "cdc_ge_300_mb_s": rate["chunk_hash_compress_mb_s"] >= 300,
            "cdc_ge_300_mb_s_at_level_1": rate["chunk_hash_compress_level_1_mb_s"] >= 300,
        }
        return {"machine": benchkit.machine_info(), "when": benchkit.timestamp(),
                "settings": {"snapshots": args.snapshots, "db_mib": args.db_mib, "rate_kib_s": args.rate_kib,
                             "interval_s": args.interval, "db_memory_dirty": args.dirty, "restores": args.restores,
                             "chunk_avg": chunking.AVG, "zstd_level": chunking.LEVEL,
                             "stores": {"chunks": "workdir as a tree pointer: per-file chunks, stat cache",
                                        "file": "workdir.tar written, then uploaded whole",
                                        "chunks_level1": "the tree path with zstd level 1",
                                        "chunks_tar": "workdir.tar written, then cut whole, level 1 (the old path)"}},
                "snapshots": rows, "summary": summary}
    finally:
        for process, _url in servers:
            process.terminate()
            process.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def plot(document: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = document["snapshots"]
    xs = [r["snapshot"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, key, style in (("file", "stored_bytes", "s-"), ("chunks", "stored_bytes", "o-"), ("chunks", "sent_bytes", "^--"),
                             ("chunks_tar", "stored_bytes", "x:")):
        ax.plot(xs, [r[kind][key] / 1e6 for r in rows], style, label="%s store: %s" % (kind, key.replace("_bytes", "")))
    ax.set_xlabel("snapshot")
    ax.set_ylabel("MB per snapshot")
    ax.set_title("Periodic snapshots of a 128 MiB database-like member + 2 seqstream members")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=5)
    parser.add_argument("--db-mib", type=int, default=128)
    parser.add_argument("--rate-kib", type=int, default=512, help="db appends, KiB per second")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between snapshots (simulated)")
    parser.add_argument("--dirty", type=float, default=0.05, help="share of the db member's pages rewritten")
    parser.add_argument("--restores", type=int, default=3, help="restores of the last snapshot per store (median)")
    parser.add_argument("--work", default=None, help="where to keep the stores (default: the temp dir)")
    parser.add_argument("--out", default=os.path.join(benchkit.ROOT, "docs", "bench", "bench_storage.json"))
    args = parser.parse_args(argv)
    if args.snapshots < 2 or args.db_mib < 8:
        parser.error("--snapshots must be >= 2 and --db-mib >= 8")
    document = run(args)
    benchkit.write_json(args.out, document)
    plot(document, os.path.splitext(args.out)[0] + ".png")
    print(json.dumps(document["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
