"""The REST edge under ``/violin``: routing, auth, JSON and errors in one place.

A plain WSGI application (webob, no ryu). Handlers receive the parsed JSON body
and the URL variables and return a JSON-ready value (or a ``(status, value)``
pair), or a ``Body`` for the rare route that answers something else (the
metrics' text exposition); a ``Refused`` becomes the one JSON error shape (``violin_core.errors``)
with its status, anything unexpected a logged 500: never a traceback.
"""

import hmac
import json
import logging
import re
from typing import Callable, List, Optional

from webob import Request, Response

from .errors import Refused, error_body

LOG = logging.getLogger("violin.rest")
PREFIX = "/violin"


class Body:
    """A handler's non-JSON answer: raw bytes with their content type."""

    def __init__(self, data: bytes, content_type: str):
        self.data, self.content_type = data, content_type


class Route:
    def __init__(self, method: str, template: str, handler: Callable, mutating: bool):
        self.method, self.template, self.handler, self.mutating = method, template, handler, mutating
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
        self.regex = re.compile("^" + pattern + "$")


class RestApp:
    """Routes requests to handlers; mutating routes need ``Authorization: Bearer``."""

    def __init__(self, token: Optional[str] = None):
        self.token = token
        self.routes: List[Route] = []

    def route(self, method: str, template: str, mutating: Optional[bool] = None):
        def register(handler):
            is_mutating = method != "GET" if mutating is None else mutating
            self.routes.append(Route(method, PREFIX + template, handler, is_mutating))
            return handler
        return register

    def __call__(self, environ, start_response):
        return self.respond(Request(environ))(environ, start_response)

    def respond(self, request: Request) -> Response:
        try:
            status, body = self._dispatch(request)
        except Refused as exc:
            status, body = exc.status, error_body(exc.status, exc.reason, **exc.extra)
        except Exception:  # last line of defence, logged in full
            LOG.exception("REST handler failed: %s %s", request.method, request.path)
            status, body = 500, error_body(500, "internal error; see the controller log")
        if isinstance(body, Body):
            response = Response(status=status)
            response.headers["Content-Type"] = body.content_type
            response.body = body.data
            return response
        response = Response(status=status, content_type="application/json", charset="utf-8")
        # Not indented: with an indent Python's json encodes in Python, 10x slower than its C encoder (a
        # restore's progress polled every 50 ms cost the controller ~0.4 s of CPU per 8-member restore).
        response.text = json.dumps(body, sort_keys=True) + "\n"
        return response

    def _dispatch(self, request: Request):
        path = request.path_info.rstrip("/") or "/"
        matched = [(r, r.regex.match(path)) for r in self.routes]
        matched = [(r, m) for r, m in matched if m]
        if not matched:
            raise Refused(404, "no such resource: %s" % path)
        for route, match in matched:
            if route.method == request.method:
                break
        else:
            allowed = ", ".join(sorted({r.method for r, _ in matched}))
            raise Refused(405, "%s not allowed on %s (allowed: %s)" % (request.method, path, allowed))
        if route.mutating:
            self._authorize(request)
        body = _json_body(request) if request.method in ("POST", "PUT", "PATCH") else None
        result = route.handler(body, **match.groupdict())
        return result if isinstance(result, tuple) else (200, result)

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            raise Refused(403, "mutating calls are disabled: no API token configured "
                                 "(set VIOLIN_API_TOKEN or api.token)")
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise Refused(401, "missing or wrong bearer token (Authorization: Bearer <token>)")


def _json_body(request: Request):
    if not request.body:
        return {}
    try:
        body = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Refused(400, "request body is not valid JSON: %s" % exc) from None
    if not isinstance(body, dict):
        raise Refused(400, "request body must be a JSON object")
    return body

