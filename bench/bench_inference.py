"""Segmentation speed: ms per 512 x 512 slice on the CPU (and the GPU when present).

``run()`` is called by the benchmark suite; ``python -m bench.bench_inference`` prints it.
Pre-processing (resample + normalise), prediction (batched network) and post-processing
(back to the native grid + connected components + laterality) are timed separately, in
wall time and in process CPU time (the latter is less sensitive to other load on a shared
machine; with 2 threads it can exceed wall time). One-thread figures are reported too:
on a machine shared with other work, two threads often wait for each other.

The same CPU can run this 1.5x slower from one hour to the next (shared host), so absolute
milliseconds from different sessions are weak evidence. :func:`reference_ms` times a fixed
workload of the same kinds (float32 convolutions at 2 threads, connected components and a
distance transform) before and after the stages; ``total_in_reference_units`` (total /
reference) is the figure to compare between runs and machines.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from node.config import AiSection

N_SLICES = 16
MATRIX = (512, 512)
SPACING_MM = 0.5
REPEATS = 2


#: Slices per block: the volume is laid out as a lumbar protocol acquires it, one parallel
#: block through each disc (slices 4 mm apart, blocks 40 mm apart), so that every stage
#: runs (the column refiner only reads blocks of up to 5 slices).
BLOCK_SLICES = 4
BLOCK_OFFSETS_MM = (-6.0, -2.0, 2.0, 6.0)


def _volume() -> Any:
    from ai.phantom import render_slice, sample_subject
    from ai.volume import Volume

    rng = np.random.default_rng(7)
    subject = sample_subject(rng, levels=("L3-L4", "L4-L5", "L5-S1"))
    images = []
    positions = []
    for k in range(N_SLICES):
        block, j = divmod(k, BLOCK_SLICES)
        level = subject.level_names[block % 3]
        s = render_slice(subject, level, "disc", "realistic", rng, offset_mm=BLOCK_OFFSETS_MM[j],
                         pixel_spacing=SPACING_MM, matrix=MATRIX)
        images.append(s.image)
        positions.append([0.0, 0.0, 40.0 * block + 4.0 * j])
    n = len(images)
    return Volume(
        pixels=np.stack(images).astype(np.float32),
        pixel_spacing=(SPACING_MM, SPACING_MM),
        positions=np.array(positions),
        orientations=np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1)),
        slice_uids=tuple(f"1.2.3.{k}" for k in range(n)),
        series_instance_uid="1.2.3",
    )


#: Fixed reference workload (never change it: its whole use is to stay the same).
REFERENCE_CONV_SHAPE = (1, 16, 224, 224)
REFERENCE_CONV_LAYERS = 4
REFERENCE_MASK_SIDE = 512
REFERENCE_REPEATS = 5


def reference_ms(threads: int = 2) -> float:
    """Median ms of a fixed CPU workload: how fast this machine is right now.

    :data:`REFERENCE_CONV_LAYERS` float32 3x3 convolutions over :data:`REFERENCE_CONV_SHAPE`
    (channels in = out) and, on a fixed random mask, connected-component labelling plus a
    Euclidean distance transform: the two kinds of work :meth:`ai.pipeline.Analyzer.segment` spends its time in.
    """
    import torch
    from scipy import ndimage

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(REFERENCE_CONV_SHAPE, generator=gen)
        channels = REFERENCE_CONV_SHAPE[1]
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.05)
        rng = np.random.default_rng(0)
        mask = ndimage.binary_opening(rng.random((REFERENCE_MASK_SIDE,) * 2) < 0.55)
        times = []
        for _ in range(REFERENCE_REPEATS + 1):
            t0 = time.perf_counter()
            with torch.inference_mode():
                y = x
                for _ in range(REFERENCE_CONV_LAYERS):
                    y = torch.relu(conv(y))
            ndimage.label(mask)
            ndimage.distance_transform_edt(mask)
            times.append(time.perf_counter() - t0)
        return 1000.0 * float(np.median(times[1:]))
    finally:
        torch.set_num_threads(previous)


def _time_stages(
    device: str, threads: int, precision: str = "auto", mirror: bool = AiSection.mirror
) -> dict[str, float]:
    """Median ms per slice of each stage of ``Analyzer.segment`` (its own timings)."""
    import torch

    from ai.pipeline import Analyzer

    analyzer = Analyzer(
        device=device, batch_size=8, threads=threads, precision=precision, mirror=mirror
    )
    vol = _volume()
    stages: dict[str, list[float]] = {}
    cpu: list[float] = []
    for _ in range(REPEATS + 1):  # first round warms up
        c0 = time.process_time()
        _, _, timings = analyzer.segment(vol)
        if analyzer.device.type == "cuda":
            torch.cuda.synchronize()
        cpu.append(time.process_time() - c0)
        for stage, seconds in timings.items():
            stages.setdefault(stage, []).append(seconds)
    n = vol.n_slices
    res = {f"{k}_ms_per_slice": 1000 * float(np.median(v[1:])) / n for k, v in stages.items()}
    res["total_ms_per_slice"] = float(sum(res.values()))
    res["cpu_total_ms_per_slice"] = 1000 * float(np.median(cpu[1:])) / n
    res["threads"] = float(torch.get_num_threads())
    res["autocast"] = str(analyzer.autocast or torch.float32).removeprefix("torch.")  # type: ignore[assignment]
    return res


def run() -> dict:  # type: ignore[type-arg]
    """ms/slice at 512 x 512 (0.5 mm) on the CPU, per stage; GPU too when CUDA is present.

    ``cpu`` is the node's default (``precision = "auto"``, ``mirror`` as ``[ai]`` sets it);
    ``cpu_float32`` the same run forced to float32, the reference for the bfloat16 speed-up
    on CPUs that have it; ``cpu_mirror`` with the mirrored second pass (``[ai] mirror``).
    """
    import torch

    from ai.card import load_model

    _, card = load_model()
    before = reference_ms()
    result: dict[str, Any] = {
        "model": f"{card.name} {card.version}",
        "matrix": list(MATRIX),
        "slices": N_SLICES,
        "cpu": _time_stages("cpu", threads=2),
        "cpu_float32": _time_stages("cpu", threads=2, precision="float32"),
        "cpu_mirror": _time_stages("cpu", threads=2, mirror=True),
        "cpu_1_thread": _time_stages("cpu", threads=1),
        "target_cpu_ms_per_slice": 50.0,
    }
    result["bfloat16_speedup"] = (
        result["cpu_float32"]["total_ms_per_slice"] / result["cpu"]["total_ms_per_slice"]
    )
    result["mirror_cost"] = (
        result["cpu_mirror"]["total_ms_per_slice"] / result["cpu"]["total_ms_per_slice"]
    )
    after = reference_ms()
    result["reference_ms"] = {"before": before, "after": after}
    result["total_in_reference_units"] = result["cpu"]["total_ms_per_slice"] / (0.5 * (before + after))
    if torch.cuda.is_available():
        result["cuda"] = _time_stages("cuda", threads=2)
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
