"""The SR assembled by ``node.encode.sr`` equals the one highdicom's ``Comprehensive3DSR``
built before (the reference path is kept here), attribute by attribute and through the
whole content tree; and the content pre-encoder writes what pydicom writes.

Differences by design, checked explicitly: dates/times of creation, the file meta
implementation UID/name (pydicom's, as for the SEG), and the "Acquisition Equipment" item
of the Contributing Equipment Sequence (the source scanner, where highdicom described our
SEG because it was the first evidence instance).
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from encode_synthetic import SyntheticSeries, make_result, make_series
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes as dcodes
from pydicom.uid import SegmentationStorage

from ai.labels import Label
from ai.results import LevelResult, SeriesResult, StructureMeasurement
from ai.volume import Volume
from node.encode import codes, sr_dataset
from node.encode.common import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    copy_patient_study,
    private_scheme_identification,
)
from node.encode.seg import SegmentSpec, build_seg, plan_segments
from node.encode.sr import _LATERALITY, _segment_for, build_sr, level_name
from node.encode.uids import SERIES_DESCRIPTION, OutputIdentity, series_number
from node.volume_io import volume_from_datasets

#: Top-level attributes that legitimately differ between two builds.
_CREATION_TIMES = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"}


@pytest.fixture(autouse=True)
def strict_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)


# --- the reference: node/encode/sr.py as it was with highdicom's Comprehensive3DSR -------------


def _ref_measurements(m: StructureMeasurement) -> list[hd.sr.Measurement]:
    out = [hd.sr.Measurement(name=codes.AREA, value=m.csa_mm2, unit=codes.UNIT_MM2)]
    if m.fcsa_mm2 is not None:
        out.append(hd.sr.Measurement(name=codes.FCSA, value=m.fcsa_mm2, unit=codes.UNIT_MM2))
    if m.fat_fraction_pct is not None:
        out.append(hd.sr.Measurement(name=codes.FAT_FRACTION, value=m.fat_fraction_pct,
                                     unit=codes.UNIT_PERCENT))
    if m.mean_si is not None:
        out.append(hd.sr.Measurement(name=codes.T2_SIGNAL, value=m.mean_si,
                                     unit=codes.UNIT_ARBITRARY, derivation=codes.MEAN))
    if m.si_ratio_to_fat is not None:
        out.append(hd.sr.Measurement(name=codes.SI_RATIO_TO_FAT, value=m.si_ratio_to_fat,
                                     unit=codes.UNIT_RATIO))
    if m.outline_contrast is not None:
        out.append(hd.sr.Measurement(name=codes.OUTLINE_CONTRAST, value=m.outline_contrast,
                                     unit=codes.UNIT_RATIO))
    return out


class _RefContext:
    def __init__(self, sources: dict[str, Dataset], volume: Volume, seg: Dataset,
                 specs: Sequence[SegmentSpec], result: SeriesResult, identity: OutputIdentity) -> None:
        self.sources, self.volume, self.seg, self.specs, self.identity = sources, volume, seg, specs, identity
        self.algorithm = hd.sr.AlgorithmIdentification(name=result.model_name, version=result.model_version)

    def referenced_segment(self, spec: SegmentSpec, lv: LevelResult) -> hd.sr.ReferencedSegment:
        slices = [i for i in lv.slice_indices if spec.slices is None or i in spec.slices]
        if not slices:
            slices = list(spec.slices or lv.slice_indices)
        return hd.sr.ReferencedSegment(
            sop_class_uid=SegmentationStorage, sop_instance_uid=str(self.seg.SOPInstanceUID),
            segment_number=spec.number, source_images=[self.source_image(i) for i in slices],
        )

    def source_image(self, index: int) -> hd.sr.SourceImageForSegmentation:
        uid = self.volume.slice_uids[index]
        src = self.sources[uid]
        frames = None
        if int(getattr(src, "NumberOfFrames", 1) or 1) > 1:
            frames = [self.volume.frame_numbers[index]]
        return hd.sr.SourceImageForSegmentation(
            referenced_sop_class_uid=str(src.SOPClassUID), referenced_sop_instance_uid=uid,
            referenced_frame_numbers=frames,
        )

    def tracking(self, text: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=self.identity.tracking_uid(text), identifier=text[:64])


def _ref_structure_group(ctx: _RefContext, lv: LevelResult, key: str, m: StructureMeasurement) -> Any:
    label = codes.STRUCTURE_LABEL.get(key)
    if label is None:
        return None
    spec = _segment_for(ctx.specs, label, lv)
    if spec is None:
        return None
    laterality = next((code for suffix, code in _LATERALITY.items() if key.endswith(suffix)), None)
    qualitative = []
    if key in lv.kjaer_grade and lv.kjaer_grade[key] in codes.KJAER_VALUES:
        qualitative.append(hd.sr.QualitativeEvaluation(codes.KJAER_GRADE, codes.KJAER_VALUES[lv.kjaer_grade[key]]))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=ctx.tracking(f"{level_name(lv)} {key}"),
        referenced_segment=ctx.referenced_segment(spec, lv),
        finding_type=spec.property_type, method=codes.MEASUREMENT_METHOD, algorithm_id=ctx.algorithm,
        finding_sites=[hd.sr.FindingSite(codes.level_site(lv.level), laterality=laterality)],
        measurements=_ref_measurements(m), qualitative_evaluations=qualitative or None,
    )


def _ref_level_group(ctx: _RefContext, lv: LevelResult) -> Any:
    spec = _segment_for(ctx.specs, Label.DURAL_SAC, lv)
    if spec is None:
        return None
    measurements = [hd.sr.Measurement(name=codes.LEVEL_CONFIDENCE, value=lv.level_confidence, unit=codes.UNIT_ONE)]
    qualitative: list[hd.sr.QualitativeEvaluation] = []
    st = lv.stenosis
    if st is not None:
        severity = codes.SEVERITY_VALUES[st.severity]
        if st.schizas == "A" and st.dsca_grade == "normal":
            severity = codes.NORMAL
        qualitative += [
            hd.sr.QualitativeEvaluation(codes.SEVERITY, severity),
            hd.sr.QualitativeEvaluation(codes.SCHIZAS_GRADE, codes.SCHIZAS_VALUES[st.schizas]),
            hd.sr.QualitativeEvaluation(codes.DSCA_GRADE, codes.DSCA_VALUES[st.dsca_grade]),
            hd.sr.QualitativeEvaluation(codes.CANAL_CONTENT, codes.CANAL_CONTENT_VALUES[st.rootlets]),
        ]
        measurements += [
            hd.sr.Measurement(name=codes.DSCA, value=st.dsca_mm2, unit=codes.UNIT_MM2),
            hd.sr.Measurement(name=codes.GRADE_CONFIDENCE, value=st.confidence, unit=codes.UNIT_ONE),
            hd.sr.Measurement(name=codes.ROOTLETS_PROBABILITY, value=st.rootlets_probability, unit=codes.UNIT_ONE),
        ]
    canal = lv.measurements.get("spinal_canal")
    if canal is not None:
        measurements.append(hd.sr.Measurement(name=codes.CANAL_AREA, value=canal.csa_mm2, unit=codes.UNIT_MM2))
    for pair, value in sorted(lv.asymmetry_pct.items()):
        if pair in codes.ASYMMETRY:
            measurements.append(hd.sr.Measurement(name=codes.ASYMMETRY[pair], value=value, unit=codes.UNIT_PERCENT))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=ctx.tracking(f"{level_name(lv)} spinal canal"),
        referenced_segment=ctx.referenced_segment(spec, lv),
        finding_type=codes.VERTEBRAL_CANAL, method=codes.MEASUREMENT_METHOD, algorithm_id=ctx.algorithm,
        finding_sites=[hd.sr.FindingSite(codes.level_site(lv.level))],
        measurements=measurements, qualitative_evaluations=qualitative or None,
    )


def reference_build_sr(sources: Sequence[Dataset], volume: Volume, result: SeriesResult, seg: Dataset,
                       specs: Sequence[SegmentSpec], identity: OutputIdentity) -> Dataset:
    """The SR as ``node.encode.sr.build_sr`` built it with ``hd.sr.Comprehensive3DSR``."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    ctx = _RefContext(by_uid, volume, seg, specs, result, identity)
    groups = []
    for lv in sorted(result.levels, key=lambda lv: lv.position):
        level_group = _ref_level_group(ctx, lv)
        if level_group is not None:
            groups.append(level_group)
        for key, m in lv.measurements.items():
            group = _ref_structure_group(ctx, lv, key, m)
            if group is not None:
                groups.append(group)
    observer = hd.sr.ObserverContext(
        observer_type=dcodes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.uid("device", result.model_name), name=result.model_name,
            manufacturer_name=MANUFACTURER, model_name=f"{result.model_name} {result.model_version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_REPORTED, imaging_measurements=groups,
    )
    if result.flags:  # TID 1500 rows 12 / 14, added to the tree as build_sr does
        container = hd.sr.ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS,
                                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence([
            hd.sr.TextContentItem(name=codes.PLAUSIBILITY_WARNING, value=flag,
                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            for flag in result.flags])
        report[0].ContentSequence.append(container)
    referenced = {volume.slice_uids[i] for lv in result.levels for i in lv.slice_indices}
    evidence = [seg] + [ds for uid, ds in by_uid.items() if uid in referenced]
    first = by_uid[volume.slice_uids[0]]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=identity.series_uid("sr"),
        series_number=series_number("sr", int(first.SeriesNumber)),
        sop_instance_uid=identity.instance_uid("sr"), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False, series_description=SERIES_DESCRIPTION["sr"],
        manufacturer_model_name=MODEL_NAME, device_serial_number=DEVICE_SERIAL_NUMBER,
    )
    copy_patient_study(first, sr)
    sr.CodingSchemeIdentificationSequence = DicomSequence([private_scheme_identification()])  # type: ignore[assignment]
    return sr


