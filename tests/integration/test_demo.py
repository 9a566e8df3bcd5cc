"""The README's demo, small: Mandelbrot on the GENI-VIOLIN LAN, failure, restore, identical image."""

import os
import sys

import pytest

from hostside.backends import criu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))


def test_demo_failure_and_restore_give_a_bit_identical_image(lab_ready, tmp_path, capsys):
    if not os.path.exists(criu.CRIU):
        if os.environ.get("CI"):
            pytest.fail("CI must run the demo: CRIU is missing")
        pytest.skip("CRIU 4.2.1 not installed")
    import demo
    out = tmp_path / "mandelbrot.png"
    code = demo.main(["--width", "120", "--height", "90", "--iterations", "200", "--delay-ms", "300",
                      "--every", "1.5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "FAILURE: h3 and h4 killed" in printed and "RESTORED all four members" in printed
    assert "bit-identical" in printed and out.exists()


def test_demo_with_vms_gives_a_bit_identical_image(vm_ready, tmp_path, capsys):
    """The seed's shape: four QEMU VMs, fake live migrations, two destroyed, all restored."""
    import demo
    out = tmp_path / "mandelbrot.png"
    code = demo.main(["--vms", "--width", "120", "--height", "90", "--iterations", "200", "--delay-ms", "500",
                      "--every", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "FAILURE: vm3 and vm4 destroyed" in printed and "RESTORED all four members" in printed
    assert "bit-identical" in printed and out.exists()
