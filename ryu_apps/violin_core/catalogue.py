"""The snapshot catalogue on disk: one directory per snapshot, written atomically.

``<dir>/<id>/manifest.json`` is the commit point: it is written last, through
a temporary file, fsync and rename, after the channel state it names. A
snapshot whose manifest says ``running`` when the controller starts was cut
short by a restart and is marked aborted; only ``complete`` ones are
``restorable``.
"""

import hashlib
import json
import os
import re
import shutil
import threading
from typing import Dict, List, Optional

from . import channel

ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
MANIFEST, CHANNEL = "manifest.json", "channel.pcapng"


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """temp file + fsync + rename + fsync of the directory (safe from several threads)."""
    tmp = "%s.tmp-%d-%d" % (path, os.getpid(), threading.get_ident())
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


class Catalogue:
    def __init__(self, directory: str):
        self.directory = directory
        self.manifests: Dict[str, dict] = {}

    def open(self) -> "Catalogue":
        """Create the directory if needed and load every manifest (marking interrupted ones)."""
        os.makedirs(self.directory, exist_ok=True)
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name, MANIFEST)
            if not ID_RE.match(name) or not os.path.isfile(path):
                continue
            try:
                with open(path, encoding="utf-8") as handle:
                    manifest = json.load(handle)
            except (OSError, ValueError):
                continue  # unreadable: never offered
            if manifest.get("state") == "running":
                manifest.update(state="aborted", phase="aborted", restorable=False,
                                reason="the controller restarted while the snapshot was running")
                self._write_manifest(manifest)
            self.manifests[manifest["id"]] = manifest
        return self

    def max_epoch(self) -> int:
        return max((m.get("epoch", 0) for m in self.manifests.values()), default=0)

    def list(self) -> List[dict]:
        return sorted(self.manifests.values(), key=lambda m: (m.get("created") or 0, m["id"]))

    def get(self, snapshot_id: str) -> Optional[dict]:
        return self.manifests.get(snapshot_id)

    def save(self, manifest: dict, frames: Optional[List[channel.ChannelFrame]] = None) -> dict:
        """Write the channel state (if any), then the manifest naming it."""
        manifest = dict(manifest)
        os.makedirs(os.path.join(self.directory, manifest["id"]), exist_ok=True)
        if frames is not None:
            data = channel.encode(frames)
            write_atomic(os.path.join(self.directory, manifest["id"], CHANNEL), data)
            manifest["channel"] = {"file": CHANNEL, "frames": len(frames), "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()}
        self._write_manifest(manifest)
        self.manifests[manifest["id"]] = manifest
        return manifest

    def load_extra(self, name: str) -> Optional[dict]:
        """A small JSON document of the controller's kept beside the snapshots (e.g. the schedule)."""
        try:
            with open(os.path.join(self.directory, name), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def save_extra(self, name: str, document: dict) -> None:
        write_atomic(os.path.join(self.directory, name), json.dumps(document).encode())

    def channel_path(self, snapshot_id: str) -> str:
        return os.path.join(self.directory, snapshot_id, CHANNEL)

    def delete(self, snapshot_id: str) -> None:
        self.manifests.pop(snapshot_id, None)
        shutil.rmtree(os.path.join(self.directory, snapshot_id), ignore_errors=True)

    def _write_manifest(self, manifest: dict) -> None:
        path = os.path.join(self.directory, manifest["id"], MANIFEST)
        write_atomic(path, (json.dumps(manifest, sort_keys=True) + "\n").encode())  # C encoder: not indented