# --- comparison ------------------------------------------------------------------------------


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def differences(a: Dataset, b: Dataset, path: str = "", skip: frozenset[str] = frozenset()) -> list[str]:
    """Every attribute (recursively through sequences) that differs in VR, value or presence."""
    out: list[str] = []
    tags = sorted(set(a.keys()) | set(b.keys()))
    for tag in tags:
        name = pydicom.datadict.keyword_for_tag(tag) or str(tag)
        if name in skip:
            continue
        where = f"{path}{name}"
        if tag not in a or tag not in b:
            out.append(f"{where}: only in {'new' if tag in a else 'reference'}")
            continue
        ea, eb = a[tag], b[tag]
        if ea.VR != eb.VR:
            out.append(f"{where}: VR {ea.VR} != {eb.VR}")
        elif ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{where}: {len(ea.value)} items != {len(eb.value)}")
                continue
            for k, (ia, ib) in enumerate(zip(ea.value, eb.value, strict=True)):
                out += differences(ia, ib, f"{where}[{k}].")
        elif ea.value != eb.value or str(ea.value) != str(eb.value):
            # str() too: DS values that are equal numbers may still be written differently
            out.append(f"{where}: {ea.value!r} != {eb.value!r}")
    return out


def _both(series: SyntheticSeries) -> tuple[Dataset, Dataset, Dataset]:
    identity = OutputIdentity.of(series.volume.series_instance_uid, series.volume.slice_uids,
                                 series.result.model_version)
    seg = build_seg(series.datasets, series.volume, series.result, identity)
    specs = plan_segments(series.result)
    new = build_sr(series.datasets, series.volume, series.result, seg, specs, identity,
                   now=dt.datetime(2026, 1, 2, 3, 4, 5, 678901))
    assert new is not None
    ref = reference_build_sr(series.datasets, series.volume, series.result, seg, specs, identity)
    return _roundtrip(new), _roundtrip(ref), series.datasets[0]


