"""Encoders: analysis results (``ai.results``) -> DICOM SEG, TID 1500 SR, overlay images.

``encode_series`` is the one entry point: it gives every output a deterministic identity
(:mod:`node.encode.uids`), so analysing the same instances with the same model again
produces the same UIDs and the PACS replaces instead of duplicating. Each output is tagged
with its kind (``seg``, ``sr``, ``overlay``) so export can filter per destination.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from ai.results import SeriesResult
from ai.volume import Volume
from node.encode.overlay import build_overlay
from node.encode.seg import SegmentSpec, build_seg, plan_segments
from node.encode.sr import build_sr
from node.encode.transcode import transcode
from node.encode.uids import KINDS, OutputIdentity

logger = logging.getLogger(__name__)

__all__ = ["EncodedOutputs", "OutputIdentity", "encode_series", "kind_of", "transcode"]

#: Private-free marker of an output's kind on the Dataset object (not written to files).
_KIND_ATTRIBUTE = "lumbar_node_kind"


@dataclass
class EncodedOutputs:
    """The DICOM objects of one analysed series."""

    seg: Dataset | None
    sr: Dataset | None
    overlay: list[Dataset] = field(default_factory=list)
    segments: list[SegmentSpec] = field(default_factory=list)

    def all(self) -> list[Dataset]:
        """Every output, SEG first (the SR refers to it), then SR, then overlay images."""
        out: list[Dataset] = []
        if self.seg is not None:
            out.append(self.seg)
        if self.sr is not None:
            out.append(self.sr)
        out.extend(self.overlay)
        return out

    def __iter__(self) -> Iterator[Dataset]:
        """Iterate over :meth:`all` (``list(outputs)`` gives every dataset)."""
        return iter(self.all())

    def __len__(self) -> int:
        return len(self.all())

    def of_kinds(self, kinds: Sequence[str]) -> list[Dataset]:
        """The outputs whose kind is in ``kinds`` (per-destination filtering)."""
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown output kind {kind!r}; expected one of {KINDS}")
        return [ds for ds in self.all() if kind_of(ds) in kinds]


def kind_of(ds: Dataset) -> str:
    """The kind an encoder output was tagged with (``seg``, ``sr`` or ``overlay``)."""
    kind = getattr(ds, _KIND_ATTRIBUTE, None)
    if kind is None:
        raise ValueError(f"dataset {ds.get('SOPInstanceUID')} is not an encoder output")
    return str(kind)


def _tag(ds: Dataset, kind: str) -> Dataset:
    # a plain Python attribute, not a DICOM element: pydicom keeps it off the wire
    object.__setattr__(ds, _KIND_ATTRIBUTE, kind)
    return ds


def encode_series(
    sources: Sequence[Dataset],
    volume: Volume,
    result: SeriesResult,
    *,
    include_overlay: bool = True,
    include_summary: bool = True,
    now: dt.datetime | None = None,
) -> EncodedOutputs:
    """Encode one series' analysis as SEG + SR (+ overlay slices and summary image).

    Parameters
    ----------
    sources
        The source datasets (headers suffice; pixel data is not read) of every instance
        in ``volume``.
    include_overlay, include_summary
        Whether to add the burned-in overlay slices and the summary image.
    """
    if result.series_instance_uid != volume.series_instance_uid:
        raise ValueError(
            f"result is for series {result.series_instance_uid}, volume for {volume.series_instance_uid}"
        )
    identity = OutputIdentity.of(volume.series_instance_uid, volume.slice_uids, result.models_line)
    specs = plan_segments(result)
    seg: Dataset | None = None
    sr: Dataset | None = None
    if specs:
        seg = _tag(build_seg(sources, volume, result, identity, now=now), "seg")
        report = build_sr(sources, volume, result, seg, specs, identity, now=now)
        sr = _tag(report, "sr") if report is not None else None
    else:
        logger.warning("series %s: empty label map, no SEG and no SR", volume.series_instance_uid)
    overlay = [
        _tag(ds, "overlay")
        for ds in (
            build_overlay(
                sources,
                volume,
                result,
                identity,
                include_slices=include_overlay,
                include_summary=include_summary,
                now=now,
            )
            if (include_overlay or include_summary)
            else []
        )
    ]
    return EncodedOutputs(seg=seg, sr=sr, overlay=overlay, segments=specs)
