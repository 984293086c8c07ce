"""Comprehensive 3D SR with a TID 1500 Measurement Report of one analysed series.

Content (PS3.16 TID 1500):

* procedure reported, observer = the algorithm as a device, TID 4019 algorithm
  identification in every measurement group;
* per level and structure one volumetric measurement group (TID 1411): tracking
  identifier and UID, finding type = the structure's code, finding site = the level (and
  the laterality), CSA, FCSA, fat fraction, mean T2 signal, signal ratio to fat, the
  measurement method, and a reference to the SEG segment restricted to the level's frames
  with its source images;
* per level one group for the spinal canal with the qualitative evaluations: stenosis
  severity (CID 3832), Schizas grade and DSCA grade (``99LUMBAR``), rootlets or cord,
  and the level naming confidence.

Levels the analysis could not name are reported as "level N from caudal, unlabelled" with
the lumbar spine as finding site, never with a guessed level.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes as dcodes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from ai.labels import Label
from ai.results import LevelResult, SeriesResult, StructureMeasurement
from ai.volume import Volume
from node.encode import codes
from node.encode.common import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    copy_patient_study,
    private_scheme_identification,
)
from node.encode.seg import SegmentSpec
from node.encode.uids import SERIES_DESCRIPTION, OutputIdentity, series_number

logger = logging.getLogger(__name__)

#: Laterality of a structure key (suffix convention of ai.labels.STRUCTURES).
_LATERALITY: dict[str, Code] = {"_left": codes.LEFT, "_right": codes.RIGHT}


def level_name(lv: LevelResult) -> str:
    """How a level is named in tracking identifiers and text."""
    if lv.level is not None:
        return lv.level
    return f"level {lv.position} from caudal, unlabelled"


def frame_number(spec: SegmentSpec, slice_index: int, n_slices: int) -> int:
    """1-based SEG frame number of a segment on a slice (segment-major layout of seg.py)."""
    return (spec.number - 1) * n_slices + slice_index + 1


def _segment_for(specs: Sequence[SegmentSpec], label: Label, lv: LevelResult) -> SegmentSpec | None:
    """The segment holding ``label`` at this level (the level's own disc segment if any)."""
    candidates = [s for s in specs if s.label == label]
    if label == Label.DISC:
        own = [
            s for s in candidates if s.slices is not None and set(s.slices) & set(lv.slice_indices)
        ]
        candidates = own or candidates
    return candidates[0] if candidates else None


def _measurements(m: StructureMeasurement) -> list[hd.sr.Measurement]:
    out = [hd.sr.Measurement(name=codes.AREA, value=m.csa_mm2, unit=codes.UNIT_MM2)]
    if m.fcsa_mm2 is not None:
        out.append(hd.sr.Measurement(name=codes.FCSA, value=m.fcsa_mm2, unit=codes.UNIT_MM2))
    if m.fat_fraction_pct is not None:
        out.append(
            hd.sr.Measurement(
                name=codes.FAT_FRACTION, value=m.fat_fraction_pct, unit=codes.UNIT_PERCENT
            )
        )
    if m.mean_si is not None:
        out.append(
            hd.sr.Measurement(
                name=codes.T2_SIGNAL,
                value=m.mean_si,
                unit=codes.UNIT_ARBITRARY,
                derivation=codes.MEAN,
            )
        )
    if m.si_ratio_to_fat is not None:
        out.append(
            hd.sr.Measurement(
                name=codes.SI_RATIO_TO_FAT, value=m.si_ratio_to_fat, unit=codes.UNIT_RATIO
            )
        )
    return out


class _Context:
    """What every group needs: sources, SEG identity, segments, the algorithm."""

    def __init__(
        self,
        sources: dict[str, Dataset],
        volume: Volume,
        seg: Dataset,
        specs: Sequence[SegmentSpec],
        result: SeriesResult,
        identity: OutputIdentity,
    ) -> None:
        self.sources = sources
        self.volume = volume
        self.seg = seg
        self.specs = specs
        self.identity = identity
        self.algorithm = hd.sr.AlgorithmIdentification(
            name=result.model_name, version=result.model_version
        )

    def referenced_segment(self, spec: SegmentSpec, lv: LevelResult) -> hd.sr.ReferencedSegment:
        slices = [i for i in lv.slice_indices if spec.slices is None or i in spec.slices]
        if not slices:
            slices = list(spec.slices or lv.slice_indices)
        return hd.sr.ReferencedSegment(
            sop_class_uid=SegmentationStorage,
            sop_instance_uid=str(self.seg.SOPInstanceUID),
            segment_number=spec.number,
            # no frame numbers: dciodvfy rejects Referenced Segment Number together with
            # Referenced Frame Number; the source images keep the reference small
            source_images=[self.source_image(i) for i in slices],
        )

    def source_image(self, index: int) -> hd.sr.SourceImageForSegmentation:
        uid = self.volume.slice_uids[index]
        src = self.sources[uid]
        frames = None
        if int(getattr(src, "NumberOfFrames", 1) or 1) > 1:
            frames = [self.volume.frame_numbers[index]]
        return hd.sr.SourceImageForSegmentation(
            referenced_sop_class_uid=str(src.SOPClassUID),
            referenced_sop_instance_uid=uid,
            referenced_frame_numbers=frames,
        )

    def tracking(self, text: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=self.identity.tracking_uid(text), identifier=text[:64])


def _structure_group(
    ctx: _Context, lv: LevelResult, key: str, m: StructureMeasurement
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | None:
    label = codes.STRUCTURE_LABEL.get(key)
    if label is None:
        return None
    spec = _segment_for(ctx.specs, label, lv)
    if spec is None:
        logger.warning(
            "no segment for %s at %s of series %s",
            key,
            level_name(lv),
            ctx.volume.series_instance_uid,
        )
        return None
    laterality = next((code for suffix, code in _LATERALITY.items() if key.endswith(suffix)), None)
    qualitative = []
    if key in lv.kjaer_grade and lv.kjaer_grade[key] in codes.KJAER_VALUES:
        qualitative.append(
            hd.sr.QualitativeEvaluation(codes.KJAER_GRADE, codes.KJAER_VALUES[lv.kjaer_grade[key]])
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=ctx.tracking(f"{level_name(lv)} {key}"),
        referenced_segment=ctx.referenced_segment(spec, lv),
        finding_type=spec.property_type,
        method=codes.MEASUREMENT_METHOD,
        algorithm_id=ctx.algorithm,
        finding_sites=[hd.sr.FindingSite(codes.level_site(lv.level), laterality=laterality)],
        measurements=_measurements(m),
        qualitative_evaluations=qualitative or None,
    )


def _level_group(
    ctx: _Context, lv: LevelResult
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | None:
    """The spinal canal at a level: stenosis grades, canal areas, confidences, asymmetry."""
    spec = _segment_for(ctx.specs, Label.DURAL_SAC, lv)
    if spec is None:
        return None
    measurements: list[hd.sr.Measurement] = [
        hd.sr.Measurement(
            name=codes.LEVEL_CONFIDENCE, value=lv.level_confidence, unit=codes.UNIT_ONE
        )
    ]
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
            hd.sr.QualitativeEvaluation(
                codes.CANAL_CONTENT, codes.CANAL_CONTENT_VALUES[st.rootlets]
            ),
        ]
        measurements += [
            hd.sr.Measurement(name=codes.DSCA, value=st.dsca_mm2, unit=codes.UNIT_MM2),
            hd.sr.Measurement(
                name=codes.GRADE_CONFIDENCE, value=st.confidence, unit=codes.UNIT_ONE
            ),
            hd.sr.Measurement(
                name=codes.ROOTLETS_PROBABILITY, value=st.rootlets_probability, unit=codes.UNIT_ONE
            ),
        ]
    canal = lv.measurements.get("spinal_canal")
    if canal is not None:
        measurements.append(
            hd.sr.Measurement(name=codes.CANAL_AREA, value=canal.csa_mm2, unit=codes.UNIT_MM2)
        )
    for pair, value in sorted(lv.asymmetry_pct.items()):
        if pair in codes.ASYMMETRY:
            measurements.append(
                hd.sr.Measurement(name=codes.ASYMMETRY[pair], value=value, unit=codes.UNIT_PERCENT)
            )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=ctx.tracking(f"{level_name(lv)} spinal canal"),
        referenced_segment=ctx.referenced_segment(spec, lv),
        finding_type=codes.VERTEBRAL_CANAL,
        method=codes.MEASUREMENT_METHOD,
        algorithm_id=ctx.algorithm,
        finding_sites=[hd.sr.FindingSite(codes.level_site(lv.level))],
        measurements=measurements,
        qualitative_evaluations=qualitative or None,
    )


def build_sr(
    sources: Sequence[Dataset],
    volume: Volume,
    result: SeriesResult,
    seg: Dataset,
    specs: Sequence[SegmentSpec],
    identity: OutputIdentity,
) -> Dataset | None:
    """Build the TID 1500 report; ``seg`` and ``specs`` are the SEG it refers to.

    Returns ``None`` when the result has no level to report (TID 1500 needs at least one
    measurement group).
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    ctx = _Context(by_uid, volume, seg, specs, result, identity)
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for lv in sorted(result.levels, key=lambda lv: lv.position):
        level_group = _level_group(ctx, lv)
        if level_group is not None:
            groups.append(level_group)
        for key, m in lv.measurements.items():
            group = _structure_group(ctx, lv, key, m)
            if group is not None:
                groups.append(group)
    if not groups:
        logger.warning("series %s: no level measured, no SR", volume.series_instance_uid)
        return None
    observer = hd.sr.ObserverContext(
        observer_type=dcodes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.uid("device", result.model_name),
            name=result.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{result.model_name} {result.model_version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    referenced = {ctx.volume.slice_uids[i] for lv in result.levels for i in lv.slice_indices}
    evidence = [seg] + [ds for uid, ds in by_uid.items() if uid in referenced]
    first = by_uid[volume.slice_uids[0]]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=identity.series_uid("sr"),
        series_number=series_number("sr", _series_number(first)),
        sop_instance_uid=identity.instance_uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION["sr"],
        manufacturer_model_name=MODEL_NAME,
        device_serial_number=DEVICE_SERIAL_NUMBER,
    )
    copy_patient_study(first, sr)
    sr.CodingSchemeIdentificationSequence = DicomSequence([private_scheme_identification()])  # type: ignore[assignment]
    logger.info(
        "SR %s for series %s: %d groups", sr.SOPInstanceUID, volume.series_instance_uid, len(groups)
    )
    return sr


def _series_number(ds: Dataset) -> int | None:
    value = ds.get("SeriesNumber")
    return int(value) if value not in (None, "") else None
