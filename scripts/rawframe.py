#!/usr/bin/env python3
"""Send or receive crafted Ethernet frames on a raw AF_PACKET socket.

Used by the transparency tests (the host kernel has no VLAN devices, so tagged
guest traffic is crafted here). ``send`` prints the hex of every frame sent;
``recv`` prints the hex of every frame received from ``--src`` (as it appeared
on the wire, with any VLAN tag the kernel moved into auxdata put back).
Runs with any python3 (no third-party modules); inside a Mininet host.
"""

import argparse
import os
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6


MARKER = b"violin-rawframe"


def mac(text):
    return bytes(int(x, 16) for x in text.split(":"))


def build(args, seq):
    frame = mac(args.dst) + mac(args.src)
    if args.vlan is not None:
        frame += struct.pack("!HH", 0x8100, args.vlan)
    payload = MARKER + struct.pack("!I", seq) + os.urandom(8)
    return (frame + struct.pack("!H", int(args.ethertype, 0)) + payload).ljust(64, b"\x00")


def send(args):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((args.iface, 0))
    for seq in range(args.count):
        frame = build(args, seq)
        sock.send(frame)
        print(frame.hex(), flush=True)
        time.sleep(args.interval)


def recv(args):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    sock.bind((args.iface, 0))
    sock.settimeout(0.2)
    want, got, deadline = mac(args.src), 0, time.monotonic() + args.timeout
    while got < args.count and time.monotonic() < deadline:
        try:
            data, ancdata, _flags, addr = sock.recvmsg(65535, socket.CMSG_LEN(64))
        except socket.timeout:
            continue
        if addr[2] == socket.PACKET_OUTGOING or data[6:12] != want or MARKER not in data:
            continue
        for level, kind, aux in ancdata:
            if level == SOL_PACKET and kind == PACKET_AUXDATA:
                status, _len, _snap, _mac, _net, tci, tpid = struct.unpack("IIIHHHH", aux[:20])
                if status & TP_STATUS_VLAN_VALID:
                    tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100
                    data = data[:12] + struct.pack("!HH", tpid, tci) + data[12:]
        print(data.hex(), flush=True)
        got += 1
    return 0 if got == args.count else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("send", "recv"))
    parser.add_argument("--iface", required=True)
    parser.add_argument("--src", required=True, help="source MAC (send) / MAC to listen for (recv)")
    parser.add_argument("--dst", default="ff:ff:ff:ff:ff:ff")
    parser.add_argument("--vlan", type=int, help="add an 802.1Q tag with this VID (send)")
    parser.add_argument("--ethertype", default="0x88b6")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    return send(args) or 0 if args.mode == "send" else recv(args)


if __name__ == "__main__":
    sys.exit(main())
