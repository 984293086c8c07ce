"""``lumbar-node analyze PATH... --out DIR``: the node's analysis, offline, on files.

Files and folders (recursively) are grouped into series by Series Instance UID; each
image series goes through the same path as in the node (``node.volume_io.load_volume``
-> ``ai.pipeline.Analyzer`` -> ``node.results_io``) and gets ``DIR/<series uid>/``
with ``results.json`` and ``labels.npz``; ``DIR/measurements.csv`` collects every series'
level measurements, ``DIR/slice_measurements.csv`` every slice's. A series whose slices are
not axial within ``--max-tilt`` (the node's ``[routing] max_axial_tilt_deg``, by the same rule:
:func:`node.routing.check_axial`) is skipped with the reason; the other routing rules (body
part, modality) are the node's business, not a researcher's folder's.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from node.commands.analysis_options import add_analysis_options, analysis_options
from node.config import RoutingSection
from node.routing import check_axial

logger = logging.getLogger(__name__)

#: Exit status when every series found was skipped (none analysed, none failed).
EXIT_NOTHING_ANALYSED = 2

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
    parser.add_argument(
        "--max-tilt",
        type=float,
        default=RoutingSection().max_axial_tilt_deg,
        help="largest angle (degrees) between a slice normal and the patient axial axis; "
        "steeper series are skipped (default: the node's [routing] max_axial_tilt_deg)",
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


def safe_dirname(uid: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-_" else "_" for ch in uid)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
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
    failures = skipped = 0
    # one line per series whatever the terminal width; messages printed as they are (no markup)
    console = Console(soft_wrap=True, markup=False, highlight=False)
    with Progress(transient=False, console=console) as progress:
        task = progress.add_task("analysing", total=len(series))
        for uid, paths in series.items():
            try:
                volume, _datasets = load_volume(paths)
                not_axial, _tilt = check_axial(volume.orientations.tolist(), args.max_tilt)
                if not_axial is not None:
                    skipped += 1
                    progress.console.print(f"series {uid}: skipped, {not_axial}")
                    progress.advance(task)
                    continue
                result = analyzer.analyze(volume)
            except (InvalidInstance, ValueError) as exc:
                failures += 1
                progress.console.print(f"series {uid}: failed, {exc}", style="red")
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
    analysed = len(series) - failures - skipped
    print(
        f"{analysed} of {len(series)} series analysed, {skipped} skipped, {failures} failed; "
        f"results in {args.out}"
    )
    if failures:
        return 1
    return 0 if analysed else EXIT_NOTHING_ANALYSED
