"""A real viewer in a real browser: OHIF 3.13 shows the node's SEG over the phantom study.

Orthanc (with the DICOMweb plugin) serves the phantom series plus the SEG, SR and overlay
in a private network namespace; the prebuilt OHIF viewer is served from the same origin
with a proxy to Orthanc; headless Debian chromium (playwright-core) opens the study with
the SEG as the initial series. The test asserts that every segment label is listed in the
segmentation panel and that the segment colours are painted on the rendered slice, with
the patient's right psoas on the image's left (radiological convention). The screenshot
is kept in the test's tmp dir (``ohif-seg.png``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from encode_synthetic import phantom_series
from ohif.harness import ensure_viewer, shoot
from ohif.server import ViewerServer
from orthanc_peer import Orthanc, isolated_network
from PIL import Image

from ai.labels import COLORS, Label
from node.encode import encode_series, kind_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VIEWER_TIMEOUT_S = 240.0
#: Viewport region of the 1400 x 900 screenshot (left study panel and right segment panel cut off).
VIEWPORT = (slice(60, 860), slice(300, 1100))
COLOUR_TOLERANCE = 12
MIN_PIXELS = 50


def _colour_mask(image: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.abs(image - np.array(rgb)).max(axis=2) <= COLOUR_TOLERANCE


def test_ohif_shows_the_seg(tmp_path: Path) -> None:
    viewer = ensure_viewer()
    series = phantom_series(str(tmp_path / "phantom"), matrix=256, spacing=0.8, levels="L4-L5",
                            extra_args=["--slices-per-block", "5", "--no-sagittal", "--no-distractor"])
    out = encode_series(series.datasets, series.volume, series.result)
    assert out.seg is not None
    files = sorted((tmp_path / "phantom").glob("PHANTOM_*/ax/*.dcm"))
    for ds in out.all():
        path = tmp_path / f"{kind_of(ds)}_{ds.InstanceNumber}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
    labels = [spec.text for spec in out.segments]
    screenshot = tmp_path / "ohif-seg.png"

    with isolated_network():
        orthanc = Orthanc(tmp_path / "orthanc")
        orthanc.start()
        try:
            for path in files:
                requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), timeout=60).raise_for_status()
            with ViewerServer(viewer.dist, orthanc.http_port) as server:
                url = (f"{server.origin}/viewer?StudyInstanceUIDs={out.seg.StudyInstanceUID}"
                       f"&initialSeriesInstanceUID={out.seg.SeriesInstanceUID}")
                # from the first image of the 5-slice block to the middle one (the disc centre)
                result = shoot(viewer, url, screenshot, labels, VIEWER_TIMEOUT_S, steps=2)
        finally:
            orthanc.stop()

    assert result["missing"] == [], f"segment labels not shown: {result['missing']}\n{result.get('text')}"
    assert not [e for e in result["errors"]], result["errors"]  # type: ignore[union-attr]
    image = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)[VIEWPORT]
    # the middle slice of the block is shown: every structure on it must be painted
    middle = series.volume.n_slices // 2
    shown = [Label(v) for v in range(1, len(Label)) if (series.result.labels[middle] == v).any()]
    assert {Label.DISC, Label.DURAL_SAC, Label.PSOAS_LEFT, Label.MULTIFIDUS_RIGHT} <= set(shown)
    counts = {label.name: int(_colour_mask(image, COLORS[label]).sum()) for label in shown}
    assert all(n >= MIN_PIXELS for n in counts.values()), counts
    left_x = np.nonzero(_colour_mask(image, COLORS[Label.PSOAS_LEFT]))[1].mean()
    right_x = np.nonzero(_colour_mask(image, COLORS[Label.PSOAS_RIGHT]))[1].mean()
    assert right_x < left_x, "patient right must be on the image's left"
