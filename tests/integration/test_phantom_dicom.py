"""Written phantom studies pass dciodvfy (dicom3tools) and the CLI writes what it says."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from node.cli import main

pytestmark = pytest.mark.integration


def test_cli_study_passes_dciodvfy(tmp_path: Path) -> None:
    assert shutil.which("dciodvfy"), "dicom3tools not installed (make test-peers)"
    rc = main(["phantom", "--out", str(tmp_path), "--seed", "4", "--subjects", "1",
               "--matrix", "128", "--spacing", "1.4", "--levels", "L4-L5,L5-S1"])
    assert rc == 0
    study = next(tmp_path.glob("PHANTOM_*"))
    files = sorted(study.rglob("*.dcm"))
    series = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription) for f in files}
    assert series == {"T2 TSE AX", "T2 TSE SAG", "T2 AX BRAIN"}
    for sub in ("ax", "sag", "other"):
        f = sorted((study / sub).glob("*.dcm"))[0]
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        out = res.stdout + res.stderr
        assert "Error" not in out, out
        assert "MRImage" in out
    truth = json.loads((study / "truth.json").read_text())
    assert truth["patient_name"].startswith("PHANTOM^")
    png = tmp_path / "sheet.png"
    assert main(["contact-sheet", str(study), "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
