"""Bounded load on loopback: 20 concurrent DCMTK associations into the real node, nothing
lost. The same measurement at full size (20 x 200) is ``bench/bench_load.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.bench_load import measure  # noqa: E402

pytestmark = pytest.mark.integration

ASSOCIATIONS = 20
PER_ASSOCIATION = 20
#: generous bounds for a shared 2-core machine; the figures are printed for the docs
MIN_RATE_PER_S = 20.0
MAX_P99_MS = 5000.0


def test_twenty_concurrent_associations_lose_nothing(tmp_path: Path) -> None:
    result = measure(ASSOCIATIONS, PER_ASSOCIATION, tmp_path)
    print(f"load: {result}")  # noqa: T201 - figures for docs/reliability.md
    assert result["errors"] == []
    assert result["succeeded"] == result["indexed"] == ASSOCIATIONS * PER_ASSOCIATION
    assert result["lost"] == 0
    assert result["instances_per_s"] >= MIN_RATE_PER_S
    assert result["p99_ms"] is not None and result["p99_ms"] <= MAX_P99_MS
