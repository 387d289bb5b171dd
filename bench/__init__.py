"""Benchmarks (`make bench`): each figure is printed beside a baseline measured in the same run.

A benchmark module in this package defines `async def run(env: BenchEnv) -> list[Figure]` and is
listed in `MODULES` of `bench/__main__.py`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchEnv:
    kafka_bootstrap: str
    database_url: str
    quick: bool  # smaller loads, for a smoke run


@dataclass(frozen=True)
class Figure:
    """One measured figure and the baseline it is compared with ("higher" or "lower" is better)."""

    benchmark: str
    metric: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline_value: float | None = None
    better: str = "higher"
    target: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0):
            return None
        return self.value / self.baseline_value


def percentile(samples: list[float], p: float) -> float:
    """The p-th percentile (0-100) of `samples`, by linear interpolation."""
    if not samples:
        raise ValueError("no samples")
    if len(samples) == 1:
        return samples[0]
    return (
        statistics.quantiles(samples, n=1000, method="inclusive")[min(int(p * 10) - 1, 998)]
        if p < 100
        else max(samples)
    )
