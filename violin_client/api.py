"""The one client of violin-snapshot's REST APIs (controller; helper and snapshot server share the error shape).

Standard library only (the ``violin`` CLI must not import Ryu or the core):

    api = ApiClient("http://127.0.0.1:8080", token="...")
    snap = api.call("POST", "/violin/snapshots", {"label": "x"})     # parsed JSON, or ApiError
    status, view = api.request("GET", "/violin/snapshots/" + snap["id"])  # never raises on 4xx/5xx
    view = wait_until_done(api, "/violin/snapshots/" + snap["id"], timeout=60)

Errors: ``ApiError(status, reason)`` for an answer that is not 2xx, with the reason of the project's one
error shape ``{"error", "reason"}`` (violin_core.errors); ``Unreachable`` (status None; also a
ConnectionError) when no answer came, ``timed_out`` saying whether it was the timeout; ``WaitTimeout``
(also a TimeoutError) when an operation is still running at the deadline, with its last ``view``.
Environment proxies are not used: the APIs are on the experiment's own hosts. An https:// URL is verified
against ``ca_file`` (or ``$VIOLIN_CA_FILE``), else the system's CAs (violin_client.tls); a certificate that
is not trusted is an Unreachable whose reason says so. The token is never part of a message.
"""

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Optional, Tuple

from violin_client import tls

DEFAULT_TIMEOUT = 30.0
DONE_STATES = ("complete", "aborted", "failed")  # a snapshot ends complete or aborted, a restore complete or failed
_OWN_TOKEN = object()


class ApiError(Exception):
    """An API refused or failed a request: ``status`` (None when there was no answer), ``reason`` for a person,
    ``body`` the parsed answer (if any)."""

    def __init__(self, status: Optional[int], reason: str, body: Any = None):
        super().__init__(reason if status is None else "HTTP %d: %s" % (status, reason))
        self.status, self.reason, self.body = status, reason, body


class Unreachable(ApiError, ConnectionError):
    """No answer from ``url``: refused, unresolvable, reset, or nothing within the timeout (``timed_out``)."""

    def __init__(self, url: str, why: str, timed_out: bool = False):
        ApiError.__init__(self, None, "cannot reach %s: %s" % (url, why))
        self.url, self.why, self.timed_out = url, why, timed_out


class WaitTimeout(ApiError, TimeoutError):
    """``path`` was still running at the deadline; ``view`` is the last answer seen."""

    def __init__(self, path: str, timeout: float, view: Any):
        ApiError.__init__(self, None, "%s still running after %.0f s: %r" % (path, timeout, view), view)
        self.path, self.view = path, view


def _reason_of(answer: Any, status: int, fallback: str = "") -> str:
    """The reason of an error answer in the one shape (as violin_core.errors.reason_of reads it)."""
    if isinstance(answer, dict) and isinstance(answer.get("reason"), str) and answer["reason"]:
        return answer["reason"]
    return fallback or "HTTP %d" % status


def _why(reason, url: str = "") -> str:
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "no answer in time"
    described = tls.describe(reason, url)
    if described:
        return described
    if url.startswith("http://") and isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError)):
        return "%s (the server closed the connection: it stopped, or it serves HTTPS and wants an https:// URL)" % (
            str(reason) or type(reason).__name__)
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


class ApiClient:
    """JSON over HTTP(S) to one API at ``url``; ``token`` is sent as ``Authorization: Bearer``;
    ``ca_file`` (default $VIOLIN_CA_FILE) verifies an https:// server."""

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 ca_file: Optional[str] = None):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        handlers = [urllib.request.ProxyHandler({})]
        if self.url.startswith("https://"):
            handlers.append(urllib.request.HTTPSHandler(context=tls.client_context(ca_file)))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self):  # never shows the token
        return "ApiClient(%r)" % self.url

    def _send(self, method: str, path: str, body, token, timeout) -> Tuple[int, bytes]:
        """(status, raw answer) of one request, whatever its status; Unreachable if none came."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        token = self.token if token is _OWN_TOKEN else token
        if token:
            headers["Authorization"] = "Bearer " + token
        timeout = self.timeout if timeout is None else timeout
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            try:
                return error.code, error.read()
            except (OSError, http.client.HTTPException):
                return error.code, b""
            finally:
                error.close()
        except urllib.error.URLError as error:
            timed_out = isinstance(error.reason, (socket.timeout, TimeoutError))
            raise Unreachable(self.url, _why(error.reason, self.url), timed_out) from None
        except (socket.timeout, TimeoutError):
            raise Unreachable(self.url, "no answer within %g s" % timeout, True) from None
        except (OSError, http.client.HTTPException) as error:
            raise Unreachable(self.url, _why(error, self.url)) from None

    def request(self, method: str, path: str, body=None, token=_OWN_TOKEN,
                timeout: Optional[float] = None) -> Tuple[int, Any]:
        """(status, parsed JSON) of one request; never raises on 4xx/5xx (for callers that check statuses).
        An empty answer parses as None, one that is not JSON as ``{"raw": text}``. ``token`` overrides the
        client's (None or "" sends none)."""
        status, raw = self._send(method, path, body, token, timeout)
        if not raw.strip():
            return status, None
        try:
            return status, json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return status, {"raw": raw.decode("utf-8", "replace")}

    def call(self, method: str, path: str, body=None, token=_OWN_TOKEN, timeout: Optional[float] = None):
        """The parsed JSON answer (None if empty) of a 2xx; ApiError otherwise, also for a 2xx not JSON."""
        status, raw = self._send(method, path, body, token, timeout)
        try:
            answer = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, ValueError):
            if 200 <= status < 300:
                raise ApiError(status, "%s answered %s %s with something that is not JSON"
                               % (self.url, method, path)) from None
            answer = None
        if not 200 <= status < 300:
            raise ApiError(status, _reason_of(answer, status, "HTTP %d %s" % (
                status, http.client.responses.get(status, ""))), answer)
        return answer

    def get(self, path: str):
        return self.call("GET", path)


def wait_until_done(client: ApiClient, path: str, timeout: Optional[float] = 60.0, done_states=DONE_STATES,
                    on_update: Optional[Callable[[dict, float], None]] = None, poll: float = 0.05,
                    first: Optional[dict] = None) -> dict:
    """Poll the snapshot or restore view at ``path`` until its ``state`` is one of ``done_states``; that view.

    ``first`` is a view already in hand (e.g. the answer that started the operation): it is looked at
    before the first poll. ``on_update(view, seconds since the start)`` sees every view, the last one too.
    ``timeout`` None waits for ever; otherwise WaitTimeout. A refused poll raises ApiError.
    """
    began = time.monotonic()
    view = first if first is not None else client.call("GET", path)
    while True:
        elapsed = time.monotonic() - began
        if on_update is not None:
            on_update(view, elapsed)
        if isinstance(view, dict) and view.get("state") in done_states:
            return view
        if timeout is not None and elapsed > timeout:
            raise WaitTimeout(path, timeout, view)
        time.sleep(poll)
        view = client.call("GET", path)


__all__ = ["ApiClient", "ApiError", "DONE_STATES", "Unreachable", "WaitTimeout", "wait_until_done"]
