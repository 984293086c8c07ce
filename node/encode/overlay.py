"""Secondary Capture overlay for viewers that cannot show SEG, and one summary image.

Each source slice becomes one RGB Secondary Capture image: the slice (windowed 1st-99th
percentile of the series), every structure filled at :data:`FILL_OPACITY` with a
full-colour contour, and a legend of the structures on that slice. The summary image
renders a per-level table of grades and measurements (PIL text) with the flags. Both say
"not for diagnostic use without review" in the image, since burned-in text is what a
SEG-blind viewer shows.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import SecondaryCaptureImageStorage
from scipy import ndimage

from ai.labels import COLORS, DISPLAY_NAMES, MUSCLES, Label
from ai.measure import low_contrast
from ai.results import SeriesResult
from ai.volume import Volume
from node.encode.common import copy_patient_study, fill_common
from node.encode.uids import SERIES_DESCRIPTION, OutputIdentity, series_number

logger = logging.getLogger(__name__)

FILL_OPACITY = 0.5
#: Window of the grey image: these percentiles of the whole series map to black and white.
WINDOW_PERCENTILES = (1.0, 99.0)
#: Smaller images are enlarged by an integer factor to at least this size, so text reads.
MIN_OUTPUT_SIZE = 512
SUMMARY_WIDTH = 1024
DISCLAIMER = "AI result - research use, review before clinical use"
_FONT_SIZE = 14
_SUMMARY_FONT_SIZE = 18
#: Appended to a muscle CSA whose outline has little contrast to its surroundings (a flag says more).
LOW_CONTRAST_MARK = "?"
#: Put before a muscle CSA at the edge of the image (``at_image_edge``): the field of view may cut it.
CUT_MARK = ">"


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def window(volume: Volume) -> np.ndarray:
    """Grey uint8 ``(n, rows, cols)`` of the volume, one window for the whole series."""
    lo, hi = np.percentile(volume.pixels, WINDOW_PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    scaled = (volume.pixels.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def render_slice(grey: np.ndarray, labels: np.ndarray, *, scale: int = 1) -> Image.Image:
    """One slice with the label map burned in (fill + contour) and a legend."""
    rgb = np.repeat(grey[:, :, None], 3, axis=2).astype(np.float32)
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
        labels = labels.repeat(scale, axis=0).repeat(scale, axis=1)
    boxes = ndimage.find_objects(labels)
    present = [
        Label(v + 1) for v, box in enumerate(boxes) if box is not None and v + 1 < len(Label)
    ]
    for label in present:
        # work inside the label's bounding box (one pixel margin for the erosion)
        box = boxes[int(label) - 1]
        assert box is not None
        r0, r1 = max(box[0].start - 1, 0), box[0].stop + 1
        c0, c1 = max(box[1].start - 1, 0), box[1].stop + 1
        mask = labels[r0:r1, c0:c1] == int(label)
        patch = rgb[r0:r1, c0:c1]
        colour = np.array(COLORS[label], np.float32)
        patch[mask] = patch[mask] * (1 - FILL_OPACITY) + colour * FILL_OPACITY
        edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
        patch[edge] = colour
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    if present:
        legend = _legend(tuple(present))
        image.paste(legend, (0, 0), legend)
    disclaimer = _disclaimer()
    image.paste(disclaimer, (4, image.height - _FONT_SIZE - 4), disclaimer)
    return image


@functools.lru_cache(maxsize=128)
def _legend(present: tuple[Label, ...]) -> Image.Image:
    """The legend of one set of structures (RGBA: a translucent box, swatches, names).

    Rendered once per set and pasted on every slice showing that set: drawing the text
    was a fifth of the overlay's time.
    """
    font = _font(_FONT_SIZE)
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    width = max(int(probe.textlength(DISPLAY_NAMES[label], font=font)) for label in present)
    size = (width + _FONT_SIZE + 11, 7 + len(present) * (_FONT_SIZE + 3))
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    y = 4
    for label in present:
        draw.rectangle([4, y + 2, 4 + _FONT_SIZE - 4, y + _FONT_SIZE], fill=COLORS[label])
        draw.text((4 + _FONT_SIZE, y), DISPLAY_NAMES[label], fill=(255, 255, 255), font=font)
        y += _FONT_SIZE + 3
    return Image.alpha_composite(Image.new("RGBA", size, (0, 0, 0, 150)), layer)


@functools.lru_cache(maxsize=1)
def _disclaimer() -> Image.Image:
    """The burned-in disclaimer line (RGBA, transparent around the text), rendered once."""
    font = _font(_FONT_SIZE)
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), DISCLAIMER, font=font)
    layer = Image.new("RGBA", (int(right) + 1, int(bottom) + 1), (255, 255, 255, 0))
    ImageDraw.Draw(layer).text((0, 0), DISCLAIMER, fill=(255, 255, 255, 255), font=font)
    return layer


def summary_tables(result: SeriesResult) -> tuple[list[list[str]], list[list[str]]]:
    """The two summary tables, caudal level first: grades, then muscle CSA / fat %.

    Each has a header row, then one row per level.
    """
    grades = [
        [
            "Level",
            "Schizas",
            "Severity",
            "DSCA mm2",
            "DSCA grade",
            "Content",
            "Grade conf.",
            "Level conf.",
        ]
    ]
    muscles = [["Level"] + [_muscle_header(m) for m in MUSCLES]]
    for lv in sorted(result.levels, key=lambda lv: lv.position):
        name = lv.level if lv.level is not None else f"#{lv.position} (unlabelled)"
        st = lv.stenosis
        row = [name]
        if st is not None:
            row += [
                st.schizas,
                st.severity,
                f"{st.dsca_mm2:.0f}",
                st.dsca_grade,
                st.rootlets,
                f"{st.confidence:.2f}",
            ]
        else:
            row += ["-"] * 6
        grades.append(row + [f"{lv.level_confidence:.2f}"])
        cells = [name]
        for muscle in MUSCLES:
            m = lv.measurements.get(muscle)
            if m is None:
                cells.append("-")
            else:
                ff = f"{m.fat_fraction_pct:.0f}" if m.fat_fraction_pct is not None else "-"
                mark = LOW_CONTRAST_MARK if low_contrast(m) is not None else ""
                cut = CUT_MARK if m.at_image_edge else ""
                cells.append(f"{cut}{m.csa_mm2:.0f}{mark} / {ff}")
        muscles.append(cells)
    return grades, muscles


def _muscle_header(muscle: str) -> str:
    side = "L" if muscle.endswith("left") else "R"
    short = {"psoas": "Psoas", "erector": "Erector sp.", "multifidus": "Multifidus"}[
        muscle.split("_")[0]
    ]
    return f"{short} {side}"


def wrap_text(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (PIL has no wrap).

    A single word wider than ``width`` keeps a line of its own rather than being cut.
    """
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def render_summary(result: SeriesResult) -> Image.Image:
    """The per-level tables of grades and measurements as an image.

    The title (every model's name and version) and the flags are wrapped to the width:
    a cut-off flag would hide what it warns about.
    """
    grades, muscles = summary_tables(result)
    font = _font(_SUMMARY_FONT_SIZE)
    small = _font(_FONT_SIZE)
    line = _SUMMARY_FONT_SIZE + 8
    text_width = SUMMARY_WIDTH - 24
    heading = wrap_text(f"AI lumbar analysis - {result.models_line}", font, text_width)
    flags = [wrapped for flag in result.flags for wrapped in wrap_text(f"! {flag}", font, text_width)]
    n_lines = len(heading) + len(grades) + len(muscles) + len(flags) + 7
    height = max(256, line * n_lines + 40)
    image = Image.new("RGB", (SUMMARY_WIDTH, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    y = 10
    for text in heading:
        draw.text((12, y), text, fill=(255, 255, 255), font=font)
        y += line
    y += line
    muscle_title = "Muscles: CSA mm2 / fat fraction %"
    legend = []
    if any(LOW_CONTRAST_MARK in cell for row in muscles[1:] for cell in row):
        legend.append(f"{LOW_CONTRAST_MARK}: outline has little contrast")
    if any(cell.startswith(CUT_MARK) for row in muscles[1:] for cell in row):
        legend.append(f"{CUT_MARK}: at the edge of the image")
    if legend:
        muscle_title += f" ({', '.join(legend)}, see flags)"
    for table, columns, title in (
        (grades, [12, 200, 280, 400, 500, 620, 730, 850], "Central canal stenosis"),
        (muscles, [12, 200, 335, 470, 605, 740, 875], muscle_title),
    ):
        draw.text((12, y), title, fill=(160, 200, 255), font=font)
        y += line
        for r, row in enumerate(table):
            colour = (255, 220, 120) if r == 0 else (255, 255, 255)
            for x, text in zip(columns, row, strict=True):
                draw.text((x, y), text, fill=colour, font=small if r == 0 else font)
            y += line
        y += line // 2
    for text in flags:
        draw.text((12, y), text, fill=(255, 120, 120), font=font)
        y += line
    draw.text(
        (12, height - line),
        DISCLAIMER + "; Schizas grade visual, DSCA cut-offs heuristic",
        fill=(200, 200, 200),
        font=small,
    )
    return image


def _sc_dataset(
    image: Image.Image,
    first: Dataset,
    identity: OutputIdentity,
    index: int,
    *,
    now: dt.datetime,
    comment: str,
    sources: Sequence[Dataset],
) -> Dataset:
    ds = Dataset()
    copy_patient_study(first, ds)
    fill_common(
        ds,
        sop_class_uid=SecondaryCaptureImageStorage,
        sop_instance_uid=identity.instance_uid("overlay", index),
        series_instance_uid=identity.series_uid("overlay"),
        series_number=series_number("overlay", _series_number(first)),
        series_description=SERIES_DESCRIPTION["overlay"],
        modality="OT",
        instance_number=index + 1,
        now=now,
    )
    ds.BodyPartExamined = str(first.get("BodyPartExamined", "") or "LSPINE")
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "YES"
    ds.ImageComments = comment[:10240]
    ds.DerivationDescription = "AI segmentation burned onto the source image"
    # every overlay image names the images it was made from, so a PACS (and the e2e test)
    # can tie it to the analysed series; the summary is made from all of them
    refs = []
    for source in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        refs.append(ref)
    if refs:
        ds.SourceImageSequence = DicomSequence(refs)
    array = np.asarray(image, np.uint8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = array.shape[:2]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.PixelData = array.tobytes()
    return ds


def build_overlay(
    sources: Sequence[Dataset],
    volume: Volume,
    result: SeriesResult,
    identity: OutputIdentity,
    *,
    include_slices: bool = True,
    include_summary: bool = True,
    now: dt.datetime | None = None,
) -> list[Dataset]:
    """The overlay series: one image per source slice, then the summary image."""
    now = now or dt.datetime.now()
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    first = by_uid[volume.slice_uids[0]]
    out: list[Dataset] = []
    if include_slices:
        grey = window(volume)
        rows = volume.pixels.shape[1]
        scale = max(1, -(-MIN_OUTPUT_SIZE // rows)) if rows < MIN_OUTPUT_SIZE else 1
        for i, uid in enumerate(volume.slice_uids):
            image = render_slice(grey[i], result.labels[i], scale=scale)
            out.append(
                _sc_dataset(
                    image,
                    first,
                    identity,
                    i,
                    now=now,
                    sources=[by_uid[uid]],
                    comment=f"AI overlay of slice {i + 1} of {volume.n_slices}",
                )
            )
    if include_summary:
        out.append(
            _sc_dataset(
                render_summary(result),
                first,
                identity,
                volume.n_slices,
                now=now,
                sources=[by_uid[uid] for uid in dict.fromkeys(volume.slice_uids)],
                comment="AI lumbar summary: per-level grades and measurements",
            )
        )
    logger.info("overlay for series %s: %d images", volume.series_instance_uid, len(out))
    return out


def _series_number(ds: Dataset) -> int | None:
    value = ds.get("SeriesNumber")
    return int(value) if value not in (None, "") else None
