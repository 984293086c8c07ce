"""``lumbar-node analyze PATH... --out DIR``: the node's analysis, offline, on files.

Files and folders (recursively) are grouped into series by Series Instance UID; each
image series goes through the same path as in the node (``node.volume_io.load_volume``
-> ``ai.pipeline.Analyzer`` -> ``node.results_io``) and gets ``DIR/<series uid>/``
with ``results.json`` and ``labels.npz``; ``DIR/measurements.csv`` collects every series'
level measurements, ``DIR/slice_measurements.csv`` every slice's.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from node.commands.analysis_options import add_analysis_options, analysis_options

logger = logging.getLogger(__name__)

#: Smallest |cos| between a slice normal and patient z for an axial (tilted blocks ok) slice.
AXIAL_MIN_COS = 0.7

#: SOP classes that are never analysed (our own outputs, reports, presentation states).
NON_IMAGE_SOP_PREFIXES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.66",  # segmentations
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--weights", type=Path, default=None, help="weights folder (default: shipped)"
    )
    add_analysis_options(parser)


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Every file under the given files and folders, sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return sorted(set(out))


def group_series(files: Sequence[Path]) -> dict[str, list[Path]]:
    """Image files grouped by Series Instance UID (non-DICOM and non-image files skipped)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list[Path]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            logger.debug("skipping %s: not DICOM", f)
            continue
        sop = str(ds.get("SOPClassUID", ""))
        if "Rows" not in ds or sop.startswith(NON_IMAGE_SOP_PREFIXES):
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid:
            series.setdefault(uid, []).append(f)
    return series


def is_axial(normals: np.ndarray) -> bool:
    """True when every slice normal is within ~45 degrees of the patient's z axis."""
    return bool(np.all(np.abs(normals[:, 2]) >= AXIAL_MIN_COS))


def safe_dirname(uid: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-_" else "_" for ch in uid)


def run(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from ai.pipeline import Analyzer
    from node.errors import InvalidInstance
    from node.results_io import (
        MEASUREMENTS_CSV,
        SLICE_MEASUREMENTS_CSV,
        append_measurements_csv,
        append_slice_measurements_csv,
        write_results,
    )
    from node.volume_io import load_volume

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    files = collect_files(args.paths)
    series = group_series(files)
    if not series:
        logger.error("no DICOM image series found under %s", [str(p) for p in args.paths])
        return 2
    analyzer = Analyzer(
        batch_size=args.batch_size,
        weights_dir=args.weights,
        **analysis_options(args),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, slice_csv_path = args.out / MEASUREMENTS_CSV, args.out / SLICE_MEASUREMENTS_CSV
    for path in (csv_path, slice_csv_path):
        path.unlink(missing_ok=True)
    failures = 0
    with Progress(transient=False) as progress:
        task = progress.add_task("analysing", total=len(series))
        for uid, paths in series.items():
            try:
                volume, _datasets = load_volume(paths)
                if not is_axial(volume.normals()):
                    progress.console.print(f"series {uid}: not axial, skipped")
                    progress.advance(task)
                    continue
                result = analyzer.analyze(volume)
            except (InvalidInstance, ValueError) as exc:
                failures += 1
                progress.console.print(f"[red]series {uid}: {exc}")
                progress.advance(task)
                continue
            write_results(
                result,
                args.out / safe_dirname(uid),
                slice_uids=volume.slice_uids,
                frame_numbers=volume.frame_numbers,
            )
            append_measurements_csv(result, csv_path)
            append_slice_measurements_csv(result, slice_csv_path)
            names = ", ".join(lv.level or f"#{lv.position}" for lv in result.levels) or "no levels"
            progress.console.print(
                f"series {uid}: {volume.n_slices} slices, {names}, {len(result.flags)} flags"
            )
            progress.advance(task)
    print(f"{len(series) - failures}/{len(series)} series analysed; results in {args.out}")
    return 1 if failures else 0
