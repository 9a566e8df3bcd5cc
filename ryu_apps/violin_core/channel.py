"""Recorded channel state as pcapng: one interface per receiver, frames in arrival order.

Wireshark opens the file as it is. Each receiving member is an interface
(``if_name`` = member name), so a frame's interface says whom to re-inject it
to; file order is arrival order, and every packet's comment repeats both.
"""

import struct
from typing import Iterable, List, NamedTuple

_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_LINKTYPE_ETHERNET = 1


class ChannelFrame(NamedTuple):
    receiver: str
    time: float  # seconds since the epoch
    frame: bytes


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad(value)


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def encode(frames: Iterable[ChannelFrame], application: str = "violin-snapshot") -> bytes:
    frames = list(frames)
    receivers = list(dict.fromkeys(f.receiver for f in frames))
    out = [_block(_SHB, struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1)
                  + _option(4, application.encode()) + _option(0, b""))]
    for name in receivers:
        out.append(_block(_IDB, struct.pack("<HHI", _LINKTYPE_ETHERNET, 0, 0)
                          + _option(2, name.encode()) + _option(9, b"\x06") + _option(0, b"")))
    index = {name: i for i, name in enumerate(receivers)}
    for order, item in enumerate(frames):
        micros = int(round(item.time * 1e6))
        comment = ("receiver=%s order=%d" % (item.receiver, order)).encode()
        body = struct.pack("<IIIII", index[item.receiver], micros >> 32, micros & 0xFFFFFFFF,
                           len(item.frame), len(item.frame))
        out.append(_block(_EPB, body + _pad(item.frame) + _option(1, comment) + _option(0, b"")))
    return b"".join(out)


def decode(data: bytes) -> List[ChannelFrame]:
    """Read what ``encode`` wrote (little-endian pcapng, Ethernet, microseconds)."""
    frames, names, offset = [], [], 0
    while offset + 12 <= len(data):
        kind, length = struct.unpack_from("<II", data, offset)
        if length < 12 or offset + length > len(data):
            raise ValueError("truncated pcapng block at offset %d" % offset)
        body = data[offset + 8:offset + length - 4]
        if kind == _SHB:
            (magic,) = struct.unpack_from("<I", body, 0)
            if magic != _BYTE_ORDER_MAGIC:
                raise ValueError("not a little-endian pcapng section")
        elif kind == _IDB:
            names.append(_options(body[8:]).get(2, b"").decode())
        elif kind == _EPB:
            iface, high, low, captured, _orig = struct.unpack_from("<IIIII", body, 0)
            frame = body[20:20 + captured]
            frames.append(ChannelFrame(names[iface], ((high << 32) | low) / 1e6, frame))
        offset += length
    return frames


def _options(data: bytes) -> dict:
    found, offset = {}, 0
    while offset + 4 <= len(data):
        code, length = struct.unpack_from("<HH", data, offset)
        if code == 0:
            break
        found[code] = data[offset + 4:offset + 4 + length]
        offset += 4 + length + (-length % 4)
    return found
