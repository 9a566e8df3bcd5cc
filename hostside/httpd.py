"""What the host-side daemons' small HTTP APIs share: JSON answers, bearer tokens, serving."""

import hmac
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet HTTP/1.1 handler that answers JSON."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status: int, body) -> None:
        data = (json.dumps(body, sort_keys=True) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_text(self, status: int, data: bytes, content_type: str) -> None:
        """A non-JSON answer (the metrics' text exposition)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def bearer_is(self, token: str) -> bool:
        """Whether the request carries ``Authorization: Bearer <token>`` (constant-time compare)."""
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def listen(host: str, port: int, handler, program: str):
    """A threaded server on host:port, or None after saying why it cannot listen (port 0 picks one)."""
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as error:
        print("%s: cannot listen on %s:%d: %s" % (program, host, port, error.strerror), file=sys.stderr)
        return None
    server.daemon_threads = True
    return server


def serve(server) -> int:
    """Serve until Ctrl-C; the exit code."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
