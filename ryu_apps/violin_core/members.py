"""Members: what the controller knows of each machine it snapshots, and their registry.

A member is named, owns one or more MAC addresses, and is usually snapshotted by a
host helper (``helper_url``). ``backend`` and ``handle`` are what the registrant says
the member is (shown to users, passed on to nobody): the controller never branches on
them. What it must know to take a cut it learns from declarations: ``marker`` (the
default for whether a cut waits for a marker frame; a helper's cut call overrides it
with what it really sent) and, at restore, what each helper's stage answer says.
"""

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

from . import schema
from .errors import Refused


def _macs(value):
    return [value] if isinstance(value, str) else value


def _mac_list(value):
    macs = _macs(value)
    if not macs or not all(isinstance(m, str) and schema.unicast_mac(m) is None for m in macs):
        return "a non-empty list of unicast MAC addresses such as 00:00:00:00:00:01"
    return None


MEMBER_SCHEMA = schema.Schema({
    "name": schema.Field(str, check=schema.name, help="the member's name, unique in the controller"),
    "macs": schema.Field((list, str), check=_mac_list, convert=lambda v: tuple(dict.fromkeys(m.lower() for m in _macs(v))),
                         help="its MAC addresses (one string or a list)"),
    "helper_url": schema.Field((str, type(None)), None, schema.http_url, help="the host helper that snapshots it"),
    "backend": schema.Field(str, "manual", help="what the member is (criu, libvirt, ...), for people"),
    "handle": schema.Field(str, "", help="the helper's handle for it, for people"),
    "host": schema.Field(str, "", help="the host its helper runs on, for people"),
    "marker": schema.Field(bool, True, help="whether its cut waits for a marker frame unless the helper says"),
}, allow_none=False)


@dataclass
class Member:
    name: str
    macs: Tuple[str, ...]
    helper_url: Optional[str] = None
    backend: str = "manual"
    handle: str = ""
    marker: bool = True  # the cut waits for a marker frame from the member's own link
    host: str = ""  # the host its helper runs on (as the helper registering it says)
    epoch: int = 0

    def same_as(self, other: "Member") -> bool:
        """Whether ``other`` describes it alike (what a registration can change; not the epoch)."""
        return all(getattr(self, key) == getattr(other, key) for key in MEMBER_SCHEMA.fields)

    def describe(self, hosts: Dict[str, Tuple[int, int]]) -> dict:
        where = [hosts.get(mac) for mac in self.macs]
        return {"name": self.name, "macs": list(self.macs), "helper_url": self.helper_url,
                "backend": self.backend, "handle": self.handle, "marker": self.marker, "host": self.host,
                "epoch": self.epoch,
                "located": all(w is not None for w in where),
                "attachment": [None if w is None else {"dpid": "%016x" % w[0], "port": w[1]} for w in where]}


def parse_member(spec, name: Optional[str] = None) -> Member:
    """Validate a member description (REST body or config entry); ``name``: the one of the URL, which the
    body may leave out but not contradict."""
    if not isinstance(spec, dict):
        raise Refused(400, "a member is a JSON object")
    if name is not None:
        if spec.get("name", name) != name:
            raise Refused(400, "member %s: the body names %r" % (name, spec.get("name")))
        spec = dict(spec, name=name)
    try:
        return Member(**MEMBER_SCHEMA.validate(spec))
    except schema.SchemaError as error:
        where = spec.get("name") if isinstance(spec.get("name"), str) else None
        raise Refused(400, ("member %s: %s" % (where, error)) if where else "member " + str(error)) from None


class MemberRegistry:
    """Members by name; a MAC belongs to one member at most."""

    def __init__(self):
        self._by_name: Dict[str, Member] = {}
        self._by_mac: Dict[str, Member] = {}  # every packet-in and every host's flows look a MAC up

    def _index(self) -> None:
        self._by_mac = {mac: member for member in self._by_name.values() for mac in member.macs}

    def add(self, member: Member) -> Member:
        if member.name in self._by_name:
            raise Refused(409, "member %s exists; delete it first" % member.name)
        self._check_macs(member)
        self._by_name[member.name] = member
        self._index()
        return member

    def _check_macs(self, member: Member) -> None:
        for other in self._by_name.values():
            shared = set(other.macs) & set(member.macs)
            if shared and other.name != member.name:
                raise Refused(409, "MAC %s already belongs to member %s" % (sorted(shared)[0], other.name))

    def update(self, member: Member) -> Member:
        """Describe the existing member ``member.name`` as ``member`` says (its epoch kept)."""
        current = self.get(member.name)
        self._check_macs(member)
        for key in MEMBER_SCHEMA.fields:
            setattr(current, key, getattr(member, key))
        self._index()
        return current

    def get(self, name: str) -> Member:
        if name not in self._by_name:
            raise Refused(404, "no member named %s" % name)
        return self._by_name[name]

    def find(self, name: str) -> Optional[Member]:
        return self._by_name.get(name)

    def pop(self, name: str) -> Member:
        member = self._by_name.pop(self.get(name).name)
        self._index()
        return member

    def by_mac(self, mac: str) -> Optional[Member]:
        member = self._by_mac.get(mac)
        if member is not None and (mac not in member.macs or self._by_name.get(member.name) is not member):
            self._index()  # changed behind the registry's back: look again
            member = self._by_mac.get(mac)
        return member

    def __contains__(self, name) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Member:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def values(self):
        return self._by_name.values()
