"""``violin-snapshot-server``: stores members' snapshot images, with checksums, written atomically.

The process-level form of the seed's "live migration to a snapshot server":
helpers stream a member's image files here over HTTP as they are produced.

    PUT    /images/<snapshot>/<member>/<file>   body = the file (Content-Length or chunked);
                                                optional X-Sha256 is checked -> 201
    GET    /images/<snapshot>/<member>/<file>   the file, with X-Sha256
    GET    /images/<snapshot>/<member>          {"snapshot", "member", "files": [{name, bytes, sha256}]}
    DELETE /images/<snapshot>[/<member>]        prune a snapshot's (or one member's) images
    GET    /health                              {"status", "root", "store", "chunks"}
    GET    /stats                               the store's totals (a chunk store: stored, logical, chunks)
    GET    /metrics                             Prometheus text exposition (README "Metrics")

A chunk store (``--store chunks:DIR``) also takes the calls by which a client sends only what the
server lacks (a FileStore answers them 405, and the client falls back to whole-file PUTs):

    POST   /chunks/missing                      {"chunks": [id, ...]} -> {"missing": [id, ...]}
    POST   /chunks/upload                       body = chunk frames (chunking.py) -> {"received", "stored", "stored_bytes"}
    POST   /chunks/fetch                        {"chunks": [id, ...]} -> the chunk frames, in that order
    PUT    /manifests/<snapshot>/<member>/<file>  {"bytes", "sha256", "chunks": [[id, size], ...], "checksum"?}
                                                -> 201, or 409 {"missing": [...]} naming the chunks to send
                                                first; "checksum": "chunk-list": sha256 is the chunk list's
    GET    /manifests/<snapshot>/<member>/<file>  {"name", "bytes", "sha256", "chunks"}
    GET    /manifests/<snapshot>/<member>       {"snapshot", "member", "files": [manifest, ...]}: every file's
                                                at once (a download's one call; 404 for the old layout)

Every call but /health and /metrics needs ``Authorization: Bearer <token>``. Errors answer
``{"error": <name>, "reason": <text>}`` (``violin_core.errors``). This is only the
HTTP side: what keeps the files is a ``Store`` (``--store file:DIR``, or ``--dir DIR``;
see ``hostside.store.base`` for the rules every store keeps, atomic puts first).
"""

import argparse
import contextlib
import json
import os
import sys
import traceback

from hostside.httpd import JsonHandler, listen, scheme_of, serve
from hostside.metrics import ServerMetrics
from violin_core import schema
from violin_core.errors import error_body

from . import chunking, open_store, store_class
from .chunks import ChunkStore, MissingChunks
from .base import CHUNK, NAME_RE, ChecksumMismatch, InvalidName, NotFound, Store

_IDS = schema.ListOf(schema.Field(str, check=lambda v: None if chunking.is_id(v) else "a chunk id: 64 lowercase hex digits"))
CHUNK_IDS = schema.Schema({"chunks": _IDS}, allow_none=False)
MANIFEST = schema.Schema({
    "bytes": schema.Field(int, check=lambda v: None if v >= 0 else "must be >= 0"),
    "sha256": schema.Field(str, check=schema.matches(r"^[0-9a-fA-F]{64}$", "64 hex digits")),
    "chunks": schema.ListOf(schema.Field(list, check=lambda v: None if len(v) == 2 and chunking.is_id(v[0])
                                         and isinstance(v[1], int) else "[id, size]")),
    "checksum": schema.Field((str, type(None)), None, check=lambda v: None if v in (None, chunking.LIST_CHECKSUM)
                             else "absent (sha256 of the content) or %r (of the chunk list)" % chunking.LIST_CHECKSUM),
}, allow_none=False)
MAX_JSON = 64 << 20  # a manifest of a 1 TiB image is about 100 MiB: more than a member has

ROUTES = "expected /images/<snapshot>[/<member>[/<file>]] with names of letters, digits, _ . -"


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


