"""violin-helper's config is validated at start; bad input is a clear message, exit code 2."""

import json

import pytest

from hostside import helper

GOOD = {"listen": "127.0.0.1:7001", "token": "t", "controller_token": "c", "servers": ["http://10.0.0.5:7070"],
        "server_token": "s", "members": {"h1": {"pid": 10, "netns": "/proc/9/ns/net", "iface": "h1-eth0",
                                                "mac": "00:00:00:00:00:01"}}}


def test_good_config_parses():
    config = helper.parse_config(GOOD, environ={})
    assert config.port == 7001 and config.backends["h1"].name == "criu" and config.members["h1"].pid == 10


@pytest.mark.parametrize("change,needle", [
    ({"colour": 1}, "unknown key"),
    ({"listen": "nowhere"}, "HOST:PORT"),
    ({"token": ""}, "token: required"),
    ({"servers": ["ftp://x"]}, "servers"),
    ({"members": {"h1": {"pid": "10", "netns": "x", "iface": "i", "mac": "m"}}}, "members.h1.pid"),
    ({"members": {"h1": {"pid": 10}}}, "members.h1.netns: required"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], backend="xen")}}, "expected one of criu, libvirt"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], backend="libvirt")}}, "members.h1: unknown key"),
    ({"members": {"h1": {"backend": "libvirt", "iface": "t", "mac": "52:54:00:00:00:01"}}},
     "members.h1.domain: required"),
    ({"members": {"v1": {"backend": "libvirt", "domain": "v1", "iface": "t", "mac": "52:54:00:00:00:01", "pid": 3}}},
     r"members.v1: unknown key\(s\) pid"),
    ({"libvirt_uri": 3}, "libvirt_uri"),
    ({"members": [{"pid": 10}]}, "members: expected a mapping of names"),
    ({"members": {"h1": "h1-eth0"}}, "members.h1: expected a mapping"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], mac="m")}}, "members.h1.mac: 'm' is not valid"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], mac="01:00:00:00:00:01")}}, "members.h1.mac"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], pid=True)}}, "members.h1.pid: expected a whole number"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], pid=0)}}, "members.h1.pid"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], workdir=5)}}, "members.h1.workdir"),
    ({"members": {"bad name!": GOOD["members"]["h1"]}}, "bad name"),
    ({"servers": "http://10.0.0.5:7070"}, "servers: expected a list"),
    ({"servers": []}, "servers: expected at least 1"),
    ({"vm_max_bandwidth": 1000}, "vm_max_bandwidth"),
    ({"vm_max_bandwidth": "fast"}, "vm_max_bandwidth: expected a whole number"),
    ({"work_dir": ["/tmp"]}, "work_dir"),
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


def test_the_top_level_must_be_a_mapping():
    for raw in ([GOOD], "listen: x", None, 3):
        with pytest.raises(helper.HelperConfigError, match="expected a mapping"):
            helper.parse_config(raw, environ={})


def test_every_registered_backend_is_a_member_variant():
    from hostside import backends
    assert {"criu", "libvirt"} <= set(backends.names())
    with pytest.raises(helper.HelperConfigError) as caught:
        helper.parse_config(dict(GOOD, members={"h1": dict(GOOD["members"]["h1"], backend="xen")}), environ={})
    assert caught.value.path == "members.h1.backend"


@pytest.mark.parametrize("name,text", [
    ("bad.yaml", "members: [\n  h1: {pid: 1"),
    ("bad.json", '{"listen": "127.0.0.1:1", '),
    ("list.yaml", "- listen: 127.0.0.1:1\n"),
    ("members-list.json", json.dumps(dict(GOOD, members=[GOOD["members"]["h1"]]))),
    ("mac.yaml", "servers: [http://a:1]\ntoken: t\ncontroller_token: c\nserver_token: s\n"
                 "members:\n  h1: {pid: 3, netns: /x, iface: i, mac: m}\n"),
    ("types.json", json.dumps(dict(GOOD, listen=["127.0.0.1", 7001]))),
])
def test_malformed_files_exit_2_with_the_key_and_no_traceback(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert helper.main(["--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("violin-helper: ") and "Traceback" not in err and len(err.splitlines()) == 1
    if name == "mac.yaml":
        assert "members.h1.mac" in err
    if name.startswith("members-list"):
        assert "members:" in err
    if name.startswith("bad."):
        assert "malformed" in err


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
