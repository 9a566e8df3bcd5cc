"""Controller configuration: a declarative schema, validated at start.

A config file is JSON or YAML (by extension) with optional sections, checked by
the one schema mechanism (``violin_core.schema``): unknown keys and wrong types
are rejected with the key's path in the message. ``violin-check-config`` runs
the same validation; docs/configuration.md is generated from ``SCHEMA``
(``python -m violin_core.config --reference``).

Environment: ``VIOLIN_CONFIG`` names the file when the app is started by
``ryu-manager violin_snapshot``; ``VIOLIN_API_TOKEN`` overrides ``api.token``
and ``VIOLIN_HELPER_TOKEN`` overrides ``api.helper_token``; ``VIOLIN_CA_FILE`` overrides ``api.ca_file``.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from . import schema
from .coordinator import SnapshotSettings
from .fabric import FabricSettings
from .members import MEMBER_SCHEMA
from .policy import Vids

F, positive, optional_str = schema.Field, schema.positive, (str, type(None))

SCHEMA = schema.Schema({
    "fabric": schema.Schema({
        "probe_interval": F(float, 1.0, positive, "seconds between link-discovery probe rounds"),
        "settle_time": F(float, 0.5, positive, "seconds a port must stay link-less to be an edge port"),
        "link_timeout": F(float, 3.5, positive, "seconds without a probe before a link is dropped"),
        "tag_vid": F(int, 0xF00, schema.between(1, Vids.MAX_BASE), "outer tag VID of uncoloured frames; "
                     "snapshot colours use the next %d" % Vids.COLOURS),
        "max_hosts": F(int, 4096, positive, "learned MAC addresses at most"),
    }, help="forwarding and discovery"),
    "api": schema.Schema({
        "token": F(optional_str, None, None, "bearer token for mutating REST calls (or VIOLIN_API_TOKEN)"),
        "helper_token": F(optional_str, None, None, "bearer token the controller sends to host helpers "
                          "(or VIOLIN_HELPER_TOKEN)"),
        "server_token": F(optional_str, None, None, "bearer token of the snapshot servers, to prune images "
                          "(or VIOLIN_SERVER_TOKEN)"),
        "advertise_url": F(optional_str, None, schema.http_url, "the URL helpers call back on, e.g. "
                           "http://10.0.0.1:8080 (default: the REST API's listen address, https:// when "
                           "tls_cert is set)"),
        "tls_cert": F(optional_str, None, None, "serve the REST API over HTTPS with this certificate (PEM, any "
                      "chain after it); needs tls_key"),
        "tls_key": F(optional_str, None, None, "the private key of tls_cert (PEM)"),
        "ca_file": F(optional_str, None, None, "CA certificates (PEM) that verify https:// helpers and snapshot "
                     "servers (or VIOLIN_CA_FILE; default: the system's CAs)"),
    }, help="the REST API"),
    "state": schema.Schema({
        "directory": F(str, "/var/lib/violin-snapshot", None, "the snapshot catalogue (manifests, channel state)"),
    }),
    "snapshot": schema.Schema({
        "hold_bytes_per_receiver": F(int, 8 * 1024 * 1024, positive, "held frames per receiver, bytes"),
        "max_channel_bytes": F(int, 256 * 1024 * 1024, positive, "recorded channel state beyond this aborts"),
        "timeout": F(float, 120.0, positive, "seconds before a snapshot that is not complete aborts"),
        "marker_timeout": F(float, 5.0, positive, "seconds a cut waits for the member's marker"),
        "barrier_timeout": F(float, 5.0, positive, "seconds to wait for switches to confirm rules"),
        "drain_poll": F(float, 0.05, positive, "seconds between flow-statistics polls while draining"),
        "drain_min": F(float, 0.2, positive, "seconds after the last cut before completion"),
        "drain_timeout": F(float, 2.0, positive, "seconds of draining before completing on time"),
    }),
    "members": schema.ListOf(MEMBER_SCHEMA, "members to snapshot (may also be registered over REST)",
                             unique=lambda member: member["name"]),
})


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Config:
    fabric: FabricSettings = FabricSettings()
    api_token: Optional[str] = field(default=None, repr=False)  # secrets never in a repr (or a log of one)
    state_directory: str = "/var/lib/violin-snapshot"
    snapshot: SnapshotSettings = SnapshotSettings()
    members: tuple = ()
    helper_token: Optional[str] = field(default=None, repr=False)
    server_token: Optional[str] = field(default=None, repr=False)
    advertise_url: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    ca_file: Optional[str] = None


def validate(raw: Any) -> Dict[str, Any]:
    """Check a parsed config against SCHEMA; return it with defaults filled in."""
    try:
        return SCHEMA.validate(raw)
    except schema.SchemaError as error:
        raise ConfigError(str(error)) from None


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
    api = values["api"]
    if bool(api["tls_cert"]) != bool(api["tls_key"]):
        missing = "tls_key" if api["tls_cert"] else "tls_cert"
        raise ConfigError("api.%s: api.tls_cert and api.tls_key go together" % missing)
    members = tuple({k: list(v) if k == "macs" else v for k, v in m.items()} for m in values["members"])
    return Config(FabricSettings(**values["fabric"]), environ.get("VIOLIN_API_TOKEN") or api["token"],
                  values["state"]["directory"], SnapshotSettings(**values["snapshot"]), members,
                  environ.get("VIOLIN_HELPER_TOKEN") or api["helper_token"],
                  environ.get("VIOLIN_SERVER_TOKEN") or api["server_token"], api["advertise_url"],
                  api["tls_cert"], api["tls_key"], environ.get("VIOLIN_CA_FILE") or api["ca_file"])


def check_config_main(argv=None) -> int:
    """``violin-check-config FILE...``: validate config files, exit 2 on error."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--reference"]:
        print(reference(), end="")
        return 0
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


def reference() -> str:
    """docs/configuration.md: every key of the controller's config, generated from SCHEMA."""
    return ("# Controller configuration\n\nGenerated from `violin_core.config.SCHEMA` by "
            "`python -m violin_core.config --reference`; a unit test keeps it true. A JSON or YAML file, named by "
            "`VIOLIN_CONFIG` (for `ryu-manager violin_snapshot`) or `violin-controller --config`; every section "
            "is optional, unknown keys and wrong types are refused with the key's path "
            "(`violin-check-config FILE`).\n\n" + schema.reference(SCHEMA))


if __name__ == "__main__":
    sys.exit(check_config_main())
