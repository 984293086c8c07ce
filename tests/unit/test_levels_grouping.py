"""Disc-level grouping and naming on synthetic label volumes with known disc slices."""

from __future__ import annotations

import numpy as np
import pytest

from ai.labels import Label
from ai.levels import (
    LevelAssignment,
    find_levels,
    group_levels,
    split_blocks,
)
from ai.volume import Volume

SIZE = 128  # pixels, 1 mm each
CANAL = (70, 64)  # row, col of the canal centre


def _tilted_orientation(tilt_deg: float) -> np.ndarray:
    """Axial orientation tilted about the patient x axis (rows keep +x)."""
    t = np.radians(tilt_deg)
    return np.array([1.0, 0.0, 0.0, 0.0, np.cos(t), np.sin(t)])


def _volume(z_centres: list[float], tilts: list[float], pixels: np.ndarray) -> Volume:
    n = len(z_centres)
    orientations = np.stack([_tilted_orientation(t) for t in tilts])
    positions = np.zeros((n, 3))
    half = (SIZE - 1) / 2.0
    for i in range(n):
        row_dir, col_dir = orientations[i, :3], orientations[i, 3:]
        centre = np.array([0.0, 0.0, z_centres[i]])
        positions[i] = centre - row_dir * half - col_dir * half
    return Volume(
        pixels=pixels.astype(np.float32),
        pixel_spacing=(1.0, 1.0),
        positions=positions,
        orientations=orientations,
        slice_uids=tuple(f"1.2.3.{i}" for i in range(n)),
        series_instance_uid="1.2.3",
    )


