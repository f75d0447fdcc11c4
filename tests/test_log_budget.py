"""LogBudget (libvirt_mdev/log.py): floods of one kind of event log a bounded number of lines."""
from __future__ import annotations

import time

from libvirt_mdev.log import LogBudget


def test_a_budget_lets_n_lines_per_window_through_and_counts_the_rest() -> None:
    b = LogBudget(lines=3, window=0.3)
    got = [b.take() for _ in range(10)]
    assert [ok for ok, _ in got] == [True] * 3 + [False] * 7
    time.sleep(0.35)
    assert b.take() == (True, 7)       # the next line says how many were left out
    assert b.take() == (True, 0)
