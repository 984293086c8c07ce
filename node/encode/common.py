"""What every encoder output shares: patient/study modules copied from the source,
equipment, SOP common, file meta, and a small explicit-VR little-endian writer used to
pre-encode large, repetitive sequences (SEG per-frame functional groups).
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Iterable, Sequence

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from node import __version__

MANUFACTURER = "lumbar-node"
MODEL_NAME = "lumbar-node encoder"
DEVICE_SERIAL_NUMBER = "lumbar-node"
SOFTWARE_VERSION = __version__

#: Patient, General Study and Patient Study attributes copied verbatim from the source.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointID",
)
#: Type 2 attributes of those modules: present (maybe empty) in every output.
TYPE2_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the patient and study modules so the output files into the same study."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = source[keyword]
    for keyword in TYPE2_KEYWORDS:
        if keyword not in target:
            setattr(target, keyword, "")
    if "StudyInstanceUID" not in target:
        raise ValueError("source dataset has no StudyInstanceUID")


def fill_common(
    ds: Dataset,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    series_description: str,
    modality: str,
    instance_number: int,
    now: dt.datetime,
) -> None:
    """General Series, General Equipment, SOP Common and file meta of an output."""
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = now.strftime("%Y%m%d")
    ds.SeriesTime = now.strftime("%H%M%S")
    ds.InstanceNumber = instance_number
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.file_meta = file_meta(sop_class_uid, sop_instance_uid)


def private_scheme_identification() -> Dataset:
    """Coding Scheme Identification item declaring the private ``99LUMBAR`` scheme."""
    from node.encode.codes import PRIVATE_SCHEME, PRIVATE_SCHEME_VERSION

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "lumbar-node private codes"
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


def file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


# --- pre-encoded sequences -------------------------------------------------------------------
# Explicit VR little endian, defined lengths. Used where building thousands of pydicom
# Dataset objects would dominate the encoding time (PS3.5 section 7.1.2 and 7.5).

_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)


def enc_element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element; ``value`` must already have even length."""
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def enc_str(tag: int, vr: str, value: str | Sequence[str]) -> bytes:
    """A string element (multi-valued when given a sequence), padded to even length."""
    text = value if isinstance(value, str) else "\\".join(value)
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return enc_element(tag, vr, raw)


def enc_ds(tag: int, values: Iterable[float]) -> bytes:
    """A DS element, each value formatted to fit 16 characters."""
    return enc_str(tag, "DS", [format_number_as_ds(float(v)) for v in values])


def enc_us(tag: int, *values: int) -> bytes:
    return enc_element(tag, "US", struct.pack(f"<{len(values)}H", *values))


def enc_ul(tag: int, *values: int) -> bytes:
    return enc_element(tag, "UL", struct.pack(f"<{len(values)}I", *values))


def enc_item(body: bytes) -> bytes:
    return _ITEM + struct.pack("<I", len(body)) + body


def enc_sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """A sequence of already encoded item bodies."""
    return enc_element(tag, "SQ", b"".join(enc_item(body) for body in items))


def enc_code(tag: int, value: str, scheme: str, meaning: str) -> bytes:
    """A code sequence with one item (Code Value, Coding Scheme Designator, Code Meaning)."""
    body = (
        enc_str(0x00080100, "SH", value)
        + enc_str(0x00080102, "SH", scheme)
        + enc_str(0x00080104, "LO", meaning)
    )
    return enc_sequence(tag, [body])


def raw_sequence(tag: int, items: Sequence[bytes]) -> RawDataElement:
    """A sequence element holding pre-encoded items; pydicom writes it as it is and
    parses it on first access."""
    value = b"".join(enc_item(body) for body in items)
    return RawDataElement(Tag(tag), "SQ", len(value), value, 0, False, True)
