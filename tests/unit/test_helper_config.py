"""violin-helper's config is validated at start; bad input is a clear message, exit code 2."""

import json

import pytest

from hostside import helper

GOOD = {"listen": "127.0.0.1:7001", "token": "t", "controller_token": "c", "servers": ["http://10.0.0.5:7070"],
        "server_token": "s", "members": {"h1": {"pid": 10, "netns": "/proc/9/ns/net", "iface": "h1-eth0",
                                                "mac": "00:00:00:00:00:01"}}}


def test_good_config_parses():
    config = helper.parse_config(GOOD, environ={})
    assert config.port == 7001 and config.members["h1"].backend == "criu"


@pytest.mark.parametrize("change,needle", [
    ({"colour": 1}, "unknown key"),
    ({"listen": "nowhere"}, "HOST:PORT"),
    ({"token": ""}, "token: required"),
    ({"servers": ["ftp://x"]}, "servers"),
    ({"members": {"h1": {"pid": "10", "netns": "x", "iface": "i", "mac": "m"}}}, "members.h1.pid"),
    ({"members": {"h1": {"pid": 10}}}, "missing iface, mac, netns"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], backend="xen")}}, "expected one of criu, libvirt"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], backend="libvirt")}}, "missing domain"),
    ({"members": {"v1": {"backend": "libvirt", "domain": "v1", "iface": "t", "mac": "m", "pid": 3}}},
     "pid do not apply to backend libvirt"),
    ({"libvirt_uri": 3}, "libvirt_uri"),
])
def test_bad_config_is_refused(change, needle):
    with pytest.raises(helper.HelperConfigError, match=needle):
        helper.parse_config(dict(GOOD, **change), environ={})


def test_libvirt_members_parse():
    raw = dict(GOOD, libvirt_uri="qemu:///session",
               members={"v1": {"backend": "libvirt", "domain": "dom-v1", "iface": "v1-tap", "mac": "52:54:00:00:00:01"}})
    config = helper.parse_config(raw, environ={})
    assert config.libvirt_uri == "qemu:///session" and config.members["v1"].domain == "dom-v1"


def test_tokens_can_come_from_the_environment():
    raw = {k: v for k, v in GOOD.items() if k not in ("token", "controller_token", "server_token")}
    config = helper.parse_config(raw, environ={"VIOLIN_HELPER_TOKEN": "a", "VIOLIN_API_TOKEN": "b",
                                               "VIOLIN_SERVER_TOKEN": "c"})
    assert (config.token, config.controller_token, config.server_token) == ("a", "b", "c")


def test_check_command(tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(GOOD))
    bad.write_text(json.dumps(dict(GOOD, listen=5)))
    assert helper.main(["--config", str(good), "--check"]) == 0
    assert helper.main(["--config", str(bad), "--check"]) == 2
    assert helper.main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "violin-helper:" in capsys.readouterr().err


def test_a_member_is_placed_on_one_server_consistently():
    config = helper.parse_config(dict(GOOD, servers=["http://a:1", "http://b:1"]), environ={})
    h = helper.Helper(config)
    assert h.server_for("h1") == h.server_for("h1") and {h.server_for("m%d" % i) for i in range(20)} == set(config.servers)
