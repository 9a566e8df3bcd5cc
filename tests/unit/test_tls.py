"""HTTPS for the snapshot server, the helper and the controller, on loopback with certificates made by
scripts/make_tls.sh (openssl): verified with the CA it works; without it, or in plain HTTP, it fails with a
reason and no traceback; the servers keep serving after a failed handshake."""

import os
import shutil
import subprocess
import time
import sys
import threading

import pytest

from hostside import helper as helper_mod
from hostside.httpd import listen
from hostside.store import server as srv
from hostside.store.client import ImageServer, StorageError
from hostside.store.files import FileStore
from violin_client import cli, tls
from violin_client.api import ApiClient, Unreachable
from violin_core.config import ConfigError, load as load_controller_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAKE_TLS = os.path.join(REPO, "scripts", "make_tls.sh")

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def make_pair(directory):
    subprocess.run(["bash", MAKE_TLS, str(directory)], check=True, capture_output=True)
    return {name: str(directory / ("%s.crt" % name if name != "key" else "server.key"))
            for name in ("ca", "server", "key")}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("other"))["ca"]


def serve(handler, pair):
    server = listen("127.0.0.1", 0, handler, "test", pair["server"], pair["key"])
    assert server is not None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.fixture
def https_store(tmp_path, pair):
    server, port = serve(srv.make_handler(FileStore(str(tmp_path / "store")), "tok"), pair)
    yield port
    server.shutdown()
    server.server_close()


def test_make_tls_is_idempotent_and_keeps_keys_private(tmp_path):
    first = make_pair(tmp_path)
    before = open(first["server"]).read()
    again = subprocess.run(["bash", MAKE_TLS, str(tmp_path)], check=True, capture_output=True, text=True)
    assert "up to date" in again.stdout and open(first["server"]).read() == before
    assert os.stat(first["key"]).st_mode & 0o077 == 0 and os.stat(tmp_path / "ca.key").st_mode & 0o077 == 0
    subprocess.run(["bash", MAKE_TLS, str(tmp_path), "10.9.8.7"], check=True, capture_output=True)
    text = subprocess.run(["openssl", "x509", "-in", first["server"], "-noout", "-ext", "subjectAltName"],
                          check=True, capture_output=True, text=True).stdout
    assert "10.9.8.7" in text and "127.0.0.1" in text


def test_snapshot_server_over_https_with_the_ca(https_store, pair, tmp_path):
    url = "https://127.0.0.1:%d" % https_store
    source = tmp_path / "img"
    source.mkdir()
    (source / "pages.img").write_bytes(os.urandom(300000))
    store = ImageServer(url, "tok", ca_file=pair["ca"])
    store.upload_dir("s1", "h1", str(source))
    store.download_dir("s1", "h1", str(tmp_path / "back"))
    assert (tmp_path / "back" / "pages.img").read_bytes() == (source / "pages.img").read_bytes()
    assert ApiClient(url, ca_file=pair["ca"]).call("GET", "/health")["status"] == "ok"


def test_ca_file_from_the_environment(https_store, pair, monkeypatch):
    monkeypatch.setenv("VIOLIN_CA_FILE", pair["ca"])
    assert ApiClient("https://127.0.0.1:%d" % https_store).call("GET", "/health")["status"] == "ok"


@pytest.mark.parametrize("which", ["system CAs", "another CA"])
def test_a_client_without_the_ca_is_refused_with_a_reason(https_store, other_ca, which, monkeypatch, capfd):
    monkeypatch.delenv("VIOLIN_CA_FILE", raising=False)
    ca = None if which == "system CAs" else other_ca
    url = "https://127.0.0.1:%d" % https_store
    with pytest.raises(Unreachable) as caught:
        ApiClient(url, ca_file=ca).call("GET", "/health")
    assert "not trusted" in caught.value.reason and "--ca-file" in caught.value.reason
    with pytest.raises(StorageError, match="not trusted"):
        ImageServer(url, "tok", ca_file=ca).index("s", "m")
    err, deadline = "", time.monotonic() + 2.0
    while "TLS handshake failed" not in err and time.monotonic() < deadline:  # the server's thread logs it
        time.sleep(0.02)  # after the client has given up, in its own time
        err += capfd.readouterr().err
    assert "Traceback" not in err and "TLS handshake failed" in err  # the server says why, in one line


