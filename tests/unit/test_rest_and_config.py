"""REST edge and config validation, in-process (no server, no switch)."""

import json

import pytest
from webob import Request

from violin_core import config as cfg
from violin_core.config import ConfigError
from violin_core.controller import ViolinController
from violin_core.routes import build_rest_app
from violin_core.fabric import FabricSettings


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make_app(token="s3cret", tmp="/tmp/violin-unit-rest"):
    controller = ViolinController(cfg.Config(FabricSettings(), token, tmp), Clock(), Clock())
    return controller, build_rest_app(controller)


def call(app, path, method="GET", body=None, token=None):
    request = Request.blank(path, method=method)
    if body is not None:
        request.body = body if isinstance(body, bytes) else json.dumps(body).encode()
    if token:
        request.headers["Authorization"] = "Bearer " + token
    response = request.get_response(app)
    assert response.content_type == "application/json"
    return response.status_int, json.loads(response.text)


def test_health_answers_json():
    controller, app = make_app()
    controller.switch_up(1, [(1, "s1-eth1", True)])
    status, body = call(app, "/violin/health")
    assert status == 200 and body["status"] == "ok" and body["switches"] == 1
    assert body["settled"] is False  # port 1 still pending its settle time


def test_topology_lists_switches_and_ports():
    controller, app = make_app()
    controller.switch_up(0xA, [(1, "s1-eth1", True), (2, "s1-eth2", False)])
    status, body = call(app, "/violin/topology/switches/a")
    assert status == 200 and [p["role"] for p in body["ports"]] == ["pending", "down"]


@pytest.mark.parametrize("path,status", [
    ("/violin/nope", 404), ("/violin/topology/switches/zz", 400), ("/violin/topology/switches/99", 404)])
def test_errors_are_json_with_a_reason(path, status):
    _, app = make_app()
    got, body = call(app, path)
    assert got == status and body["reason"]


def test_wrong_method_is_405():
    _, app = make_app()
    status, body = call(app, "/violin/health", method="DELETE", token="s3cret")
    assert status == 405 and "GET" in body["reason"]


def test_mutating_routes_need_the_bearer_token():
    controller, app = make_app()

    @app.route("POST", "/things")
    def create(body):
        return 201, {"got": body}

    assert call(app, "/violin/things", "POST", {"a": 1})[0] == 401
    assert call(app, "/violin/things", "POST", {"a": 1}, token="wrong")[0] == 401
    assert call(app, "/violin/things", "POST", {"a": 1}, token="s3cret") == (201, {"got": {"a": 1}})
    assert call(app, "/violin/things", "POST", b"{not json", token="s3cret")[0] == 400
    assert call(app, "/violin/things", "POST", [1, 2], token="s3cret")[0] == 400
    _, tokenless = make_app(token=None)
    tokenless.route("POST", "/things")(create)
    assert call(tokenless, "/violin/things", "POST", {}, token="x")[0] == 403


def test_config_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("fabric:\n  settle_time: 0.25\napi:\n  token: abc\n")
    loaded = cfg.load(str(path), environ={})
    assert loaded.fabric.settle_time == 0.25 and loaded.api_token == "abc"
    assert cfg.load(str(path), environ={"VIOLIN_API_TOKEN": "env"}).api_token == "env"
    assert cfg.load(None, environ={}).fabric == FabricSettings()


@pytest.mark.parametrize("raw,needle", [
    ({"fabrik": {}}, "unknown key(s) fabrik"),
    ({"fabric": {"settle": 1}}, "unknown key(s) settle"),
    ({"fabric": {"settle_time": "1"}}, "fabric.settle_time: expected a number"),
    ({"fabric": {"settle_time": True}}, "fabric.settle_time: expected a number"),
    ({"members": {"h1": {}}}, "members: expected a list"),
    ({"members": [{"name": "h1", "macs": ["m"]}]}, "members[0].macs"),
    ({"members": [{"name": "h1", "macs": ["00:00:00:00:00:01"]}, {"name": "h1", "macs": ["00:00:00:00:00:02"]}]},
     "members[1]: duplicate 'h1'"),
    ({"api": {"advertise_url": "ctl:8080"}}, "api.advertise_url"),
    ({"fabric": {"tag_vid": 5000}}, "out of range"),
    ({"fabric": {"probe_interval": -1}}, "out of range"),
    ([1], "expected a mapping"),
])
def test_bad_config_is_rejected_with_its_path(raw, needle):
    with pytest.raises(ConfigError) as error:
        cfg.validate(raw)
    assert needle in str(error.value)


def test_check_config_command(tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"fabric": {"max_hosts": 10}}')
    bad.write_text('{"fabric": {"max_hosts": "ten"}}')
    assert cfg.check_config_main([str(good)]) == 0
    assert cfg.check_config_main([str(bad)]) == 2
    assert cfg.check_config_main([str(tmp_path / "missing.json")]) == 2
    assert cfg.check_config_main([]) == 2
    assert "max_hosts" in capsys.readouterr().err


def test_put_member_registers_then_updates_idempotently(tmp_path):
    controller, app = make_app(tmp=str(tmp_path))
    spec = {"macs": ["00:00:00:00:00:01"], "helper_url": "http://a:7001", "backend": "criu", "host": "hv1",
            "handle": "h1: seqstream.py"}
    status, body = call(app, "/violin/members/h1", "PUT", spec, "s3cret")
    assert status == 201 and body["host"] == "hv1" and body["backend"] == "criu" and body["name"] == "h1"
    controller.coordinator.members["h1"].epoch = 4  # an update keeps the member's epoch
    assert call(app, "/violin/members/h1", "PUT", dict(spec, name="h1"), "s3cret")[0] == 200
    status, body = call(app, "/violin/members/h1", "PUT", dict(spec, helper_url="http://b:7001", host="hv2"), "s3cret")
    assert status == 200 and body["helper_url"] == "http://b:7001" and body["host"] == "hv2" and body["epoch"] == 4
    assert call(app, "/violin/members")[1]["members"][0]["host"] == "hv2"


def test_put_member_refuses_another_members_mac_a_contradicting_name_and_no_token(tmp_path):
    _, app = make_app(tmp=str(tmp_path))
    assert call(app, "/violin/members/h1", "PUT", {"macs": ["00:00:00:00:00:01"]}, "s3cret")[0] == 201
    status, body = call(app, "/violin/members/h2", "PUT", {"macs": ["00:00:00:00:00:01"]}, "s3cret")
    assert status == 409 and "belongs to member h1" in body["reason"]
    status, body = call(app, "/violin/members/h2", "PUT", {"name": "h3", "macs": ["00:00:00:00:00:02"]}, "s3cret")
    assert status == 400 and "h3" in body["reason"]
    assert call(app, "/violin/members/h2", "PUT", {"macs": ["00:00:00:00:00:02"]})[0] == 401
    assert call(app, "/violin/members/h2", "PUT", {"macs": []}, "s3cret")[0] == 400
    # the MAC moves from one member to another only when the first lets it go
    assert call(app, "/violin/members/h1", "PUT", {"macs": ["00:00:00:00:00:03"]}, "s3cret")[0] == 200
    assert call(app, "/violin/members/h2", "PUT", {"macs": ["00:00:00:00:00:01"]}, "s3cret")[0] == 201
