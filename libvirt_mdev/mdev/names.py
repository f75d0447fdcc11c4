"""Validation of the names that become sysfs path components or log text.

Why a module of its own: the hook, sysfs and domain XML code all check the same
things, and the hook's no-op path must not pay for lxml to get a regex.
"""
from __future__ import annotations

import re

#: canonical textual UUID (lower case); mdev uuids become sysfs path components
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: mdev type ids (``nvidia-222``, ``i915-GVTg_V5_8``) and parent names (``0000:af:00.0``, ``0.0.0123``)
NAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,128}$")


def is_uuid(text: str) -> bool:
    return bool(UUID_RE.match(text))


def is_name(text: str) -> bool:
    return bool(NAME_RE.match(text)) and text not in (".", "..")
