"""The three HTTP APIs keep their OpenAPI contracts under fuzzing (schemathesis, GitHub issue 13).

Each test starts a real server on loopback (a ``ryu-manager violin_snapshot`` with no switches,
a ``violin-helper`` whose member's pidfile does not exist, a ``violin-snapshot-server``
on a temporary directory) and runs schemathesis's CLI from its own environment (``.venv-fuzz``,
built by scripts/setup.sh) against the document in docs/, authenticated with the server's bearer
token, with the checks below. Zero failures and zero errors are required; the number of generated
cases is printed. Each run is bounded by ``VIOLIN_FUZZ_SECONDS`` (default 40 s) and a cap on
examples per operation (``VIOLIN_FUZZ_EXAMPLES``, default 40).
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

from lab import lab, slicelab

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOCS = os.path.join(REPO, "docs")
FUZZ_VENV = os.environ.get("VIOLIN_FUZZ_VENV", os.path.join(REPO, ".venv-fuzz"))
SCHEMATHESIS = os.path.join(FUZZ_VENV, "bin", "schemathesis")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
SECONDS = int(os.environ.get("VIOLIN_FUZZ_SECONDS", "40"))
EXAMPLES = int(os.environ.get("VIOLIN_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def schemathesis():
    if not os.access(SCHEMATHESIS, os.X_OK):
        reason = "%s missing (scripts/setup.sh builds %s)" % (SCHEMATHESIS, FUZZ_VENV)
        if os.environ.get("CI"):
            pytest.fail("CI must fuzz the APIs: " + reason)
        pytest.skip(reason)
    return SCHEMATHESIS


def fuzz(schemathesis, spec: str, url: str, token: str, name: str, documented_5xx=()) -> dict:
    """Run schemathesis on ``spec`` against ``url``; the JSON report (printed in short).

    ``documented_5xx``: server-error statuses the document promises for what the test set up (e.g.
    the helper's 502 when its member's process does not exist); any other 5xx still fails."""
    with tempfile.TemporaryDirectory(prefix="violin-fuzz-") as workdir:
        report, config = os.path.join(workdir, "report.json"), os.path.join(workdir, "schemathesis.toml")
        with open(config, "w") as handle:
            statuses = ["1XX", "2XX", "3XX", "4XX"] + [str(s) for s in documented_5xx]
            handle.write("[checks.not_a_server_error]\nexpected-statuses = %s\n" % json.dumps(statuses))
        argv = [schemathesis, "--config-file", config, "run", os.path.join(DOCS, spec), "--url", url,
                "--header", "Authorization: Bearer %s" % token, "--checks", CHECKS,
                "--max-examples", str(EXAMPLES), "--max-time", str(SECONDS), "--workers", "2",
                "--request-timeout", "10", "--seed", os.environ.get("VIOLIN_FUZZ_SEED", "13"),
                "--no-color", "--report", "json", "--report-json-path", report]
        try:
            run = subprocess.run(argv, capture_output=True, text=True, cwd=workdir, timeout=SECONDS + 60,
                                 env=dict(os.environ, SCHEMATHESIS_HOOKS=""))
        except subprocess.TimeoutExpired as expired:
            pytest.fail("schemathesis on %s did not finish in %d s:\n%s" % (name, SECONDS + 60, expired.stdout))
        if not os.path.exists(report):
            pytest.fail("schemathesis on %s wrote no report (exit %d):\n%s%s"
                        % (name, run.returncode, run.stdout[-6000:], run.stderr[-3000:]))
        with open(report) as handle:
            result = json.load(handle)
    cases = result["test_cases"]
    print("%s API: %d cases generated, %d with failures, %d errored, %d operations tested in %.1f s"
          % (name, cases["generated"], cases["with_failures"], cases["errored"],
             result["operations"]["tested"], result["running_time"]), file=sys.stderr)
    assert not result["failures"] and not result["errors"] and cases["with_failures"] == 0, \
        run.stdout[-12000:]
    assert result["operations"]["tested"] == result["operations"]["selected"] > 0, run.stdout[-6000:]
    return result


def test_controller_api_keeps_its_contract(lab_ready, schemathesis):
    controller = lab.ControllerProcess().start()
    try:
        fuzz(schemathesis, "openapi.yaml", controller.url, controller.token, "controller")
    except BaseException:
        print("---- controller log ----\n" + controller.log_text())
        raise
    finally:
        controller.stop()


def test_snapshot_server_api_keeps_its_contract(lab_ready, schemathesis, tmp_path):
    port = lab.free_port()
    url = "http://127.0.0.1:%d" % port
    server = slicelab.start_daemon(
        [sys.executable, "-m", "hostside.store.server", "--listen", "127.0.0.1:%d" % port,
         "--dir", str(tmp_path / "images"), "--token", slicelab.SERVER_TOKEN], url, str(tmp_path / "server.log"))
    try:
        fuzz(schemathesis, "openapi-server.yaml", url, slicelab.SERVER_TOKEN, "snapshot server")
    except BaseException:
        print("---- server log ----\n" + (tmp_path / "server.log").read_text()[-6000:])
        raise
    finally:
        slicelab.stop_daemon(server)


def test_helper_api_keeps_its_contract(lab_ready, schemathesis, tmp_path):
    """A helper whose one member does not exist (its pidfile neither): the calls fail, in contract."""
    port = lab.free_port()
    url = "http://127.0.0.1:%d" % port
    config = {"listen": "127.0.0.1:%d" % port, "token": slicelab.HELPER_TOKEN, "controller_token": "unused",
              "servers": ["http://127.0.0.1:%d" % lab.free_port()], "server_token": slicelab.SERVER_TOKEN,
              "work_dir": str(tmp_path / "helper"),
              "members": {"fuzz-member-7f3a": {"backend": "criu", "pidfile": str(tmp_path / "none.pid"),
                                               "workdir": str(tmp_path / "member")}}}
    (tmp_path / "helper.json").write_text(json.dumps(config))
    helper = slicelab.start_daemon([sys.executable, "-m", "hostside.helper", "--config", str(tmp_path / "helper.json")],
                                   url, str(tmp_path / "helper.log"))
    try:
        fuzz(schemathesis, "openapi-helper.yaml", url, slicelab.HELPER_TOKEN, "helper", documented_5xx=[502])
    except BaseException:
        print("---- helper log ----\n" + (tmp_path / "helper.log").read_text()[-6000:])
        raise
    finally:
        slicelab.stop_daemon(helper)
