"""``violin``: drive a violin_snapshot controller from the shell.

A thin client of the REST API under ``/violin`` (docs/openapi.yaml) through violin_client.api, standard
library only: ``violin status``, ``violin snapshot`` (follows the snapshot
until it ends), ``violin list``, ``violin show ID``, ``violin restore ID`` and
so on. Tables by default, the controller's JSON with ``--json``. Live progress
goes to stderr (one line, rewritten, on a terminal; a line per change
otherwise), results to stdout.

Exit codes: 0 done, 1 the controller refused, failed or could not be reached
(or the snapshot aborted / the restore failed), 2 bad usage, 130 interrupted
(what was started goes on on the controller).
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
import urllib.parse
from typing import Dict, List, Optional, Tuple

from violin_client import tls
from violin_client.api import ApiClient, ApiError, Unreachable, wait_until_done

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_HTTP_TIMEOUT = 30.0
POLL_INTERVAL = 0.2  # seconds between progress polls (~5 per second)
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
SNAPSHOT_DONE = ("complete", "aborted")
RESTORE_DONE = ("complete", "failed")


class CliError(Exception):
    """Ends the command: ``violin: <message>`` on stderr, exit ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.message, self.code = message, code


class Interrupted(Exception):
    """Ctrl-C while following an operation that goes on without us."""

    def __init__(self, note: str):
        super().__init__(note)
        self.note = note


# --- arguments --------------------------------------------------------------------


def _url(value: str) -> str:
    parsed = urllib.parse.urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError("not an http(s) URL: %r" % value)
    return value.rstrip("/")


