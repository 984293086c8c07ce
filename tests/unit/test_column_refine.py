"""Column refiner (ai.column_refine): block input, identity-only changes, card, shipped model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ai.canal_refine import patch_coords, patch_matrix
from ai.column_refine import (
    CARD_FILE,
    SHIPPED_WEIGHTS_DIR,
    WEIGHTS_FILE,
    ColumnRefiner,
    ColumnRefinerError,
    block_input,
    column_centre,
    in_channels,
)
from ai.labels import Label

DISC = int(Label.DISC)
BODY = int(Label.VERTEBRAL_BODY)


def _block(n: int = 3, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([np.full((size, size), 100.0 * (k + 1), np.float32) for k in range(n)])
    labels = np.zeros((n, size, size), np.uint8)
    labels[:, 30:60, 30:70] = BODY
    labels[n // 2, 30:60, 30:70] = DISC
    return images, labels


def test_block_input_marks_missing_neighbours_and_signs_the_column() -> None:
    images, labels = _block()
    centre = column_centre(labels[0])
    assert centre is not None and centre == pytest.approx((44.5, 49.5))
    coords = patch_coords(centre, patch_matrix((1.0, 1.0), 1.6), 48)
    first = block_input(images, labels, 0, coords)
    middle = block_input(images, labels, 1, coords)
    assert first.shape == middle.shape == (in_channels(1), 48, 48) == (8, 48, 48)
    # slice 0 has no lower neighbour: zero image, zero column, presence plane 0
    assert not first[0].any() and not first[3].any()
    assert first[6].max() == 0.0 and first[7].min() == 1.0
    assert middle[6].min() == 1.0 and middle[7].min() == 1.0
    # coarse column: +1 disc on the middle slice, -1 body on its neighbours
    assert middle[4].max() == pytest.approx(1.0) and middle[3].min() == pytest.approx(-1.0)
    assert column_centre(np.zeros((10, 10), np.uint8)) is None


def test_block_input_with_two_neighbours_each_side() -> None:
    """Context 2 (version 2 weights): images and columns of k-2 .. k+2, presence of the four neighbours."""
    images, labels = _block(4)
    images = images + np.linspace(0.0, 300.0, images.shape[-1], dtype=np.float32)  # a ramp to normalise on
    coords = patch_coords(column_centre(labels[1]), patch_matrix((1.0, 1.0), 1.2), 64)  # type: ignore[arg-type]
    x = block_input(images, labels, 1, coords, context=2)
    assert x.shape == (in_channels(2), 64, 64) == (14, 64, 64)
    # image planes k-2 (missing), k-1, k, k+1, k+2 (100 brighter each), normalised on slice k
    assert not x[0].any()
    assert x[1].mean() < x[2].mean() < x[3].mean() < x[4].mean()
    # column planes: k+1 (index 2 of the block) is the disc, the others body, k-2 missing
    assert not x[5].any() and x[6].min() == pytest.approx(-1.0) and x[8].max() == pytest.approx(1.0)
    # presence of k-2, k-1, k+1, k+2
    assert [float(x[c].mean()) for c in range(10, 14)] == [0.0, 1.0, 1.0, 1.0]


def test_card_checksum_and_fields_checked(tmp_path: Path) -> None:
    shutil.copy(SHIPPED_WEIGHTS_DIR / WEIGHTS_FILE, tmp_path / WEIGHTS_FILE)
    card = json.loads((SHIPPED_WEIGHTS_DIR / CARD_FILE).read_text())
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    assert ColumnRefiner.load(tmp_path).version == card["version"]
    (tmp_path / CARD_FILE).write_text(json.dumps({**card, "weights_sha256": "0" * 64}))
    with pytest.raises(ColumnRefinerError, match="checksum"):
        ColumnRefiner.load(tmp_path)
    (tmp_path / CARD_FILE).write_text(json.dumps({**card, "classes": ["other", "disc"]}))
    with pytest.raises(ColumnRefinerError, match="classes"):
        ColumnRefiner.load(tmp_path)
    (tmp_path / CARD_FILE).write_text(json.dumps({**card, "config": {**card["config"], "min_share": 0.2}}))
    with pytest.raises(ColumnRefinerError, match="min_share"):
        ColumnRefiner.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        ColumnRefiner.load(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def randomised_study(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Tuning study PHANTOM_7703_006 (randomised contrast): the 2D model calls its slice-7
    disc vertebral body; the slice's neighbours in the block show it is disc."""
    from node.commands.evaluate import phantom_cases
    from node.phantom_dicom import PhantomOptions, write_phantom_studies

    out = tmp_path_factory.mktemp("col")
    opts = PhantomOptions(seed=7703, subjects=6, mode="randomised", matrix=448, spacing=0.55,
                          sagittal=False, distractor=False)
    write_phantom_studies(out, opts)
    return next(c for c in phantom_cases(out) if c.name == "PHANTOM_7703_006")


