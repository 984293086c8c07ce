"""The image volume handed from the node to the analysis.

Slices may come from several angled blocks (one block per disc is the common lumbar
axial protocol), so orientation and position are kept per slice, not per volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Volume:
    """A stack of 2D slices with their patient geometry (DICOM LPS, millimetres).

    Attributes
    ----------
    pixels
        ``(n_slices, rows, columns)`` float32 stored values after rescale; slices are
        sorted caudal to cranial (ascending patient z of the slice centre).
    pixel_spacing
        ``(row_spacing, column_spacing)`` in mm (DICOM PixelSpacing order), same for all
        slices.
    positions
        ``(n_slices, 3)`` ImagePositionPatient of each slice (centre of the first pixel).
    orientations
        ``(n_slices, 6)`` ImageOrientationPatient (row cosines then column cosines).
    slice_thickness
        Nominal slice thickness in mm, if known.
    slice_uids
        SOP Instance UID of each slice's source instance.
    frame_numbers
        1-based frame number within that instance (1 for single-frame images).
    series_instance_uid
        The source series.
    """

    pixels: np.ndarray
    pixel_spacing: tuple[float, float]
    positions: np.ndarray
    orientations: np.ndarray
    slice_uids: tuple[str, ...]
    series_instance_uid: str
    slice_thickness: float | None = None
    frame_numbers: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3:
            raise ValueError(f"pixels must be (slices, rows, columns), got {self.pixels.shape}")
        n = self.pixels.shape[0]
        if self.positions.shape != (n, 3):
            raise ValueError(f"positions must be ({n}, 3), got {self.positions.shape}")
        if self.orientations.shape != (n, 6):
            raise ValueError(f"orientations must be ({n}, 6), got {self.orientations.shape}")
        if len(self.slice_uids) != n:
            raise ValueError(f"slice_uids must have {n} entries, got {len(self.slice_uids)}")
        if self.frame_numbers and len(self.frame_numbers) != n:
            raise ValueError(f"frame_numbers must have {n} entries")
        if not self.frame_numbers:
            object.__setattr__(self, "frame_numbers", (1,) * n)
        rs, cs = self.pixel_spacing
        if not (np.isfinite(rs) and np.isfinite(cs) and rs > 0 and cs > 0):
            raise ValueError(f"pixel_spacing must be positive and finite, got {self.pixel_spacing}")

    @property
    def n_slices(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def pixel_area_mm2(self) -> float:
        return float(self.pixel_spacing[0] * self.pixel_spacing[1])

    def normals(self) -> np.ndarray:
        """Unit slice normals ``(n, 3)`` (row cosine x column cosine)."""
        n = np.cross(self.orientations[:, :3], self.orientations[:, 3:])
        return n / np.linalg.norm(n, axis=1, keepdims=True)

    def centres(self) -> np.ndarray:
        """Patient coordinates ``(n, 3)`` of each slice's centre."""
        rows, cols = self.pixels.shape[1:]
        rs, cs = self.pixel_spacing
        row_dir = self.orientations[:, :3]
        col_dir = self.orientations[:, 3:]
        return (
            self.positions
            + row_dir * cs * (cols - 1) / 2.0
            + col_dir * rs * (rows - 1) / 2.0
        )
