"""The Comprehensive 3D SR *dataset* around a highdicom-built TID 1500 content tree.

highdicom builds and validates the content (``hd.sr.MeasurementReport`` and its measurement
groups); this module assembles the SR document around the root content item, as
``hd.sr.Comprehensive3DSR.__init__`` (highdicom 0.28) does, without its costs: that
constructor deep-copies the whole content tree, re-parses the copy into highdicom objects
and walks it again to collect the referenced instances (2.6 s of 3.4 s for a 15-slice,
3-level report). Here the evidence comes from the references the caller already knows, and
the content tree is pre-encoded once to Explicit VR Little Endian bytes held in a raw
``ContentSequence`` element that pydicom writes as it is (the precedent is the SEG's
per-frame functional groups, :mod:`node.encode.seg`).

The attributes are those highdicom writes (PS3.3 A.35.13): Patient, General Study, Patient
Study (copied from the source), SR Document Series, General Equipment, SR Document General
(completion COMPLETE, verification UNVERIFIED, preliminary PRELIMINARY, empty Performed
Procedure Code and Referenced Performed Procedure Step sequences, Current Requested
Procedure Evidence = the SEG and the referenced source images), SR Document Content (the
root item) and SOP Common with Contributing Equipment. One deliberate difference: the
"Acquisition Equipment" item describes the scanner of the source images; highdicom took
the first evidence instance, which is our SEG.
"""

from __future__ import annotations

import datetime as dt
import logging
import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes as dcodes
from pydicom.tag import Tag
from pydicom.uid import Comprehensive3DSRStorage
from pydicom.valuerep import DT

from node.encode.common import copy_patient_study, enc_element, enc_item, file_meta

logger = logging.getLogger(__name__)

_T_CONTENT_SEQUENCE = 0x0040A730
#: Tags of the root content item copied to the top level of the document (PS3.3 C.17.3).
_ROOT_ITEM_KEYWORDS = (
    "ValueType",
    "ConceptNameCodeSequence",
    "ContinuityOfContent",
    "ContentTemplateSequence",
)

# --- pre-encoding a content tree -----------------------------------------------------------
# Value representations written here directly; anything else (PN, DA, TM, DT, binary, text
# that is not ASCII) goes through pydicom's own element writer.
_ASCII_VRS = frozenset({"AE", "AS", "CS"})
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})
_NUMBER_STRING_VRS = frozenset({"DS", "IS"})
_BINARY_FORMATS = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FL": "f", "FD": "d"}


def _number_string(value: object) -> str:
    # as pydicom writes DS/IS: the string a value was created from, else str()
    original = getattr(value, "original_string", None)
    return str(original) if original is not None else str(value)


def _encode_value(elem: DataElement) -> bytes | None:
    """The value bytes of a non-sequence element, or ``None`` to let pydicom write it."""
    vr = elem.VR
    value = elem.value
    if value is None or value == "" or (isinstance(value, list | tuple) and not value):
        return b""
    multi = not isinstance(value, str) and isinstance(value, Sequence)
    if vr in _NUMBER_STRING_VRS:
        text = "\\".join(_number_string(v) for v in value) if multi else _number_string(value)
        raw = text.encode("ascii")
        return raw + b" " if len(raw) % 2 else raw
    if vr == "UI" or vr in _ASCII_VRS or vr in _TEXT_VRS:
        if multi and all(isinstance(v, str) for v in value):
            text = "\\".join(value)
        elif isinstance(value, str):
            text = value
        else:
            return None
        if not text.isascii():
            return None  # the character set matters: pydicom encodes it
        raw = text.encode("ascii")
        if len(raw) % 2:
            raw += b"\0" if vr == "UI" else b" "
        return raw
    fmt = _BINARY_FORMATS.get(vr)
    if fmt is not None:
        values = list(value) if multi else [value]
        return struct.pack(f"<{len(values)}{fmt}", *values)
    return None


class ContentEncoder:
    """Explicit VR Little Endian bytes of datasets (item bodies), defined lengths.

    Equivalent to pydicom's writer for what SR content items hold, and much faster: it
    skips pydicom's per-dataset ambiguous-VR pass and per-element buffering, and encodes an
    item shared by several parents (the same object: concepts, source image references,
    finding sites) once. Only for a tree that does not change while it is encoded.
    """

    def __init__(self, encodings: list[str]) -> None:
        self.encodings = encodings
        self._items: dict[int, bytes] = {}

    def items(self, items: Iterable[Dataset]) -> bytes:
        """The value of a sequence element: its items, each with a defined length."""
        return b"".join(self.item(item) for item in items)

    def item(self, ds: Dataset) -> bytes:
        encoded = self._items.get(id(ds))
        if encoded is None:
            encoded = self._items[id(ds)] = enc_item(self.dataset(ds))
        return encoded

    def dataset(self, ds: Dataset) -> bytes:
        parts: list[bytes] = []
        for elem in ds.elements():
            if isinstance(elem, RawDataElement):
                elem = ds[elem.tag]
            tag = int(elem.tag)
            if elem.VR == "SQ":
                parts.append(enc_element(tag, "SQ", self.items(elem.value)))
                continue
            value = _encode_value(elem)
            if value is not None:
                parts.append(enc_element(tag, elem.VR, value))
                continue
            buffer = DicomBytesIO()
            buffer.is_little_endian = True
            buffer.is_implicit_VR = False
            write_data_element(buffer, elem, self.encodings)
            parts.append(buffer.getvalue())
        return b"".join(parts)


