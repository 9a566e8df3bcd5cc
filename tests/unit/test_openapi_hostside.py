"""docs/openapi-helper.yaml and docs/openapi-server.yaml describe exactly what the helper and the
snapshot server serve (as test_openapi.py does for the controller), with the statuses they answer."""

import http.client
import json
import os
import threading
from unittest import mock

import pytest
import yaml

from hostside import helper
from hostside.httpd import listen
from hostside.store import base
from hostside.store import server as srv
from hostside.store.files import FileStore
from violin_core import schema

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")
METHODS = ("get", "put", "post", "delete", "patch")


def load(name):
    with open(os.path.join(DOCS, name)) as handle:
        return yaml.safe_load(handle)


def operations(spec):
    return {(method.upper(), path): op for path, item in spec["paths"].items()
            for method, op in item.items() if method in METHODS}


def error_statuses(op):
    return {int(code) for code in op["responses"] if int(code) >= 400}


def test_the_helper_document_names_every_route_the_helper_serves_and_no_other():
    handler = helper.make_handler(mock.Mock())  # the routes, not what they do
    served = ({("GET", p) for p in handler.get_paths} | {("POST", p) for p in handler.post_paths}
              | {("DELETE", p) for p in handler.delete_paths})
    assert set(operations(load("openapi-helper.yaml"))) == served


def test_the_helper_document_has_the_statuses_the_helper_answers():
    spec = load("openapi-helper.yaml")
    assert spec["components"]["schemas"]["Name"]["pattern"] == schema.NAME_PATTERN
    for (method, path), op in operations(spec).items():
        if path == "/health":
            assert op["security"] == [] and error_statuses(op) == set()
            continue
        assert 401 in error_statuses(op), path  # every other call needs the bearer token
        if path.startswith("/members"):  # runtime members: a bad spec or name, one that exists / is busy
            assert {400, 409} <= error_statuses(op) or method == "GET", (method, path)
            assert (404 in error_statuses(op)) == (method == "DELETE"), (method, path)
            continue
        if method == "POST":  # BadRequest, UnknownMember, Failed (backend/store/controller); Conflict for /snapshot
            assert {400, 404, 502} <= error_statuses(op), path
            assert (409 in error_statuses(op)) == (path == "/snapshot"), path
            assert op["requestBody"]["required"] is True


@pytest.fixture
def image_server(tmp_path):
    server = listen("127.0.0.1", 0, srv.make_handler(FileStore(str(tmp_path / "store")), "tok"), "test")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def call(port, method, path, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": "Bearer tok"}
    if method == "PUT":
        body = body or b"x"
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    try:
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def test_the_server_document_names_every_route_the_server_serves_and_no_other(image_server):
    """Every (method, path shape) the server can be asked: the documented ones are served (no route
    refusal), the others refused with 400 (a path shape it does not take) or 405, all JSON errors."""
    spec = load("openapi-server.yaml")
    assert spec["components"]["schemas"]["Name"]["pattern"] == base.NAME_RE.pattern
    documented = set(operations(spec))
    shapes = {"/health": "/health", "/images/{snapshot}": "/images/s1",
              "/images/{snapshot}/{member}": "/images/s1/m1", "/images/{snapshot}/{member}/{file}": "/images/s1/m1/f1"}
    for method in ("GET", "PUT", "DELETE", "POST", "PATCH"):
        for template, path in shapes.items():
            status, content_type, data = call(image_server, method, path)
            if (method, template) in documented:
                assert status in (200, 201, 404), (method, path, status, data)
                assert str(status) in operations(spec)[(method, template)]["responses"], (method, path, status)
            else:
                assert status in (400, 405), (method, path, status, data)
                assert content_type == "application/json" and json.loads(data)["error"], (method, path)


def test_the_server_document_has_the_statuses_the_server_answers():
    for (method, path), op in operations(load("openapi-server.yaml")).items():
        statuses = error_statuses(op)
        if path == "/health":
            assert op["security"] == []
            continue
        assert {400, 401, 500} <= statuses, path  # a bad name, the token, a bug (never expected)
        if method == "PUT":
            assert {411, 422, 507} <= statuses
        else:
            assert 404 in statuses, path
