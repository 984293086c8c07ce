"""Bounded benchmarks (``make bench`` / ``python -m bench.run``); never part of ``make test``.

Each ``bench_<name>.py`` exposes ``run() -> dict`` (see :mod:`bench.run` for the shape of
the dict the table understands); :mod:`bench.harness` holds the shared plumbing (the real
node process, DCMTK peers, synthetic MR files, a private network namespace).
"""
