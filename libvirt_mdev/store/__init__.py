"""The trusted device-state store (docs/architecture.md; its guarantees: SECURITY.md §4).

Public API (everything else is internal)::

    from libvirt_mdev.store import Store, StateMeta, Manifest, issue_token, resolve_token, spend_token

    store = Store.open(root, create=True)
    with store.begin_state(StateMeta(idstr=..., instance_id=..., version_id=...,
                                     vfio_framing="v1", migration_id=..., mdev_uuid=...)) as w:
        for chunk in chunks:
            w.write(chunk)            # bytes or memoryview; hashed on the fly
        manifest = w.commit()         # fsync + rename + manifest; exception in the block = abort
    token = issue_token(manifest)     # "mdev-state-v1:<manifest id>"

All path and permission code lives in :mod:`.acl`; the file names in :mod:`.layout`.
"""
from __future__ import annotations

from .gc import GcReport
from .manifest import FORMAT_VERSION, Manifest, StateMeta, parse_manifest
from .store import Entry, StateWriter, Store
from .tokens import TOKEN_PREFIX, issue_token, parse_token, resolve_token, spend_token

__all__ = ["FORMAT_VERSION", "TOKEN_PREFIX", "Entry", "GcReport", "Manifest", "StateMeta", "StateWriter", "Store",
           "issue_token", "parse_manifest", "parse_token", "resolve_token", "spend_token"]