def _slice(kind: str, disc_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and image of one slice: a disc or a vertebral body, canal, fat rim."""
    lab = np.zeros((SIZE, SIZE), dtype=np.uint8)
    img = np.full((SIZE, SIZE), 0.2, dtype=np.float32)
    rr, cc = np.mgrid[:SIZE, :SIZE]
    body = ((rr - 45) / (16 * disc_scale)) ** 2 + ((cc - 64) / (24 * disc_scale)) ** 2 <= 1
    lab[body] = int(Label.DISC if kind == "disc" else Label.VERTEBRAL_BODY)
    sac = ((rr - CANAL[0]) / 6) ** 2 + ((cc - CANAL[1]) / 8) ** 2 <= 1
    lab[sac] = int(Label.DURAL_SAC)
    img[sac] = 0.9
    fat = (rr >= 110) & (rr < 120) & (cc >= 30) & (cc < 98)
    lab[fat] = int(Label.SUBCUTANEOUS_FAT)
    img[fat] = 1.0
    # T2 reference tissues (the image cues check their contrast premises on them):
    # lamina behind the canal and the multifidus on either side, dark muscle.
    lamina = (rr >= 80) & (rr < 84) & (cc >= 54) & (cc < 74)
    lab[lamina] = int(Label.POSTERIOR_ELEMENTS)
    img[lamina] = 0.3
    for side, c0 in ((Label.MULTIFIDUS_RIGHT, 44), (Label.MULTIFIDUS_LEFT, 76)):
        muscle = (rr >= 86) & (rr < 104) & (cc >= c0) & (cc < c0 + 8)
        lab[muscle] = int(side)
        img[muscle] = 0.2
    return lab, img


def _stack(kinds: list[str], scales: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    scales = scales or [1.0] * len(kinds)
    labs, imgs = zip(*(_slice(k, s) for k, s in zip(kinds, scales, strict=True)), strict=True)
    return np.stack(labs), np.stack(imgs)


def _add_iliac_wings(img: np.ndarray) -> None:
    """Two iliac wings: thin long marrow bands (half the fat signal) in dark cortex."""
    for c0 in (2, 114):
        img[28:72, c0 : c0 + 12] = 0.05
        img[30:70, c0 + 1 : c0 + 11] = 0.5


def _add_cord(img: np.ndarray) -> None:
    rr, cc = np.mgrid[:SIZE, :SIZE]
    img[((rr - CANAL[0]) / 4) ** 2 + ((cc - CANAL[1]) / 4.5) ** 2 <= 1] = 0.2


def _continuous() -> tuple[Volume, np.ndarray, list[list[int]]]:
    """60 slices, 4 mm apart; discs at slices 5-7, 15-17, 25-27 (40 mm apart)."""
    n = 36
    kinds = ["body"] * n
    discs = [[5, 6, 7], [15, 16, 17], [25, 26, 27]]
    scales = [1.0] * n
    for run in discs:
        for i in run:
            kinds[i] = "disc"
        scales[run[0]] = 0.8
        scales[run[2]] = 0.8
    labels, img = _stack(kinds, scales)
    vol = _volume([4.0 * i for i in range(n)], [0.0] * n, img)
    return vol, labels, discs


def _blocks(
    z_mid: list[float], tilts: list[float], per_block: int = 4
) -> tuple[Volume, np.ndarray, list[list[int]]]:
    """One angled block per disc; all slices but the first of each block are disc."""
    z: list[float] = []
    t: list[float] = []
    kinds: list[str] = []
    groups: list[list[int]] = []
    for zm, tilt in zip(z_mid, tilts, strict=True):
        start = len(z)
        for k in range(per_block):
            z.append(zm + 4.0 * (k - (per_block - 1) / 2))
            t.append(tilt)
            kinds.append("body" if k == 0 else "disc")
        groups.append(list(range(start + 1, start + per_block)))
    labels, img = _stack(kinds)
    return _volume(z, t, img), labels, groups


def test_continuous_stack_groups_runs_between_bodies() -> None:
    vol, labels, discs = _continuous()
    assert len(split_blocks(vol)) == 1
    groups = group_levels(labels, vol)
    assert [g for g, _ in groups] == discs
    assert [m for _, m in groups] == [6, 16, 26]


def test_angled_blocks_split_into_levels_by_geometry() -> None:
    vol, labels, groups = _blocks([0.0, 40.0, 80.0], [20.0, 10.0, 0.0])
    assert len(split_blocks(vol)) == 3
    found = find_levels(labels, vol)
    assert [lv.slice_indices for lv in found] == groups
    assert [lv.position for lv in found] == [1, 2, 3]
    assert all(lv.mid_slice in lv.slice_indices for lv in found)


def test_adjacent_disc_only_blocks_are_not_merged_across_levels() -> None:
    # Blocks with only disc slices touch each other: the geometry must split them.
    vol, labels, groups = _blocks([0.0, 38.0], [12.0, 4.0], per_block=3)
    labels[[0, 3]] = _stack(["disc", "disc"])[0]
    found = find_levels(labels, vol)
    assert [lv.slice_indices for lv in found] == [[0, 1, 2], [3, 4, 5]]


def test_overlapping_blocks_over_one_disc_merge() -> None:
    vol, labels, _ = _blocks([0.0, 6.0], [10.0, 8.0], per_block=3)
    found = find_levels(labels, vol)
    assert len(found) == 1
    assert found[0].slice_indices == [1, 2, 4, 5]


def test_no_cues_means_no_names() -> None:
    vol, labels, _ = _continuous()
    found = find_levels(labels, vol)
    assert len(found) == 3
    assert all(lv.level is None and lv.confidence == 0.0 for lv in found)
    assert found[1].display_name == "level 2 from caudal, unlabelled"


def test_iliac_wings_at_caudal_level_name_from_l5_s1_up() -> None:
    vol, labels, _ = _continuous()
    pixels = vol.pixels.copy()
    for i in (5, 6, 7):
        _add_iliac_wings(pixels[i])
    vol = _volume(list(vol.centres()[:, 2]), [0.0] * vol.n_slices, pixels)
    found = find_levels(labels, vol)
    assert [lv.level for lv in found] == ["L5-S1", "L4-L5", "L3-L4"]
    assert all(lv.confidence >= 0.8 for lv in found)
    assert found[0].evidence["pelvis_area_mm2"] > 600
    assert found[1].evidence["pelvis_area_mm2"] == 0


def test_skipped_level_is_counted_from_block_gap() -> None:
    vol, labels, _ = _blocks([0.0, 38.0, 114.0], [20.0, 10.0, 0.0])
    pixels = vol.pixels.copy()
    for i in (1, 2, 3):
        _add_iliac_wings(pixels[i])
    vol = _volume(list(vol.centres()[:, 2]), [20.0] * 4 + [10.0] * 4 + [0.0] * 4, pixels)
    found = find_levels(labels, vol)
    assert [lv.level for lv in found] == ["L5-S1", "L4-L5", "L2-L3"]


def test_cord_at_top_level_names_l1_l2_downwards() -> None:
    vol, labels, _ = _continuous()
    pixels = vol.pixels.copy()
    for i in (25, 26, 27):
        _add_cord(pixels[i])
    vol = _volume(list(vol.centres()[:, 2]), [0.0] * vol.n_slices, pixels)
    found = find_levels(labels, vol)
    assert [lv.level for lv in found] == ["L3-L4", "L2-L3", "L1-L2"]
    assert found[2].evidence["cord_fraction"] > 0.2
    assert found[0].evidence["cord_fraction"] == 0


def test_image_cues_are_no_evidence_when_the_contrast_is_not_t2() -> None:
    """Wings and cord drawn in, but the muscle is as bright as the fat (not T2 contrast):
    both cues are set aside and the levels stay unnamed instead of being named from cues
    whose premise fails (before the check, absent wings read as evidence against L5-S1)."""
    vol, labels, _ = _continuous()
    pixels = vol.pixels.copy()
    for i in (5, 6, 7):
        _add_iliac_wings(pixels[i])
    for i in (25, 26, 27):
        _add_cord(pixels[i])
    muscle = np.isin(labels, [int(Label.MULTIFIDUS_LEFT), int(Label.MULTIFIDUS_RIGHT)])
    pixels[muscle] = 0.95
    vol = _volume(list(vol.centres()[:, 2]), [0.0] * vol.n_slices, pixels)
    found = find_levels(labels, vol)
    assert [lv.level for lv in found] == [None, None, None]
    assert all(not lv.evidence["pelvis_observable"] for lv in found)
    assert all(not lv.evidence["cord_observable"] for lv in found)
    assert found[0].evidence["pelvis_area_mm2"] == 0 and found[2].evidence["cord_fraction"] == 0


def test_sagittal_hint_names_matching_levels() -> None:
    vol, labels, _ = _continuous()
    z = vol.centres()[:, 2]
    hint = {"L4-L5": (0.0, 0.0, float(z[16]) + 3.0)}
    found = find_levels(labels, vol, sagittal_hint=hint)
    assert [lv.level for lv in found] == ["L5-S1", "L4-L5", "L3-L4"]
    far = {"L4-L5": (0.0, 0.0, float(z[16]) + 20.0)}
    assert all(lv.level is None for lv in find_levels(labels, vol, sagittal_hint=far))


def test_empty_and_mismatched_inputs() -> None:
    vol, labels, _ = _continuous()
    assert find_levels(np.zeros_like(labels), vol) == []
    with pytest.raises(ValueError, match="shape"):
        find_levels(labels[:-1], vol)


def test_level_assignment_validates() -> None:
    with pytest.raises(ValueError, match="level"):
        LevelAssignment("L6-S1", 1, [1], 1, 0.9)
    with pytest.raises(ValueError, match="mid_slice"):
        LevelAssignment(None, 1, [1, 2], 5, 0.0)
    with pytest.raises(ValueError, match="position"):
        LevelAssignment(None, 0, [1], 1, 0.0)
