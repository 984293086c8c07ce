"""Series-level disc assignment (``ai.disc_assignment``) and its evidence (``ai.inference.disc_evidence``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ai.disc_assignment import (
    CENTRED_MAX_SLICES,
    EVEN_BLOCK_PEAK_RATIO,
    MAX_BLOCK_SLICES,
    assign_block_discs,
    centre_disc_runs,
    move_even_block_discs,
)
from ai.inference import disc_evidence
from ai.labels import Label
from ai.levels import KEEP_DISC_EVIDENCE, find_levels
from ai.volume import Volume

SIZE = 96
AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def _blocks(blocks: list[list[str]], step_mm: float = 4.4, level_gap_mm: float = 38.0) -> tuple[Volume, np.ndarray]:
    """Parallel blocks of slices, each slice an oval body of the given kind ("disc" / "body")."""
    rr, cc = np.mgrid[:SIZE, :SIZE]
    oval = ((rr - 40) / 18) ** 2 + ((cc - 48) / 26) ** 2 <= 1
    sac = ((rr - 68) / 6) ** 2 + ((cc - 48) / 8) ** 2 <= 1
    labels, z = [], []
    for b, kinds in enumerate(blocks):
        for k, kind in enumerate(kinds):
            lab = np.zeros((SIZE, SIZE), dtype=np.uint8)
            lab[oval] = int(Label.DISC if kind == "disc" else Label.VERTEBRAL_BODY)
            lab[sac] = int(Label.DURAL_SAC)
            labels.append(lab)
            z.append(b * level_gap_mm + k * step_mm)
    n = len(z)
    positions = np.array([[-(SIZE - 1) / 2, -(SIZE - 1) / 2, zi] for zi in z])
    vol = Volume(
        pixels=np.zeros((n, SIZE, SIZE), dtype=np.float32),
        pixel_spacing=(1.0, 1.0),
        positions=positions,
        orientations=np.tile(AXIAL, (n, 1)),
        slice_uids=tuple(f"1.2.3.{i}" for i in range(n)),
        series_instance_uid="1.2.3",
    )
    return vol, np.stack(labels)


def test_disc_less_block_gets_its_disc_at_the_evidence_peak() -> None:
    vol, labels = _blocks([["body", "disc", "disc", "body"], ["body"] * 5])
    evidence = np.array([0.01, 0.9, 0.95, 0.01, 0.003, 0.004, 0.2, 0.004, 0.003])
    out, flags = assign_block_discs(labels, vol, evidence)
    assert np.array_equal(out[:6], labels[:6]) and np.array_equal(out[7:], labels[7:])
    assert np.count_nonzero(out[6] == Label.DISC) == np.count_nonzero(labels[6] == Label.VERTEBRAL_BODY)
    assert not np.any(out[6] == Label.VERTEBRAL_BODY)
    assert np.count_nonzero(out[6] == Label.DURAL_SAC) == np.count_nonzero(labels[6] == Label.DURAL_SAC)
    assert len(flags) == 1 and flags[0].startswith("slice 6: block 2 had no disc slice")
    assert not np.any(labels[6] == Label.DISC), "the input must not change"
    # the level finder now finds the second level, read on the assigned slice
    assert [lv.mid_slice for lv in find_levels(labels, vol)] == [1]
    assert [lv.mid_slice for lv in find_levels(out, vol)][-1] == 6


@pytest.mark.parametrize(
    "evidence",
    [
        [0.003, 0.1, 0.2, 0.15, 0.003],  # peak not clear of a neighbour (ratio < 1.5)
        [0.003, 0.004, 0.004, 0.004, 0.3],  # peak on the block's edge
        [0.0002, 0.0005, 0.0025, 0.0005, 0.0002],  # peak below the absolute floor
    ],
)
def test_unclear_or_edge_peaks_change_nothing(evidence: list[float]) -> None:
    vol, labels = _blocks([["body"] * 5])
    out, flags = assign_block_discs(labels, vol, np.array(evidence))
    assert out is labels and flags == []


def test_a_confident_models_faint_peak_still_counts() -> None:
    # segmentation 1.3.0 on tuning study 7701_025: a black disc whose evidence is 0.0057
    vol, labels = _blocks([["body"] * 4])
    out, flags = assign_block_discs(labels, vol, np.array([0.0026, 0.0057, 0.0017, 0.0004]))
    assert len(flags) == 1 and "slice 1" in flags[0]
    assert (out[1] == Label.DISC).any() and not (out[1] == Label.VERTEBRAL_BODY).any()


def test_the_floor_is_the_callers_to_set() -> None:
    # a model card's calibration.disc_evidence_floor reaches this argument (ai.pipeline)
    vol, labels = _blocks([["body"] * 4])
    out, flags = assign_block_discs(labels, vol, np.array([0.0026, 0.0057, 0.0017, 0.0004]), min_evidence=0.01)
    assert out is labels and flags == []


def test_blocks_with_a_disc_and_long_stacks_are_left_alone() -> None:
    vol, labels = _blocks([["body", "body", "disc", "body", "body"]])
    out, flags = assign_block_discs(labels, vol, np.array([0.0, 0.5, 0.1, 0.0, 0.0]))
    assert out is labels and flags == []
    n = MAX_BLOCK_SLICES + 1  # a continuous stack: one block over several levels
    vol, labels = _blocks([["body"] * n])
    evidence = np.full(n, 0.003)
    evidence[n // 2] = 0.3
    out, flags = assign_block_discs(labels, vol, evidence)
    assert out is labels and flags == []


def test_evidence_must_match_the_slices() -> None:
    vol, labels = _blocks([["body"] * 3])
    with pytest.raises(ValueError, match="one value per slice"):
        assign_block_discs(labels, vol, np.zeros(2))


def test_disc_evidence_is_the_disc_share_of_the_confident_body() -> None:
    logits = torch.full((2, len(Label), 4, 4), -20.0)
    logits[:, int(Label.BACKGROUND)] = 0.0
    # slice 0: 4 body pixels, P(disc) = P(body) = 0.5 each -> share 0.5;
    # 4 more pixels where disc + body hold under half the probability: ignored
    logits[0, int(Label.DISC), :1, :] = 10.0
    logits[0, int(Label.VERTEBRAL_BODY), :1, :] = 10.0
    logits[0, int(Label.DISC), 1:2, :] = -1.0
    # slice 1: 8 pixels of pure body, 8 of pure disc -> share 0.5; no body at all would be 0
    logits[1, int(Label.VERTEBRAL_BODY), :2, :] = 20.0
    logits[1, int(Label.DISC), 2:, :] = 20.0
    ev = disc_evidence(logits)
    assert ev == pytest.approx([0.5, 0.5], abs=1e-3)
    logits[1, int(Label.DISC), 2:, :] = -20.0
    assert disc_evidence(logits)[1] == pytest.approx(0.0, abs=1e-3)
    empty = torch.zeros((1, len(Label), 4, 4))
    assert disc_evidence(empty)[0] == 0.0


def _kinds(labels: np.ndarray) -> list[str]:
    return ["disc" if np.any(lab == Label.DISC) else "body" for lab in labels]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        # a two-slice run holding the centre: the endplate beside a one-slice disc loses its disc
        (["body", "disc", "disc", "body", "body"], ["body", "body", "disc", "body", "body"]),
        (["body", "body", "disc", "disc", "body"], ["body", "body", "disc", "body", "body"]),
        (["disc", "disc", "body"], ["body", "disc", "body"]),
        # four of five: cut to the symmetric three
        (["disc", "disc", "disc", "disc", "body"], ["body", "disc", "disc", "disc", "body"]),
    ],
)
def test_a_disc_run_is_cut_to_its_part_symmetric_about_the_block_centre(block: list[str], expected: list[str]) -> None:
    vol, labels = _blocks([block, ["body", "body", "disc", "body", "body"]])
    out, flags = centre_disc_runs(labels, vol)
    assert _kinds(out[: len(block)]) == expected
    assert np.array_equal(out[len(block):], labels[len(block):])
    changed = [k for k in range(len(block)) if expected[k] != block[k]]
    assert [f.split(":")[0] for f in flags] == [f"slice {k}" for k in changed]
    for k in changed:  # identity only: the column keeps its extent, nothing else moves
        assert np.array_equal(out[k] == Label.VERTEBRAL_BODY, labels[k] == Label.DISC)
        assert np.array_equal(out[k] == Label.DURAL_SAC, labels[k] == Label.DURAL_SAC)
    assert _kinds(labels[: len(block)]) == block, "the input must not change"


@pytest.mark.parametrize(
    ("block", "evidence", "expected"),
    [
        # the slice the cut would remove is near-certain disc: its mirror slice becomes disc
        (["body", "disc", "disc", "body", "body"], [0.01, 0.996, 0.996, 0.49, 0.01],
         ["body", "disc", "disc", "disc", "body"]),
        (["body", "body", "disc", "disc", "body"], [0.01, 0.05, 0.997, 0.987, 0.01],
         ["body", "disc", "disc", "disc", "body"]),
        # just under the guard: cut as without evidence
        (["body", "disc", "disc", "body", "body"], [0.01, KEEP_DISC_EVIDENCE - 0.01, 0.996, 0.49, 0.01],
         ["body", "body", "disc", "body", "body"]),
        # four of five, the outer one certain: five
        (["disc", "disc", "disc", "disc", "body"], [0.99, 0.99, 0.99, 0.99, 0.2], ["disc"] * 5),
    ],
)
def test_a_near_certain_disc_slice_is_not_cut_the_run_is_made_symmetric_the_other_way(
    block: list[str], evidence: list[float], expected: list[str]
) -> None:
    vol, labels = _blocks([block])
    out, flags = centre_disc_runs(labels, vol, np.array(evidence))
    assert _kinds(out) == expected
    changed = [k for k in range(len(block)) if expected[k] != block[k]]
    assert [f.split(":")[0] for f in flags] == [f"slice {k}" for k in changed]
    for k in changed:
        assert np.array_equal(out[k] == Label.DISC, labels[k] == Label.VERTEBRAL_BODY)
        assert np.array_equal(out[k] == Label.DURAL_SAC, labels[k] == Label.DURAL_SAC)
    assert _kinds(labels) == block, "the input must not change"


@pytest.mark.parametrize(
    "block",
    [
        ["body", "disc", "body"],
        ["body", "disc", "disc", "disc", "body"],
        ["disc", "disc", "disc"],
        ["body", "disc", "body", "disc", "body"],  # a stray disc slice not joined to the centre's run
        ["body", "disc", "disc", "body", "body"][:4],  # even block: no centre slice
        ["disc", "disc", "body", "body", "body"],  # centre slice not disc: the series assignment's case
        # longer than a planned block (odd, centre disc, run of two: cut if it were shorter)
        ["body"] * (CENTRED_MAX_SLICES // 2 + 1) + ["disc"] * 2 + ["body"] * (CENTRED_MAX_SLICES // 2),
    ],
)
def test_symmetric_runs_even_blocks_and_long_stacks_are_left_alone(block: list[str]) -> None:
    vol, labels = _blocks([block])
    out, flags = centre_disc_runs(labels, vol)
    assert out is labels and flags == []


@pytest.mark.parametrize(
    ("block", "evidence", "expected"),
    [
        # tuning study 7708_030: the refiner's disc on slice 2, the model's evidence 40 times higher on 1
        (["body", "body", "disc", "body"], [0.007, 0.445, 0.011, 0.001], ["body", "disc", "body", "body"]),
        # 7706_034: a peak only 3 times higher is not enough (there the disc slice was right)
        (["body", "disc", "body", "body"], [0.006, 0.014, 0.007, 0.043], None),
        (["body", "disc", "body", "body"], [0.006, 0.014, 0.9 * EVEN_BLOCK_PEAK_RATIO * 0.014, 0.0], None),
        # the peak on an outer slice does not count (a block is planned through its disc)
        (["body", "disc", "body", "body"], [0.9, 0.01, 0.0, 0.0], None),
        # odd blocks belong to the centring; two disc slices are not one
        (["body", "body", "disc", "body", "body"], [0.0, 0.5, 0.01, 0.0, 0.0], None),
        (["body", "disc", "disc", "body"], [0.0, 0.01, 0.01, 0.0], None),
        # below the evidence floor nothing is a peak
        (["body", "body", "disc", "body"], [0.0, 0.002, 0.0001, 0.0], None),
    ],
)
def test_an_even_blocks_disc_moves_to_a_far_stronger_evidence_peak(
    block: list[str], evidence: list[float], expected: list[str] | None
) -> None:
    vol, labels = _blocks([block])
    out, flags = move_even_block_discs(labels, vol, np.array(evidence))
    if expected is None:
        assert out is labels and flags == []
        return
    assert _kinds(out) == expected
    new = expected.index("disc")
    assert [f.split(":")[0] for f in flags] == [f"slice {new}"]
    assert np.array_equal(out[new] == Label.DISC, labels[new] == Label.VERTEBRAL_BODY)
    assert _kinds(labels) == block, "the input must not change"
