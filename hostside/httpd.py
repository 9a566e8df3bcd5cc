"""What the host-side daemons' small HTTP APIs share: JSON answers, bearer tokens, serving (HTTP or HTTPS)."""

import hmac
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from violin_client import tls


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet HTTP/1.1 handler that answers JSON."""

    protocol_version = "HTTP/1.1"
    # An answer is written as headers, then body: on a kept-alive connection Nagle held the body until the
    # client's delayed ACK of the headers, 40 ms per request (a staging's 38 requests per member: 1.8 s).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def send_json(self, status: int, body) -> None:
        self.send_text(status, (json.dumps(body, sort_keys=True) + "\n").encode(), "application/json")

    def send_text(self, status: int, data: bytes, content_type: str) -> None:
        """An answer of ``content_type`` (JSON, or the metrics' text exposition)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:  # say so: a client must not send its next request on this connection
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, unknown method...) in the one JSON error shape:
        never its HTML page. A method this server has no ``do_<METHOD>`` for is a 405 with ``Allow``."""
        from violin_core.errors import error_body
        self.close_connection = True
        allowed = sorted(name[3:] for name in dir(self) if name.startswith("do_"))
        if code == 501 and getattr(self, "command", None) and self.command not in allowed:
            code, message = 405, "%s not allowed (allowed: %s)" % (self.command, ", ".join(allowed))
        data = (json.dumps(error_body(code, message or self.responses.get(code, ("error",))[0]),
                           sort_keys=True) + "\n").encode()
        self.send_response(code)
        if code == 405:
            self.send_header("Allow", ", ".join(allowed))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(data)

    def bearer_is(self, token: str) -> bool:
        """Whether the request carries ``Authorization: Bearer <token>`` (constant-time compare)."""
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


# socketserver listens with a backlog of 5. Eight members storing at once open about 24 connections;
# on a busy host the accept queue overflowed, the kernel answered with SYN cookies, and the ones it
# then could not take were reset: a helper saw "Connection reset by peer" and the snapshot aborted.
LISTEN_BACKLOG = 1024  # (the kernel caps it at net.core.somaxconn)


class HTTPServer(ThreadingHTTPServer):
    """A thread per connection and a listen backlog for many at once."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG


class TlsHTTPServer(HTTPServer):
    """HTTPS: each connection's handshake is done in its own thread; one that fails (plain HTTP, a client
    that does not trust the certificate) is closed with one line on stderr, no traceback."""

    program = "httpd"

    def finish_request(self, request, client_address):
        why = tls.handshake(request)
        if why is not None:
            print("%s: %s from %s" % (self.program, why, client_address[0]), file=sys.stderr, flush=True)
            return
        super().finish_request(request, client_address)


def listen(host: str, port: int, handler, program: str, tls_cert: str = None, tls_key: str = None):
    """A threaded server on host:port, HTTPS when given a certificate and its key, or None after saying
    why it cannot listen (port 0 picks one)."""
    try:
        context = tls.server_context(tls_cert, tls_key) if tls_cert or tls_key else None
    except tls.TlsError as error:
        print("%s: %s" % (program, error), file=sys.stderr)
        return None
    try:
        server = (TlsHTTPServer if context else HTTPServer)((host, port), handler)
    except OSError as error:
        print("%s: cannot listen on %s:%d: %s" % (program, host, port, error.strerror), file=sys.stderr)
        return None
    server.daemon_threads = True
    if context is not None:
        server.program = program
        server.socket = tls.wrap_listener(server.socket, context)
    return server


def scheme_of(server) -> str:
    return "https" if isinstance(server, TlsHTTPServer) else "http"


def serve(server) -> int:
    """Serve until Ctrl-C; the exit code."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