def raw_content_sequence(
    items: Sequence[Dataset], character_set: str | list[str] | None
) -> RawDataElement:
    """A ``ContentSequence`` element pre-encoded from ``items`` (pydicom parses it on access)."""
    encodings = convert_encodings(character_set or "ISO_IR 6")
    value = ContentEncoder(encodings).items(items)
    return RawDataElement(Tag(_T_CONTENT_SEQUENCE), "SQ", len(value), value, 0, False, True)


# --- the document --------------------------------------------------------------------------


@dataclass(frozen=True)
class SRDocument:
    """Identity and equipment of an SR document (what ``Comprehensive3DSR`` was given)."""

    series_instance_uid: str
    series_number: int
    sop_instance_uid: str
    instance_number: int
    series_description: str
    manufacturer: str
    manufacturer_model_name: str
    device_serial_number: str

    def __post_init__(self) -> None:
        if self.series_number < 1 or self.instance_number < 1:
            raise ValueError(
                f"series and instance numbers must be >= 1, got {self.series_number}, "
                f"{self.instance_number}"
            )
        for text in (
            self.series_description,
            self.manufacturer,
            self.manufacturer_model_name,
            self.device_serial_number,
        ):
            if len(text) > 64:
                raise ValueError(f"LO value longer than 64 characters: {text!r}")


def evidence_sequence(evidence: Sequence[Dataset], study_instance_uid: str) -> DicomSequence:
    """Current Requested Procedure Evidence: instances grouped by study and series, in the
    order given, duplicates dropped (as ``highdicom.sr.utils.collect_evidence``)."""
    by_series: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
    seen: set[str] = set()
    for ds in evidence:
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            continue
        seen.add(uid)
        if str(ds.StudyInstanceUID) != study_instance_uid:
            raise ValueError(f"evidence {uid} belongs to another study")
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        by_series[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))].append(item)
    series_items = []
    for (_study, series_uid), instances in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = DicomSequence(instances)
        series_items.append(series)
    study = Dataset()
    study.StudyInstanceUID = study_instance_uid
    study.ReferencedSeriesSequence = DicomSequence(series_items)
    return DicomSequence([study])


def acquisition_equipment(source: Dataset) -> hd.ContributingEquipment | None:
    """ "Acquisition Equipment" item for the scanner of a source image, the fields
    ``hd.ContributingEquipment.for_image_acquisition`` takes (that method first loads
    highdicom's IOD tables, 0.5 s on the first call, to check the source is an image).
    ``None`` when the source names no manufacturer."""
    manufacturer = source.get("Manufacturer")
    if not manufacturer:
        return None
    when = source.get("AcquisitionDateTime")
    date, time = source.get("AcquisitionDate"), source.get("AcquisitionTime")
    if when is None and isinstance(date, dt.date) and isinstance(time, dt.time):
        when = dt.datetime.combine(date, time)
    return hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=dcodes.DCM.AcquisitionEquipment,
        manufacturer_model_name=source.get("ManufacturerModelName"),
        software_versions=source.get("SoftwareVersions"),
        device_serial_number=source.get("DeviceSerialNumber"),
        institution_name=source.get("InstitutionName"),
        institutional_department_name=source.get("InstitutionalDepartmentName"),
        institution_address=source.get("InstitutionAddress"),
        station_name=source.get("StationName"),
        contribution_datetime=when,
        contribution_description="Acquisition equipment of the source image(s)",
    )


def contributing_equipment(source: Dataset, now: dt.datetime) -> DicomSequence:
    """The scanner of the source images (when it names a manufacturer) and highdicom, the
    library that built the content tree, contributing at ``now``."""
    items: list[Dataset] = []
    scanner = acquisition_equipment(source)
    if scanner is not None:
        items.append(scanner)
    library = hd.ContributingEquipment.for_highdicom()
    library.ContributionDateTime = DT(now)
    items.append(library)
    return DicomSequence(items)


def build_sr_dataset(
    root: Dataset,
    *,
    document: SRDocument,
    source: Dataset,
    evidence: Sequence[Dataset],
    now: dt.datetime,
) -> Dataset:
    """Assemble a Comprehensive 3D SR around the root content item ``root``.

    Parameters
    ----------
    root
        The root CONTAINER (``hd.sr.MeasurementReport(...)[0]``); it is not modified.
    source
        A source image: patient and study modules, character set, acquisition equipment.
    evidence
        Every instance the content references (SEG first, then source images), all of the
        source's study.
    now
        Instance creation, content and contribution date/time.
    """
    study_uid = str(source.StudyInstanceUID)
    ds = Dataset()
    copy_patient_study(source, ds)
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = document.sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S.%f")
    ds.InstanceNumber = document.instance_number
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S.%f")
    ds.Modality = "SR"
    ds.SeriesInstanceUID = document.series_instance_uid
    ds.SeriesNumber = document.series_number
    ds.SeriesDescription = document.series_description
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    ds.Manufacturer = document.manufacturer
    ds.ManufacturerModelName = document.manufacturer_model_name
    ds.DeviceSerialNumber = document.device_serial_number
    ds.ContributingEquipmentSequence = contributing_equipment(source, now)
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PreliminaryFlag = "PRELIMINARY"
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    ds.CurrentRequestedProcedureEvidenceSequence = evidence_sequence(evidence, study_uid)
    for keyword in _ROOT_ITEM_KEYWORDS:
        if keyword in root:
            ds[keyword] = root[keyword]
    character_set = ds.get("SpecificCharacterSet")
    ds[_T_CONTENT_SEQUENCE] = raw_content_sequence(root.ContentSequence, character_set)
    ds.file_meta = file_meta(Comprehensive3DSRStorage, document.sop_instance_uid)
    # the pre-encoded content is Explicit VR Little Endian: declaring that as the dataset's
    # original encoding lets pydicom write it without parsing it
    ds.set_original_encoding(False, True, ds._character_set)
    return ds
