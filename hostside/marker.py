"""Send a member's cut marker down the member's own link (DESIGN: cut precision).

While a member is paused, every frame it sent earlier is ahead of the marker
in its link's queue; the controller flips the member only after the marker
reached the switch, so no pre-cut frame can be coloured post. Sending is one
``send()`` on an AF_PACKET socket bound to the member's interface, so the
socket is opened once, before any pause: ``MarkerSender(iface)`` in-process,
or ``python -m hostside.marker serve --iface IF --src MAC`` inside the
member's network namespace, which reads ``SNAPSHOT_ID MEMBER`` lines on stdin
and answers ``ok`` after each marker.
"""

import argparse
import socket
import sys

from violin_core.packets import build_marker


class MarkerSender:
    def __init__(self, iface: str, src_mac: str):
        self.src_mac = src_mac
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.sock.bind((iface, 0))

    def send(self, snapshot_id: str, member: str) -> None:
        self.sock.send(build_marker(self.src_mac, snapshot_id, member))

    def close(self) -> None:
        self.sock.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hostside.marker", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("send", "serve"))
    parser.add_argument("--iface", required=True)
    parser.add_argument("--src", required=True, help="the member's MAC address")
    parser.add_argument("--snapshot", help="snapshot id (send)")
    parser.add_argument("--member", help="member name (send)")
    args = parser.parse_args(argv)
    sender = MarkerSender(args.iface, args.src)
    if args.mode == "send":
        if not args.snapshot or not args.member:
            parser.error("send needs --snapshot and --member")
        sender.send(args.snapshot, args.member)
        return 0
    print("ready", flush=True)
    for line in sys.stdin:
        snapshot_id, member = line.split()
        sender.send(snapshot_id, member)
        print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
