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
    rle = syntax == RLELossless and int(ds.get("BitsAllocated", 0)) in (8, 16)
    if syntax == RLELossless and not rle:
        logger.info("%s: 1-bit data cannot be RLE encoded, deflating instead", ds.SOPInstanceUID)
        syntax = DeflatedExplicitVRLittleEndian
    # RLE rewrites PixelData in place: copy deeply; otherwise share the (large) elements
    out = copy.deepcopy(ds) if rle else Dataset(ds)
    out.file_meta = copy.deepcopy(ds.file_meta)
    implicit, little = ds.original_encoding
    out.set_original_encoding(implicit, little, ds.original_character_set)
    kind = getattr(ds, "lumbar_node_kind", None)
    if kind is not None:
        object.__setattr__(out, "lumbar_node_kind", kind)
    if rle:
        out.compress(RLELossless, encoding_plugin="pydicom")
    else:
        out.file_meta.TransferSyntaxUID = syntax
    return out
