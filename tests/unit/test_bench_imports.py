"""The benchmarks import outside pytest, as ``make bench`` runs them (``python -m bench.run``
from the repository root): they share helpers with the tests, which pytest makes importable
in its own way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))


def test_every_benchmark_is_found() -> None:
    assert {"bench_ingest", "bench_e2e", "bench_load", "bench_inference"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_benchmark_imports_in_a_plain_interpreter(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import bench.{module}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
