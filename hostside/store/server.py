"""``violin-snapshot-server``: stores members' snapshot images, with checksums, written atomically.

The process-level form of the seed's "live migration to a snapshot server":
helpers stream a member's image files here over HTTP as they are produced.

    PUT    /images/<snapshot>/<member>/<file>   body = the file (Content-Length);
                                                optional X-Sha256 is checked -> 201
    GET    /images/<snapshot>/<member>/<file>   the file, with X-Sha256
    GET    /images/<snapshot>/<member>          {"files": [{name, bytes, sha256}]}
    DELETE /images/<snapshot>                   prune a snapshot's images
    GET    /health

Every call but /health needs ``Authorization: Bearer <token>``. Files land in a
temporary file, are fsynced and renamed; a member's ``index.json`` (the list of
complete files and their checksums) is rewritten the same way after each one.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Optional

from hostside.httpd import JsonHandler, listen, serve as httpd_serve
from violin_core.catalogue import fsync_dir, write_atomic

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
CHUNK = 1 << 20
INDEX = "index.json"


class ImageStore:
    """The files on disk: <root>/<snapshot>/<member>/<file> plus each member's index.json."""

    def __init__(self, root: str):
        self.root = root
        self.lock = threading.Lock()
        os.makedirs(root, exist_ok=True)

    def member_dir(self, snapshot: str, member: str) -> str:
        return os.path.join(self.root, snapshot, member)

    def index(self, snapshot: str, member: str) -> Optional[dict]:
        try:
            with open(os.path.join(self.member_dir(snapshot, member), INDEX)) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def store(self, snapshot: str, member: str, name: str, stream, length: Optional[int],
              expected: Optional[str]) -> dict:
        """Store one file from ``stream``: ``length`` bytes, or HTTP chunks when ``length`` is None
        (a VM's migration stream, whose size nobody knows in advance)."""
        directory = self.member_dir(snapshot, member)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, ".%s.part-%d" % (name, threading.get_ident()))
        digest, received = hashlib.sha256(), 0
        chunks = read_chunked(stream) if length is None else read_exactly(stream, length)
        try:
            with open(tmp, "wb") as handle:
                for chunk in chunks:
                    digest.update(chunk)
                    handle.write(chunk)
                    received += len(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            sha256 = digest.hexdigest()
            if expected and expected.lower() != sha256:
                raise ChecksumMismatch("checksum mismatch for %s: sent %s, received %s" % (name, expected, sha256))
            os.replace(tmp, os.path.join(directory, name))
            fsync_dir(directory)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        with self.lock:
            index = self.index(snapshot, member) or {"snapshot": snapshot, "member": member, "files": []}
            index["files"] = [f for f in index["files"] if f["name"] != name] + [
                {"name": name, "bytes": received, "sha256": sha256}]
            write_atomic(os.path.join(directory, INDEX), json.dumps(index, indent=1).encode())
        return {"name": name, "bytes": received, "sha256": sha256}

    def delete(self, snapshot: str) -> bool:
        path = os.path.join(self.root, snapshot)
        if not os.path.isdir(path):
            return False
        shutil.rmtree(path)
        return True


class ChecksumMismatch(ValueError):
    pass


def read_exactly(stream, length: int):
    remaining = length
    while remaining > 0:
        chunk = stream.read(min(CHUNK, remaining))
        if not chunk:
            raise ValueError("the body ended after %d of %d bytes" % (length - remaining, length))
        remaining -= len(chunk)
        yield chunk


def read_chunked(stream):
    """The payload of an HTTP/1.1 chunked body (trailers ignored)."""
    while True:
        line = stream.readline(1024)
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise ValueError("bad chunk header %r" % line[:40]) from None
        if size == 0:
            while stream.readline(1024) not in (b"\r\n", b"\n", b""):
                pass
            return
        yield from read_exactly(stream, size)
        if stream.readline(8) not in (b"\r\n", b"\n"):
            raise ValueError("chunk not terminated by CRLF")


def make_handler(store: ImageStore, token: str):
    class Handler(JsonHandler):
        def _error(self, status: int, reason: str) -> None:
            self.send_json(status, {"error": status, "reason": reason})

        def _parts(self):
            """Validated path parts after /images, or None after answering an error."""
            if self.path == "/health":
                return ["health"]
            if not self.bearer_is(token):
                self._error(401, "missing or wrong bearer token")
                return None
            parts = self.path.strip("/").split("/")
            if parts[0] != "images" or not 2 <= len(parts) <= 4 or not all(NAME_RE.match(p) for p in parts[1:]):
                self._error(404 if parts[0] != "images" else 400,
                            "expected /images/<snapshot>[/<member>[/<file>]] with names of letters, digits, _ . -")
                return None
            return parts[1:]

        def do_GET(self):
            parts = self._parts()
            if parts is None:
                return
            if parts == ["health"]:
                return self.send_json(200, {"status": "ok", "root": store.root})
            if len(parts) == 2:
                index = store.index(*parts)
                return self.send_json(200, index) if index else self._error(404, "no images for %s/%s" % tuple(parts))
            if len(parts) != 3:
                return self._error(400, "GET /images/<snapshot>/<member>[/<file>]")
            entry = next((f for f in (store.index(*parts[:2]) or {}).get("files", []) if f["name"] == parts[2]), None)
            if entry is None:
                return self._error(404, "no file %s" % "/".join(parts))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(entry["bytes"]))
            self.send_header("X-Sha256", entry["sha256"])
            self.end_headers()
            with open(os.path.join(store.member_dir(*parts[:2]), parts[2]), "rb") as handle:
                shutil.copyfileobj(handle, self.wfile, CHUNK)

        def do_PUT(self):
            parts = self._parts()
            if parts is None:
                return
            if len(parts) != 3 or parts[2] == INDEX:
                return self._error(400, "PUT /images/<snapshot>/<member>/<file>")
            chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            if self.headers.get("Content-Length") is None and not chunked:
                return self._error(411, "Content-Length or chunked transfer encoding is required")
            try:
                length = None if chunked else int(self.headers["Content-Length"])
                result = store.store(*parts, self.rfile, length, self.headers.get("X-Sha256"))
            except ChecksumMismatch as error:
                return self._error(422, str(error))
            except ValueError as error:
                self.close_connection = True
                return self._error(400, str(error))
            except OSError as error:
                return self._error(507, "cannot store %s: %s" % ("/".join(parts), error.strerror))
            self.send_json(201, dict(result, location="/images/" + "/".join(parts)))

        def do_DELETE(self):
            parts = self._parts()
            if parts is None:
                return
            if len(parts) != 1:
                return self._error(400, "DELETE /images/<snapshot>")
            if not store.delete(parts[0]):
                return self._error(404, "no images for snapshot %s" % parts[0])
            self.send_json(200, {"deleted": parts[0]})

    return Handler