def test_plain_http_to_an_https_port_fails_cleanly_and_the_server_serves_on(https_store, pair, capfd):
    with pytest.raises(Unreachable) as caught:
        ApiClient("http://127.0.0.1:%d" % https_store, token="s3cret-token").call("GET", "/health")
    assert "https://" in caught.value.reason
    with pytest.raises(StorageError):
        ImageServer("http://127.0.0.1:%d" % https_store, "s3cret-token").index("s", "m")
    assert ApiClient("https://127.0.0.1:%d" % https_store, ca_file=pair["ca"]).call("GET", "/health")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "s3cret-token" not in err


def test_https_to_a_plain_port_says_so(tmp_path, pair):
    server = listen("127.0.0.1", 0, srv.make_handler(FileStore(str(tmp_path / "s")), "tok"), "test")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(Unreachable) as caught:
            ApiClient("https://127.0.0.1:%d" % server.server_address[1], ca_file=pair["ca"]).call("GET", "/health")
        assert "plain HTTP" in caught.value.reason
    finally:
        server.shutdown()
        server.server_close()


def test_the_cli_without_the_ca_says_why_and_with_it_works(https_store, pair, monkeypatch, capsys):
    monkeypatch.delenv("VIOLIN_CA_FILE", raising=False)
    url = "https://127.0.0.1:%d" % https_store  # the server's /health stands in for a controller here
    assert cli.main(["--url", url, "--token", "s3cret-token", "status"]) == 1
    err = capsys.readouterr().err
    assert "not trusted" in err and "Traceback" not in err and "s3cret-token" not in err
    assert cli.main(["--url", url, "--ca-file", str(pair["ca"]) + ".missing", "status"]) == 2
    assert "cannot use CA file" in capsys.readouterr().err


def test_bad_certificate_or_key_is_a_message(tmp_path, pair, capsys):
    handler = srv.make_handler(FileStore(str(tmp_path / "s")), "tok")
    assert listen("127.0.0.1", 0, handler, "test", pair["ca"], pair["key"]) is None  # key of another cert
    assert "cannot use certificate" in capsys.readouterr().err
    assert listen("127.0.0.1", 0, handler, "test", pair["server"], None) is None
    assert "both a certificate and its key" in capsys.readouterr().err


def test_server_flags_go_together(tmp_path):
    with pytest.raises(SystemExit):
        srv.build_args(["--dir", str(tmp_path), "--token", "t", "--tls-cert", "x.crt"])
    args = srv.build_args(["--dir", str(tmp_path), "--token", "t", "--tls-cert", "x.crt", "--tls-key", "x.key"])
    assert (args.tls_cert, args.tls_key) == ("x.crt", "x.key")


def _helper_raw(**extra):
    return dict({"token": "h", "controller_token": "c", "servers": ["https://127.0.0.1:7070"],
                 "server_token": "s", "members": {}}, **extra)


def test_helper_config_keys(pair):
    config = helper_mod.parse_config(_helper_raw(tls_cert=pair["server"], tls_key=pair["key"], ca_file=pair["ca"]),
                                     environ={})
    assert (config.tls_cert, config.tls_key, config.ca_file) == (pair["server"], pair["key"], pair["ca"])
    with pytest.raises(helper_mod.HelperConfigError, match="go together"):
        helper_mod.parse_config(_helper_raw(tls_cert=pair["server"]), environ={})
    assert helper_mod.parse_config(_helper_raw(), environ={}).tls_cert is None


def test_helper_check_loads_the_certificate(pair, tmp_path, capsys):
    import json
    path = tmp_path / "h.json"
    path.write_text(json.dumps(_helper_raw(tls_cert=pair["server"], tls_key=pair["ca"])))  # not its key
    assert helper_mod.main(["--config", str(path), "--check"]) == 2
    assert "cannot use certificate" in capsys.readouterr().err
    path.write_text(json.dumps(_helper_raw(tls_cert=pair["server"], tls_key=pair["key"])))
    assert helper_mod.main(["--config", str(path), "--check"]) == 0