def make_handler(store: Store, token: str, metrics: ServerMetrics = None):
    metrics = ServerMetrics() if metrics is None else metrics  # its own registry unless given

    class Handler(JsonHandler):
        answered = False  # whether this request's status line went out (then no error answer can follow)

        def send_response(self, *args, **kwargs):
            self.answered = True
            super().send_response(*args, **kwargs)

        def _error(self, status: int, reason: str) -> None:
            if getattr(self, "command", None) in ("PUT", "POST"):
                self.close_connection = True  # its body may be unread: the connection cannot carry another request
            self.send_json(status, error_body(status, reason))

        def _answer(self, route) -> None:
            """Run ``route(parts)`` on the validated path; a store's refusal or any failure becomes
            a JSON error answer (the traceback goes to our stderr, never to the client)."""
            self.answered = False
            if self.command in ("GET", "DELETE") and (self.headers.get("Transfer-Encoding")
                                                      or self.headers.get("Content-Length", "0").strip() != "0"):
                self.close_connection = True  # a body no route reads would be taken for the next request
            try:
                parts = self._parts()
                if parts is not None:
                    route(parts)
            except NotFound as error:
                self._error(404, str(error))
            except MissingChunks as error:
                self.send_json(409, error_body(409, str(error), missing=error.ids))
            except (ChecksumMismatch, InvalidName, ValueError) as error:
                self._error(422 if isinstance(error, ChecksumMismatch) else 400, str(error))
            except Exception as error:  # noqa: BLE001 - the answer must stay JSON
                traceback.print_exc()
                self.close_connection = True
                if not self.answered:
                    self._error(500, "internal error: %s: %s" % (type(error).__name__, error))

        def _parts(self):
            """Validated path parts after /images, or None after answering an error."""
            if self.path in ("/health", "/metrics"):
                return [self.path[1:]]
            if not self.bearer_is(token):
                self._error(401, "missing or wrong bearer token")
                return None
            if self.path == "/stats":
                return ["@stats"]
            parts = self.path.strip("/").split("/")
            if parts[0] == "chunks" and len(parts) == 2 and parts[1] in ("missing", "upload", "fetch"):
                return ["@chunks", parts[1]]
            if parts[0] == "manifests" and len(parts) in (3, 4):
                if not all(NAME_RE.match(p) for p in parts[1:]):
                    self._error(400, "expected /manifests/<snapshot>/<member>[/<file>] with names of letters, "
                                     "digits, _ . -")
                    return None
                return ["@manifests"] + parts[1:]
            if parts[0] != "images" or not 2 <= len(parts) <= 4 or not all(NAME_RE.match(p) for p in parts[1:]):
                self._error(404 if parts[0] != "images" else 400, ROUTES)
                return None
            return parts[1:]

        def do_GET(self):
            self._answer(self._get)

        def do_PUT(self):
            self._answer(self._put)

        def do_DELETE(self):
            self._answer(self._delete)

        def do_POST(self):
            self._answer(self._post)

        def _body(self):
            """The request body's pieces (Content-Length or chunked); None after answering 411."""
            chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            if self.headers.get("Content-Length") is None and not chunked:
                self._error(411, "Content-Length or chunked transfer encoding is required")
                return None
            return read_chunked(self.rfile) if chunked else read_exactly(self.rfile, int(self.headers["Content-Length"]))

        def _json_body(self, shape: schema.Schema):
            body = self._body()
            if body is None:
                return None
            data, size = [], 0
            for piece in body:
                size += len(piece)
                if size > MAX_JSON:
                    raise ValueError("a JSON body of more than %d bytes" % MAX_JSON)
                data.append(piece)
            try:
                value = json.loads(b"".join(data) or b"null")
            except ValueError:
                raise ValueError("the body is not JSON") from None
            return shape.validate(value)  # a SchemaError is a ValueError: 400 naming the key

        def _chunk_store(self, what: str) -> bool:
            if isinstance(store, ChunkStore):
                return True
            self._error(405, "%s: this server's store (%s:) keeps whole files, not chunks" % (what, store.scheme))
            return False

        def _post(self, parts):
            if parts[:1] != ["@chunks"]:
                return self._error(405, "POST is only for /chunks/missing, /chunks/upload and /chunks/fetch")
            if not self._chunk_store(self.path):
                return None
            if parts[1] == "upload":
                body = self._body()
                if body is None:
                    return None
                try:
                    answer = store.store_chunks(chunking.read_frames(chunking.IterReader(body)))
                except OSError as error:
                    metrics.refused("storage_error")
                    self.close_connection = True
                    return self._error(507, "cannot store chunks: %s" % (error.strerror or error))
                return self.send_json(200, answer)
            body = self._json_body(CHUNK_IDS)
            if body is None:
                return None
            ids = body["chunks"]
            if parts[1] == "missing":
                return self.send_json(200, {"missing": store.missing(ids)})
            found = store.frame_ranges(ids)
            if found is not None:  # the frames as the packs hold them, sent by the kernel (sendfile)
                handles, ranges = found
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(sum(length for _, _, length in ranges)))
                    self.end_headers()
                    for handle, offset, length in ranges:
                        self.connection.sendfile(handle, offset, length)
                finally:
                    for handle in handles:
                        handle.close()
                return None
            packed, lacking = store.packed_chunks(ids)  # read before answering: a sweep cannot truncate it
            if lacking:
                return self.send_json(404, error_body(404, "%d chunks are missing (first: %s)" % (
                    len(lacking), lacking[0]), missing=lacking))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(sum(chunking.HEAD_SIZE + len(p) for p in packed)))
            self.end_headers()
            self.wfile.write(b"".join(chunking.frame_head(cid, data) + data for cid, data in zip(ids, packed)))
            return None

        def _get(self, parts):
            if parts == ["health"]:
                return self.send_json(200, {"status": "ok", "root": store.root, "store": store.scheme,
                                            "chunks": isinstance(store, ChunkStore)})
            if parts == ["metrics"]:
                content_type, data = metrics.exposition()
                return self.send_text(200, data, content_type)
            if parts == ["@stats"]:
                return self.send_json(200, dict(store.totals(), store=store.scheme))
            if parts[0] == "@manifests":
                if not self._chunk_store(self.path):
                    return None
                if len(parts) == 3:
                    return self.send_json(200, store.manifests(*parts[1:]))
                return self.send_json(200, store.manifest(*parts[1:]))
            if parts[0].startswith("@"):
                return self._error(405, "%s takes POST" % self.path)
            if len(parts) == 2:
                files = store.index(*parts)
                if files is None:
                    return self._error(404, "no images for %s/%s" % tuple(parts))
                return self.send_json(200, {"snapshot": parts[0], "member": parts[1],
                                            "files": [f.as_dict() for f in files]})
            if len(parts) != 3:
                return self._error(400, "GET /images/<snapshot>/<member>[/<file>]")
            chunks, info = store.open(*parts)
            with contextlib.closing(chunks):
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(info.bytes))
                self.send_header("X-Sha256", info.sha256)
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(chunk)

        def _put(self, parts):
            if parts[0] == "@manifests":
                if len(parts) != 4:
                    return self._error(400, "PUT /manifests/<snapshot>/<member>/<file>")
                if not self._chunk_store(self.path):
                    return None
                body = self._json_body(MANIFEST)
                if body is None:
                    return None
                try:
                    info = store.commit(*parts[1:], body["bytes"], body["sha256"], body["chunks"],
                                        checksum=body["checksum"])
                except OSError as error:
                    metrics.refused("storage_error")
                    return self._error(507, "cannot store %s: %s" % ("/".join(parts[1:]), error.strerror or error))
                metrics.stored(info.bytes)
                return self.send_json(201, dict(info.as_dict(), location="/images/" + "/".join(parts[1:])))
            if parts[0].startswith("@") or parts == ["health"] or len(parts) != 3:
                return self._error(400, "PUT /images/<snapshot>/<member>/<file>")
            chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            if self.headers.get("Content-Length") is None and not chunked:
                return self._error(411, "Content-Length or chunked transfer encoding is required")
            length = None if chunked else int(self.headers["Content-Length"])
            body = read_chunked(self.rfile) if length is None else read_exactly(self.rfile, length)
            try:
                info = store.put(*parts, body, self.headers.get("X-Sha256"))
            except OSError as error:  # e.g. ENOSPC: answer, then read the rest, so the client sees the answer
                gone = isinstance(error, FileNotFoundError)  # the snapshot deleted while its file came in
                metrics.refused("conflict" if gone else "storage_error")
                self.close_connection = True  # (a close with its data unread would reset the connection first)
                self._error(409 if gone else 507, "cannot store %s: %s" % (
                    "/".join(parts), "its snapshot was deleted meanwhile" if gone else error.strerror or error))
                self.wfile.flush()
                try:
                    for _ in body:
                        pass
                except (OSError, ValueError):
                    pass
                return None
            except ChecksumMismatch:
                metrics.refused("checksum_mismatch")
                raise
            except (InvalidName, ValueError):
                metrics.refused("bad_request")
                raise
            metrics.stored(info.bytes)
            self.send_json(201, dict(info.as_dict(), location="/images/" + "/".join(parts)))

        def _delete(self, parts):
            if parts[0].startswith("@") or parts[:1] in (["health"], ["metrics"]) or len(parts) not in (1, 2):
                return self._error(400, "DELETE /images/<snapshot>[/<member>]")
            if not store.delete(*parts):
                return self._error(404, "no images for %s" % "/".join(parts))
            self.send_json(200, {"deleted": "/".join(parts)})

    return Handler