def _assert_equivalent(new: Dataset, ref: Dataset, source: Dataset) -> None:
    assert differences(new, ref, skip=frozenset(_CREATION_TIMES | {"ContributingEquipmentSequence"})) == []
    # file meta: same identity and syntax; the implementation is pydicom's, not highdicom's
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"):
        assert new.file_meta[keyword].value == ref.file_meta[keyword].value
    assert new.file_meta.ImplementationVersionName != ref.file_meta.ImplementationVersionName
    # contributing equipment: highdicom, then (by design) the scanner of the sources
    assert len(new.ContributingEquipmentSequence) == len(ref.ContributingEquipmentSequence) == 2
    scanner, library = new.ContributingEquipmentSequence
    assert differences(library, ref.ContributingEquipmentSequence[1], skip=frozenset({"ContributionDateTime"})) == []
    assert scanner.Manufacturer == source.Manufacturer != ref.ContributingEquipmentSequence[0].Manufacturer
    assert differences(scanner, ref.ContributingEquipmentSequence[0],
                       skip=frozenset({"Manufacturer", "ManufacturerModelName", "DeviceSerialNumber",
                                       "SoftwareVersions"})) == []
    assert new.InstanceCreationDate == "20260102" and new.ContentTime == "030405.678901"


def test_same_as_highdicom_two_levels_one_unlabelled() -> None:
    new, ref, source = _both(make_series(levels=("L4-L5", None)))
    assert len(new.ContentSequence) == len(ref.ContentSequence) > 1
    _assert_equivalent(new, ref, source)


