"""Overlay Secondary Capture images, the summary image, and lossless re-encoding."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from encode_synthetic import make_series
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from ai.labels import COLORS, Label
from node.encode import encode_series, transcode
from node.encode.overlay import (
    _SUMMARY_FONT_SIZE,
    FILL_OPACITY,
    SUMMARY_WIDTH,
    _font,
    render_slice,
    render_summary,
    summary_tables,
    wrap_text,
)


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def test_overlay_burns_colours_where_the_labels_are() -> None:
    grey = np.full((128, 128), 100, np.uint8)
    labels = np.zeros((128, 128), np.uint8)
    labels[60:80, 60:80] = Label.DURAL_SAC
    image = np.asarray(render_slice(grey, labels))
    inside = image[70, 70].astype(float)
    expected = 100 * (1 - FILL_OPACITY) + np.array(COLORS[Label.DURAL_SAC]) * FILL_OPACITY
    np.testing.assert_allclose(inside, expected, atol=1)
    assert tuple(image[60, 70]) == COLORS[Label.DURAL_SAC]  # contour at full colour
    assert tuple(image[90, 90]) == (100, 100, 100)  # outside untouched
    assert tuple(image[8, 30]) != (100, 100, 100)  # the legend


def test_overlay_series_and_summary() -> None:
    s = make_series(levels=("L4-L5", None))
    out = encode_series(s.datasets, s.volume, s.result)
    assert len(out.overlay) == s.volume.n_slices + 1
    for i, ds in enumerate(out.overlay):
        back = _roundtrip(ds)
        assert back.SeriesDescription == "AI Lumbar Overlay"
        assert back.PhotometricInterpretation == "RGB"
        assert back.pixel_array.shape[2] == 3
        assert back.InstanceNumber == i + 1
        assert back.StudyInstanceUID == s.datasets[0].StudyInstanceUID
    assert out.overlay[0].SourceImageSequence[0].ReferencedSOPInstanceUID == s.volume.slice_uids[0]
    grades, muscles = summary_tables(s.result)
    assert grades[1][:2] == ["L4-L5", "A"] and grades[2][0].startswith("#2 (unlabelled)")
    assert muscles[1][1] == "901 / 20"  # psoas left CSA / fat %
    only_summary = encode_series(s.datasets, s.volume, s.result, include_overlay=False)
    assert len(only_summary.overlay) == 1
    nothing = encode_series(s.datasets, s.volume, s.result, include_overlay=False, include_summary=False)
    assert nothing.overlay == [] and nothing.seg is not None and nothing.sr is not None


def test_lossless_transcoding_round_trips() -> None:
    s = make_series()
    out = encode_series(s.datasets, s.volume, s.result, include_summary=False)
    assert out.seg is not None
    seg = _roundtrip(transcode(out.seg, DeflatedExplicitVRLittleEndian))
    assert seg.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert seg.PixelData == out.seg.PixelData
    sc = _roundtrip(transcode(out.overlay[0], RLELossless))
    assert sc.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(sc.pixel_array, _roundtrip(out.overlay[0]).pixel_array)
    # a 1-bit SEG cannot be RLE encoded: it is deflated instead
    assert transcode(out.seg, RLELossless).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian


def test_summary_wraps_the_title_and_flags_to_its_width() -> None:
    """Four models' names and a long flag no longer run off the right edge."""
    from PIL import Image, ImageDraw

    font = _font(_SUMMARY_FONT_SIZE)
    text = "AI lumbar analysis - " + " + ".join(f"lumbar-model-number-{i} 1.{i}.0" for i in range(6))
    lines = wrap_text(text, font, 600)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert len(lines) > 1 and " ".join(lines) == text
    assert all(probe.textlength(ln, font=font) <= 600 for ln in lines)
    assert wrap_text("unbreakable" * 20, font, 100) == ["unbreakable" * 20]  # kept, not cut
    s = make_series()
    short = render_summary(s.result)
    s.result.flags.extend(["L3-L4: grades disagree, review the level: " + "word " * 60] * 2)
    tall = render_summary(s.result)
    assert tall.size[0] == short.size[0] == SUMMARY_WIDTH
    assert tall.size[1] > short.size[1]  # the wrapped flags got their own lines
    # nothing drawn in the right margin: every line fits the width
    right = np.asarray(tall)[:, SUMMARY_WIDTH - 10 :]
    assert not right.any()


def test_a_psoas_area_with_little_outline_contrast_is_marked_in_the_summary() -> None:
    import dataclasses

    from node.encode.overlay import LOW_CONTRAST_MARK

    s = make_series(levels=("L4-L5", None))
    _, muscles = summary_tables(s.result)
    assert all(LOW_CONTRAST_MARK not in cell for row in muscles for cell in row)
    level = s.result.levels[0]
    level.measurements["psoas_left"] = dataclasses.replace(level.measurements["psoas_left"], outline_contrast=0.1)
    level.measurements["psoas_right"] = dataclasses.replace(level.measurements["psoas_right"], outline_contrast=0.9)
    _, muscles = summary_tables(s.result)
    assert muscles[1][1] == f"901{LOW_CONTRAST_MARK} / 20" and muscles[1][2] == "951 / 20"
    assert render_summary(s.result).size[0] > 0


def test_a_muscle_cut_by_the_field_of_view_is_marked_as_a_lower_bound() -> None:
    import dataclasses

    from node.encode.overlay import CUT_MARK, LOW_CONTRAST_MARK

    s = make_series(levels=("L4-L5", None))
    level = s.result.levels[0]
    level.measurements["psoas_left"] = dataclasses.replace(
        level.measurements["psoas_left"], outline_contrast=0.1, at_image_edge=True
    )
    _, muscles = summary_tables(s.result)
    assert muscles[1][1] == f"{CUT_MARK}901{LOW_CONTRAST_MARK} / 20" and muscles[1][2] == "951 / 20"
    assert all(not cell.startswith(CUT_MARK) for row in muscles[2:] for cell in row)
    assert render_summary(s.result).size[0] > 0
