"""The guest's oracle member without a VM: workloads.guestctl's parser, and guest/vseq.c compiled for the
host and run against workloads/seqstream.py on loopback in a private network namespace (a few seconds)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from workloads import guestctl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DUMP = """id 2
peers 1 3
progress 1 10 9 5 5
progress 3 10 10 0 0
1 1 1000
t 1 1 1001
3 1 1002
end
"""


def test_load_guest_state_parses_a_dump():
    state = guestctl.load_guest_state(DUMP)
    assert state == {"id": 2, "peers": [1, 3], "progress": {1: (10, 9, 5, 5), 3: (10, 10, 0, 0)},
                     "log": [("u", 1, 1, 1000), ("t", 1, 1, 1001), ("u", 3, 1, 1002)]}
    member = guestctl.oracle_member(state)
    assert member == {"log": [(1, 1, 1000), (3, 1, 1002)], "tcp_log": [(1, 1, 1001)],
                      "sent": {1: 9, 3: 10}, "tcp_sent": {1: 5, 3: 0}}


@pytest.mark.parametrize("text", [DUMP.replace("end\n", ""), "ERR\n", DUMP.replace("t 1 1 1001", "t 1 x 1001"),
                                  DUMP.replace("progress 3 10 10 0 0", "progress 3 10")])
def test_load_guest_state_rejects_truncated_or_bad_dumps(text):
    with pytest.raises(guestctl.GuestError):
        guestctl.load_guest_state(text)


# Runs inside the namespace: both members on loopback (vseq also has two peers that do not exist), then STOP/DUMP and a few bad commands; prints JSON.
DRIVER = r"""
import json, os, signal, socket, subprocess, sys, time
from workloads import guestctl, seqstream
vseq, work, repo = sys.argv[1:4]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
guest = subprocess.Popen([vseq, "--id", "2", "--bind", "127.0.0.2", "--peers", "1=127.0.0.1+3=127.0.0.3", "--rate",
                          "200", "--size", "200", "4=127.0.0.4"], stdout=subprocess.DEVNULL)  # 3, 4: nobody there
progress, log = os.path.join(work, "p"), os.path.join(work, "l")
member = subprocess.Popen([sys.executable, os.path.join(repo, "workloads", "seqstream.py"), "--id", "1", "--bind",
                           "127.0.0.1", "--peers", "2=127.0.0.2", "--rate", "200", "--progress", progress,
                           "--log", log])
try:
    time.sleep(2.0)
    out = {"stop": guestctl.guest_command("127.0.0.2", "STOP")}
    os.kill(member.pid, signal.SIGSTOP)
    time.sleep(0.3)
    out["dump"] = guestctl.guest_command("127.0.0.2", "DUMP")
    out["py_udp"] = seqstream.read_progress(progress, [2])[2]
    out["py_tcp"] = seqstream.read_progress(progress, [2], tcp=True)[2]
    os.kill(member.pid, signal.SIGCONT)
    time.sleep(0.3)
    member.terminate(); member.wait()
    out["py_log"] = open(log).read()
    out["bad"] = guestctl.guest_command("127.0.0.2", "dump")
    out["long"] = guestctl.guest_command("127.0.0.2", "x" * 100)
    with socket.create_connection(("127.0.0.2", 47002)) as sock:  # a line in pieces
        sock.sendall(b"DU"); time.sleep(0.1); sock.sendall(b"MP\r\n")
        out["pieces"] = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
finally:
    for process in (guest, member):
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT); process.kill(); process.wait()
print(json.dumps(out))
"""


def _namespace_prefix():
    """A command prefix that runs its argument in a fresh network namespace, or None."""
    for prefix in (["unshare", "--net"] if os.geteuid() == 0 else [], ["unshare", "-rn"]):
        if prefix and shutil.which("unshare") and shutil.which("ip") and \
                subprocess.run(prefix + ["true"], capture_output=True).returncode == 0:
            return prefix
    return None


def _check(seqs, first, last, upto):
    assert len(seqs) == len(set(seqs)), "duplicates"
    assert set(range(first, last + 1)) <= set(seqs) <= set(range(first, max(last, upto) + 1))


def test_vseq_speaks_seqstream_protocol(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (run scripts/setup.sh)")
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot create a network namespace here (needs root or unprivileged user namespaces)")
    binary = str(tmp_path / "vseq")
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", binary, os.path.join(REPO, "guest", "vseq.c")],
                   check=True)
    result = subprocess.run(prefix + [sys.executable, "-c", DRIVER, binary, str(tmp_path), REPO], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["stop"] == "OK\n" and out["bad"] == "ERR\n" and out["long"] == "ERR\n"
    state = guestctl.load_guest_state(out["dump"])
    assert guestctl.load_guest_state(out["pieces"])["progress"] == state["progress"]  # stopped stays stopped
    assert state["id"] == 2 and state["peers"] == [1, 3, 4]  # "+" and extra words are peers too, in order
    assert state["progress"][4][:2] == state["progress"][1][:2] and state["progress"][4][2:] == (0, 0)
    udp_about, udp_last, tcp_about, tcp_last = state["progress"][1]
    assert udp_about == udp_last > 150 and tcp_about == tcp_last > 150
    # vseq got seqstream's datagrams and records, each once, up to what seqstream had sent;
    got_udp = [q for p, s, q, _t in state["log"] if p == "u" and s == 1]
    got_tcp = [q for p, s, q, _t in state["log"] if p == "t" and s == 1]
    _check(got_udp, min(got_udp), out["py_udp"][1], out["py_udp"][0])
    _check(got_tcp, 1, out["py_tcp"][1], out["py_tcp"][0])
    assert all(t > 0 for _p, _s, _q, t in state["log"])
    # and seqstream got vseq's.
    py_log = str(tmp_path / "py.log")
    with open(py_log, "w") as handle:
        handle.write(out["py_log"])
    from workloads import seqstream
    mine_udp = [q for s, q, _t in seqstream.parse_log(py_log) if s == 2]
    mine_tcp = [q for s, q, _t in seqstream.parse_log(py_log, tcp=True) if s == 2]
    _check(mine_udp, min(mine_udp), udp_last, udp_last)
    _check(mine_tcp, 1, tcp_last, tcp_last)