def test_shipped_refiner_changes_identity_only_and_restores_a_lost_disc(randomised_study) -> None:  # type: ignore[no-untyped-def]
    from ai.inference import pre_process, predict_native
    from ai.pipeline import Analyzer
    from ai.postprocess import post_process

    analyzer = Analyzer(device="cpu", batch_size=4, refine=False)
    volume, truth = randomised_study.volume, randomised_study.truth_labels
    raw = predict_native(analyzer.model, pre_process(volume, analyzer.card), analyzer.device, 4, None)
    coarse, _ = post_process(raw.labels, volume)
    refined, flags = ColumnRefiner.load().refine(coarse, volume)
    column = np.isin(coarse, (DISC, BODY))
    # identity only: the column keeps its pixels, everything else is untouched
    assert np.array_equal(np.isin(refined, (DISC, BODY)), column)
    assert np.array_equal(refined[~column], coarse[~column])

    def disc_dice(labels: np.ndarray, k: int) -> float:
        a, b = labels[k] == DISC, truth[k] == DISC
        return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)

    assert disc_dice(coarse, 7) < 0.1
    assert disc_dice(refined, 7) > 0.9
    assert any(f.startswith("slice 7:") for f in flags)
    discs = [k for k in range(len(truth)) if (truth[k] == DISC).any()]
    assert np.mean([disc_dice(refined, k) for k in discs]) >= np.mean([disc_dice(coarse, k) for k in discs])


def test_blocks_longer_than_trained_keep_the_coarse_column(monkeypatch: pytest.MonkeyPatch) -> None:
    from ai.column_refine import MAX_BLOCK_SLICES
    from ai.volume import Volume

    n = MAX_BLOCK_SLICES + 2
    images, labels = _block(n)
    volume = Volume(
        pixels=images, pixel_spacing=(1.0, 1.0),
        positions=np.array([[0.0, 0.0, 4.0 * k] for k in range(n)]),
        orientations=np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1)),
        slice_uids=tuple(f"1.2.{k}" for k in range(n)), series_instance_uid="1.2",
    )
    refiner = ColumnRefiner.load()

    def no_network(patches: np.ndarray) -> None:
        raise AssertionError("the network ran on a continuous stack")

    monkeypatch.setattr(refiner, "predict_patches", no_network)
    out, flags = refiner.refine(labels, volume)
    assert np.array_equal(out, labels) and flags == []


def test_continuous_stack_levels_and_names_with_the_shipped_pipeline() -> None:
    """Held-out grading series 22 (continuous, untilted, L3-L4..L5-S1): the column refiner once
    turned its vertebral-body slices into discs and five levels L1-L2..L5-S1 were reported."""
    from ai.grading_heldout import phantom_series
    from ai.pipeline import Analyzer

    series = phantom_series(22)
    assert series.truth["layout"] == "continuous"
    result = Analyzer(device="cpu", batch_size=8).analyze(series.volume)
    assert [lv.level for lv in result.levels] == [lv["level"] for lv in series.truth["levels"]]
