"""docs/openapi.yaml describes exactly the routes the app serves."""

import os

import yaml

from violin_core.config import Config
from violin_core.controller import ViolinController
from violin_core.routes import build_rest_app

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "openapi.yaml")


def served_routes(tmp_path):
    controller = ViolinController(Config(state_directory=str(tmp_path)), lambda: 0.0, lambda: 0.0)
    return build_rest_app(controller).routes


def test_every_route_is_documented_and_every_documented_route_served(tmp_path):
    with open(SPEC) as handle:
        spec = yaml.safe_load(handle)
    documented = {(method.upper(), path) for path, item in spec["paths"].items()
                  for method in item if method in ("get", "post", "put", "delete", "patch")}
    served = {(r.method, r.template) for r in served_routes(tmp_path)}
    assert documented == served


def test_mutating_routes_are_documented_with_the_bearer_token(tmp_path):
    with open(SPEC) as handle:
        spec = yaml.safe_load(handle)
    for route in served_routes(tmp_path):
        operation = spec["paths"][route.template][route.method.lower()]
        assert bool(operation.get("security")) == route.mutating, route.template


def test_every_refusal_the_edge_makes_is_documented(tmp_path):
    """401 and 403 (the token) on every mutating call, 400 (a body that is no JSON object) on every call
    that takes a body: what fuzzing the real controller found missing (GitHub issue 13)."""
    with open(SPEC) as handle:
        spec = yaml.safe_load(handle)
    for route in served_routes(tmp_path):
        operation = spec["paths"][route.template][route.method.lower()]
        statuses = set(operation["responses"])
        if route.mutating:
            assert {"401", "403"} <= statuses, (route.method, route.template)
        if "requestBody" in operation:
            assert "400" in statuses, (route.method, route.template)
