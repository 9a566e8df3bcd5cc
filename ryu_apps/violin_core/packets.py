"""Ethernet parsing and the controller's link-discovery probe frames (no ryu)."""

import struct
from dataclasses import dataclass
from typing import Optional, Tuple

PROBE_DST = "03:76:69:6f:6c:6e"  # locally administered multicast, never a guest MAC
PROBE_SRC = "02:76:69:6f:6c:6e"
MARKER_DST = "03:76:69:6f:6c:6d"  # a member's cut marker: sent on its own link while it is paused
PROBE_ETH_TYPE = 0x88B5  # IEEE 802 local experimental ethertype 1
_PROBE_MAGIC = b"VIOLINPROBE1"
_PROBE_BODY = struct.Struct("!12s8sQI")  # magic, controller nonce, dpid, port


def mac_to_bytes(mac: str) -> bytes:
    return bytes(int(octet, 16) for octet in mac.split(":"))


def mac_to_str(raw: bytes) -> str:
    return ":".join("%02x" % b for b in raw)


def is_multicast(mac: str) -> bool:
    """Group address (broadcast included): bit 0 of the first octet."""
    return bool(int(mac[:2], 16) & 1)


@dataclass(frozen=True)
class EthHeader:
    dst: str
    src: str
    eth_type: int  # the ethertype after any VLAN tags
    vlan_ids: Tuple[int, ...]  # outermost first


def parse_eth(frame: bytes) -> Optional[EthHeader]:
    """Parse an Ethernet header with any stack of 802.1Q/802.1ad tags."""
    if len(frame) < 14:
        return None
    dst, src = mac_to_str(frame[0:6]), mac_to_str(frame[6:12])
    (eth_type,) = struct.unpack_from("!H", frame, 12)
    offset, vlans = 14, []
    while eth_type in (0x8100, 0x88A8, 0x9100) and len(frame) >= offset + 4:
        tci, eth_type = struct.unpack_from("!HH", frame, offset)
        vlans.append(tci & 0x0FFF)
        offset += 4
    return EthHeader(dst, src, eth_type, tuple(vlans))


def build_probe(nonce: bytes, dpid: int, port: int) -> bytes:
    header = mac_to_bytes(PROBE_DST) + mac_to_bytes(PROBE_SRC) + struct.pack("!H", PROBE_ETH_TYPE)
    frame = header + _PROBE_BODY.pack(_PROBE_MAGIC, nonce, dpid, port)
    return frame.ljust(60, b"\0")


_MARKER_MAGIC = b"VIOLINMARK1\0"
_CUT_MAGIC = b"VIOLINCUT01\0"
_MARKER_BODY = struct.Struct("!12s40s40s")  # magic, snapshot id, member name


def build_marker(src_mac: str, snapshot_id: str, member: str) -> bytes:
    """The frame a paused member's helper sends down the member's link (see DESIGN: cut precision)."""
    return _control_frame(_MARKER_MAGIC, src_mac, snapshot_id, member)


def build_cut_request(src_mac: str, snapshot_id: str, member: str) -> bytes:
    """The frame the helper sends down the member's link once the member runs again after its marker
    (an asynchronous cut): "flip it and release what is held for it", in band, with no HTTP call."""
    return _control_frame(_CUT_MAGIC, src_mac, snapshot_id, member)


def _control_frame(magic: bytes, src_mac: str, snapshot_id: str, member: str) -> bytes:
    header = mac_to_bytes(MARKER_DST) + mac_to_bytes(src_mac) + struct.pack("!H", PROBE_ETH_TYPE)
    return header + _MARKER_BODY.pack(magic, snapshot_id.encode(), member.encode())


def parse_marker(frame: bytes) -> Optional[Tuple[str, str, str]]:
    """(source MAC, snapshot id, member name) of a marker frame, or None."""
    return _parse_control(frame, _MARKER_MAGIC)


def parse_cut_request(frame: bytes) -> Optional[Tuple[str, str, str]]:
    """(source MAC, snapshot id, member name) of a cut request frame, or None."""
    return _parse_control(frame, _CUT_MAGIC)


def _parse_control(frame: bytes, expected: bytes) -> Optional[Tuple[str, str, str]]:
    if len(frame) < 14 + _MARKER_BODY.size or frame[0:6] != mac_to_bytes(MARKER_DST):
        return None
    magic, snapshot_id, member = _MARKER_BODY.unpack_from(frame, 14)
    if magic != expected:
        return None
    return mac_to_str(frame[6:12]), snapshot_id.rstrip(b"\0").decode(), member.rstrip(b"\0").decode()


def strip_outer_tag(frame: bytes) -> bytes:
    """The guest frame inside our outer 802.1Q tag."""
    return frame[:12] + frame[16:]


def parse_probe(frame: bytes, nonce: bytes) -> Optional[Tuple[int, int]]:
    """Return (dpid, port) the probe was sent from, or None if not our probe."""
    if len(frame) < 14 + _PROBE_BODY.size:
        return None
    if frame[0:6] != mac_to_bytes(PROBE_DST) or frame[12:14] != struct.pack("!H", PROBE_ETH_TYPE):
        return None
    magic, probe_nonce, dpid, port = _PROBE_BODY.unpack_from(frame, 14)
    if magic != _PROBE_MAGIC or probe_nonce != nonce:
        return None
    return dpid, port