def test_same_as_highdicom_many_slices_and_blocks() -> None:
    # three angled blocks of 7 slices: every group references 7 source images (shared items)
    series = make_series(blocks=((-40.0, 8.0, 7), (0.0, 0.0, 7), (40.0, -6.0, 7)),
                         levels=("L5-S1", "L4-L5", "L3-L4"), with_pixels=False)
    new, ref, source = _both(series)
    _assert_equivalent(new, ref, source)
    assert len(new.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[1]
               .ReferencedSOPSequence) == 21


def test_non_ascii_text_and_character_set() -> None:
    # text that is not ASCII goes through pydicom's own writer with the character set
    series = make_series(levels=("L4-L5", None))
    for ds in series.datasets:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jürgen"
    series.result.model_name = "lümbar-ünet"  # type: ignore[misc]
    new, ref, source = _both(series)
    _assert_equivalent(new, ref, source)
    names = [str(item.TextValue) for item in new.ContentSequence[0:6] if "TextValue" in item]
    assert "lümbar-ünet" in names


def test_reads_back_with_highdicom_and_skips_comprehensive3dsr_init(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Comprehensive3DSR.__init__ must not be used to build the SR")

    monkeypatch.setattr(hd.sr.Comprehensive3DSR, "__init__", refuse)
    series = make_series(levels=("L4-L5", "L3-L4"))
    identity = OutputIdentity.of(series.volume.series_instance_uid, series.volume.slice_uids, "1.0.0")
    seg = build_seg(series.datasets, series.volume, series.result, identity)
    sr = build_sr(series.datasets, series.volume, series.result, seg, plan_segments(series.result), identity)
    assert sr is not None
    doc = hd.sr.Comprehensive3DSR.from_dataset(_roundtrip(sr))
    groups = doc.content.get_volumetric_roi_measurement_groups()  # type: ignore[attr-defined]
    assert {g.tracking_identifier for g in groups} >= {"L4-L5 spinal canal", "L3-L4 psoas_left"}
    evidence = {uid for _study, _series, uid, _cls in doc.get_evidence()}
    assert str(seg.SOPInstanceUID) in evidence
    # the in-memory dataset gives the content tree too (pydicom parses the raw element)
    assert sr.ContentSequence[0].ConceptNameCodeSequence[0].CodeValue == "121049"


def _content_item() -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "NUM"
    item.ReferencedFrameNumber = [1, 12]
    item.ReferencedSegmentNumber = 3
    item.FloatingPointValue = 0.1
    item.NumericValue = "47.0400000000000"
    item.TextValue = "odd"
    item.UID = "1.2.3"
    item.PersonName = "Jürgen^Müller"
    item.Date = "20260101"
    item.ConceptNameCodeSequence = DicomSequence([Dataset()])
    item.ConceptNameCodeSequence[0].CodeValue = "x"
    item.ConceptNameCodeSequence[0].CodeMeaning = "Grüße"
    return item


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_encode_dataset_matches_pydicom_writer(charset: str) -> None:
    # a fresh item per character set: pydicom's PersonName keeps its first encoding
    raw = sr_dataset.raw_content_sequence([_content_item()], charset)
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds[raw.tag] = raw
    ds.set_original_encoding(False, True, charset)
    ref = Dataset()
    ref.SpecificCharacterSet = charset
    ref.ContentSequence = DicomSequence([_content_item()])
    new, expected = _roundtrip(_with_meta(ds)), _roundtrip(_with_meta(ref))
    assert differences(new, expected) == []
    assert new.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning == "Grüße"


def _with_meta(ds: Dataset) -> Dataset:
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_same_as_highdicom_for_an_enhanced_mr_source() -> None:
    """A multi-frame source: the source image references carry frame numbers."""
    base = make_series(blocks=((0.0, 0.0, 4),), levels=("L4-L5",))
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=base.datasets, series_instance_uid=hd.UID(), series_number=7,
        sop_instance_uid=hd.UID(), instance_number=1,
    )
    enhanced.Manufacturer = "Synthetic"
    volume, sources = volume_from_datasets([_roundtrip(enhanced)])
    assert len(set(volume.slice_uids)) == 1 and volume.n_slices == 4
    # the volume's frame order, as indices of the original slices (matched by position)
    order = [int(np.argmin(np.abs(base.volume.positions[:, 2] - z))) for z in volume.positions[:, 2]]
    assert sorted(order) == [0, 1, 2, 3]
    result = make_result(volume.series_instance_uid, base.result.labels[order], [list(range(4))], ["L4-L5"])
    new, ref, _source = _both(SyntheticSeries(sources, volume, result))
    _assert_equivalent(new, ref, sources[0])
    (measurements,) = [i for i in new.ContentSequence if i.ValueType == "CONTAINER"
                       and i.ConceptNameCodeSequence[0].CodeValue == "126010"]  # Imaging Measurements
    refs = [
        item.ReferencedSOPSequence[0]
        for group in measurements.ContentSequence
        for item in group.ContentSequence
        if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121233"
    ]
    assert {str(r.ReferencedSOPInstanceUID) for r in refs} == set(volume.slice_uids)
    assert {int(r.ReferencedFrameNumber) for r in refs} == {1, 2, 3, 4}


def test_implicit_vr_and_deflated_writes_give_the_same_dataset() -> None:
    """The pre-encoded content is Explicit VR: other syntaxes re-encode it (export may
    negotiate Implicit VR Little Endian, or deflate)."""
    series = make_series(levels=("L4-L5", None))
    identity = OutputIdentity.of(series.volume.series_instance_uid, series.volume.slice_uids, "1.0.0")
    seg = build_seg(series.datasets, series.volume, series.result, identity)
    specs = plan_segments(series.result)
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    reference = build_sr(series.datasets, series.volume, series.result, seg, specs, identity, now=now)
    assert reference is not None
    explicit = _roundtrip(reference)
    for syntax in (pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.DeflatedExplicitVRLittleEndian):
        sr = build_sr(series.datasets, series.volume, series.result, seg, specs, identity, now=now)
        assert sr is not None
        sr.file_meta.TransferSyntaxUID = syntax
        other = _roundtrip(sr)
        assert other.file_meta.TransferSyntaxUID == syntax
        assert differences(other, explicit) == []
