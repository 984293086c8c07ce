"""Encoding time of the DICOM outputs: SEG, SR and overlay for 15 and 100 slices of 512 x 512.

Input: the encoder tests' synthetic series (``tests/encode_synthetic.py``): two angled
blocks, 8 structures per slice plus a disc split per level, a hand-made result with two
levels. SEG time is the build plus the write to memory (``pydicom.dcmwrite``), median of
:data:`REPEATS` runs after a warm-up; SR and overlay are timed once after a warm-up of the
SEG. The reference is highdicom 0.28's ``Segmentation`` (build + write) on the same masks,
the library the SEG writer replaced; highdicom refuses angled blocks ("Source images must
have a shared orientation"), so it runs on the same series with the blocks parallel. Target: SEG <= 0.5 s
for 100 frames of 512 x 512 (issue #5).

``run()`` is called by the benchmark suite; ``python -m bench.bench_encode`` prints it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

REPEATS = 3
SIZES = (15, 100)
MATRIX = 512
SEG_TARGET_S = 0.5
_TESTS = Path(__file__).resolve().parents[1] / "tests" / "encode_synthetic.py"


def _synthetic() -> Any:
    spec = importlib.util.spec_from_file_location("encode_synthetic", _TESTS)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {_TESTS}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["encode_synthetic"] = module
    spec.loader.exec_module(module)
    return module


def _series(n: int, *, angled: bool = True) -> Any:
    half = n // 2
    tilt = 8.0 if angled else 0.0
    return _synthetic().make_series(
        rows=MATRIX, cols=MATRIX, spacing=0.6, blocks=((-30.0, tilt, half), (30.0, 0.0, n - half)),
        levels=("L4-L5", "L3-L4"), slice_gap=0.8, with_pixels=False,
    )


def _once(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_time(fn: Any) -> float:
    fn()  # warm-up (imports, first-call caches)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _write(ds: pydicom.Dataset) -> int:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return len(buf.getvalue())


def _write_sr(ds: pydicom.Dataset | None) -> int:
    if ds is None:
        raise ValueError("the synthetic result has levels: an SR was expected")
    return _write(ds)


def _highdicom_seg(series: Any) -> float:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from node.encode.seg import plan_segments

    specs = plan_segments(series.result)
    masks = np.stack([spec.mask(series.result.labels) for spec in specs], axis=-1)
    algo = hd.AlgorithmIdentificationSequence(name="lumbar-unet", version="1", family=codes.DCM.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=spec.number, segment_label=spec.text, segmented_property_category=spec.category,
            segmented_property_type=spec.property_type, algorithm_type="AUTOMATIC", algorithm_identification=algo,
        )
        for spec in specs
    ]

    def build() -> None:
        seg = hd.seg.Segmentation(
            source_images=series.datasets, pixel_array=masks, segmentation_type="BINARY",
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=1,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="x", manufacturer_model_name="x",
            software_versions="1", device_serial_number="1", omit_empty_frames=False,
        )
        _write(seg)

    t0 = time.perf_counter()
    build()
    return time.perf_counter() - t0


def measure(n: int, *, reference: bool) -> dict[str, Any]:
    from node.encode import OutputIdentity
    from node.encode.overlay import build_overlay
    from node.encode.seg import build_seg, plan_segments
    from node.encode.sr import build_sr

    series = _series(n)
    ident = OutputIdentity.of(series.volume.series_instance_uid, series.volume.slice_uids, "1.0.0")
    seg = build_seg(series.datasets, series.volume, series.result, ident)
    specs = plan_segments(series.result)
    out: dict[str, Any] = {
        "slices": n,
        "segments": len(specs),
        "frames": int(seg.NumberOfFrames),
        "seg_bytes": _write(seg),
        "seg_build_s": _median_time(lambda: build_seg(series.datasets, series.volume, series.result, ident)),
        "seg_build_write_s": _median_time(
            lambda: _write(build_seg(series.datasets, series.volume, series.result, ident))
        ),
        "sr_s": _once(lambda: _write_sr(build_sr(series.datasets, series.volume, series.result, seg, specs, ident))),
    }
    # the overlay needs pixels; a random image of the same size is enough for timing
    pixels = np.random.default_rng(0).normal(500, 100, series.volume.pixels.shape).astype(np.float32)
    object.__setattr__(series.volume, "pixels", pixels)
    out["overlay_s"] = _once(
        lambda: [_write(ds) for ds in build_overlay(series.datasets, series.volume, series.result, ident)]
    )
    if reference:
        # highdicom refuses sources with more than one orientation: same size, one orientation
        out["highdicom_seg_build_write_s"] = _highdicom_seg(_series(n, angled=False))
    return out


def run() -> dict[str, Any]:
    """SEG, SR and overlay times for 15 and 100 slices; highdicom as the SEG reference."""
    results = {f"{n}_slices": measure(n, reference=(n == max(SIZES))) for n in SIZES}
    big = results[f"{max(SIZES)}_slices"]
    figures = []
    for n in SIZES:
        r = results[f"{n}_slices"]
        ref = r.get("highdicom_seg_build_write_s")
        figures.append({
            "figure": f"SEG build+write, {n} slices 512x512 ({r['frames']} frames)",
            "value": r["seg_build_write_s"], "unit": "s",
            "reference": ref, "reference_name": "highdicom 0.28" if ref else None,
            "ratio": (r["seg_build_write_s"] / ref) if ref else None,
            "target": SEG_TARGET_S if n == 100 else None,
            "met": (r["seg_build_write_s"] <= SEG_TARGET_S) if n == 100 else None,
        })
        figures.append({"figure": f"SR build+write, {n} slices", "value": r["sr_s"], "unit": "s",
                        "reference": None, "ratio": None, "target": None, "met": None})
        figures.append({"figure": f"overlay ({n} + summary images), {n} slices", "value": r["overlay_s"], "unit": "s",
                        "reference": None, "ratio": None, "target": None, "met": None})
    return {"name": "encode", "matrix": MATRIX, "results": results, "figures": figures,
            "seg_target_met": big["seg_build_write_s"] <= SEG_TARGET_S}


if __name__ == "__main__":
    print(json.dumps(run(), indent=1, default=str))