def _names(value: str) -> List[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated member names, got %r" % value)
    return names


def _mac(value: str) -> str:
    if not MAC_RE.match(value):
        raise argparse.ArgumentTypeError("not a MAC address (aa:bb:cc:dd:ee:ff): %r" % value)
    return value.lower()


def _placement(value: str) -> Tuple[str, str]:
    name, sep, url = value.partition("=")
    if not sep or not name.strip() or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError("expected MEMBER=HELPER_URL (http...), got %r" % value)
    return name.strip(), url.strip()


SPEC_OPTIONS = (("--pidfile", "pidfile"), ("--mininet-host", "mininet_host"), ("--command", "command"),
                ("--domain", "domain"), ("--container", "container"), ("--workdir", "workdir"), ("--ip", "ip"))
SPEC_HELP = {"pidfile": "criu: a file holding the pid of the member's process",
             "mininet_host": "criu: the Mininet host it runs in (with --command)",
             "command": "criu: a part of its command line in that host",
             "domain": "libvirt: the VM's domain", "container": "podman: the container",
             "workdir": "criu: its files, captured at the cut", "ip": "criu: address/prefix when restored elsewhere"}
BACKEND_OF = {"pidfile": "criu", "mininet_host": "criu", "domain": "libvirt", "container": "podman"}


def _spec_pair(value: str) -> Tuple[str, object]:
    key, sep, text = value.partition("=")
    if not sep or not re.match(r"^[a-z_][a-z0-9_]*$", key):
        raise argparse.ArgumentTypeError("expected KEY=VALUE, got %r" % value)
    try:
        return key, json.loads(text)
    except ValueError:
        return key, text


def _helper_token_option(parser, environ) -> None:
    parser.add_argument("--helper-token", default=environ.get("VIOLIN_HELPER_TOKEN"),
                        help="the helper's bearer token (default: $VIOLIN_HELPER_TOKEN)")


def _positive(kind):
    def convert(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError("not a %s: %r" % ("whole number" if kind is int else "number", value))
        if number <= 0:
            raise argparse.ArgumentTypeError("must be more than 0, got %r" % value)
        return number
    return convert


def _global_options(parser: argparse.ArgumentParser, environ, suppress: bool, http_timeout: bool = True) -> None:
    """The global options, on the main parser (with defaults) and on every subcommand
    (without, so ``violin list --json`` works and does not undo ``violin --json list``).
    ``violin snapshot --timeout`` is the snapshot's own: there the HTTP one goes first."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    group = parser.add_argument_group("global options")
    group.add_argument("--url", type=_url, default=default(environ.get("VIOLIN_URL") or DEFAULT_URL),
                       help="the controller's REST address (default: $VIOLIN_URL or %s)" % DEFAULT_URL)
    group.add_argument("--token", default=default(environ.get("VIOLIN_API_TOKEN")),
                       help="API token for changes, sent as 'Authorization: Bearer' (default: $VIOLIN_API_TOKEN)")
    group.add_argument("--ca-file", default=default(environ.get("VIOLIN_CA_FILE")), metavar="PEM",
                       help="CA certificates that verify an https:// controller (default: $VIOLIN_CA_FILE, "
                            "else the system's CAs; verification cannot be turned off)")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="print the controller's JSON answer(s) instead of tables")
    if not http_timeout:
        return
    group.add_argument("--timeout", dest="http_timeout", type=_positive(float),
                       default=default(DEFAULT_HTTP_TIMEOUT), metavar="SECONDS",
                       help="HTTP timeout per request (default %g s)" % DEFAULT_HTTP_TIMEOUT)


def build_args(argv, environ=None):
    """Parse ``argv``; defaults for --url and --token come from ``environ`` (os.environ)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="violin", description="Drive a violin_snapshot controller from the shell.",
        epilog="Run 'violin COMMAND --help' for a command's options. Environment proxies are not used.")
    _global_options(parser, environ, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, help_text, http_timeout=True):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, environ, suppress=True, http_timeout=http_timeout)
        return sub

    command("status", "the controller's health, fabric and current snapshot")
    command("members", "the registered members and where they are attached")

    member = command("member", "add, show or remove a member")
    member_commands = member.add_subparsers(dest="member_command", metavar="ACTION", required=True)
    add = member_commands.add_parser(
        "add", help="add a member: to its host's helper (by name), or to the controller (by MAC)",
        description="Add a member. Named as its host knows it (--pidfile, --mininet-host and --command, "
                    "--domain, --container, --spec) it goes to the helper at --helper, which finds its MAC "
                    "and registers it with the controller; given by --mac it is registered with the "
                    "controller directly (a member no helper snapshots, or one you describe yourself).")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--mac", dest="macs", type=_mac, action="append",
                     help="a MAC address of the member (repeat for several): register it with the controller")
    add.add_argument("--helper", dest="helper_url", type=_url, help="URL of the host helper that snapshots it")
    add.add_argument("--backend", help="snapshot backend (criu, libvirt, ...; by name: inferred from the options)")
    add.add_argument("--handle", help="what the backend knows the member by (with --mac)")
    add.add_argument("--no-marker", dest="marker", action="store_false",
                     help="do not wait for a marker frame from the member's link at its cut (with --mac)")
    named = add.add_argument_group("a member by name (sent to the helper at --helper)")
    for option, key in SPEC_OPTIONS:
        named.add_argument(option, dest="spec_" + key, metavar=key.upper(), help=SPEC_HELP[key])
    named.add_argument("--spec", dest="spec", type=_spec_pair, action="append", default=[], metavar="KEY=VALUE",
                       help="any other key of the backend's member spec (VALUE is JSON, or else a string)")
    _helper_token_option(add, environ)
    remove = member_commands.add_parser(
        "rm", aliases=["remove"], help="remove a member",
        description="Remove a member: a member its helper registered is removed at that helper (which "
                    "unregisters it); others at the controller.")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--helper", dest="helper_url", type=_url, help="remove it at this helper")
    _helper_token_option(remove, environ)
    show_member = member_commands.add_parser("show", help="one member", description="one member")
    show_member.add_argument("name", metavar="NAME")
    for sub in (add, remove, show_member):
        _global_options(sub, environ, suppress=True)

    snapshot = command("snapshot", "take a snapshot and follow it until it is complete or aborted",
                       http_timeout=False)
    snapshot.add_argument("--members", type=_names, metavar="A,B", help="only these members (default: all)")
    snapshot.add_argument("--label", help="a label kept with the snapshot")
    snapshot.add_argument("--timeout", dest="snapshot_timeout", type=_positive(float), metavar="SECONDS",
                          help="the controller aborts the snapshot unless complete by then "
                               "(default: its snapshot.timeout); an HTTP timeout goes before the command: "
                               "violin --timeout N snapshot")
    snapshot.add_argument("--no-wait", dest="wait", action="store_false", help="start it and return")

    command("list", "every snapshot in the catalogue")

    show = command("show", "one snapshot in detail")
    show.add_argument("id", metavar="ID")

    restore = command("restore", "restore the whole slice from a complete snapshot and follow it")
    restore.add_argument("id", metavar="ID")
    restore.add_argument("--place", dest="placement", type=_placement, action="append", default=[],
                         metavar="MEMBER=HELPER_URL", help="restore MEMBER with this helper (repeatable)")
    restore.add_argument("--no-wait", dest="wait", action="store_false", help="start it and return")

    restores = command("restores", "the restores run by this controller, or one of them")
    restores.add_argument("id", metavar="RESTORE_ID", nargs="?")

    delete = command("delete", "delete a finished snapshot and its images")
    delete.add_argument("id", metavar="ID")

    abort = command("abort", "abort the running snapshot")
    abort.add_argument("id", metavar="ID")
    abort.add_argument("--reason", help="said in the manifest (default: aborted by request)")

    schedule = command("schedule", "periodic snapshots: show (default), set, off")
    schedule_commands = schedule.add_subparsers(dest="schedule_command", metavar="ACTION")
    schedule_show = schedule_commands.add_parser("show", help="the schedule", description="the schedule")
    schedule_set = schedule_commands.add_parser(
        "set", help="take a snapshot every SECONDS", description="take a snapshot (label 'scheduled') every "
        "SECONDS, keeping the newest K scheduled ones (older ones are deleted, images included)")
    schedule_set.add_argument("--every", dest="interval_s", type=_positive(float), required=True,
                              metavar="SECONDS", help="seconds between snapshots (at least 1)")
    schedule_set.add_argument("--keep", type=_positive(int), metavar="K",
                              help="scheduled snapshots to keep (the controller's default: 5)")
    schedule_set.add_argument("--members", type=_names, metavar="A,B", help="only these members (default: all)")
    schedule_off = schedule_commands.add_parser("off", help="stop periodic snapshots",
                                                description="stop periodic snapshots")
    for sub in (schedule_show, schedule_set, schedule_off):
        _global_options(sub, environ, suppress=True)

    args = parser.parse_args(argv)
    if args.command == "schedule" and args.schedule_command is None:
        args.schedule_command = "show"
    if args.command == "member" and args.member_command == "remove":
        args.member_command = "rm"
    if args.command == "member" and args.member_command == "add":
        try:
            args.member_spec = member_spec(args)
        except ValueError as error:
            add.error(str(error))
        if args.member_spec and (args.macs or args.handle or not args.marker):
            add.error("a member by name gets its MAC and marker from its helper: drop --mac, --handle, --no-marker")
        if args.member_spec and not args.helper_url:
            add.error("a member by name goes to its host's helper: give --helper URL")
        if not args.member_spec and not args.macs:
            add.error("give the member's --mac (a member the controller is told of), or name it for its helper "
                      "(--pidfile, --mininet-host and --command, --domain, --container, --spec)")
    return args


