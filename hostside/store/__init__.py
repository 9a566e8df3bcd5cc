"""Where snapshot images live: the snapshot server (``server``), its client (``client``) and the
``Store`` interface (``base``) behind the server, with its implementations chosen by name.

``--store file:/srv/images`` picks ``FileStore`` (``files``: one plain file per image file);
``--store chunks:/srv/images`` picks ``ChunkStore`` (``chunks``: content-defined chunks, each stored
once, compressed, images as manifests; it also reads a FileStore's layout in the same directory).
"""

from typing import Dict, Type

from .base import Store
from .chunks import ChunkStore
from .files import FileStore

STORES: Dict[str, Type[Store]] = {FileStore.scheme: FileStore, ChunkStore.scheme: ChunkStore}


def store_class(spec: str):
    """``(class, argument)`` for ``<scheme>:<argument>``; ValueError naming the known schemes."""
    scheme, colon, argument = spec.partition(":")
    if not colon or scheme not in STORES or not argument:
        raise ValueError("a store is <scheme>:<argument> with scheme one of %s, got %r"
                         % (", ".join(sorted(STORES)), spec))
    return STORES[scheme], argument


def open_store(spec: str) -> Store:
    cls, argument = store_class(spec)
    return cls(argument)
