"""The compatibility policy: what must hold, beyond the type name, for state to move.

The same mdev type is always required.  Vendors add rules of their own — NVIDIA's
vGPU migration needs the destination's vGPU manager (the ``nvidia`` kernel module) to
be the same version as the source's or newer — so two optional rules:

=======================  ===============================  =============================================
config key               values (default first)           rule
=======================  ===============================  =============================================
``match_driver_version`` ``off``, ``same``,               the vendor driver (module) version of the
                         ``same-or-newer``                destination mdev's parent, compared with the
                                                          version ``annotate`` recorded on the source
``match_parent_model``   ``no``, ``yes``                  the parent device's PCI ``vendor:device`` id
                                                          must equal the recorded one
=======================  ===============================  =============================================

A rule that is on and cannot be decided (the annotation predates it, sysfs does not
show a version) refuses: doubt is never a match.  The keys live in the configuration
file; :meth:`MatchPolicy.from_config` reads them from any object carrying them (and
the defaults when it does not), so the policy works before and after ``Config``
learns them.  No lxml, no libvirt: the hook imports this.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

DRIVER_VERSION_KEY = "match_driver_version"
PARENT_MODEL_KEY = "match_parent_model"
_PART_RE = re.compile(r"[.\-_+~]")
_BOOL = {"1": True, "yes": True, "true": True, "on": True, "0": False, "no": False, "false": False, "off": False}


class DriverVersionRule(str, enum.Enum):
    OFF = "off"
    SAME = "same"
    SAME_OR_NEWER = "same-or-newer"


@dataclass(frozen=True)
class MatchPolicy:
    """Which optional rules are on (the type rule always is)."""

    driver_version: DriverVersionRule = DriverVersionRule.OFF
    parent_model: bool = False

    @classmethod
    def parse(cls, driver_version: Any = "off", parent_model: Any = False, where: str = "policy") -> MatchPolicy:
        """From config-file or command-line values.  Raises :class:`ConfigError` (one line)."""
        try:
            rule = DriverVersionRule(str(getattr(driver_version, "value", driver_version)).strip().lower())
        except ValueError:
            raise ConfigError(f"{where}: {DRIVER_VERSION_KEY} must be one of "
                              f"{', '.join(r.value for r in DriverVersionRule)}, not {driver_version!r}") from None
        if isinstance(parent_model, bool):
            model = parent_model
        elif str(parent_model).strip().lower() in _BOOL:
            model = _BOOL[str(parent_model).strip().lower()]
        else:
            raise ConfigError(f"{where}: {PARENT_MODEL_KEY} must be yes or no, not {parent_model!r}")
        return cls(rule, model)

    @classmethod
    def from_config(cls, config: Any) -> MatchPolicy:
        """The policy named by *config*'s ``match_driver_version``/``match_parent_model``."""
        return cls.parse(getattr(config, DRIVER_VERSION_KEY, "off"), getattr(config, PARENT_MODEL_KEY, False),
                         where=str(getattr(config, "source", "configuration")))

    @property
    def active(self) -> bool:
        return self.driver_version is not DriverVersionRule.OFF or self.parent_model

    def to_json(self) -> dict[str, Any]:
        return {DRIVER_VERSION_KEY: self.driver_version.value, PARENT_MODEL_KEY: self.parent_model}

    def describe(self) -> str:
        parts = ["same type"]
        if self.driver_version is not DriverVersionRule.OFF:
            parts.append(f"vendor driver version {self.driver_version.value}")
        if self.parent_model:
            parts.append("same parent model")
        return ", ".join(parts)


def _key(version: str) -> tuple[tuple[int, Any], ...]:
    """``550.54.14`` → ((0, 550), (0, 54), (0, 14)); non-numeric parts sort after numbers."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in _PART_RE.split(version.strip()) if p)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as *a* is older than, equal to or newer than *b* (dotted numeric)."""
    ka, kb = _key(a), _key(b)
    return (ka > kb) - (ka < kb)


def driver_problem(rule: DriverVersionRule, source: str | None, dest: str | None) -> str | None:
    """Why the vendor driver rule refuses, or ``None`` when it holds (or is off)."""
    if rule is DriverVersionRule.OFF:
        return None
    if source is None:
        return (f"the annotation records no vendor driver version but {DRIVER_VERSION_KEY} is {rule.value}; "
                f"re-run libvirt-mdev annotate on the source")
    if dest is None:
        return (f"the destination's vendor driver version is unknown but {DRIVER_VERSION_KEY} is {rule.value}")
    cmp = compare_versions(dest, source)
    if rule is DriverVersionRule.SAME and cmp != 0:
        return f"vendor driver {dest} on the destination, {source} on the source ({DRIVER_VERSION_KEY} = same)"
    if rule is DriverVersionRule.SAME_OR_NEWER and cmp < 0:
        return (f"vendor driver {dest} on the destination is older than {source} on the source "
                f"({DRIVER_VERSION_KEY} = same-or-newer); upgrade the destination's driver")
    return None


def parent_problem(on: bool, source: str | None, dest: str | None) -> str | None:
    """Why the parent-model rule refuses, or ``None``."""
    if not on:
        return None
    if source is None or dest is None:
        side = "the annotation" if source is None else "the destination"
        return f"{side} does not tell the parent device model but {PARENT_MODEL_KEY} is yes"
    if source.lower() != dest.lower():
        return f"parent device model {dest} on the destination, {source} on the source ({PARENT_MODEL_KEY} = yes)"
    return None
