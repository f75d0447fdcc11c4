"""Shared launcher of the atheris harnesses (not collected by pytest: no ``test_`` prefix).

Each ``tests/fuzz/atheris_<target>.py`` calls :func:`main` with its one-input function.
Run from the repo root, e.g.::

    python3 -m tests.fuzz.make_corpus /tmp/corpus
    python3 -m tests.fuzz.atheris_stream /tmp/corpus/stream -runs=1000000 -timeout=10 -rss_limit_mb=2048

Every argument is passed to libFuzzer (``-runs``, ``-max_total_time``, ``-timeout``,
``-rss_limit_mb``, ``-artifact_prefix``...).  A crash file reproduces with the same
command and the file as the only argument.  Count executions with ``-print_final_stats=1``
(``stat::number_of_executed_units``); when a run is interrupted or crashes, the harness
also prints ``LM_FUZZ_EXECS=<n>`` (libFuzzer's normal exit skips Python's atexit).
"""
from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable

_COUNT = [0]


def main(make_target: Callable[[], Callable[[bytes], None]],
         instrument: tuple[str, ...] = ("libvirt_mdev",)) -> None:
    """Instrument the package, then build the target (its imports must come after)."""
    import atheris

    def one(data: bytes) -> None:
        _COUNT[0] += 1
        target(data)

    atexit.register(lambda: print(f"LM_FUZZ_EXECS={_COUNT[0]} pid={os.getpid()}", file=sys.stderr, flush=True))
    with atheris.instrument_imports(include=list(instrument)):
        import libvirt_mdev.filter
        import libvirt_mdev.mdev.domain
        import libvirt_mdev.store
        import libvirt_mdev.stream  # noqa: F401 - imported under instrumentation
    target = make_target()
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
