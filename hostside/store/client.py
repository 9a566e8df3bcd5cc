"""Client of ``violin-snapshot-server``: stream image files up with their checksum, fetch them back verified.

Against a chunk store (``--store chunks:DIR``) a file is cut into chunks here (``chunking.py``), the
server is asked which of them it lacks (one call per batch of ~8 MiB), only those are sent, and the
file's manifest is committed last; memory stays bounded by one batch whatever the file's size.
Against a store of whole files (``file:``, or an older server: the chunk calls answer 404 or 405)
the whole file is PUT, as before. Every upload answers its ``logical_bytes`` (the file's size),
``stored_bytes`` (what the server newly stored for it, compressed) and ``sent_bytes`` (what went
over the wire). Downloads check every chunk's hash and every file's sha256.
"""

import collections
import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import queue
import threading
import urllib.parse
from typing import Callable, Dict, List

from violin_client import tls
from violin_core.errors import reason_of

from . import chunking, tree
from .base import CHUNK

FETCH_CHUNKS = 128  # chunks per fetch request (~8 MiB of content on average, 32 MiB at most)
PIPELINE = 1  # batches cut ahead of the one being sent
FETCHERS = 3  # groups of chunks fetched at once by a download (one connection each)
FILES_AT_ONCE = 2  # files of a directory uploaded at once (each bounded by PIPELINE + 1 batches)
KEEP_IDLE = 4  # kept-alive connections a download keeps for its next request


class StorageError(RuntimeError):
    """The server refused or could not be reached; the message says which and why."""


class ChecksumError(StorageError):
    """A fetched file does not match the checksum the server stored with it."""


