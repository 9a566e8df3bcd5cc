"""violin_client.api on loopback: call raises with the {error, reason} shape's reason, request does not,
tokens, unreachable APIs, and wait_until_done's updates and deadline."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from violin_client.api import ApiClient, ApiError, Unreachable, WaitTimeout, wait_until_done


class Handler(BaseHTTPRequestHandler):
    polls = 0

    def log_message(self, *args):
        pass

    def _answer(self, status, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/echo":
            self._answer(200, {"auth": self.headers.get("Authorization")})
        elif self.path == "/job":
            Handler.polls += 1
            self._answer(200, {"id": "j", "state": "complete" if Handler.polls >= 3 else "running"})
        elif self.path == "/forever":
            self._answer(200, {"state": "running"})
        elif self.path == "/text":
            self._answer(200, b"<html>")
        elif self.path == "/empty":
            self._answer(204, b"")
        else:
            self._answer(404, {"error": "not_found", "reason": "no snapshot %s" % self.path})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer(202, {"got": body})


@pytest.fixture()
def url():
    Handler.polls = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


def test_call_parses_json_and_raises_with_the_reason(url):
    api = ApiClient(url + "/", token="t0k")
    assert api.call("POST", "/x", {"a": 1}) == {"got": {"a": 1}}
    assert api.get("/echo") == {"auth": "Bearer t0k"}
    assert api.call("GET", "/empty") is None
    with pytest.raises(ApiError) as error:
        api.get("/snap-9")
    assert (error.value.status, error.value.reason) == (404, "no snapshot /snap-9")
    assert error.value.body["error"] == "not_found" and str(error.value) == "HTTP 404: no snapshot /snap-9"
    with pytest.raises(ApiError, match="not JSON"):
        api.get("/text")


def test_request_returns_statuses_and_tokens_can_be_overridden(url):
    api = ApiClient(url, token="t0k")
    assert api.request("GET", "/snap-9") == (404, {"error": "not_found", "reason": "no snapshot /snap-9"})
    assert api.request("GET", "/text") == (200, {"raw": "<html>"})
    assert api.request("GET", "/echo", token="other")[1] == {"auth": "Bearer other"}
    assert api.request("GET", "/echo", token="")[1] == {"auth": None}


def test_unreachable_is_one_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(Unreachable) as error:
        ApiClient("http://127.0.0.1:%d" % port, timeout=2).get("/violin/health")
    assert error.value.status is None and not error.value.timed_out
    assert error.value.reason.startswith("cannot reach http://127.0.0.1:%d: " % port)
    assert isinstance(error.value, ConnectionError)  # callers that wait for a daemon catch OSError


def test_wait_until_done_reports_every_view_and_keeps_a_deadline(url):
    api, seen = ApiClient(url), []
    view = wait_until_done(api, "/job", timeout=10, poll=0.01, on_update=lambda v, elapsed: seen.append(v["state"]))
    assert view["state"] == "complete" and seen == ["running", "running", "complete"]
    first = {"state": "running"}
    assert wait_until_done(api, "/job", timeout=10, poll=0.01, first=first)["state"] == "complete"
    with pytest.raises(WaitTimeout) as error:
        wait_until_done(api, "/forever", timeout=0.1, poll=0.01)
    assert error.value.view == {"state": "running"} and isinstance(error.value, TimeoutError)
    with pytest.raises(ApiError, match="no snapshot"):
        wait_until_done(api, "/gone", timeout=1, poll=0.01)
