"""Deterministic UIDs for the encoder outputs.

A re-analysis of the same input (same source series, same set of instances, same model
version) must give the same Series and SOP Instance UIDs, so the PACS replaces the earlier
objects instead of collecting duplicates. The UIDs are hashes (pydicom ``generate_uid`` with
``entropy_srcs``, SHA-512 based) of those inputs and the output kind.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

#: Root of every UID the node derives (pydicom's root is meant for hash-derived UIDs).
UID_ROOT = PYDICOM_ROOT_UID
#: Output kinds; each has its own series.
KINDS: tuple[str, ...] = ("seg", "sr", "overlay")
#: SeriesNumber offset per kind, so the AI series sort after the source and in this order.
SERIES_NUMBER_OFFSET: dict[str, int] = {"seg": 1, "sr": 2, "overlay": 3}
#: Base of output SeriesNumbers: 1000 + 10 x source SeriesNumber + offset.
SERIES_NUMBER_BASE = 1000

#: SeriesDescription per kind (what radiologists read in the series list).
SERIES_DESCRIPTION: dict[str, str] = {
    "seg": "AI Lumbar SEG",
    "sr": "AI Lumbar Report",
    "overlay": "AI Lumbar Overlay",
}


@dataclass(frozen=True)
class OutputIdentity:
    """Where one analysis' outputs live: a key shared by all their UIDs.

    Attributes
    ----------
    source_series_uid
        SeriesInstanceUID of the analysed series.
    instance_uids
        SOP Instance UIDs of the instances analysed (order does not matter).
    model_version
        Names and versions of every model that produced the analysis
        (:attr:`ai.results.SeriesResult.models_line`): a new version of any of them (a
        retrained canal refiner or grader as much as the segmentation) gives new UIDs, so
        a PACS never receives different content under a UID it already holds.
    """

    source_series_uid: str
    instance_uids: tuple[str, ...]
    model_version: str

    def __post_init__(self) -> None:
        if not self.source_series_uid:
            raise ValueError("source_series_uid must not be empty")
        if not self.instance_uids:
            raise ValueError("instance_uids must not be empty")
        if not self.model_version:
            raise ValueError("model_version must not be empty")
        object.__setattr__(self, "instance_uids", tuple(sorted(set(self.instance_uids))))

    @classmethod
    def of(
        cls, source_series_uid: str, instance_uids: Iterable[str], model_version: str
    ) -> OutputIdentity:
        return cls(source_series_uid, tuple(instance_uids), model_version)

    def _entropy(self, *parts: str) -> list[str]:
        return [self.source_series_uid, *self.instance_uids, self.model_version, *parts]

    def series_uid(self, kind: str) -> str:
        """SeriesInstanceUID of the output series of ``kind``."""
        _check_kind(kind)
        return str(generate_uid(prefix=UID_ROOT, entropy_srcs=self._entropy(kind, "series")))

    def instance_uid(self, kind: str, index: int = 0) -> str:
        """SOPInstanceUID of the ``index``-th instance of the ``kind`` series."""
        _check_kind(kind)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        return str(
            generate_uid(prefix=UID_ROOT, entropy_srcs=self._entropy(kind, "instance", str(index)))
        )

    def tracking_uid(self, identifier: str) -> str:
        """Tracking Unique Identifier of an SR measurement group (stable across re-runs)."""
        return str(
            generate_uid(prefix=UID_ROOT, entropy_srcs=self._entropy("tracking", identifier))
        )

    def uid(self, *parts: str) -> str:
        """Any other UID that must stay stable (device observer, dimension organisation)."""
        return str(generate_uid(prefix=UID_ROOT, entropy_srcs=self._entropy("other", *parts)))


def series_number(kind: str, source_series_number: int | None) -> int:
    """SeriesNumber of an output: sorts after the source series, SEG < SR < overlay."""
    _check_kind(kind)
    base = SERIES_NUMBER_BASE + 10 * (source_series_number or 0)
    return base + SERIES_NUMBER_OFFSET[kind]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
