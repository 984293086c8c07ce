"""Comprehensive 3D SR with a TID 1500 Measurement Report of one analysed series.

Content (PS3.16 TID 1500):

* procedure reported, observer = the algorithm as a device, TID 4019 algorithm
  identification in every measurement group (the model that produced the group's
  content: the canal refiner for the dural sac, the stenosis grader for the spinal canal
  group with grades, the segmentation model otherwise; a measurement that another model
  produced carries its own TID 4019, see :func:`_level_group`);
* per level and structure one volumetric measurement group (TID 1411): tracking
  identifier and UID, finding type = the structure's code, finding site = the level (and
  the laterality), CSA, FCSA, fat fraction, mean T2 signal, signal ratio to fat, the
  measurement method, and a reference to the SEG segment restricted to the level's frames
  with its source images;
* per level one group for the spinal canal with the qualitative evaluations: stenosis
  severity (CID 3832), Schizas grade and DSCA grade (``99LUMBAR``), rootlets or cord,
  and the level naming confidence;
* the analysis's plausibility warnings (the ``flags`` of ``results.json``, also printed on
  the overlay summary), one TEXT item each in the report's own "Qualitative Evaluations"
  container (TID 1500 rows 12 and 14), so a reader of the SR sees which numbers to doubt.

Levels the analysis could not name are reported as "level N from caudal, unlabelled" with
the lumbar spine as finding site, never with a guessed level.

highdicom builds the content tree (its template classes check TID 1500);
:mod:`node.encode.sr_dataset` assembles the document around it, which is 5-10x faster than
``hd.sr.Comprehensive3DSR`` and gives the same attributes (``docs/dicom-outputs.md``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes as dcodes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from ai.labels import Label
from ai.results import (
    ROLE_CANAL_REFINEMENT,
    ROLE_SEGMENTATION,
    ROLE_STENOSIS_GRADING,
    LevelResult,
    SeriesResult,
    StructureMeasurement,
)
from ai.volume import Volume
from node.encode import codes
from node.encode.common import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    private_scheme_identification,
)
from node.encode.seg import SegmentSpec, label_role
from node.encode.sr_dataset import SRDocument, build_sr_dataset
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


class _Context:
    """What every group needs: sources, SEG identity, segments, the algorithms.

    Content items that repeat across groups (coded concepts, source image references,
    finding sites, the algorithm identification) are built once and shared: highdicom does
    not modify them once built, and the tree is encoded to bytes without copying.
    """

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
        self.result = result
        #: TID 4019 per contributing model (name, version), built once per report
        self._algorithms: dict[tuple[str, str], hd.sr.AlgorithmIdentification] = {}
        #: source slice indices referenced by some group (the SR's evidence)
        self.referenced: set[int] = set()
        self._concepts: dict[tuple[str, str, str, str | None], hd.sr.CodedConcept] = {}
        self._source_images: dict[int, hd.sr.SourceImageForSegmentation] = {}
        self._source_image_name: hd.sr.CodedConcept | None = None
        self._sites: dict[tuple[str | None, str | None], hd.sr.FindingSite] = {}

    def concept(self, code: Code) -> hd.sr.CodedConcept:
        """``code`` as a highdicom CodedConcept, built once per report."""
        key = (code.value, code.scheme_designator, code.meaning, code.scheme_version)
        concept = self._concepts.get(key)
        if concept is None:
            concept = self._concepts[key] = hd.sr.CodedConcept.from_code(code)
        return concept

    def algorithm_for(self, role: str) -> hd.sr.AlgorithmIdentification:
        """TID 4019 of the model with ``role`` (the segmentation model when there is none),
        built once per model: a missing model gives the very object of the segmentation
        model, so ``is`` tells whether an item needs its own identification."""
        key = self.result.model_for(role)
        algorithm = self._algorithms.get(key)
        if algorithm is None:
            parameters = self.result.algorithm_parameters_for(role)
            algorithm = self._algorithms[key] = hd.sr.AlgorithmIdentification(
                name=key[0], version=key[1], parameters=parameters or None
            )
        return algorithm

    def measurement(
        self,
        name: Code,
        value: float,
        unit: Code,
        algorithm_id: hd.sr.AlgorithmIdentification | None = None,
    ) -> hd.sr.Measurement:
        return hd.sr.Measurement(
            name=self.concept(name),
            value=value,
            unit=self.concept(unit),
            algorithm_id=algorithm_id,
        )

    def qualitative(self, name: Code, value: Code) -> hd.sr.QualitativeEvaluation:
        return hd.sr.QualitativeEvaluation(self.concept(name), self.concept(value))

    def finding_site(self, level: str | None, laterality: Code | None) -> hd.sr.FindingSite:
        key = (level, laterality.value if laterality is not None else None)
        site = self._sites.get(key)
        if site is None:
            site = self._sites[key] = hd.sr.FindingSite(
                self.concept(codes.level_site(level)),
                laterality=self.concept(laterality) if laterality is not None else None,
            )
        return site

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
        image = self._source_images.get(index)
        if image is not None:
            return image
        uid = self.volume.slice_uids[index]
        src = self.sources[uid]
        frames = None
        if int(getattr(src, "NumberOfFrames", 1) or 1) > 1:
            frames = [self.volume.frame_numbers[index]]
        image = self._source_images[index] = hd.sr.SourceImageForSegmentation(
            referenced_sop_class_uid=str(src.SOPClassUID),
            referenced_sop_instance_uid=uid,
            referenced_frame_numbers=frames,
        )
        # one name object for all of them: highdicom indexes every appended item by name
        # in a dict, and equal names that are not the same object cost a slow __eq__
        if self._source_image_name is None:
            self._source_image_name = image.name
        elif image.name == self._source_image_name:
            image.ConceptNameCodeSequence = [self._source_image_name]
        self.referenced.add(index)
        return image

    def tracking(self, text: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=self.identity.tracking_uid(text), identifier=text[:64])


def _measurements(ctx: _Context, m: StructureMeasurement) -> list[hd.sr.Measurement]:
    c = ctx.concept
    out = [ctx.measurement(codes.AREA, m.csa_mm2, codes.UNIT_MM2)]
    if m.fcsa_mm2 is not None:
        out.append(ctx.measurement(codes.FCSA, m.fcsa_mm2, codes.UNIT_MM2))
    if m.fat_fraction_pct is not None:
        out.append(ctx.measurement(codes.FAT_FRACTION, m.fat_fraction_pct, codes.UNIT_PERCENT))
    if m.mean_si is not None:
        out.append(
            hd.sr.Measurement(
                name=c(codes.T2_SIGNAL),
                value=m.mean_si,
                unit=c(codes.UNIT_ARBITRARY),
                derivation=c(codes.MEAN),
            )
        )
    if m.si_ratio_to_fat is not None:
        out.append(ctx.measurement(codes.SI_RATIO_TO_FAT, m.si_ratio_to_fat, codes.UNIT_RATIO))
    if m.outline_contrast is not None:
        out.append(ctx.measurement(codes.OUTLINE_CONTRAST, m.outline_contrast, codes.UNIT_RATIO))
    return out


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
            ctx.qualitative(codes.KJAER_GRADE, codes.KJAER_VALUES[lv.kjaer_grade[key]])
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=ctx.tracking(f"{level_name(lv)} {key}"),
        referenced_segment=ctx.referenced_segment(spec, lv),
        finding_type=ctx.concept(spec.property_type),
        method=ctx.concept(codes.MEASUREMENT_METHOD),
        # the model that produced the segment (and so every measurement of it)
        algorithm_id=ctx.algorithm_for(label_role(label)),
        finding_sites=[ctx.finding_site(lv.level, laterality)],
        measurements=_measurements(ctx, m),
        qualitative_evaluations=qualitative or None,
    )


def _level_group(
    ctx: _Context, lv: LevelResult
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | None:
    """The spinal canal at a level: stenosis grades, canal areas, confidences, asymmetry.

    Provenance (TID 4019): the group names the stenosis grader when the level has grades
    (the qualitative evaluations, TID 1411 CODE items, can carry no identification of their
    own, so they take the group's), the segmentation model otherwise. A measurement that
    another model produced names it itself (TID 300 algorithm identification): DSCA and
    canal area the canal refiner (the segmentation model without one), grading confidence
    and rootlets probability the grader, level confidence and asymmetry the segmentation
    model. With only the segmentation model every item is the segmentation model's and no
    measurement carries its own identification, as before models were told apart.
    """
    spec = _segment_for(ctx.specs, Label.DURAL_SAC, lv)
    if spec is None:
        return None
    st = lv.stenosis
    group_algorithm = ctx.algorithm_for(
        ROLE_STENOSIS_GRADING if st is not None else ROLE_SEGMENTATION
    )

    def by(role: str) -> hd.sr.AlgorithmIdentification | None:
        algorithm = ctx.algorithm_for(role)
        return None if algorithm is group_algorithm else algorithm

    segmentation, refiner, grader = (
        by(ROLE_SEGMENTATION),
        by(ROLE_CANAL_REFINEMENT),
        by(ROLE_STENOSIS_GRADING),
    )
    measurements = [
        ctx.measurement(codes.LEVEL_CONFIDENCE, lv.level_confidence, codes.UNIT_ONE, segmentation)
    ]
    qualitative: list[hd.sr.QualitativeEvaluation] = []
    if st is not None:
        severity = codes.SEVERITY_VALUES[st.severity]
        if st.schizas == "A" and st.dsca_grade == "normal":
            severity = codes.NORMAL
        qualitative += [
            ctx.qualitative(codes.SEVERITY, severity),
            ctx.qualitative(codes.SCHIZAS_GRADE, codes.SCHIZAS_VALUES[st.schizas]),
            ctx.qualitative(codes.DSCA_GRADE, codes.DSCA_VALUES[st.dsca_grade]),
            ctx.qualitative(codes.CANAL_CONTENT, codes.CANAL_CONTENT_VALUES[st.rootlets]),
        ]
        measurements += [
            ctx.measurement(codes.DSCA, st.dsca_mm2, codes.UNIT_MM2, refiner),
            ctx.measurement(codes.GRADE_CONFIDENCE, st.confidence, codes.UNIT_ONE, grader),
            ctx.measurement(
                codes.ROOTLETS_PROBABILITY, st.rootlets_probability, codes.UNIT_ONE, grader
            ),
        ]
    canal = lv.measurements.get("spinal_canal")
    if canal is not None:
        measurements.append(
            ctx.measurement(codes.CANAL_AREA, canal.csa_mm2, codes.UNIT_MM2, refiner)
        )
    for pair, value in sorted(lv.asymmetry_pct.items()):
        if pair in codes.ASYMMETRY:
            measurements.append(
                ctx.measurement(codes.ASYMMETRY[pair], value, codes.UNIT_PERCENT, segmentation)
            )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=ctx.tracking(f"{level_name(lv)} spinal canal"),
        referenced_segment=ctx.referenced_segment(spec, lv),
        finding_type=ctx.concept(codes.VERTEBRAL_CANAL),
        method=ctx.concept(codes.MEASUREMENT_METHOD),
        algorithm_id=group_algorithm,
        finding_sites=[ctx.finding_site(lv.level, None)],
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
    *,
    now: dt.datetime | None = None,
) -> Dataset | None:
    """Build the TID 1500 report; ``seg`` and ``specs`` are the SEG it refers to.

    highdicom builds the content tree (and validates it against the templates);
    :func:`node.encode.sr_dataset.build_sr_dataset` assembles the document around it.
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
        procedure_reported=ctx.concept(codes.PROCEDURE_REPORTED),
        imaging_measurements=groups,
    )
    if result.flags:
        report[0].ContentSequence.append(_warnings(ctx, result.flags))
    # evidence: the SEG, then every slice of the reported levels and every slice the
    # content references, in source order
    referenced = {volume.slice_uids[i] for lv in result.levels for i in lv.slice_indices}
    referenced |= {volume.slice_uids[i] for i in ctx.referenced}
    evidence = [seg] + [ds for uid, ds in by_uid.items() if uid in referenced]
    first = by_uid[volume.slice_uids[0]]
    document = SRDocument(
        series_instance_uid=identity.series_uid("sr"),
        series_number=series_number("sr", _series_number(first)),
        sop_instance_uid=identity.instance_uid("sr"),
        instance_number=1,
        series_description=SERIES_DESCRIPTION["sr"],
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        device_serial_number=DEVICE_SERIAL_NUMBER,
    )
    sr = build_sr_dataset(
        report[0], document=document, source=first, evidence=evidence, now=now or dt.datetime.now()
    )
    sr.CodingSchemeIdentificationSequence = DicomSequence([private_scheme_identification()])  # type: ignore[assignment]
    logger.info(
        "SR %s for series %s: %d groups", sr.SOPInstanceUID, volume.series_instance_uid, len(groups)
    )
    return sr


def _warnings(ctx: _Context, flags: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 with one row 14 TEXT item per plausibility warning.

    highdicom's ``MeasurementReport`` builds rows 1-9 only, so the container is added to
    its content tree here, after the imaging measurements as the template orders it.
    """
    container = hd.sr.ContainerContentItem(
        name=ctx.concept(codes.QUALITATIVE_EVALUATIONS),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=ctx.concept(codes.PLAUSIBILITY_WARNING),
                value=flag,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for flag in flags
        ]
    )
    return container


def _series_number(ds: Dataset) -> int | None:
    value = ds.get("SeriesNumber")
    return int(value) if value not in (None, "") else None