def test_helper_serves_https(pair, tmp_path):
    """The real violin-helper (no members) on HTTPS from its config keys."""
    import json
    from lab import lab, slicelab
    port = lab.free_port()
    path = tmp_path / "helper.json"
    path.write_text(json.dumps(_helper_raw(
        listen="127.0.0.1:%d" % port, token="helper-tok", work_dir=str(tmp_path / "w"),
        tls_cert=pair["server"], tls_key=pair["key"], ca_file=pair["ca"])))
    url = "https://127.0.0.1:%d" % port
    process = slicelab.start_daemon([sys.executable, "-m", "hostside.helper", "--config", str(path)], url,
                                    str(tmp_path / "helper.log"), ca_file=pair["ca"])
    try:
        client = ApiClient(url, token="helper-tok", ca_file=pair["ca"])
        assert client.call("GET", "/jobs") == {}
        with pytest.raises(Unreachable, match="not trusted"):
            ApiClient(url, token="helper-tok", ca_file=None).call("GET", "/jobs")
        with pytest.raises(Unreachable, match="https://"):
            ApiClient(url.replace("https", "http"), token="helper-tok").call("GET", "/jobs")
        assert client.call("GET", "/health")["status"] == "ok"
    finally:
        slicelab.stop_daemon(process)
    log = (tmp_path / "helper.log").read_text()
    assert "listening on https://" in log and "helper-tok" not in log and "Traceback" not in log, log


def test_controller_config_keys(tmp_path, pair):
    path = tmp_path / "c.json"
    path.write_text('{"api": {"tls_cert": "%s", "tls_key": "%s", "ca_file": "%s"}}' % (
        pair["server"], pair["key"], pair["ca"]))
    config = load_controller_config(str(path), environ={})
    assert (config.tls_cert, config.tls_key, config.ca_file) == (pair["server"], pair["key"], pair["ca"])
    assert load_controller_config(str(path), environ={"VIOLIN_CA_FILE": "/x.pem"}).ca_file == "/x.pem"
    path.write_text('{"api": {"tls_cert": "%s"}}' % pair["server"])
    with pytest.raises(ConfigError, match="go together"):
        load_controller_config(str(path), environ={})


def test_tls_contexts_always_verify(pair):
    context = tls.client_context(pair["ca"])
    import ssl
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize("framework", ["ryu", "os_ken"])
def test_controller_serves_https(tmp_path, pair, framework):
    """A real controller (no switches) on an HTTPS REST API: verified with the CA, refused without."""
    from lab.lab import ControllerProcess
    if framework == "ryu":
        pytest.importorskip("ryu")
        command = None
    else:
        osken = "/work/main/.venv-osken/bin/python"
        if not os.path.exists(osken):
            pytest.skip("no os-ken environment")
        command = [osken, os.path.join(REPO, "ryu_apps", "violin_launcher.py"), "--framework", "os_ken"]
    config = {"api": {"tls_cert": pair["server"], "tls_key": pair["key"]}}
    controller = ControllerProcess(config=config, ca_file=pair["ca"], command=command,
                                   extra_env={"PYTHONPATH": os.pathsep.join(
                                       [os.path.join(REPO, "ryu_apps"), REPO])})
    try:
        controller.start()
        assert controller.url.startswith("https://")
        status, health = controller.get("/violin/health")
        assert status == 200, health
        with pytest.raises(Unreachable, match="not trusted"):
            ApiClient(controller.url, ca_file=None).call("GET", "/violin/health")
        with pytest.raises(Unreachable):
            ApiClient(controller.url.replace("https", "http")).call("GET", "/violin/health")
        assert controller.get("/violin/health")[0] == 200  # still serving
        assert cli.main(["--url", controller.url, "--ca-file", pair["ca"], "--token", controller.token, "status"]) == 0
        log = controller.log_text()
        assert controller.token not in log and "Traceback" not in log, log
    finally:
        controller.stop()


def test_no_token_in_any_repr():
    from violin_core.config import Config
    config = helper_mod.parse_config(_helper_raw(token="T-helper", controller_token="T-ctl", server_token="T-srv"),
                                     environ={})
    shown = repr(config) + repr(Config(api_token="T-api", helper_token="T-helper", server_token="T-srv"))
    shown += repr(ApiClient("http://127.0.0.1:1", token="T-api")) + repr(ImageServer("http://127.0.0.1:1", "T-srv"))
    assert "T-" not in shown, shown
