"""Phantom generation speed: slices per second on one core (label map + image, 256 x 256).

``run()`` is called by the benchmark suite; ``python -m bench.bench_phantom`` prints it.
Speed is measured in process CPU time so that other load on a shared machine does not count;
numpy/BLAS threads are limited to one where the platform allows it.
"""

from __future__ import annotations

import json
import os
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

N_SUBJECTS = 4
SLICES_PER_SUBJECT = 40
MATRIX = (256, 256)


def _measure(mode: str) -> dict[str, float]:
    from ai.phantom import render_slice, sample_subject

    rng = np.random.default_rng(0)
    subjects = [sample_subject(rng) for _ in range(N_SUBJECTS)]
    render_slice(subjects[0], "L4-L5", "disc", mode, rng, matrix=MATRIX)  # warm-up
    n = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for s in subjects:
        for i in range(SLICES_PER_SUBJECT):
            level = s.level_names[i % len(s.level_names)]
            render_slice(s, level, "disc" if i % 4 else "mid", mode, rng, matrix=MATRIX)
            n += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"slices": n, "cpu_s": cpu, "wall_s": wall, "slices_per_s_cpu": n / cpu,
            "slices_per_s_wall": n / wall}


def run() -> dict:  # type: ignore[type-arg]
    """Slices/s for the realistic and randomised modes, and subject sampling time."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    from ai.phantom import sample_subject

    rng = np.random.default_rng(1)
    t0 = time.process_time()
    for _ in range(50):
        sample_subject(rng)
    subj_ms = (time.process_time() - t0) / 50 * 1000.0
    return {
        "name": "phantom",
        "matrix": list(MATRIX),
        "realistic": _measure("realistic"),
        "randomised": _measure("randomised"),
        "sample_subject_ms": subj_ms,
        "target_slices_per_s": 50,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