# --- HTTP ------------------------------------------------------------------------


class Client(ApiClient):
    """The API client (violin_client.api) with every failure turned into a CliError in the CLI's words."""

    who, token_hint = "the controller", "--token or VIOLIN_API_TOKEN"

    def call(self, method: str, path: str, body: Optional[dict] = None, **options):
        try:
            return super().call(method, path, body, **options)
        except Unreachable as error:
            why = ("no answer within %g s" % self.timeout) if error.timed_out else error.why
            raise CliError("cannot reach %s at %s: %s%s"
                           % (self.who, self.url, why, " (see --timeout)" if error.timed_out else "")) from None
        except ApiError as error:
            if 200 <= error.status < 300:  # an answer that is not JSON
                raise CliError("%s at %s" % (self.who, error.reason)) from None
            if error.status in (401, 403):
                hint = "" if self.token else "; give one with " + self.token_hint
                raise CliError("%s refused the token (%s)%s" % (self.who, error.reason, hint)) from None
            raise CliError(error.reason) from None


class HelperClient(Client):
    """A host helper's API (``/members``), with its own token."""

    who, token_hint = "the helper", "--helper-token or VIOLIN_HELPER_TOKEN"


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


# --- formatting ------------------------------------------------------------------


def _table(rows: List[List[str]], header: List[str]) -> str:
    cells = [header] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _local(stamp, with_ms: bool = False) -> str:
    if not isinstance(stamp, (int, float)):
        return "-"
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    return text + (".%03d" % int((stamp % 1) * 1000)) if with_ms else text


