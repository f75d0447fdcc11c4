"""atheris harness: the load-token resolver against a store holding one real state
(see targets.TokenTarget)."""
from __future__ import annotations

from tests.fuzz.atheris_common import main


def _target():
    from tests.fuzz.targets import TokenTarget
    return TokenTarget().run


if __name__ == "__main__":
    main(_target)
