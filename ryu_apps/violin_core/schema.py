"""One declarative validation mechanism for every input: controller config, helper config,
member specs and REST bodies (in the manner of Faucet's ``conf.py``).

A schema is a tree of nodes: ``Schema`` (a mapping with known keys), ``Field`` (a typed
value with a default and an optional check), ``ListOf``, ``MapOf`` (names to specs) and
``Variant`` (a mapping whose schema is chosen by one of its keys, e.g. a member's
``backend``). ``validate`` returns plain dicts and lists with defaults filled in, or
raises ``SchemaError`` whose ``path`` names the offending key (``members.h1.mac``).
Unknown keys and wrong types are always refused; ``bool`` never passes for a number.
"""

import json
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

REQUIRED = object()  # a Field default meaning "must be given"
Check = Callable[[Any], Optional[str]]  # returns what was expected when the value is wrong


class SchemaError(ValueError):
    """Input that does not fit its schema; ``path`` says where, ``message`` what is wrong."""

    def __init__(self, path: str, message: str):
        super().__init__("%s: %s" % (path or "(top level)", message))
        self.path, self.message = path, message


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return "%s[%d]" % (path, key)
    return "%s.%s" % (path, key) if path else str(key)


def _type_names(types: Tuple[type, ...]) -> str:
    names = {type(None): "null", str: "a string", int: "a whole number", float: "a number",
             bool: "true or false", dict: "a mapping", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


class Node:
    help: str = ""

    def validate(self, value: Any, path: str = "") -> Any:
        raise NotImplementedError

    def describe(self, path: str = "") -> List[Tuple[str, str, Any, str]]:
        """(path, type, default, help) rows, for generated documentation."""
        return []


class Field(Node):
    """A typed value. ``types`` is a type or a tuple; ``float`` also takes whole numbers."""

    def __init__(self, types, default: Any = REQUIRED, check: Optional[Check] = None, help: str = "",
                 convert: Optional[Callable[[Any], Any]] = None):
        self.types = types if isinstance(types, tuple) else (types,)
        self.default, self.check, self.help, self.convert = default, check, help, convert

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def _type_ok(self, value) -> bool:
        if isinstance(value, bool):
            return bool in self.types
        if value is None:
            return type(None) in self.types
        if isinstance(value, int) and float in self.types:
            return True
        return isinstance(value, tuple(t for t in self.types if t is not bool))

    def validate(self, value, path=""):
        if not self._type_ok(value):
            raise SchemaError(path, "expected %s, got %r" % (_type_names(self.types), value))
        if self.check is not None and value is not None:
            wrong = self.check(value)
            if wrong:
                kind = "out of range" if isinstance(value, (int, float)) else "not valid"
                raise SchemaError(path, "%r is %s: expected %s" % (value, kind, wrong))
        if isinstance(value, int) and not isinstance(value, bool) and float in self.types and int not in self.types:
            value = float(value)
        return self.convert(value) if self.convert is not None and value is not None else value

    def describe(self, path=""):
        default = "(required)" if self.required else self.default
        return [(path, _type_names(self.types), default, self.help)]


class Schema(Node):
    """A mapping with known keys; a missing optional key gets its default."""

    def __init__(self, fields: Dict[str, Node], help: str = "", allow_none: bool = True):
        self.fields, self.help, self.allow_none = fields, help, allow_none

    def validate(self, value, path=""):
        if value is None and self.allow_none:
            value = {}
        if not isinstance(value, dict):
            raise SchemaError(path, "expected a mapping, got %s" % _describe_value(value))
        unknown = sorted(str(k) for k in set(value) - set(self.fields))
        if unknown:
            raise SchemaError(path, "unknown key(s) %s; known: %s" % (", ".join(unknown), ", ".join(self.fields)))
        result = {}
        for key, node in self.fields.items():
            where = _join(path, key)
            if key in value:
                result[key] = node.validate(value[key], where)
            elif isinstance(node, Field):
                if node.required:
                    raise SchemaError(where, "required")
                result[key] = node.default
            elif isinstance(node, Schema):
                result[key] = node.validate(None, where)
            elif isinstance(node, (ListOf, MapOf)):
                result[key] = node.empty()
        return result

    def describe(self, path=""):
        rows = []
        for key, node in self.fields.items():
            rows += node.describe(_join(path, key))
        return rows


class ListOf(Node):
    def __init__(self, item: Node, help: str = "", min_items: int = 0, unique: Optional[Callable[[Any], Any]] = None):
        self.item, self.help, self.min_items, self.unique = item, help, min_items, unique

    def empty(self):
        return []

    def validate(self, value, path=""):
        if value is None:
            value = []
        if not isinstance(value, list):
            raise SchemaError(path, "expected a list, got %s" % _describe_value(value))
        if len(value) < self.min_items:
            raise SchemaError(path, "expected at least %d item(s)" % self.min_items)
        items, seen = [], {}
        for index, entry in enumerate(value):
            item = self.item.validate(entry, _join(path, index))
            if self.unique is not None:
                key = self.unique(item)
                if key in seen:
                    raise SchemaError(_join(path, index), "duplicate %r (also at [%d])" % (key, seen[key]))
                seen[key] = index
            items.append(item)
        return items

    def describe(self, path=""):
        return [(path, "a list", [], self.help)] + self.item.describe(path + "[]")


class MapOf(Node):
    """Names to specs (``members: {h1: {...}, h2: {...}}``); names must pass ``key_check``."""

    def __init__(self, item: Node, help: str = "", key_check: Optional[Check] = None):
        self.item, self.help, self.key_check = item, help, key_check

    def empty(self):
        return {}

    def validate(self, value, path=""):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise SchemaError(path, "expected a mapping of names to entries, got %s" % _describe_value(value))
        result = {}
        for key, entry in value.items():
            where = _join(path, key)
            if not isinstance(key, str):
                raise SchemaError(where, "names must be strings")
            if self.key_check is not None:
                wrong = self.key_check(key)
                if wrong:
                    raise SchemaError(where, "bad name %r: expected %s" % (key, wrong))
            result[key] = self.item.validate(entry, where)
        return result

    def describe(self, path=""):
        return [(path, "a mapping of names", {}, self.help)] + self.item.describe(path + ".<name>")


class Variant(Node):
    """A mapping whose schema is picked by ``key`` (``backend: criu`` -> the CRIU schema)."""

    def __init__(self, key: str, variants: Dict[str, Schema], default: Optional[str] = None, help: str = ""):
        self.key, self.variants, self.default, self.help = key, variants, default, help

    def validate(self, value, path=""):
        if not isinstance(value, dict):
            raise SchemaError(path, "expected a mapping, got %s" % _describe_value(value))
        choice = value.get(self.key, self.default)
        if not isinstance(choice, str) or choice not in self.variants:
            raise SchemaError(_join(path, self.key), "expected one of %s, got %r" % (
                ", ".join(sorted(self.variants)), choice))
        rest = {k: v for k, v in value.items() if k != self.key}
        result = self.variants[choice].validate(rest, path)
        result[self.key] = choice
        return result

    def describe(self, path=""):
        rows = [(_join(path, self.key), "one of " + ", ".join(sorted(self.variants)), self.default, self.help)]
        for name, schema in sorted(self.variants.items()):
            rows += [("%s (%s)" % (p, name), t, d, h) for p, t, d, h in schema.describe(path)]
        return rows


def _describe_value(value) -> str:
    return "null" if value is None else "%s %r" % (type(value).__name__, value)


# --- checks: each returns what was expected, or None ----------------------------------------

def positive(value) -> Optional[str]:
    return None if value > 0 else "a value above 0"


def between(low, high) -> Check:
    return lambda value: None if low <= value <= high else "a value from %s to %s" % (low, high)


def one_of(*choices) -> Check:
    return lambda value: None if value in choices else "one of %s" % ", ".join(map(str, choices))


def matches(pattern: str, what: str) -> Check:
    regex = re.compile(pattern)
    return lambda value: None if regex.match(value) else what


def each(check: Check) -> Check:
    """A check applied to every item of a list value."""
    def run(values: Iterable) -> Optional[str]:
        for value in values:
            wrong = check(value)
            if wrong:
                return wrong
        return None
    return run


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$"
name = matches(NAME_PATTERN, "1-40 letters, digits, '_', '.', '-', starting with a letter or digit")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def unicast_mac(value: str) -> Optional[str]:
    if not _MAC_RE.match(value) or int(value[:2], 16) & 1:
        return "a unicast MAC address such as 00:00:00:00:00:01"
    return None


def http_url(value: str) -> Optional[str]:
    return None if re.match(r"^https?://[^\s/]+", value) else "an http(s)://HOST:PORT URL"


def host_port(value: str) -> Optional[str]:
    host, _, port = value.rpartition(":")
    return None if host and port.isdigit() and 0 <= int(port) <= 65535 else "HOST:PORT"


def lower(value: str) -> str:
    return value.lower()


def reference(schema: Node, path: str = "") -> str:
    """A Markdown table of every key of ``schema``: the generated configuration reference."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, text in schema.describe(path):
        shown = default if default == "(required)" else "`%s`" % json.dumps(default)
        lines.append("| `%s` | %s | %s | %s |" % (key, kind, shown, text))
    return "\n".join(lines) + "\n"


def request_body(node: Node, body: Any) -> Any:
    """``node.validate(body)`` for a request body: a mismatch is a 400 refusal naming the key."""
    from .errors import Refused
    try:
        return node.validate(body)
    except SchemaError as error:
        raise Refused(400, str(error)) from None
