"""Client of ``violin-snapshot-server``: stream image files up with their checksum, fetch them back verified."""

import hashlib
import http.client
import json
import os
import urllib.parse
from typing import Dict, List

from violin_client import tls
from violin_core.errors import reason_of

from .base import CHUNK


class StorageError(RuntimeError):
    """The server refused or could not be reached; the message says which and why."""


class ChecksumError(StorageError):
    """A fetched file does not match the checksum the server stored with it."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ImageServer:
    """One snapshot server at ``url``: http://HOST:PORT, or https://HOST:PORT verified against ``ca_file``
    (default $VIOLIN_CA_FILE, else the system's CAs)."""

    def __init__(self, url: str, token: str, timeout: float = 30.0, ca_file: str = None):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise StorageError("snapshot server URL must be http(s)://HOST:PORT, got %r" % url)
        self.url, self.host = url.rstrip("/"), parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.token, self.timeout = token, timeout
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
        connection = self._connect()
        try:
            connection.request(method, path, body=body, headers=dict(
                {"Authorization": "Bearer " + self.token}, **(headers or {})))
            response = connection.getresponse()
            return response, connection
        except OSError as error:
            connection.close()
            raise StorageError("snapshot server %s unreachable: %s" % (self.url, self._failure(error))) from None

    def _call(self, method, path, body=None, headers=None):
        """``(status, answer)``: the answer parsed as JSON, or its text when it is not JSON."""
        response, connection = self._request(method, path, body, headers)
        try:
            return response.status, read_answer(response)
        except (OSError, http.client.HTTPException) as error:
            raise StorageError("snapshot server %s: %s %s failed: %s" % (
                self.url, method, path, self._failure(error))) from None
        finally:
            connection.close()

    def _refused(self, name, status, answer) -> StorageError:
        return StorageError("snapshot server %s refused %s: %s %s" % (self.url, name, status, reason_of(answer)))

    def upload(self, snapshot: str, member: str, path: str, name: str = None) -> Dict:
        """Stream one file; the server checks the checksum we computed first."""
        name = name or os.path.basename(path)
        size, checksum = os.path.getsize(path), sha256_file(path)
        with open(path, "rb") as handle:
            status, answer = self._call("PUT", "/images/%s/%s/%s" % (snapshot, member, name), body=handle,
                                        headers={"Content-Length": str(size), "X-Sha256": checksum})
        if status != 201:
            raise self._refused(name, status, answer)
        return answer

    def upload_stream(self, snapshot: str, member: str, name: str, reader) -> Dict:
        """Stream a file of unknown size (chunked) from ``reader.read(n)`` until it returns b"".

        The server's checksum must equal ours, or the upload counts as failed."""
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
        return answer

    def upload_dir(self, snapshot: str, member: str, directory: str) -> List[Dict]:
        return [self.upload(snapshot, member, os.path.join(directory, name))
                for name in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, name))]

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

    def download_dir(self, snapshot: str, member: str, directory: str) -> List[Dict]:
        """Fetch every file of a member's image into ``directory``, each checksum verified."""
        os.makedirs(directory, exist_ok=True)
        files = self.index(snapshot, member)["files"]
        for entry in files:
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
                connection.close()
            if digest.hexdigest() != entry["sha256"]:
                raise ChecksumError("image file %s of %s/%s is corrupt: sha256 %s, expected %s" % (
                    entry["name"], snapshot, member, digest.hexdigest(), entry["sha256"]))
        return files


def read_answer(response):
    """A JSON answer as a dict, or its text when it is not JSON (a proxy's error page, say)."""
    data = response.read()
    try:
        return json.loads(data) if data else {}
    except ValueError:
        return data.decode("utf-8", "replace")
