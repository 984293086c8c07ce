"""Every DIMSE status the node returns, named (PS3.4 annex B.2.3, PS3.7 annex C).

Handlers return these constants and nothing else, so a status code is never typed twice
(pynetdicom's own drift between ``0x0210`` and ``0xC210`` shows why).
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """DIMSE status codes returned by the node's C-ECHO and C-STORE handlers."""

    #: the instance is stored durably and indexed (or was already)
    SUCCESS = 0x0000
    #: refused: out of resources (free disk below the floor, series instance limit)
    OUT_OF_RESOURCES = 0xA700
    #: error: the data set does not match the SOP class (missing UIDs, pixel limits)
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: error: cannot understand (the data set cannot be parsed)
    CANNOT_UNDERSTAND = 0xC000
    #: refused: SOP class not supported (not an image class the node accepts)
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: failure: processing failure (storing failed for a local reason)
    PROCESSING_FAILURE = 0x0110

    @property
    def is_success(self) -> bool:
        """True for the success status."""
        return self is Status.SUCCESS

    def describe(self) -> str:
        """Lower-case words for logs and metric labels (``out_of_resources``)."""
        return self.name.lower()


SUCCESS = Status.SUCCESS
OUT_OF_RESOURCES = Status.OUT_OF_RESOURCES
DATASET_DOES_NOT_MATCH_SOP_CLASS = Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
CANNOT_UNDERSTAND = Status.CANNOT_UNDERSTAND
SOP_CLASS_NOT_SUPPORTED = Status.SOP_CLASS_NOT_SUPPORTED
PROCESSING_FAILURE = Status.PROCESSING_FAILURE