class ChunksLost(StorageError):
    """The manifest's commit found chunks gone that the server had said it held (collected meanwhile)."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ImageServer:
    """One snapshot server at ``url``: http://HOST:PORT, or https://HOST:PORT verified against ``ca_file``
    (default $VIOLIN_CA_FILE, else the system's CAs)."""

    def __init__(self, url: str, token: str, timeout: float = 30.0, ca_file: str = None, level: int = None):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise StorageError("snapshot server URL must be http(s)://HOST:PORT, got %r" % url)
        self.url, self.host = url.rstrip("/"), parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.token, self.timeout = token, timeout
        self.level = level  # zstd's level for the chunks it sends (None: chunking.level_from_env())
        self.chunked = None  # whether the server takes chunks (asked once, on the first upload)
        self._keeping, self._idle, self._idle_lock = 0, [], threading.Lock()  # see _release
        try:
            self._context = tls.client_context(ca_file) if parsed.scheme == "https" else None
        except tls.TlsError as error:
            raise StorageError("snapshot server %s: %s" % (self.url, error)) from None

    def __repr__(self):  # never shows the token
        return "ImageServer(%r)" % self.url

    def _connect(self) -> http.client.HTTPConnection:
        if self._context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _failure(self, error) -> str:
        return tls.describe(error, self.url) or str(error)

    def _request(self, method, path, body=None, headers=None):
        """``(response, connection)``; give the connection back with ``_release`` once the answer is read.

        Inside a download a kept-alive connection is reused (a new one per file was a TLS handshake per
        request: 40 per CRIU member, 2.4 s of a loaded host's staging where the bytes took 0.2 s); if the
        server closed it meanwhile, the request goes once more on a new one (a body of bytes only)."""
        reused = self._idle_connection() if body is None or isinstance(body, bytes) else None
        connection = reused or self._connect()
        try:
            connection.request(method, path, body=body, headers=dict(
                {"Authorization": "Bearer " + self.token}, **(headers or {})))
            response = connection.getresponse()
            return response, connection
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            if reused is not None:
                return self._request(method, path, body, headers)
            if not isinstance(error, OSError):
                raise
            raise StorageError("snapshot server %s unreachable: %s" % (self.url, self._failure(error))) from None

    def _idle_connection(self):
        with self._idle_lock:
            return self._idle.pop() if self._idle else None

    def _release(self, connection, response=None) -> None:
        """Keep ``connection`` for the next request if a download runs and its answer was read to the end
        (and the server keeps it open), else close it."""
        if (response is not None and response.isclosed() and not response.will_close
                and connection.sock is not None):
            with self._idle_lock:
                if self._keeping and len(self._idle) < KEEP_IDLE:
                    self._idle.append(connection)
                    return
        connection.close()

    @contextlib.contextmanager
    def _kept_alive(self):
        """Connections kept alive between the requests made inside, closed at its end."""
        with self._idle_lock:
            self._keeping += 1
        try:
            yield
        finally:
            with self._idle_lock:
                self._keeping -= 1
                idle, self._idle = (self._idle, []) if not self._keeping else ([], self._idle)
            for connection in idle:
                connection.close()

    def _call(self, method, path, body=None, headers=None):
        """``(status, answer)``: the answer parsed as JSON, or its text when it is not JSON."""
        response, connection = self._request(method, path, body, headers)
        try:
            return response.status, read_answer(response)
        except (OSError, http.client.HTTPException) as error:
            raise StorageError("snapshot server %s: %s %s failed: %s" % (
                self.url, method, path, self._failure(error))) from None
        finally:
            self._release(connection, response)

    def _refused(self, name, status, answer) -> StorageError:
        return StorageError("snapshot server %s refused %s: %s %s" % (self.url, name, status, reason_of(answer)))

    # --- chunks -------------------------------------------------------------------------------

    def takes_chunks(self, name: str = "/chunks/missing") -> bool:
        """Whether the server keeps chunks (asked once): an empty ``missing`` call answers 200."""
        if self.chunked is None:
            status, answer = self._call("POST", "/chunks/missing", json.dumps({"chunks": []}).encode(),
                                        {"Content-Type": "application/json"})
            if status not in (200, 404, 405):
                raise self._refused(name, status, answer)
            self.chunked = status == 200
        return self.chunked

    def _post_json(self, path: str, body: dict, what: str):
        data = json.dumps(body).encode()
        status, answer = self._call("POST", path, data, {"Content-Type": "application/json"})
        if status != 200:
            raise self._refused(what, status, answer)
        return answer, len(data)

    def upload_chunks(self, snapshot: str, member: str, name: str, reader) -> Dict:
        """Cut what ``reader.read(n)`` gives into chunks, send those the server lacks, commit the manifest."""
        digest, counted = hashlib.sha256(), [0]

        class Hashing:
            @staticmethod
            def read(size):
                data = reader.read(size)
                digest.update(data)
                counted[0] += len(data)
                return data

        return self._upload_pieces(snapshot, member, name, chunking.packer_for(name).pieces(Hashing),
                                   lambda entries: {"sha256": digest.hexdigest()})

    def _upload_pieces(self, snapshot: str, member: str, name: str, pieces, checksum) -> Dict:
        """Send the chunks of ``pieces`` the server lacks and commit their manifest with ``checksum(entries)``
        (the manifest's checksum keys). A piece without data (named from a cache) that the server lacks
        raises ``ChunksLost`` before anything is committed."""
        totals = {"logical_bytes": 0, "stored_bytes": 0, "sent_bytes": 0, "chunks": 0, "new_chunks": 0}
        entries, known = [], set()  # known: ids this upload already asked about (and sent if lacking)

        def send(group):
            ask = [cid for cid in dict.fromkeys(p.id for p in group) if cid not in known]
            known.update(ask)
            answer, size = self._post_json("/chunks/missing", {"chunks": ask}, "/chunks/missing")
            totals["sent_bytes"] += size
            lacking = set(answer.get("missing", []))  # only these are compressed and sent
            wanted = {p.id: p for p in group if p.id in lacking}
            unread = [cid for cid, p in wanted.items() if p.data is None]
            if unread:
                raise ChunksLost("snapshot server %s no longer has %d chunks of %s named from the helper's "
                                 "cache (first: %s)" % (self.url, len(unread), name, unread[0]))
            frames = b"".join(chunking.frame(sender_packer.compress(p)) for p in wanted.values())
            if frames:
                status, stored = self._call("POST", "/chunks/upload", frames,
                                            {"Content-Type": "application/octet-stream",
                                             "Content-Length": str(len(frames))})
                if status != 200:
                    raise self._refused("chunks of %s" % name, status, stored)
                totals["sent_bytes"] += len(frames)
                totals["stored_bytes"] += stored.get("stored_bytes", 0)
                totals["new_chunks"] += stored.get("stored", 0)

        # Cutting and hashing here while the previous batch is asked about, compressed and sent in a
        # second thread: at most PIPELINE batches in memory (the queue, and the one being sent).
        sender_packer = chunking.packer_for(name, self.level)
        pipeline, failure = queue.Queue(PIPELINE), []

        def sender():
            while True:
                group = pipeline.get()
                if group is None:
                    return
                if not failure:
                    try:
                        send(group)
                    except BaseException as error:  # noqa: B902 - handed to the cutting thread
                        failure.append(error)

        thread = threading.Thread(target=sender, name="chunk-sender", daemon=True)
        thread.start()
        try:
            for group in chunking.batches(pieces):
                entries.extend([p.id, p.size] for p in group)
                if failure:
                    break
                pipeline.put(group)
        finally:
            pipeline.put(None)
            thread.join()
        if failure:
            raise failure[0]
        totals["chunks"] = len(entries)
        totals["logical_bytes"] = sum(size for _, size in entries)
        check = checksum(entries)
        body = json.dumps(dict(check, bytes=totals["logical_bytes"], chunks=entries)).encode()
        status, answer = self._call("PUT", "/manifests/%s/%s/%s" % (snapshot, member, name), body,
                                    {"Content-Type": "application/json"})
        totals["sent_bytes"] += len(body)
        if status == 409:  # a chunk it said it had was collected meanwhile (its snapshot deleted)
            raise ChunksLost("snapshot server %s lost %d chunks of %s during the upload (deleted meanwhile): %s"
                             % (self.url, len(answer.get("missing", [])), name, reason_of(answer)))
        if status != 201:
            raise self._refused(name, status, answer)
        if answer.get("sha256") != check["sha256"]:
            raise StorageError("snapshot server %s stored %s with sha256 %s, we sent %s" % (
                self.url, name, answer.get("sha256"), check["sha256"]))
        return dict(answer, **totals)

    def upload_tree(self, snapshot: str, member: str, name: str, root: str, clone: bool = False) -> Dict:
        """Store directory ``root`` as the tar file ``name`` (``tree.TreeTar``: what ``tarfile.add(root,
        arcname=".")`` writes) without writing the tar. On a chunk store each file is cut on its own and
        a file whose stat key is the one of this member's last upload is not read (``tree.StatCache``);
        the manifest's checksum is then the chunk list's (``chunking.list_checksum``). A store of whole
        files gets the archive streamed, every file read. ``clone``: ``root`` is a fresh copy of the
        member's directory (inode numbers and ctimes new; see ``tree``)."""
        if not self.takes_chunks(name):
            answer = self.upload_stream(snapshot, member, name, chunking.IterReader(tree.tar_bytes(root)))
            return dict(answer, files_read=None)
        cache = tree.cache_for(self.url, member, name)
        for attempt in (1, 2):
            walk = tree.TreeTar(root, chunking.Packer(), cache, clone, trust=attempt == 1)
            try:
                answer = self._upload_pieces(snapshot, member, name, walk.pieces(), lambda entries: {
                    "sha256": chunking.list_checksum(entries), "checksum": chunking.LIST_CHECKSUM})
            except ChunksLost:
                cache.clear()
                if attempt == 2:
                    raise
                continue
            walk.commit_cache()
            return dict(answer, files=walk.stats["files"], files_read=walk.stats["files_read"],
                        bytes_read=walk.stats["bytes_read"])
        raise AssertionError("unreachable")

    # --- whole files ----------------------------------------------------------------------------

    def upload(self, snapshot: str, member: str, path: str, name: str = None) -> Dict:
        """Stream one file; the server checks the checksum we computed first."""
        name = name or os.path.basename(path)
        if self.takes_chunks(name):
            try:
                with open(path, "rb") as handle:
                    return self.upload_chunks(snapshot, member, name, handle)
            except ChunksLost:  # a file can be read again: once more, now that the server knows it lacks them
                with open(path, "rb") as handle:
                    return self.upload_chunks(snapshot, member, name, handle)
        size, checksum = os.path.getsize(path), sha256_file(path)
        with open(path, "rb") as handle:
            status, answer = self._call("PUT", "/images/%s/%s/%s" % (snapshot, member, name), body=handle,
                                        headers={"Content-Length": str(size), "X-Sha256": checksum})
        if status != 201:
            raise self._refused(name, status, answer)
        return dict(answer, logical_bytes=size, stored_bytes=size, sent_bytes=size)

    def upload_stream(self, snapshot: str, member: str, name: str, reader) -> Dict:
        """Stream a file of unknown size (chunked) from ``reader.read(n)`` until it returns b"".

        The server's checksum must equal ours, or the upload counts as failed."""
        if self.takes_chunks(name):
            return self.upload_chunks(snapshot, member, name, reader)
        digest = hashlib.sha256()

        def chunks():
            for chunk in iter(lambda: reader.read(CHUNK), b""):
                digest.update(chunk)
                yield chunk

        connection = self._connect()
        try:
            connection.putrequest("PUT", "/images/%s/%s/%s" % (snapshot, member, name))
            connection.putheader("Authorization", "Bearer " + self.token)
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            try:
                for chunk in chunks():
                    connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                connection.send(b"0\r\n\r\n")
            except OSError as error:  # the server may have answered (refused) and hung up: say why
                try:
                    response = connection.getresponse()
                except (OSError, http.client.HTTPException):
                    raise error from None
            else:
                response = connection.getresponse()
            answer = read_answer(response)
        except (OSError, http.client.HTTPException) as error:
            raise StorageError("snapshot server %s: streaming %s failed: %s" % (
                self.url, name, self._failure(error))) from None
        finally:
            connection.close()
        if response.status != 201:
            raise self._refused(name, response.status, answer)
        stored = answer.get("sha256") if isinstance(answer, dict) else None
        if stored != digest.hexdigest():
            raise StorageError("snapshot server %s stored %s with sha256 %s, we sent %s" % (
                self.url, name, stored, digest.hexdigest()))
        return dict(answer, logical_bytes=answer["bytes"], stored_bytes=answer["bytes"], sent_bytes=answer["bytes"])

    def upload_dir(self, snapshot: str, member: str, directory: str) -> List[Dict]:
        """Every file of ``directory`` (in name order), FILES_AT_ONCE at a time (one file's disk and
        network waits overlap another's cutting); a tree pointer (``tree.POINTER``: ``workdir.tar.tree``)
        is stored as the tar it names (``upload_tree``), under the name without ``.tree``."""
        names = [n for n in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, n))]

        def one(name):
            path = os.path.join(directory, name)
            pointer = tree.read_pointer(path)
            if pointer is not None:
                return self.upload_tree(snapshot, member, name[:-len(tree.POINTER)], pointer["root"],
                                        clone=pointer["clone"])
            return self.upload(snapshot, member, path)

        if len(names) < 2 or FILES_AT_ONCE < 2:
            return [one(name) for name in names]
        self.takes_chunks()  # asked once, before the threads
        with concurrent.futures.ThreadPoolExecutor(FILES_AT_ONCE, thread_name_prefix="image-upload") as pool:
            return list(pool.map(one, names))

    def delete(self, snapshot: str, member: str = None) -> None:
        """Remove a snapshot's images, or one member's (a partial image after a failed upload)."""
        path = "/images/%s" % snapshot + ("/%s" % member if member else "")
        status, answer = self._call("DELETE", path)
        if status not in (200, 404):
            raise self._refused(path, status, answer)

    def index(self, snapshot: str, member: str) -> Dict:
        status, answer = self._call("GET", "/images/%s/%s" % (snapshot, member))
        if status != 200:
            raise StorageError("snapshot server %s has no images for %s/%s: %s %s" % (
                self.url, snapshot, member, status, reason_of(answer)))
        return answer

    def manifest(self, snapshot: str, member: str, name: str):
        """A file's chunk manifest, or None (a store of whole files, or a file of the old layout)."""
        if not self.takes_chunks():
            return None
        status, answer = self._call("GET", "/manifests/%s/%s/%s" % (snapshot, member, name))
        if status == 404:
            return None
        if status != 200:
            raise self._refused("the manifest of %s/%s/%s" % (snapshot, member, name), status, answer)
        return answer

    def _fetch_group(self, group, where_of: Callable[[int], str]) -> bytes:
        """The frames of ``group``'s chunks, as the server sent them (checked by the caller)."""
        ids = [cid for cid, _ in group]
        body = json.dumps({"chunks": ids}).encode()
        response, connection = self._request("POST", "/chunks/fetch", body, {"Content-Type": "application/json"})
        try:
            if response.status != 200:
                answer = read_answer(response)
                missing = answer.get("missing") if isinstance(answer, dict) else None
                if missing and missing[0] in ids:
                    raise StorageError("snapshot server %s: chunk %s is missing%s" % (
                        self.url, missing[0], where_of(ids.index(missing[0]))))
                raise StorageError("snapshot server %s: %s %s%s" % (
                    self.url, response.status, reason_of(answer), where_of(0)))
            return response.read()
        except (OSError, http.client.HTTPException) as error:
            raise StorageError("snapshot server %s: fetching chunks%s failed: %s" % (
                self.url, where_of(0), self._failure(error))) from None
        finally:
            self._release(connection, response)

    def _checked_group(self, group, where_of: Callable[[int], str]) -> List[bytes]:
        """The contents of ``group``'s chunks ([(id, size), ...]), fetched, each decompressed and checked
        against its id; ``where_of(i)`` names the file of chunk ``i`` in errors."""
        frames, contents = chunking.split_frames(self._fetch_group(group, where_of)), []
        for number, (cid, size) in enumerate(group):
            where = where_of(number)
            try:
                got = next(frames, None)
            except chunking.ChunkError as error:
                raise StorageError("snapshot server %s: bad chunk frames%s: %s" % (self.url, where, error)) from None
            if got is None:
                raise StorageError("snapshot server %s: the chunks ended before chunk %s%s" % (self.url, cid, where))
            if got.id != cid:
                raise ChecksumError("snapshot server %s sent chunk %s for chunk %s%s" % (self.url, got.id, cid, where))
            try:
                contents.append(chunking.unpack(cid, size, got.packed, where))
            except chunking.ChunkError as error:
                raise ChecksumError(str(error)) from None
        return contents

    def manifests(self, snapshot: str, member: str):
        """Every file's manifest of a member's image, in one call; None when the server cannot answer
        them so (a store of whole files, an older server, or a member's images of the old layout)."""
        if not self.takes_chunks():
            return None
        status, answer = self._call("GET", "/manifests/%s/%s" % (snapshot, member))
        if status in (404, 405):
            return None
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("files"), list):
            raise self._refused("the manifests of %s/%s" % (snapshot, member), status, answer)
        return answer["files"]

    def _download_chunks(self, snapshot: str, member: str, manifests: List[dict], directory: str) -> None:
        """Write every file of ``manifests`` into ``directory`` from its chunks, each chunk checked against
        its id and each file against its checksum (the content's sha256, or the chunk list's for a
        manifest whose ``checksum`` is ``chunking.LIST_CHECKSUM``). ChecksumError/StorageError name them.

        The chunks of all the files are fetched in groups of FETCH_CHUNKS that cross file boundaries: a
        CRIU image is ~40 files, most smaller than one chunk, and a request per file (plus its manifest)
        was 2-3 ms each, most of a member's staging. FETCHERS threads fetch, decompress and check the next
        groups (each on its own connection; zstd, BLAKE3 and the sockets release the GIL) while this one
        writes them in order: at most FETCHERS + 1 groups (~8 MiB each) in memory."""
        pieces = [(number, cid, size) for number, manifest in enumerate(manifests) for cid, size in manifest["chunks"]]
        groups = [pieces[start:start + FETCH_CHUNKS] for start in range(0, len(pieces), FETCH_CHUNKS)]
        writer = _ImageWriter(manifests, directory, " of member %s (snapshot %s)" % (member, snapshot))
        try:
            with concurrent.futures.ThreadPoolExecutor(FETCHERS, thread_name_prefix="chunk-fetcher") as pool:
                pending = collections.deque()
                try:
                    for group in groups:
                        pending.append((group, pool.submit(self._checked_group, [(c, n) for _, c, n in group],
                                                           lambda i, group=group: writer.where(group[i][0]))))
                        if len(pending) > FETCHERS:
                            done, future = pending.popleft()
                            writer.write(done, future.result())
                    while pending:
                        done, future = pending.popleft()
                        writer.write(done, future.result())
                finally:
                    for _, future in pending:
                        future.cancel()
            writer.finish()
        finally:
            writer.close()

    def download_dir(self, snapshot: str, member: str, directory: str) -> List[Dict]:
        """Fetch every file of a member's image into ``directory``, each chunk and checksum verified."""
        with self._kept_alive():
            return self._download_dir(snapshot, member, directory)

    def _download_dir(self, snapshot: str, member: str, directory: str) -> List[Dict]:
        os.makedirs(directory, exist_ok=True)
        manifests, whole = self.manifests(snapshot, member), []
        if manifests is not None:
            files = [{"name": m["name"], "bytes": m["bytes"], "sha256": m["sha256"]} for m in manifests]
        else:  # one manifest per file, or whole files
            files, manifests = self.index(snapshot, member)["files"], []
            for entry in files:
                manifest = self.manifest(snapshot, member, entry["name"])
                (whole if manifest is None else manifests).append(manifest or entry)
        self._download_chunks(snapshot, member, manifests, directory)
        for entry in whole:
            response, connection = self._request("GET", "/images/%s/%s/%s" % (snapshot, member, entry["name"]))
            try:
                if response.status != 200:
                    raise StorageError("snapshot server %s: %s/%s/%s: %s %s" % (
                        self.url, snapshot, member, entry["name"], response.status, reason_of(read_answer(response))))
                digest, target = hashlib.sha256(), os.path.join(directory, entry["name"])
                with open(target, "wb") as handle:
                    for chunk in iter(lambda: response.read(CHUNK), b""):
                        digest.update(chunk)
                        handle.write(chunk)
            finally:
                self._release(connection, response)
            if digest.hexdigest() != entry["sha256"]:
                raise ChecksumError("image file %s of %s/%s is corrupt: sha256 %s, expected %s" % (
                    entry["name"], snapshot, member, digest.hexdigest(), entry["sha256"]))
        return files


