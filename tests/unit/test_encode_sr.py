"""TID 1500 SR: read back with highdicom and pydicom (strict) gives the same numbers."""

from __future__ import annotations

import io

import highdicom as hd
import pydicom
import pytest
from encode_synthetic import make_series
from pydicom import config
from pydicom.dataset import Dataset

from node.encode import codes, encode_series


@pytest.fixture(autouse=True)
def strict_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _report(flags: list[str] | None = None) -> tuple[object, object, hd.sr.Comprehensive3DSR]:
    s = make_series(levels=("L4-L5", None))
    if flags is not None:
        s.result.flags[:] = flags
    out = encode_series(s.datasets, s.volume, s.result, include_overlay=False, include_summary=False)
    assert out.sr is not None
    return s, out, hd.sr.Comprehensive3DSR.from_dataset(_roundtrip(out.sr))


def _groups_by_id(sr: hd.sr.Comprehensive3DSR) -> dict[str, object]:
    return {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}


def test_measurements_read_back_exactly() -> None:
    s, out, sr = _report()
    groups = _groups_by_id(sr)
    for lv in s.result.levels:  # type: ignore[attr-defined]
        name = lv.level or f"level {lv.position} from caudal, unlabelled"
        for key, m in lv.measurements.items():
            if key == "spinal_canal":
                continue
            g = groups[f"{name} {key}"]
            values = {x.name.value: (x.value, x.unit.value) for x in g.get_measurements()}  # type: ignore[attr-defined]
            assert values[codes.AREA.value] == (pytest.approx(m.csa_mm2), "mm2")
            if m.fcsa_mm2 is not None:
                assert values[codes.FCSA.value] == (pytest.approx(m.fcsa_mm2), "mm2")
                assert values[codes.FAT_FRACTION.value] == (pytest.approx(m.fat_fraction_pct), "%")
                assert values[codes.T2_SIGNAL.value] == (pytest.approx(m.mean_si), "[arb'U]")
            if m.outline_contrast is not None:
                assert values[codes.OUTLINE_CONTRAST.value] == (pytest.approx(m.outline_contrast), "{ratio}")
            else:
                assert codes.OUTLINE_CONTRAST.value not in values
        canal = groups[f"{name} spinal canal"]
        values = {x.name.value: x.value for x in canal.get_measurements()}  # type: ignore[attr-defined]
        assert values[codes.DSCA.value] == pytest.approx(lv.stenosis.dsca_mm2)
        assert values[codes.CANAL_AREA.value] == pytest.approx(lv.measurements["spinal_canal"].csa_mm2)
        assert values[codes.LEVEL_CONFIDENCE.value] == pytest.approx(lv.level_confidence)


def test_qualitative_evaluations_and_codes() -> None:
    s, out, sr = _report()
    groups = _groups_by_id(sr)
    first, second = s.result.levels  # type: ignore[attr-defined]
    g = groups["L4-L5 spinal canal"]
    evals = {q.name.value: q.value for q in g.get_qualitative_evaluations()}  # type: ignore[attr-defined]
    assert evals[codes.SCHIZAS_GRADE.value].value == codes.SCHIZAS_VALUES[first.stenosis.schizas].value
    assert evals[codes.DSCA_GRADE.value].value == codes.DSCA_VALUES[first.stenosis.dsca_grade].value
    assert evals[codes.CANAL_CONTENT.value].value == "ROOTLETS"
    # CID 3832 severity: the synthetic level 1 is Schizas A with a relative DSCA -> Mild
    assert evals[codes.SEVERITY.value].value == "255604002"
    g2 = groups["level 2 from caudal, unlabelled spinal canal"]
    evals2 = {q.name.value: q.value.value for q in g2.get_qualitative_evaluations()}  # type: ignore[attr-defined]
    assert evals2[codes.SEVERITY.value] == "6736007"  # Schizas B -> Moderate
    kjaer = {q.name.value: q.value.value for q in groups["L4-L5 multifidus_left"].get_qualitative_evaluations()}  # type: ignore[attr-defined]
    assert kjaer[codes.KJAER_GRADE.value] == "KJAER-1"


def test_finding_sites_laterality_and_segment_references() -> None:
    s, out, sr = _report()
    groups = _groups_by_id(sr)
    g = groups["L4-L5 psoas_left"]
    site = g.finding_sites[0]  # type: ignore[attr-defined]
    assert site.value.value == "243923001"
    lat = [item for item in site.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "272741003"]
    assert lat[0].ConceptCodeSequence[0].CodeValue == "7771000"
    assert g.finding_type.value == "68455001"  # type: ignore[attr-defined]
    unnamed = groups["level 2 from caudal, unlabelled dural_sac"]
    assert unnamed.finding_sites[0].value.value == codes.LUMBAR_SPINE.value  # type: ignore[attr-defined]
    ref = g.referenced_segment  # type: ignore[attr-defined]
    assert ref.referenced_sop_instance_uid == out.seg.SOPInstanceUID  # type: ignore[attr-defined]
    by_label = {spec.text: spec.number for spec in out.segments}  # type: ignore[attr-defined]
    assert list(ref.referenced_segment_numbers) == [by_label["Psoas major left"]]
    level_uids = {s.volume.slice_uids[i] for i in s.result.levels[0].slice_indices}  # type: ignore[attr-defined]
    sources = {img.referenced_sop_instance_uid for img in ref.source_images_for_segmentation}
    assert sources == level_uids  # only the level's own slices: the SR stays small


def test_report_identity_and_algorithm() -> None:
    s, out, sr = _report()
    ds = out.sr  # type: ignore[attr-defined]
    assert ds.SeriesDescription == "AI Lumbar Report"
    assert ds.StudyInstanceUID == s.datasets[0].StudyInstanceUID  # type: ignore[attr-defined]
    assert ds.PatientName == s.datasets[0].PatientName  # type: ignore[attr-defined]
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert groups
    for g in groups:
        names = [str(node.TextValue) for node in g[0].ContentSequence if "TextValue" in node
                 and node.ConceptNameCodeSequence[0].CodeValue == "111001"]
        assert names == ["lumbar-unet"]
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == codes.PRIVATE_SCHEME


def _report_evaluations(ds: Dataset) -> list[Dataset]:
    return [item for item in ds.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value]


def test_plausibility_warnings_are_text_items_of_the_report() -> None:
    flags = ["L4-L5: psoas_left outline has little contrast", "slice 3: the column refiner changed 9 of 10 pixels"]
    _s, out, sr = _report(flags)
    ds = _roundtrip(out.sr)  # type: ignore[attr-defined]
    (container,) = _report_evaluations(ds)
    last = ds.ContentSequence[-1].ConceptNameCodeSequence[0]  # after the imaging measurements
    assert last.CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    assert container.ValueType == "CONTAINER" and container.RelationshipType == "CONTAINS"
    assert container.ConceptNameCodeSequence[0].CodingSchemeDesignator == "UMLS"
    items = [(i.ValueType, i.RelationshipType, i.ConceptNameCodeSequence[0].CodeValue, i.TextValue)
             for i in container.ContentSequence]
    assert items == [("TEXT", "CONTAINS", codes.PLAUSIBILITY_WARNING.value, f) for f in flags]
    assert sr.content.get_volumetric_roi_measurement_groups()  # highdicom still reads the report


def test_no_warnings_no_evaluations_container() -> None:
    _s, out, _sr = _report([])
    assert _report_evaluations(out.sr) == []  # type: ignore[attr-defined]
