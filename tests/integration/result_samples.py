"""Small valid result objects (highdicom SEG, TID 1500 Comprehensive 3D SR, Secondary
Capture overlay) for the export tests, independent of the real encoders."""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROWS = COLS = 16
SLICES = 3
SPACING_MM = 1.0


@dataclass
class ResultSet:
    """The analysed series and its three result objects."""

    sources: list[Dataset]
    seg: Dataset
    sr: Dataset
    overlay: Dataset

    @property
    def series_uid(self) -> str:
        return str(self.sources[0].SeriesInstanceUID)

    @property
    def results(self) -> list[Dataset]:
        return [self.seg, self.sr, self.overlay]


def _mr_slice(study: str, series: str, frame_of_reference: str, index: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PatientName = "Export^Test"
    ds.PatientID = "EXPORT-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "MR"
    ds.SeriesNumber = 3
    ds.InstanceNumber = index + 1
    ds.Manufacturer = "lumbar-node tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ImagePositionPatient = [0.0, 0.0, float(index) * 4.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [SPACING_MM, SPACING_MM]
    ds.SliceThickness = 4.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(ROWS * COLS, dtype=np.uint16).reshape(ROWS, COLS) + index).tobytes()
    return ds


def make_result_set() -> ResultSet:
    """A 3-slice MR series with a 1-segment binary SEG, a TID 1500 SR and an RGB SC overlay."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    sources = [_mr_slice(study, series, frame, i) for i in range(SLICES)]
    mask = np.zeros((SLICES, ROWS, COLS), dtype=bool)
    mask[:, 4:10, 5:11] = True
    algorithm = hd.AlgorithmIdentificationSequence(
        name="lumbar-node tests", version="0", family=codes.DCM.ArtificialIntelligence
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Dural sac",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept("280401006", "SCT", "Spinal cerebrospinal fluid pathway"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="lumbar-node tests",
        manufacturer_model_name="export",
        software_versions="0",
        device_serial_number="0",
    )
    measurement = hd.sr.Measurement(
        name=codes.SCT.Area,
        value=36.0,
        unit=codes.UCUM.SquareMillimeter,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="level 1"),
        measurements=[measurement],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid()),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.MRISpineReport,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=generate_uid(),
        series_number=902,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="lumbar-node tests",
    )
    rgb = np.zeros((ROWS, COLS, 3), dtype=np.uint8)
    rgb[4:10, 5:11, 0] = 255
    overlay = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=sources[1],
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=903,
        instance_number=1,
        manufacturer="lumbar-node tests",
        pixel_spacing=[SPACING_MM, SPACING_MM],
        patient_orientation=["L", "P"],
    )
    return ResultSet(sources=sources, seg=seg, sr=sr, overlay=overlay)