def serve(host: str, port: int, root: str, token: str):
    """A started-but-not-serving server (call ``serve_forever``); port 0 picks one."""
    server = ThreadingHTTPServer((host, port), make_handler(ImageStore(root), token))
    server.daemon_threads = True
    return server


def build_args(argv):
    parser = argparse.ArgumentParser(prog="violin-snapshot-server", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT (default 127.0.0.1:7070)")
    parser.add_argument("--dir", required=True, help="where images are stored")
    parser.add_argument("--token", default=os.environ.get("VIOLIN_SERVER_TOKEN"),
                        help="bearer token clients must send (default: $VIOLIN_SERVER_TOKEN)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        parser.error("--listen must be HOST:PORT, got %r" % args.listen)
    if not args.token:
        parser.error("a token is required (--token or VIOLIN_SERVER_TOKEN)")
    args.host, args.port = host, int(port)
    return args


def main(argv=None) -> int:
    args = build_args(sys.argv[1:] if argv is None else argv)
    server = listen(args.host, args.port, make_handler(ImageStore(args.dir), args.token), "violin-snapshot-server")
    if server is None:
        return 1
    print("violin-snapshot-server: serving %s on %s:%d" % (args.dir, *server.server_address[:2]), flush=True)
    return httpd_serve(server)


if __name__ == "__main__":
    sys.exit(main())
