"""Integration fixtures: real Open vSwitch, a real controller process, real Mininet.

These tests need root, Open vSwitch and Mininet. Outside CI they are skipped
with the reason when those are missing; in CI (``CI`` set) a missing piece
fails the run instead, so a broken set-up can never pass as "skipped".
"""

import os
import shutil

import pytest

from hostside.backends import criu
from lab import containers, lab, slicelab, vms

pytestmark = pytest.mark.integration


def _missing():
    if os.geteuid() != 0:
        return "integration tests need root"
    for tool in ("ovs-vsctl", "mnexec", "iperf3", "ethtool"):
        if shutil.which(tool) is None:
            return "%s is not installed (run scripts/setup.sh)" % tool
    try:
        import mininet.net  # noqa: F401
    except ImportError:
        return "mininet is not importable from this Python (run scripts/setup.sh)"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def lab_ready():
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail("CI must run the integration tests: " + reason)
        pytest.skip(reason)
    lab.ensure_ovs()


@pytest.fixture(scope="module")
def vm_ready(lab_ready):
    """libvirtd, the guest image and the QEMU of scripts/install_qemu.sh are there."""
    reason = vms.libvirt_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail("CI must test VMs: %s" % reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def podman_ready(lab_ready):
    """podman, its runtime and the base image (built here in CI if set-up has not yet)."""
    reason = containers.podman_available()
    if reason and os.environ.get("CI"):
        containers.ensure_image()
        reason = containers.podman_available()
        if reason:
            pytest.fail("CI must test containers: %s" % reason)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def controller(lab_ready, request):
    """A fresh ``ryu-manager violin_snapshot`` on private ports; its log is shown on failure."""
    process = lab.ControllerProcess().start()
    yield process
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print("---- controller log ----\n" + process.log_text())
    process.stop()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture
def slice_controller(lab_ready):
    """A controller set up to talk to a slice's helper and snapshot server (lab.slicelab)."""
    if not os.path.exists(criu.CRIU):
        if os.environ.get("CI"):
            pytest.fail("CI must test CRIU: %s is missing (scripts/setup.sh builds it)" % criu.CRIU)
        pytest.skip("CRIU 4.2.1 not installed (run scripts/setup.sh)")
    process = lab.ControllerProcess(config=slicelab.controller_config()).start()
    yield process
    process.stop()