class _ImageWriter:
    """Writes the chunks of a download's files in order, one file open at a time, and checks each file
    against its manifest's checksum as it is closed."""

    def __init__(self, manifests: List[dict], directory: str, where: str):
        self.manifests, self.directory, self._where = manifests, directory, where
        self.current, self.handle, self.digest = -1, None, None

    def where(self, number: int) -> str:
        """Names file ``number`` in an error: " of image file NAME of member M (snapshot S)"."""
        return " of image file %s%s" % (self.manifests[number]["name"], self._where)

    def write(self, group, contents) -> None:
        for (number, _, _), content in zip(group, contents):
            self._advance(number)
            if self.digest is not None:
                self.digest.update(content)
            self.handle.write(content)

    def finish(self) -> None:
        """Every file written (the empty ones too) and checked."""
        self._advance(len(self.manifests))

    def _advance(self, number: int) -> None:
        while self.current < number:
            if self.handle is not None:
                self._close_checked()
            self.current += 1
            if self.current < len(self.manifests):
                manifest = self.manifests[self.current]
                self.handle = open(os.path.join(self.directory, manifest["name"]), "wb")
                self.digest = None if manifest.get("checksum") == chunking.LIST_CHECKSUM else hashlib.sha256()

    def _close_checked(self) -> None:
        manifest, handle, self.handle = self.manifests[self.current], self.handle, None
        handle.close()
        checksum = chunking.list_checksum(manifest["chunks"]) if self.digest is None else self.digest.hexdigest()
        if checksum != manifest["sha256"]:
            raise ChecksumError("image file %s%s is corrupt: sha256 %s, expected %s" % (
                manifest["name"], self._where, checksum, manifest["sha256"]))

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def takes_trees(sink) -> bool:
    """Whether an image sink uploads through this client (``upload_dir``), so that a tree pointer
    (``tree.write_pointer``) may stand for a directory in its image (the helper's ``StoreSink``)."""
    return isinstance(getattr(sink, "client", None), ImageServer)


def read_answer(response):
    """A JSON answer as a dict, or its text when it is not JSON (a proxy's error page, say)."""
    data = response.read()
    try:
        return json.loads(data) if data else {}
    except ValueError:
        return data.decode("utf-8", "replace")
