"""Provenance: every SEG segment and SR measurement names the model that produced it.

The pipeline runs four models (``SeriesResult.models``): the segmentation model, the column
refiner (disc or vertebral body), the canal refiner (dural sac, epidural space) and the
stenosis grader (Schizas grades). Read back
with pydicom (strict) and highdicom; a model that did not run falls back to the
segmentation model with outputs identical to a result that lists no models.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
from collections.abc import Iterable

import highdicom as hd
import pydicom
import pytest
from encode_synthetic import SyntheticSeries, make_series
from pydicom import config
from pydicom.dataset import Dataset

from ai.labels import Label
from ai.results import InferenceSettings
from node.encode import codes, encode_series

NOW = dt.datetime(2026, 1, 1, 12)
SEG_MODEL = ("lumbar-unet", "1.0.0")  # make_result's segmentation model
REFINER = ("lumbar-canal-refiner", "1.2.0")
COLUMN = ("lumbar-column-refiner", "1.0.0")
GRADER = ("lumbar-stenosis-grader", "1.0.0")
ALGORITHM_NAME = "111001"  # DCM Algorithm Name (TID 4019)
ALGORITHM_VERSION = "111003"  # DCM Algorithm Version
ALGORITHM_PARAMETERS = "111002"  # DCM Algorithm Parameters
TRACKING_IDENTIFIER = "112039"


@pytest.fixture(autouse=True)
def strict_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)


def _model(role: str, name_version: tuple[str, str]) -> dict[str, str]:
    return {"role": role, "name": name_version[0], "version": name_version[1]}


ALL_MODELS = [
    _model("segmentation", SEG_MODEL),
    _model("column refinement", COLUMN),
    _model("canal refinement", REFINER),
    _model("stenosis grading", GRADER),
]
#: segment label -> the model it must name when all models ran (others: SEG_MODEL)
REFINED_SEGMENTS = {"Dural sac": REFINER, "Epidural space": REFINER}


def _series(models: list[dict[str, str]]) -> SyntheticSeries:
    s = make_series(levels=("L4-L5", None))
    labels = s.result.labels.copy()
    # epidural space behind the sac on every slice (the synthetic map has none)
    behind = labels[:, 34:36, 28:36]
    behind[behind == 0] = int(Label.EPIDURAL_SPACE)
    assert (labels == int(Label.EPIDURAL_SPACE)).any()
    s.result = dataclasses.replace(s.result, labels=labels, models=models)
    return s


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _roundtrip(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(_bytes(ds)))


def _written(models: list[dict[str, str]]) -> tuple[bytes, bytes]:
    s = _series(models)
    out = encode_series(s.datasets, s.volume, s.result, include_overlay=False, now=NOW)
    assert out.seg is not None and out.sr is not None
    return _bytes(out.seg), _bytes(out.sr)


def _encode(models: list[dict[str, str]]) -> tuple[Dataset, Dataset]:
    seg, sr = _written(models)
    return pydicom.dcmread(io.BytesIO(seg)), pydicom.dcmread(io.BytesIO(sr))


def _segments(seg: Dataset) -> dict[str, Dataset]:
    return {str(item.SegmentLabel): item for item in seg.SegmentSequence}


def _segment_model(item: Dataset) -> tuple[str, str]:
    """The model a segment names, checking the Segment Description Macro on the way."""
    assert item.SegmentAlgorithmType == "AUTOMATIC"
    (algo,) = item.SegmentationAlgorithmIdentificationSequence
    family = algo.AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
    assert item.SegmentAlgorithmName == algo.AlgorithmName
    return str(algo.AlgorithmName), str(algo.AlgorithmVersion)


def _texts(items: Iterable[Dataset], concept: str) -> list[str]:
    return [
        str(i.TextValue)
        for i in items
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == concept
    ]


def _named(items: Iterable[Dataset]) -> tuple[str, str] | None:
    """The TID 4019 algorithm directly in ``items`` (None when there is none)."""
    items = list(items)
    names, versions = _texts(items, ALGORITHM_NAME), _texts(items, ALGORITHM_VERSION)
    assert len(names) == len(versions) <= 1
    return (names[0], versions[0]) if names else None


def _groups(sr: Dataset) -> dict[str, list[Dataset]]:
    """Content items of every measurement group, by tracking identifier."""
    (container,) = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"
                    and i.ConceptNameCodeSequence[0].CodeValue == "126010"]  # Imaging Measurements
    out = {}
    for group in container.ContentSequence:
        (tracking,) = _texts(group.ContentSequence, TRACKING_IDENTIFIER)
        out[tracking] = list(group.ContentSequence)
    return out


def _measurement_models(group: list[Dataset]) -> dict[str, tuple[str, str] | None]:
    """Per NUM item (by concept code value) the algorithm it names itself."""
    return {
        str(i.ConceptNameCodeSequence[0].CodeValue): _named(i.get("ContentSequence", []))
        for i in group
        if i.ValueType == "NUM"
    }


def _expected_segment_model(text: str) -> tuple[str, str]:
    if text.startswith("Intervertebral disc") or text.startswith("Vertebral body"):
        return COLUMN
    return REFINED_SEGMENTS.get(text, SEG_MODEL)


def test_seg_names_the_refiners_for_their_segments_and_the_segmentation_model_otherwise() -> None:
    seg, _ = _encode(ALL_MODELS)
    by_label = _segments(seg)
    assert _segment_model(by_label["Dural sac"]) == REFINER
    assert _segment_model(by_label["Epidural space"]) == REFINER
    assert _segment_model(by_label["Multifidus left"]) == SEG_MODEL
    assert _segment_model(by_label["Intervertebral disc L4-L5"]) == COLUMN
    for text, item in by_label.items():
        assert _segment_model(item) == _expected_segment_model(text), text
    # highdicom reads the per-segment algorithm identification back as well
    back = hd.seg.Segmentation.from_dataset(seg)
    for number in back.segment_numbers:
        desc = back.get_segment_description(number)
        algo = desc.algorithm_identification
        assert algo is not None
        expected = _expected_segment_model(desc.segment_label)
        assert (algo[0].AlgorithmName, algo[0].AlgorithmVersion) == expected


@pytest.mark.parametrize(
    "models",
    [
        [_model("segmentation", SEG_MODEL)],
        [_model("segmentation", SEG_MODEL), _model("stenosis grading", GRADER)],
    ],
    ids=["segmentation only", "no refiner"],
)
def test_seg_without_refiner_names_the_segmentation_model_everywhere(
    models: list[dict[str, str]],
) -> None:
    seg, _ = _encode(models)
    reference, _ = _encode([])
    for item in seg.SegmentSequence:
        assert _segment_model(item) == SEG_MODEL, item.SegmentLabel
    # same segment descriptions as a result that lists no models
    assert seg.SegmentSequence == reference.SegmentSequence


def test_sr_names_the_grader_for_grading_and_the_refiner_for_canal_areas() -> None:
    _, sr = _encode(ALL_MODELS)
    groups = _groups(sr)
    canal = groups["L4-L5 spinal canal"]
    # the group (and so its Schizas / severity / content evaluations) is the grader's
    assert _named(canal) == GRADER
    own = _measurement_models(canal)
    assert own[codes.GRADE_CONFIDENCE.value] is None  # the group's: the grader
    assert own[codes.ROOTLETS_PROBABILITY.value] is None
    assert own[codes.DSCA.value] == REFINER
    assert own[codes.CANAL_AREA.value] == REFINER
    assert own[codes.LEVEL_CONFIDENCE.value] == SEG_MODEL
    assert all(own[code.value] == SEG_MODEL for code in codes.ASYMMETRY.values())
    # the dural sac group is the refiner's, a muscle group the segmentation model's
    assert _named(groups["L4-L5 dural_sac"]) == REFINER
    assert _named(groups["L4-L5 multifidus_left"]) == SEG_MODEL
    assert set(_measurement_models(groups["L4-L5 multifidus_left"]).values()) == {None}
    assert _named(groups["L4-L5 disc"]) == COLUMN
    assert _named(groups["level 2 from caudal, unlabelled spinal canal"]) == GRADER
    # highdicom still reads the report as TID 1500 with every measurement
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    read = report.content.get_volumetric_roi_measurement_groups()  # type: ignore[attr-defined]
    assert {g.tracking_identifier for g in read} == set(groups)


def test_sr_without_refiner_gives_canal_areas_to_the_segmentation_model() -> None:
    _, sr = _encode([_model("segmentation", SEG_MODEL), _model("stenosis grading", GRADER)])
    groups = _groups(sr)
    canal = groups["L4-L5 spinal canal"]
    assert _named(canal) == GRADER
    own = _measurement_models(canal)
    assert own[codes.DSCA.value] == SEG_MODEL
    assert own[codes.CANAL_AREA.value] == SEG_MODEL
    assert own[codes.GRADE_CONFIDENCE.value] is None
    assert _named(groups["L4-L5 dural_sac"]) == SEG_MODEL


def test_sr_without_grader_names_the_segmentation_model_for_the_canal_group() -> None:
    s = _series([_model("segmentation", SEG_MODEL), _model("canal refinement", REFINER)])
    levels = [dataclasses.replace(lv, stenosis=None) for lv in s.result.levels]
    result = dataclasses.replace(s.result, levels=levels)
    out = encode_series(s.datasets, s.volume, result, include_overlay=False, now=NOW)
    assert out.sr is not None
    canal = _groups(_roundtrip(out.sr))["L4-L5 spinal canal"]
    assert _named(canal) == SEG_MODEL
    own = _measurement_models(canal)
    assert codes.GRADE_CONFIDENCE.value not in own
    assert own[codes.CANAL_AREA.value] == REFINER
    assert own[codes.LEVEL_CONFIDENCE.value] is None


def test_segmentation_model_only_gives_the_same_outputs_as_no_models_listed() -> None:
    """The fallback changes nothing: same bytes as a result without ``models``."""
    written = _written([_model("segmentation", SEG_MODEL)])
    assert written == _written([])
    sr = pydicom.dcmread(io.BytesIO(written[1]))
    for group in _groups(sr).values():
        assert _named(group) == SEG_MODEL
        assert set(_measurement_models(group).values()) == {None}


def _with_settings(s: SyntheticSeries, settings: InferenceSettings | None) -> SyntheticSeries:
    s.result = dataclasses.replace(s.result, inference=settings)
    return s


ONE_PASS = InferenceSettings(device="cpu", precision="bfloat16", mirror=False)
MIRRORED = dataclasses.replace(ONE_PASS, mirror=True)


def _encoded_with(settings: InferenceSettings | None) -> tuple[Dataset, Dataset, str]:
    s = _with_settings(_series(ALL_MODELS), settings)
    out = encode_series(s.datasets, s.volume, s.result, include_overlay=False, now=NOW)
    assert out.seg is not None and out.sr is not None
    return _roundtrip(out.seg), _roundtrip(out.sr), str(out.seg.SeriesInstanceUID)


def _parameters(items: Iterable[Dataset]) -> list[str]:
    return _texts(items, ALGORITHM_PARAMETERS)


def test_segmentation_model_states_how_it_ran_in_seg_and_sr() -> None:
    """The mirror pass and precision change the masks, so both objects carry them as the
    segmentation model's Algorithm Parameters; refiners and the grader carry none."""
    seg, sr, _ = _encoded_with(MIRRORED)
    expected = ["device=cpu", "precision=bfloat16", "mirror=on"]
    for item in seg.SegmentSequence:
        (algo,) = item.SegmentationAlgorithmIdentificationSequence
        if _segment_model(item) == SEG_MODEL:
            assert algo.AlgorithmParameters == ", ".join(expected), item.SegmentLabel
        else:
            assert "AlgorithmParameters" not in algo, item.SegmentLabel
    groups = _groups(sr)
    assert _parameters(groups["L4-L5 multifidus_left"]) == expected
    assert _parameters(groups["L4-L5 dural_sac"]) == []  # the refiner's group
    assert _parameters(groups["L4-L5 spinal canal"]) == []  # the grader's group
    level_confidence = next(
        i for i in groups["L4-L5 spinal canal"]
        if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == codes.LEVEL_CONFIDENCE.value
    )
    assert _parameters(level_confidence.ContentSequence) == expected


def test_mirrored_analysis_gets_its_own_output_uids() -> None:
    """Different masks must never reach a PACS under UIDs it already holds; a result from
    before the settings were recorded keeps its UIDs."""
    _, _, one_pass = _encoded_with(ONE_PASS)
    _, _, mirrored = _encoded_with(MIRRORED)
    _, _, unrecorded = _encoded_with(None)
    assert mirrored != one_pass
    assert one_pass == unrecorded
