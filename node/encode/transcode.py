"""Lossless re-encoding of encoder outputs for destinations that accept it.

* Deflated Explicit VR Little Endian: any output; a BINARY SEG is mostly zero bits and
  shrinks about 20-50 fold.
* RLE Lossless: images with 8 or 16 bits allocated (the RGB overlay), via pydicom.
* Explicit VR Little Endian: the fallback every destination accepts.
"""

from __future__ import annotations

import copy
import logging

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
)

logger = logging.getLogger(__name__)

SUPPORTED: tuple[UID, ...] = (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless)


def transcode(ds: Dataset, transfer_syntax: str) -> Dataset:
    """A copy of ``ds`` to be written with ``transfer_syntax`` (lossless only).

    RLE applies to 8/16-bit images; a 1-bit SEG asked for RLE gets Deflated instead,
    since RLE cannot hold 1-bit frames.
    """
    syntax = UID(transfer_syntax)
    if syntax not in SUPPORTED:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}; use one of {SUPPORTED}")
    current = ds.file_meta.TransferSyntaxUID
    if syntax == current:
        return ds
    if current != ExplicitVRLittleEndian and current != DeflatedExplicitVRLittleEndian:
        raise ValueError(f"can only transcode from uncompressed data, not {current}")
    out = copy.copy(ds)
    out.file_meta = copy.deepcopy(ds.file_meta)
    kind = getattr(ds, "lumbar_node_kind", None)
    if kind is not None:
        object.__setattr__(out, "lumbar_node_kind", kind)
    if syntax == RLELossless:
        if int(ds.get("BitsAllocated", 0)) not in (8, 16):
            logger.info("%s: 1-bit data cannot be RLE encoded, deflating instead", ds.SOPInstanceUID)
            out.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
            return out
        out.PixelData = ds.PixelData
        out.compress(RLELossless, encoding_plugin="pydicom")
        return out
    out.file_meta.TransferSyntaxUID = syntax
    return out
