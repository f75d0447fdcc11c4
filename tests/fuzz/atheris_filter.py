"""atheris harness: the filter (strip, splice of the result, splice pass-through) on one
input against a scratch store (see targets.FilterTarget)."""
from __future__ import annotations

from tests.fuzz.atheris_common import main


def _target():
    from tests.fuzz.targets import FilterTarget
    return FilterTarget().run


if __name__ == "__main__":
    main(_target)
