"""The one validation mechanism (violin_core.schema), the VID allocator, and the generated config reference."""

import os

import pytest

from violin_core import config, schema
from violin_core.policy import Vids

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEMBER = schema.Variant("backend", {
    "criu": schema.Schema({"pid": schema.Field(int, check=schema.positive),
                           "mac": schema.Field(str, check=schema.unicast_mac, convert=schema.lower)}),
    "libvirt": schema.Schema({"domain": schema.Field(str)}),
}, default="criu")
HELPER = schema.Schema({
    "listen": schema.Field(str, "127.0.0.1:7001", schema.host_port),
    "servers": schema.ListOf(schema.Field(str, check=schema.http_url), min_items=1),
    "members": schema.MapOf(MEMBER, key_check=schema.name),
})


def test_defaults_are_filled_and_values_converted():
    got = HELPER.validate({"servers": ["http://s:1"], "members": {"h1": {"pid": 3, "mac": "00:00:00:00:00:0A"}}})
    assert got == {"listen": "127.0.0.1:7001", "servers": ["http://s:1"],
                   "members": {"h1": {"pid": 3, "mac": "00:00:00:00:00:0a", "backend": "criu"}}}


@pytest.mark.parametrize("raw,message", [
    ([1], "(top level): expected a mapping, got list [1]"),
    ({"servers": []}, "servers: expected at least 1 item(s)"),
    ({"servers": ["s:1"]}, "servers[0]: 's:1' is not valid: expected an http(s)://HOST:PORT URL"),
    ({"servers": ["http://s"], "members": ["h1"]}, "members: expected a mapping of names to entries"),
    ({"servers": ["http://s"], "members": {"h1": {"pid": True, "mac": "00:00:00:00:00:01"}}},
     "members.h1.pid: expected a whole number, got True"),
    ({"servers": ["http://s"], "members": {"h1": {"pid": 1, "mac": "m"}}}, "members.h1.mac: 'm' is not valid"),
    ({"servers": ["http://s"], "members": {"h1": {"pid": 1, "mac": "01:00:00:00:00:01"}}}, "unicast"),
    ({"servers": ["http://s"], "members": {"h1": {"backend": "xen"}}},
     "members.h1.backend: expected one of criu, libvirt, got 'xen'"),
    ({"servers": ["http://s"], "members": {"h1": {"backend": "libvirt", "domain": "d", "pid": 1}}},
     "members.h1: unknown key(s) pid; known: domain"),
    ({"servers": ["http://s"], "members": {"bad name": {"backend": "libvirt", "domain": "d"}}}, "bad name"),
    ({"servers": ["http://s"], "members": {"h1": {"mac": "00:00:00:00:00:01"}}}, "members.h1.pid: required"),
    ({"servers": ["http://s"], "listen": "7001"}, "listen: '7001' is not valid: expected HOST:PORT"),
    ({"servers": ["http://s"], "colour": 1}, "unknown key(s) colour"),
])
def test_bad_input_names_the_key(raw, message):
    with pytest.raises(schema.SchemaError) as error:
        HELPER.validate(raw)
    assert message in str(error.value)


def test_floats_take_whole_numbers_but_never_booleans():
    field = schema.Field(float, 1.0, schema.positive)
    assert field.validate(2) == 2.0 and isinstance(field.validate(2), float)
    with pytest.raises(schema.SchemaError):
        field.validate(False)


def test_vids_come_from_one_allocator():
    vids = Vids(0xF00)
    assert vids.all() == [0xF00, 0xF01, 0xF02] and vids.colour(4) == vids.colour(6) != vids.colour(5)
    assert Vids(Vids.MAX_BASE).all()[-1] <= 4094
    with pytest.raises(ValueError):
        Vids(Vids.MAX_BASE + 1)
    with pytest.raises(config.ConfigError) as error:
        config.validate({"fabric": {"tag_vid": Vids.MAX_BASE + 1}})
    assert "fabric.tag_vid" in str(error.value)


def test_configuration_reference_is_generated_from_the_schema():
    with open(os.path.join(ROOT, "docs", "configuration.md")) as handle:
        assert handle.read() == config.reference(), \
            "docs/configuration.md is stale: python -m violin_core.config --reference > docs/configuration.md"
