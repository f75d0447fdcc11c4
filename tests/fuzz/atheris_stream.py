"""atheris harness: run_stream (see targets.py for the invariants, atheris_common.py to run it)."""
from __future__ import annotations

from tests.fuzz.atheris_common import main


def _target():
    from tests.fuzz.targets import run_stream
    return run_stream


if __name__ == "__main__":
    main(_target)
