"""atheris harness: run_save_image_header (see targets.py for the invariants, atheris_common.py to run it)."""
from __future__ import annotations

from tests.fuzz.atheris_common import main


def _target():
    from tests.fuzz.targets import run_save_image_header
    return run_save_image_header


if __name__ == "__main__":
    main(_target)
