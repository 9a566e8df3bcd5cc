"""violin-helper's config is validated at start; bad input is a clear message, exit code 2."""

import json

import pytest

from hostside import helper

GOOD = {"listen": "127.0.0.1:7001", "token": "t", "controller_token": "c", "servers": ["http://10.0.0.5:7070"],
        "server_token": "s", "members": {"h1": {"mininet_host": "h1", "command": "seqstream.py"}}}


def test_good_config_parses():
    config = helper.parse_config(GOOD, environ={})
    assert config.port == 7001 and config.backends["h1"].name == "criu" and config.members["h1"].mininet_host == "h1"
    assert config.members["h1"].command == "seqstream.py" and config.controller is None
    assert config.advertise_url == "http://127.0.0.1:7001" and config.host_name  # the host's own name


def test_controller_advertise_url_and_host_name():
    config = helper.parse_config(dict(GOOD, controller="http://10.0.0.1:8080", host_name="hv1",
                                      members={"db": {"pidfile": "/run/db.pid", "workdir": "/srv/db", "ip": "10.0.0.9/8"},
                                               "vm1": {"backend": "libvirt", "domain": "vm1"}}), environ={})
    assert (config.controller, config.host_name) == ("http://10.0.0.1:8080", "hv1")
    assert config.members["db"].pidfile == "/run/db.pid" and config.members["vm1"].tap is None
    tls = helper.parse_config(dict(GOOD, tls_cert="/c", tls_key="/k"), environ={})
    assert tls.advertise_url == "https://127.0.0.1:7001"
    assert helper.parse_config(dict(GOOD, advertise_url="http://10.0.0.2:7001/"), environ={}).advertise_url == \
        "http://10.0.0.2:7001"


@pytest.mark.parametrize("change,needle", [
    ({"colour": 1}, "unknown key"),
    ({"listen": "nowhere"}, "HOST:PORT"),
    ({"token": ""}, "token: required"),
    ({"servers": ["ftp://x"]}, "servers"),
    ({"members": {"h1": {"pidfile": 10}}}, "members.h1.pidfile"),
    ({"members": {"h1": {}}}, "members.h1: name the member's process by pidfile, or by mininet_host and command"),
    ({"members": {"h1": {"pidfile": "/run/x.pid", "mininet_host": "h1", "command": "x"}}}, "members.h1: name"),
    ({"members": {"h1": {"mininet_host": "h1"}}}, "members.h1.command: required with mininet_host"),
    ({"members": {"h1": {"pidfile": "/run/x.pid", "command": "x"}}}, "members.h1.command: goes with mininet_host"),
    ({"members": {"h1": {"pid": 10, "netns": "/proc/9/ns/net"}}}, r"members.h1: unknown key\(s\) netns, pid"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], backend="xen")}}, "expected one of criu, libvirt"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], backend="libvirt")}}, "members.h1: unknown key"),
    ({"members": {"h1": {"backend": "libvirt", "tap": "t"}}}, "members.h1.domain: required"),
    ({"members": {"h1": {"backend": "libvirt", "domain": ""}}}, "members.h1.domain"),
    ({"members": {"v1": {"backend": "libvirt", "domain": "v1", "iface": "t", "mac": "52:54:00:00:00:01"}}},
     r"members.v1: unknown key\(s\) iface, mac"),
    ({"controller": "nowhere"}, "controller"),
    ({"advertise_url": 7001}, "advertise_url"),
    ({"host_name": ""}, "host_name"),
    ({"libvirt_uri": 3}, "libvirt_uri"),
    ({"members": [{"pid": 10}]}, "members: expected a mapping of names"),
    ({"members": {"h1": "h1-eth0"}}, "members.h1: expected a mapping"),
    ({"members": {"h1": dict(GOOD["members"]["h1"], command=True)}}, "members.h1.command"),
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
               members={"v1": {"backend": "libvirt", "domain": "dom-v1", "tap": "v1-tap"}})
    config = helper.parse_config(raw, environ={})
    assert config.libvirt_uri == "qemu:///session" and config.members["v1"].domain == "dom-v1"
    assert config.members["v1"].tap == "v1-tap"


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
    ("bad.yaml", "members: [\n  h1: {pidfile: 1"),
    ("bad.json", '{"listen": "127.0.0.1:1", '),
    ("list.yaml", "- listen: 127.0.0.1:1\n"),
    ("members-list.json", json.dumps(dict(GOOD, members=[GOOD["members"]["h1"]]))),
    ("mac.yaml", "servers: [http://a:1]\ntoken: t\ncontroller_token: c\nserver_token: s\n"
                 "members:\n  h1: {mininet_host: h1}\n"),
    ("types.json", json.dumps(dict(GOOD, listen=["127.0.0.1", 7001]))),
])
def test_malformed_files_exit_2_with_the_key_and_no_traceback(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert helper.main(["--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("violin-helper: ") and "Traceback" not in err and len(err.splitlines()) == 1
    if name == "mac.yaml":
        assert "members.h1.command" in err
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
