"""Talk to a VM guest's consistency-oracle member (guest/vseq.c) over its control port.

The guest has no disk and no shell for the host: ``vseq`` keeps its receive log
in memory and answers one line per TCP connection on port 47002 ("STOP" stops
sending, "DUMP" returns its state; see guest/vseq.c). Standard library only.

    text = guest_command("10.0.0.5", "DUMP")
    state = load_guest_state(text)       # {"id", "peers", "progress", "log"}
    member = oracle_member(state)        # the shape workloads.oracle.check takes
"""

import socket
from typing import Dict, List, Tuple

CONTROL_PORT = 47002


class GuestError(RuntimeError):
    """The guest did not answer, or answered something that is not a state dump."""


def guest_command(ip: str, command: str, port: int = CONTROL_PORT, timeout: float = 5.0) -> str:
    """Send one command line ("STOP", "DUMP") and return the whole reply (the guest closes after it)."""
    line = command if command.endswith("\n") else command + "\n"
    chunks = []
    try:
        with socket.create_connection((ip, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(line.encode())
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    break
                chunks.append(data)
    except OSError as error:
        raise GuestError("guest %s:%d, command %r: %s" % (ip, port, command.strip(), error)) from error
    return b"".join(chunks).decode()


def load_guest_state(text: str) -> dict:
    """Parse a DUMP reply: {"id": int, "peers": [ids], "progress": {peer: (udp_about, udp_last,
    tcp_about, tcp_last)}, "log": [(proto, sender, seq, arrival_ns)]} with proto "u" or "t"."""
    state = {"id": None, "peers": [], "progress": {}, "log": []}
    log: List[Tuple[str, int, int, int]] = state["log"]
    complete = False
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        try:
            if not parts:
                continue
            if parts[0] == "end":
                complete = True
                break
            if parts[0] == "id":
                state["id"] = int(parts[1])
            elif parts[0] == "peers":
                state["peers"] = [int(p) for p in parts[1:]]
            elif parts[0] == "progress":
                peer, *values = (int(p) for p in parts[1:6])
                if len(values) != 4:
                    raise ValueError(line)
                state["progress"][peer] = tuple(values)
            elif parts[0] == "t" and len(parts) == 4:
                log.append(("t", int(parts[1]), int(parts[2]), int(parts[3])))
            elif len(parts) == 3:
                log.append(("u", int(parts[0]), int(parts[1]), int(parts[2])))
            else:
                raise ValueError(line)
        except (ValueError, IndexError) as error:
            raise GuestError("bad line %d of a guest dump: %r" % (number, line)) from error
    if not complete or state["id"] is None:
        raise GuestError("incomplete guest dump (%d bytes, no 'end' line)" % len(text))
    return state


def oracle_member(state: dict) -> Dict[str, object]:
    """A guest's state as workloads.oracle.check wants one member: logs and last-sent seqs, per protocol."""
    return {
        "log": [(s, q, t) for proto, s, q, t in state["log"] if proto == "u"],
        "tcp_log": [(s, q, t) for proto, s, q, t in state["log"] if proto == "t"],
        "sent": {peer: p[1] for peer, p in state["progress"].items()},
        "tcp_sent": {peer: p[3] for peer, p in state["progress"].items()},
    }
