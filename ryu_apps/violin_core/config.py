"""Controller configuration: a declarative schema, validated at start.

A config file is JSON or YAML (by extension) with optional sections; unknown
keys and wrong types are rejected with the key's path in the message. The
``violin-check-config`` command runs the same validation.

Environment: ``VIOLIN_CONFIG`` names the file when the app is started by
``ryu-manager violin_snapshot``; ``VIOLIN_API_TOKEN`` overrides ``api.token``
and ``VIOLIN_HELPER_TOKEN`` overrides ``api.helper_token``.
"""

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .fabric import FabricSettings
from .snapshot import SnapshotError, SnapshotSettings, parse_member


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and why."""


def _positive(value):
    return value > 0


SCHEMA = {
    "fabric": {
        "probe_interval": ((int, float), 1.0, _positive, "seconds between link-discovery probe rounds"),
        "settle_time": ((int, float), 0.5, _positive, "seconds a port must stay link-less to be an edge port"),
        "link_timeout": ((int, float), 3.5, _positive, "seconds without a probe before a link is dropped"),
        "tag_vid": (int, 0xF00, lambda v: 1 <= v <= 4092, "outer tag VID of uncoloured frames; "
                    "snapshot colours use the next two (1..4092)"),
        "max_hosts": (int, 4096, _positive, "learned MAC addresses at most"),
    },
    "api": {
        "token": ((str, type(None)), None, None, "bearer token for mutating REST calls"),
        "helper_token": ((str, type(None)), None, None, "bearer token the controller sends to host helpers"),
        "server_token": ((str, type(None)), None, None, "bearer token of the snapshot servers (to prune images)"),
    },
    "state": {
        "directory": (str, "/var/lib/violin-snapshot", None, "the snapshot catalogue (manifests, channel state)"),
    },
    "snapshot": {
        "hold_bytes_per_receiver": (int, 8 * 1024 * 1024, _positive, "held frames per receiver, bytes"),
        "max_channel_bytes": (int, 256 * 1024 * 1024, _positive, "recorded channel state beyond this aborts"),
        "timeout": ((int, float), 120.0, _positive, "seconds before a snapshot that is not complete aborts"),
        "marker_timeout": ((int, float), 5.0, _positive, "seconds a cut waits for the member's marker"),
        "barrier_timeout": ((int, float), 5.0, _positive, "seconds to wait for switches to confirm rules"),
        "drain_poll": ((int, float), 0.05, _positive, "seconds between flow-statistics polls while draining"),
        "drain_min": ((int, float), 0.2, _positive, "seconds after the last cut before completion"),
        "drain_timeout": ((int, float), 2.0, _positive, "seconds of draining before completing on time"),
    },
}
LIST_SECTIONS = {"members": "members to snapshot: {name, macs, helper_url, backend, handle, marker}"}


@dataclass(frozen=True)
class Config:
    fabric: FabricSettings = FabricSettings()
    api_token: Optional[str] = None
    state_directory: str = "/var/lib/violin-snapshot"
    snapshot: SnapshotSettings = SnapshotSettings()
    members: tuple = ()
    helper_token: Optional[str] = None
    server_token: Optional[str] = None


def validate(raw: Any) -> Dict[str, Dict[str, Any]]:
    """Check a parsed config against SCHEMA; return it with defaults filled in."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping of sections, got %s" % type(raw).__name__)
    unknown = sorted(set(raw) - set(SCHEMA) - set(LIST_SECTIONS))
    if unknown:
        raise ConfigError("config: unknown section(s) %s; known: %s" % (
            ", ".join(unknown), ", ".join(list(SCHEMA) + list(LIST_SECTIONS))))
    result = {}
    members = raw.get("members") or []
    if not isinstance(members, list):
        raise ConfigError("members: expected a list of members")
    names = set()
    for index, spec in enumerate(members):
        try:
            member = parse_member(spec)
        except SnapshotError as error:
            raise ConfigError("members[%d]: %s" % (index, error.reason)) from None
        if member.name in names:
            raise ConfigError("members[%d]: duplicate member name %s" % (index, member.name))
        names.add(member.name)
    result["members"] = list(members)
    for section, keys in SCHEMA.items():
        given = raw.get(section)
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise ConfigError("%s: expected a mapping" % section)
        unknown = sorted(set(given) - set(keys))
        if unknown:
            raise ConfigError("%s: unknown key(s) %s; known: %s" % (section, ", ".join(unknown), ", ".join(keys)))
        values = {}
        for key, (types, default, check, help_text) in keys.items():
            value = given.get(key, default)
            if isinstance(value, bool) or not isinstance(value, types):
                raise ConfigError("%s.%s: expected %s (%s), got %r" % (
                    section, key, _type_names(types), help_text, value))
            if check is not None and value is not None and not check(value):
                raise ConfigError("%s.%s: %r is out of range (%s)" % (section, key, value, help_text))
            values[key] = value
        result[section] = values
    return result


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def parse_text(text: str, filename: str = "") -> Any:
    if filename.endswith((".yaml", ".yml")):
        import yaml
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("%s: not valid YAML: %s" % (filename, exc)) from None
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError("%s: not valid JSON: %s" % (filename or "config", exc)) from None


def load(path: Optional[str] = None, environ=os.environ) -> Config:
    """Read and validate the config file (if any) and apply the environment."""
    path = path or environ.get("VIOLIN_CONFIG")
    raw = {}
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                raw = parse_text(handle.read(), path)
        except OSError as exc:
            raise ConfigError("cannot read config %s: %s" % (path, exc.strerror)) from None
    values = validate(raw)
    token = environ.get("VIOLIN_API_TOKEN") or values["api"]["token"]
    helper_token = environ.get("VIOLIN_HELPER_TOKEN") or values["api"]["helper_token"]
    server_token = environ.get("VIOLIN_SERVER_TOKEN") or values["api"]["server_token"]
    return Config(FabricSettings(**values["fabric"]), token, values["state"]["directory"],
                  SnapshotSettings(**values["snapshot"]), tuple(values["members"]), helper_token, server_token)


def check_config_main(argv=None) -> int:
    """``violin-check-config FILE...``: validate config files, exit 2 on error."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: violin-check-config FILE [FILE...]", file=sys.stderr)
        return 2 if not argv else 0
    status = 0
    for path in argv:
        try:
            load(path, environ={})
            print("%s: OK" % path)
        except ConfigError as exc:
            print("error: %s" % exc, file=sys.stderr)
            status = 2
    return status