def build_args(argv):
    parser = argparse.ArgumentParser(prog="violin-snapshot-server", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT (default 127.0.0.1:7070)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", help="where images are stored (the same as --store file:DIR)")
    where.add_argument("--store", help="the store, as SCHEME:ARGUMENT (file:DIR, or chunks:DIR: deduplicated)")
    parser.add_argument("--token", default=os.environ.get("VIOLIN_SERVER_TOKEN"),
                        help="bearer token clients must send (default: $VIOLIN_SERVER_TOKEN)")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM, chain after it); needs --tls-key")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        parser.error("--listen must be HOST:PORT, got %r" % args.listen)
    if not args.token:
        parser.error("a token is required (--token or VIOLIN_SERVER_TOKEN)")
    args.store = args.store or "file:" + args.dir
    try:
        store_class(args.store)
    except ValueError as error:
        parser.error(str(error))
    args.host, args.port = host, int(port)
    return args


def build_tool_args(argv):
    """``verify`` / ``gc`` of a chunk store (a server may be running on it: both take its lock)."""
    parser = argparse.ArgumentParser(prog="violin-snapshot-server " + argv[0],
                                     description="verify: check every manifest, chunk and file checksum "
                                     "(JSON report, exit 0 when sound, 1 when damaged); gc: free the chunks "
                                     "no manifest names")
    parser.add_argument("--store", required=True, help="the store, chunks:DIR")
    if argv[0] == "gc":
        parser.add_argument("--min-age", type=float, default=3600.0,
                            help="keep unreferenced chunks younger than this many seconds (uploads of a "
                            "running server hold them; default 3600)")
    args = parser.parse_args(argv[1:])
    try:
        cls, _ = store_class(args.store)
    except ValueError as error:
        parser.error(str(error))
    if cls is not ChunkStore:
        parser.error("%s works on a chunk store (chunks:DIR), not %s" % (argv[0], args.store))
    if not os.path.isdir(args.store.partition(":")[2]):
        parser.error("no such directory: %s" % args.store.partition(":")[2])
    args.command = argv[0]
    return args


def tool(argv) -> int:
    args = build_tool_args(argv)
    store = open_store(args.store)
    report = store.verify() if args.command == "verify" else store.gc(args.min_age)
    print(json.dumps(report, indent=1, sort_keys=True))
    return 0 if report.get("ok", True) else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["verify"], ["gc"]):
        return tool(argv)
    args = build_args(argv)
    try:
        store = open_store(args.store)
    except OSError as error:
        print("violin-snapshot-server: cannot open store %s: %s" % (args.store, error), file=sys.stderr)
        return 1
    server = listen(args.host, args.port, make_handler(store, args.token), "violin-snapshot-server",
                    args.tls_cert, args.tls_key)
    if server is None:
        return 1
    print("violin-snapshot-server: serving %s on %s://%s:%d" % (args.store, scheme_of(server),
                                                                *server.server_address[:2]), flush=True)
    return serve(server)


if __name__ == "__main__":
    sys.exit(main())