def _clock(stamp) -> str:
    if not isinstance(stamp, (int, float)):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(stamp)) + ".%03d" % int((stamp % 1) * 1000)


def _size(count) -> str:
    if not isinstance(count, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return ("%d %s" % (count, unit)) if unit == "B" else ("%.1f %s" % (count, unit))
        count /= 1024.0
    return "-"  # pragma: no cover


def _ms(value) -> str:
    return "-" if not isinstance(value, (int, float)) else "%.1f" % value


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 60:
        return "%.1f s" % seconds
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return ("%dh%02dm%02ds" % (hours, minutes, secs)) if hours else ("%dm%02ds" % (minutes, secs))


def _member_names(manifest: dict) -> List[str]:
    return [m.get("name", "?") for m in manifest.get("members") or []]


def _short_names(names: List[str], limit: int = 4) -> str:
    if len(names) <= limit:
        return ",".join(names)
    return ",".join(names[:limit]) + ",+%d" % (len(names) - limit)


def _image_bytes(entry: dict):
    if isinstance(entry.get("bytes"), (int, float)):
        return entry["bytes"]
    files = (entry.get("image") or {}).get("files") if isinstance(entry.get("image"), dict) else None
    if files:
        return sum(f.get("bytes") or 0 for f in files)
    return None


STORAGE = ("logical_bytes", "stored_bytes", "sent_bytes")


def _storage(entry: dict):
    """A member's {logical, stored, sent} bytes, as its helper reported them (None: an older helper)."""
    image = entry.get("image") if isinstance(entry.get("image"), dict) else {}
    storage = image.get("storage")
    if isinstance(storage, dict) and all(isinstance(storage.get(k), (int, float)) for k in STORAGE):
        return storage
    return None


def _storage_total(manifest: dict):
    """The sum over the members that report it; None when none does."""
    reports = [r for r in (_storage(e) for e in manifest.get("members") or [] if isinstance(e, dict)) if r]
    if not reports:
        return None
    return {k: sum(r[k] for r in reports) for k in STORAGE}


def _storage_cells(storage) -> List[str]:
    return [_size(storage[k]) if storage else "-" for k in STORAGE]


def _emit_json(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _output(args, answer, render) -> int:
    """The answer as JSON with --json, else ``render(answer)``; exit code 0."""
    if args.json:
        _emit_json(answer)
    else:
        print(render(answer if answer is not None else {}))
    return 0


def format_health(health: dict, url: str) -> str:
    snapshot = health.get("snapshot")
    current = "none" if not snapshot else "%s %s (%s)" % (snapshot.get("id"), snapshot.get("state"),
                                                          snapshot.get("phase"))
    lines = [
        ("controller", "%s at %s: %s %s, up %s" % (health.get("status", "?"), url, health.get("app", "?"),
                                                   health.get("version", "?"), _duration(health.get("uptime_s")))),
        ("fabric", "%s switches, %s links, %s hosts (%s)" % (
            health.get("switches", "?"), health.get("links", "?"), health.get("hosts", "?"),
            "settled" if health.get("settled") else "still learning")),
        ("members", str(health.get("members", "?"))),
        ("switch errors", str(health.get("switch_errors", 0))),
        ("snapshot", current),
    ]
    return "\n".join("%-14s %s" % pair for pair in lines)


def format_members(members: List[dict]) -> str:
    if not members:
        return "no members (add one with: violin member add NAME --mac MAC)"
    rows = []
    for m in members:
        attached = []
        for mac, where in zip(m.get("macs") or [], m.get("attachment") or []):
            attached.append("%s@%s:%s" % (mac, where["dpid"].lstrip("0") or "0", where["port"]) if where
                            else "%s not seen" % mac)
        rows.append([m.get("name"), ",".join(m.get("macs") or []), m.get("helper_url"), m.get("backend"),
                     m.get("host"), "yes" if m.get("marker", True) else "no", m.get("epoch"), "; ".join(attached)])
    return _table(rows, ["NAME", "MACS", "HELPER", "BACKEND", "HOST", "MARKER", "EPOCH", "ATTACHED (dpid:port)"])


def format_list(snapshots: List[dict]) -> str:
    if not snapshots:
        return "no snapshots"
    storage = any(_storage_total(s) for s in snapshots)  # columns only when some helper reports them
    rows = [[s.get("id"), s.get("state"), s.get("epoch"), s.get("label"), _short_names(_member_names(s)),
             _local(s.get("created")), (s.get("channel") or {}).get("frames")]
            + (_storage_cells(_storage_total(s)) if storage else []) for s in snapshots]
    return _table(rows, ["ID", "STATE", "EPOCH", "LABEL", "MEMBERS", "CREATED", "CHANNEL FRAMES"]
                  + (["LOGICAL", "STORED", "SENT"] if storage else []))


def format_snapshot(m: dict) -> str:
    state = m.get("state", "?")
    if state == "running":
        state += " (%s)" % m.get("phase")
    elif state == "complete":
        state += " (restorable)" if m.get("restorable") else " (not restorable)"
    took = ""
    if isinstance(m.get("completed"), (int, float)) and isinstance(m.get("created"), (int, float)):
        took = " (took %s)" % _duration(m["completed"] - m["created"])
    lines = ["snapshot   %s" % m.get("id"),
             "state      %s" % state]
    if m.get("reason"):
        lines.append("reason     %s" % m["reason"])
    lines += ["label      %s" % (m.get("label") or "-"),
              "epoch      %s" % m.get("epoch", "-"),
              "created    %s" % _local(m.get("created")),
              "completed  %s%s" % (_local(m.get("completed")), took)]
    members = m.get("members") or []
    rows = [[e.get("name"), e.get("state"), _clock(e.get("cut_time")), _ms(e.get("flip_ms")),
             _ms(e.get("pause_ms")), e.get("server"), _size(_image_bytes(e))] for e in members]
    lines.append("members    %d" % len(members))
    total = _storage_total(m)
    if total:  # a helper that reports what its uploads cost: stored and sent columns too
        lines.append("storage    logical %s, newly stored %s, sent %s" % tuple(_size(total[k]) for k in STORAGE))
        rows = [row + _storage_cells(_storage(e))[1:] for row, e in zip(rows, members)]
    if rows:
        table = _table(rows, ["NAME", "STATE", "CUT TIME", "FLIP MS", "PAUSE MS", "IMAGE SERVER", "IMAGE"]
                       + (["STORED", "SENT"] if total else []))
        lines += ["  " + line for line in table.splitlines()]
    counts = m.get("counts") or {}
    if counts:
        lines.append("frames     held %s, released %s, recorded %s (%s), dropped %s, late released %s" % (
            counts.get("held", 0), counts.get("released", 0), counts.get("recorded", 0),
            _size(counts.get("recorded_bytes", 0)), counts.get("dropped", 0), counts.get("late_released", 0)))
    channel = m.get("channel")
    if channel:
        lines.append("channel    %s frames, %s, sha256 %s" % (channel.get("frames", "?"), _size(channel.get("bytes")),
                                                              str(channel.get("sha256", "?"))[:16]))
    drain = m.get("drain") or {}
    if drain:
        lines.append("drain      by %s after %s polls, %s ms (switch record-rule packets %s, controller "
                     "recorded %s)" % (drain.get("method", "?"), drain.get("polls", "?"), _ms(drain.get("waited_ms")),
                                       drain.get("switch_record_rule_packets", "-"),
                                       drain.get("controller_recorded", "-")))
    return "\n".join(lines)


def format_restore(r: dict) -> str:
    lines = ["restore    %s of snapshot %s" % (r.get("id"), r.get("snapshot")),
             "state      %s%s" % (r.get("state"), " (%s)" % r.get("phase") if r.get("state") == "running" else "")]
    if r.get("reason"):
        lines.append("reason     %s" % r["reason"])
    members = r.get("members") or {}
    rows = [[name, info.get("state"), info.get("helper")] for name, info in sorted(members.items())]
    if rows:
        lines.append("members    %d" % len(rows))
        lines += ["  " + line for line in _table(rows, ["NAME", "STATE", "HELPER"]).splitlines()]
    timings = r.get("timings_ms") or {}
    if timings:
        lines.append("timings    " + ", ".join("%s %s ms" % (k, _ms(v)) for k, v in timings.items()))
    if r.get("reinjected_frames") is not None:
        lines.append("reinjected %s frames of channel state" % r["reinjected_frames"])
    return "\n".join(lines)


def format_restores(restores: List[dict]) -> str:
    if not restores:
        return "no restores"
    rows = [[r.get("id"), r.get("snapshot"), r.get("state"), r.get("phase"), _local(r.get("started")),
             r.get("reason")] for r in restores]
    return _table(rows, ["ID", "SNAPSHOT", "STATE", "PHASE", "STARTED", "REASON"])


def format_schedule(s: dict) -> str:
    if not s.get("enabled"):
        return "periodic snapshots are off"
    members = s.get("members")
    text = "a snapshot every %s, keeping the newest %s scheduled ones, members: %s" % (
        _duration(s.get("interval_s")), s.get("keep", "?"), ",".join(members) if members else "all")
    if s.get("next_in_s") is not None:
        text += "\nnext in %s" % _duration(s["next_in_s"])
    if s.get("taken") is not None:
        text += "; taken so far %s" % s["taken"]
    for skipped in s.get("skipped") or []:
        text += "\nskipped: %s" % skipped
    return text


def snapshot_progress(m: dict) -> str:
    members = m.get("members") or []
    cut = sum(1 for e in members if e.get("state") in ("cut", "done"))
    done = sum(1 for e in members if e.get("state") == "done")
    counts = m.get("counts") or {}
    return "%s %s: cut %d/%d, done %d/%d, held %s, recorded %s" % (
        m.get("id"), m.get("phase") or m.get("state"), cut, len(members), done, len(members),
        counts.get("held", 0), counts.get("recorded", 0))


def restore_progress(r: dict) -> str:
    members = r.get("members") or {}
    states = ", ".join("%s %s" % (name, (info or {}).get("state")) for name, info in sorted(members.items()))
    stage = r.get("phase") if r.get("state") == "running" else "%s (in %s)" % (r.get("state"), r.get("phase"))
    return "%s %s: %s" % (r.get("id"), stage, states or "no members")


# --- following ---------------------------------------------------------------------


class Progress:
    """One rewritten line on a terminal; a plain line per change otherwise (or nothing if quiet)."""

    def __init__(self, stream, tty: Optional[bool] = None, quiet: bool = False):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.quiet = quiet and not self.tty
        self.last = None
        self.shown = False

    def update(self, text: str, elapsed: float) -> None:
        line = "%s  [%s]" % (text, _duration(elapsed))
        if self.tty:
            width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
            self.stream.write("\r" + line[:width] + "\x1b[K")
            self.stream.flush()
            self.shown = True
        elif not self.quiet and text != self.last:
            self.stream.write(line + "\n")
            self.stream.flush()
        self.last = text

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def follow(client: Client, args, kind: str, op_id: str, path: str, first: dict, done_states, describe,
           render, note: str, began: float) -> int:
    """Follow the ``kind`` (snapshot or restore) ``op_id`` at ``path`` until its state is one of ``done_states``,
    showing ``describe(view)`` on stderr; print the final view (``render`` or --json); CliError unless it is
    complete. Ctrl-C raises Interrupted(note)."""
    progress = Progress(sys.stderr, quiet=args.json)
    try:
        final = wait_until_done(client, path, timeout=None, done_states=done_states, first=first,
                                poll=POLL_INTERVAL,
                                on_update=lambda view, elapsed: progress.update(describe(view), elapsed))
    except KeyboardInterrupt:
        raise Interrupted(note) from None
    finally:
        progress.close()
    if args.json:
        _emit_json(final)
    else:
        print(render(final))
    if final.get("state") != "complete":
        raise CliError("%s %s %s: %s" % (kind, op_id, final.get("state"), final.get("reason") or "no reason given"))
    if not args.json:
        print("%s %s complete in %s" % (kind, op_id, _duration(time.monotonic() - began)))
    return 0


# --- commands ----------------------------------------------------------------------


def cmd_status(client: Client, args) -> int:
    return _output(args, client.get("/violin/health"), lambda health: format_health(health, client.url))


def cmd_members(client: Client, args) -> int:
    return _output(args, client.get("/violin/members"), lambda answer: format_members(answer.get("members") or []))


def _helper(client: Client, args, url: str) -> HelperClient:
    return HelperClient(url, args.helper_token, client.timeout, getattr(args, "ca_file", None))


def format_helper_member(m: dict) -> str:
    where = m.get("located") or {}
    registration = m.get("registration") or {}
    state = ("registered with the controller" if registration.get("registered")
             else "not registered: %s" % registration.get("reason", "pending") if registration else "")
    found = ("%s on %s (pid %s)" % (where.get("mac"), where.get("iface"), where.get("pid")) if where
             else "not located: %s" % m.get("problem", "?"))
    return "added member %s (%s) at its helper: %s%s" % (m.get("name"), m.get("backend"), found,
                                                         "; " + state if state else "")


def member_spec(args) -> dict:
    """The helper's member spec from ``violin member add``'s options (empty: a member by MAC)."""
    spec = {key: getattr(args, "spec_" + key) for _, key in SPEC_OPTIONS if getattr(args, "spec_" + key) is not None}
    for key, value in args.spec:
        if key in spec and spec[key] != value:
            raise ValueError("--spec %s contradicts --%s" % (key, key.replace("_", "-")))
        spec[key] = value
    return spec


def cmd_member(client: Client, args) -> int:
    if args.member_command == "add":
        spec = args.member_spec
        if spec:  # by name: the helper finds it and registers it
            backend = args.backend or next((BACKEND_OF[k] for k in BACKEND_OF if k in spec), None)
            body = dict(spec, name=args.name, **({"backend": backend} if backend else {}))
            answer = _helper(client, args, args.helper_url).call("POST", "/members", body)
            return _output(args, answer, format_helper_member)
        body = {"name": args.name, "macs": args.macs}
        for key in ("helper_url", "backend", "handle"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        if not args.marker:
            body["marker"] = False
        return _output(args, client.call("POST", "/violin/members", body), lambda _: "added member %s" % args.name)
    if args.member_command == "show":
        return _output(args, client.get("/violin/members/" + _quote(args.name)), lambda m: format_members([m]))
    helper_url = args.helper_url
    if helper_url is None:  # a member its helper registered (it says its host) is removed there
        member = client.get("/violin/members/" + _quote(args.name)) or {}
        helper_url = member.get("helper_url") if member.get("host") else None
    if helper_url:
        answer = _helper(client, args, helper_url).call("DELETE", "/members/" + _quote(args.name))
        return _output(args, answer, lambda a: "removed member %s at its helper %s%s" % (
            args.name, helper_url, "" if (a or {}).get("unregistered") is not False
            else " (the controller will be told when it answers)"))
    return _output(args, client.call("DELETE", "/violin/members/" + _quote(args.name)),
                   lambda _: "removed member %s" % args.name)


def cmd_snapshot(client: Client, args) -> int:
    body = {}
    if args.members:
        body["members"] = args.members
    if args.label is not None:
        body["label"] = args.label
    if args.snapshot_timeout is not None:
        body["timeout_s"] = args.snapshot_timeout
    began = time.monotonic()
    manifest = client.call("POST", "/violin/snapshots", body) or {}
    snapshot_id = manifest.get("id")
    if not snapshot_id:
        raise CliError("the controller started no snapshot (its answer names none)")
    if not args.wait:
        if args.json:
            _emit_json(manifest)
        else:
            print("started snapshot %s (epoch %s, members %s); follow it with: violin show %s"
                  % (snapshot_id, manifest.get("epoch"), ",".join(_member_names(manifest)) or "-", snapshot_id))
        return 0
    note = ("snapshot %s goes on on the controller (see: violin show %s; stop it: violin abort %s)"
            % (snapshot_id, snapshot_id, snapshot_id))
    return follow(client, args, "snapshot", snapshot_id, "/violin/snapshots/" + _quote(snapshot_id), manifest,
                  SNAPSHOT_DONE, snapshot_progress, format_snapshot, note, began)


def cmd_list(client: Client, args) -> int:
    return _output(args, client.get("/violin/snapshots"), lambda answer: format_list(answer.get("snapshots") or []))


def cmd_show(client: Client, args) -> int:
    return _output(args, client.get("/violin/snapshots/" + _quote(args.id)), format_snapshot)


def cmd_restore(client: Client, args) -> int:
    placement: Dict[str, str] = {}
    for name, url in args.placement:
        if name in placement and placement[name] != url:
            raise CliError("--place names %s twice" % name, code=2)
        placement[name] = url
    body = {"placement": placement} if placement else {}
    began = time.monotonic()
    job = client.call("POST", "/violin/snapshots/%s/restore" % _quote(args.id), body) or {}
    restore_id = job.get("id")
    if not restore_id:
        raise CliError("the controller started no restore (its answer names none)")
    if not args.wait:
        if args.json:
            _emit_json(job)
        else:
            print("started restore %s of snapshot %s" % (restore_id, args.id))
        return 0
    note = "restore %s goes on on the controller (see: violin restores %s)" % (restore_id, restore_id)
    return follow(client, args, "restore", restore_id, "/violin/restores/" + _quote(restore_id), job,
                  RESTORE_DONE, restore_progress, format_restore, note, began)


def cmd_restores(client: Client, args) -> int:
    if args.id:
        return _output(args, client.get("/violin/restores/" + _quote(args.id)), format_restore)
    return _output(args, client.get("/violin/restores"), lambda answer: format_restores(answer.get("restores") or []))


def cmd_delete(client: Client, args) -> int:
    return _output(args, client.call("DELETE", "/violin/snapshots/" + _quote(args.id)),
                   lambda _: "deleted snapshot %s" % args.id)


def cmd_abort(client: Client, args) -> int:
    body = {"reason": args.reason} if args.reason is not None else {}
    answer = client.call("POST", "/violin/snapshots/%s/abort" % _quote(args.id), body)
    if args.json:
        _emit_json(answer)
    else:
        answer = answer or {}
        print("snapshot %s %s%s" % (args.id, answer.get("state", "aborted"),
                                    ": " + answer["reason"] if answer.get("reason") else ""))
    return 0


def cmd_schedule(client: Client, args) -> int:
    if args.schedule_command == "set":
        body = {"interval_s": args.interval_s}
        if args.keep is not None:
            body["keep"] = args.keep
        if args.members:
            body["members"] = args.members
        answer = client.call("PUT", "/violin/schedule", body)
    elif args.schedule_command == "off":
        answer = client.call("DELETE", "/violin/schedule")
    else:
        answer = client.get("/violin/schedule")
    return _output(args, answer, format_schedule)


def _newline() -> str:
    """After the terminal's echoed ^C, start on a fresh line."""
    try:
        return "\n" if sys.stderr.isatty() else ""
    except (AttributeError, ValueError):
        return ""


COMMANDS = {"status": cmd_status, "members": cmd_members, "member": cmd_member, "snapshot": cmd_snapshot,
            "list": cmd_list, "show": cmd_show, "restore": cmd_restore, "restores": cmd_restores, "delete": cmd_delete,
            "abort": cmd_abort, "schedule": cmd_schedule}


def main(argv=None) -> int:
    try:
        args = build_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # argparse: --help (0) or bad usage (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        client = Client(args.url, args.token, args.http_timeout, args.ca_file)
    except tls.TlsError as error:
        print("violin: %s" % error, file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](client, args)
    except CliError as error:
        sys.stdout.flush()
        print("violin: %s" % error.message, file=sys.stderr)
        return error.code
    except Interrupted as interrupted:
        print("%sviolin: interrupted; %s" % (_newline(), interrupted.note), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("%sviolin: interrupted" % _newline(), file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. violin list | head
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
