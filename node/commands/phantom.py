"""``lumbar-node phantom`` and ``lumbar-node contact-sheet``.

``phantom`` writes synthetic lumbar MR studies with exact ground truth (see
``docs/phantom.md``); ``contact-sheet`` renders the axial slices of such a study with their
label overlays into one PNG, to look at the anatomy.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

logger = logging.getLogger(__name__)

EXIT_ERROR = 2


def add_phantom_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (one study folder per subject)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed (output is deterministic for a seed)"
    )
    parser.add_argument("--subjects", type=int, default=1, help="number of subjects / studies")
    parser.add_argument("--levels", default="L3-L4,L4-L5,L5-S1", help="comma-separated disc levels")
    parser.add_argument(
        "--stenosis",
        default="random",
        help="none | mild | moderate | severe | random, or a Schizas grade A-D",
    )
    parser.add_argument("--mode", default="realistic", choices=("realistic", "randomised"))
    parser.add_argument("--matrix", type=int, default=320, help="axial matrix (square)")
    parser.add_argument("--spacing", type=float, default=0.7, help="axial pixel spacing (mm)")
    parser.add_argument(
        "--slices-per-block",
        type=int,
        default=None,
        help="axial slices per disc block, 3-5 (default: drawn per subject)",
    )
    parser.add_argument(
        "--sagittal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write a sagittal T2 series",
    )
    parser.add_argument(
        "--distractor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write a non-lumbar distractor series",
    )
    parser.add_argument(
        "--continuous",
        action="store_true",
        help="a continuous axial stack instead of one tilted block per disc",
    )


def run_phantom(args: argparse.Namespace) -> int:
    from node.phantom_dicom import PhantomOptions, write_phantom_studies

    try:
        opts = PhantomOptions(
            seed=args.seed,
            subjects=args.subjects,
            levels=tuple(v.strip() for v in args.levels.split(",") if v.strip()),
            stenosis=args.stenosis,
            mode=args.mode,
            matrix=args.matrix,
            spacing=args.spacing,
            sagittal=args.sagittal,
            distractor=args.distractor,
            continuous=args.continuous,
            slices_per_block=args.slices_per_block,
        )
        folders = write_phantom_studies(args.out, opts)
    except ValueError as exc:
        logger.error("phantom: %s", exc)
        return EXIT_ERROR
    for f in folders:
        print(f)
    return 0


def add_contact_sheet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", type=Path, help="a study folder written by `lumbar-node phantom`")
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--columns", type=int, default=5, help="slices per row")
    parser.add_argument("--no-overlay", action="store_true", help="images only")


def run_contact_sheet(args: argparse.Namespace) -> int:
    try:
        render_contact_sheet(
            args.study, args.out, columns=args.columns, overlay=not args.no_overlay
        )
    except (FileNotFoundError, ValueError) as exc:
        logger.error("contact-sheet: %s", exc)
        return EXIT_ERROR
    print(args.out)
    return 0


def overlay_rgb(image: np.ndarray, labels: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """An 8-bit RGB rendering of a slice (1st-99.5th percentile window) with label colours."""
    import numpy as np

    from ai.labels import COLORS

    lo, hi = np.percentile(image, (1.0, 99.5))
    grey = np.clip((image - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if labels is not None:
        for lab, colour in COLORS.items():
            m = labels == lab
            rgb[m] = (1.0 - alpha) * rgb[m] + alpha * np.asarray(colour, dtype=float)
    return rgb.astype(np.uint8)


def tile_sheet(
    tiles: list[tuple[np.ndarray, str]], columns: int, tile_px: int = 256
) -> Image.Image:
    """Arrange RGB tiles with captions in a grid (PIL image)."""
    from PIL import Image, ImageDraw

    rows = (len(tiles) + columns - 1) // columns
    caption = 14
    sheet = Image.new("RGB", (columns * tile_px, rows * (tile_px + caption)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, (rgb, text) in enumerate(tiles):
        im = Image.fromarray(rgb).resize((tile_px, tile_px), Image.Resampling.BILINEAR)
        x, y = (i % columns) * tile_px, (i // columns) * (tile_px + caption)
        sheet.paste(im, (x, y + caption))
        draw.text((x + 3, y + 1), text, fill=(255, 255, 255))
    return sheet


def render_contact_sheet(study: Path, out: Path, *, columns: int = 5, overlay: bool = True) -> Path:
    """Render every axial slice of a phantom study folder (image | image + labels) to a PNG."""
    import json

    import numpy as np
    import pydicom

    truth_path = study / "truth.json"
    if not truth_path.is_file():
        raise FileNotFoundError(f"{truth_path} not found: not a phantom study folder")
    truth = json.loads(truth_path.read_text())
    labels = np.load(study / "labels.npz")
    by_uid: dict[str, pydicom.Dataset] = {}
    for f in sorted((study / "ax").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        by_uid[str(ds.SOPInstanceUID)] = ds
    tiles: list[tuple[np.ndarray, str]] = []
    for st in truth["slices"]:
        uid = st["sop_instance_uid"]
        found = by_uid.get(uid)
        if found is None:
            raise ValueError(f"slice {uid} of truth.json has no file in {study / 'ax'}")
        img = found.pixel_array.astype(np.float32)
        text = f"{st['level']} {st['kind']} {st['offset_mm']:+.1f}mm {st['schizas']} {st['dsca_mm2']:.0f}mm2"
        tiles.append((overlay_rgb(img, None), text))
        if overlay:
            tiles.append((overlay_rgb(img, labels[uid]), "labels"))
    sheet = tile_sheet(tiles, columns * (2 if overlay else 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    logger.info("contact sheet written: %s (%d slices)", out, len(truth["slices"]))
    return out
