"""Fake CPU counters, so that tests of what is measured and cached do not depend on other work
running on the machine (:func:`restspec.decode.budget.measured_while_busy`)."""

from __future__ import annotations

from restspec.decode import budget as budget_module
from restspec.decode.budget import CpuSnapshot


def snapshots(monkeypatch, other_cores: float) -> None:
    """Fake CPU counters: each snapshot 10 s after the last, this process busy on 2 cores and other
    processes on ``other_cores``."""
    clock = iter(range(0, 10_000, 10))

    def snapshot():
        t = float(next(clock))
        return CpuSnapshot(t, (2.0 + other_cores) * t, 2.0 * t)

    monkeypatch.setattr(budget_module, "cpu_snapshot", snapshot)


def quiet_machine(monkeypatch) -> None:
    snapshots(monkeypatch, other_cores=0.0)
