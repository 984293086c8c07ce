"""`lumbar-node train --task column`: the data it renders, its settings, and a short run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ai.column_refine import ColumnRefiner
from ai.train_column import ColumnTrainConfig, render_study, train_column


def test_in_memory_studies_equal_what_the_phantom_command_writes(tmp_path: Path) -> None:
    """Training sees the node's view of `lumbar-node phantom --seed S` subject i, pixel for pixel."""
    from node.commands.evaluate import phantom_cases
    from node.phantom_dicom import PhantomOptions, write_phantom_studies

    opts = PhantomOptions(seed=5107, subjects=1, mode="randomised", matrix=160, spacing=1.4,
                          sagittal=False, distractor=False)
    write_phantom_studies(tmp_path, opts)
    (case,) = list(phantom_cases(tmp_path))
    volume, truth = render_study(5107, 0, "randomised", 160, 1.4)
    assert np.array_equal(volume.pixels, case.volume.pixels)
    assert np.array_equal(truth, case.truth_labels)
    assert np.array_equal(volume.positions, case.volume.positions)
    assert np.array_equal(volume.orientations, case.volume.orientations)
    assert volume.pixel_spacing == case.volume.pixel_spacing


def test_swapped_slices_counts_a_column_given_the_other_identity_on_most_of_it() -> None:
    from ai.train_column import BODY, DISC, swapped_slices

    truth = np.zeros((4, 10, 10), np.uint8)
    truth[:, 2:8, 2:8] = BODY
    truth[1, 2:8, 2:8] = DISC
    pred = truth.copy()
    assert swapped_slices(pred, truth) == 0
    pred[1, 2:8, 2:8] = BODY  # the disc slice called body in full
    pred[2, 2:5, 2:8] = DISC  # half of a body slice called disc: not more than half
    pred[3, 2:6, 2:8] = DISC  # two thirds: swapped
    assert swapped_slices(pred, truth) == 2


def test_flip_identities_swaps_disc_and_body_on_drawn_slices_only() -> None:
    from ai.train_column import BODY, DISC, flip_identities

    labels = np.zeros((3, 6, 6), np.uint8)
    labels[:, 1:5, 1:5] = BODY
    labels[1, 1:5, 1:5] = DISC
    labels[:, 0, 0] = 7  # another structure: never touched
    rng = np.random.default_rng(0)
    assert flip_identities(labels, 0.0, rng) is labels
    out = flip_identities(labels, 0.999999, rng)
    assert (out[[0, 2]][:, 1:5, 1:5] == DISC).all() and (out[1, 1:5, 1:5] == BODY).all()
    assert (out[:, 0, 0] == 7).all() and ((out > 0) == (labels > 0)).all()  # same extent
    assert (labels[1, 1:5, 1:5] == DISC).all()  # the input is not changed
    shares = [flip_identities(labels, 0.2, np.random.default_rng(s))[0, 2, 2] == DISC for s in range(400)]
    assert 0.14 < np.mean(shares) < 0.26


def test_config_keeps_evaluation_and_validation_seeds_out_of_training() -> None:
    with pytest.raises(ValueError, match="evaluation and tuning"):
        ColumnTrainConfig(sets=((9002, 5, "randomised", 448, 0.55),))
    with pytest.raises(ValueError, match="evaluation and tuning"):
        ColumnTrainConfig(val_sets=((7704, 5, "realistic", 320, 0.7),))
    with pytest.raises(ValueError, match="different seeds"):
        ColumnTrainConfig(sets=((5301, 5, "randomised", 448, 0.55),))
    with pytest.raises(ValueError, match="realistic|randomised"):
        ColumnTrainConfig(sets=((5101, 5, "noise", 448, 0.55),))
    with pytest.raises(ValueError, match="label_flip"):
        ColumnTrainConfig(label_flip=0.5)


SMALL = ColumnTrainConfig(sets=((5101, 1, "randomised", 256, 1.0),),
                          val_sets=((5301, 1, "realistic", 256, 1.0), (5302, 1, "randomised", 192, 1.3)),
                          steps=4, batch_size=4, val_every=2)


def test_a_short_run_writes_loadable_weights_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    card = train_column(out, SMALL, max_minutes=0.0)  # stops after its first step
    assert card["training"]["step"] == 1
    refiner = ColumnRefiner.load(out / "best")
    assert refiner.card["weights_sha256"] == card["weights_sha256"]
    val = card["evaluation"]["validation"]
    # validation studies of two matrix sizes and both modes, each reported
    assert set(val) == {"all", "realistic", "randomised"} and val["all"]["studies"] == 2
    assert set(val["all"]) == {"studies", "coarse", "refined"}
    assert 0.0 <= val["all"]["coarse"]["disc_dice"] <= 1.0
    assert val["all"]["refined"]["swapped_slices"] >= 0
    assert len(list(out.glob("column-blocks-*.pkl"))) == 1  # rendered once, cached

    with pytest.raises(ValueError, match="another configuration"):
        train_column(out, dataclasses.replace(SMALL, lr=1e-3), resume=True)
    train_column(out, SMALL, resume=True)
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 4]
    last = json.loads((out / "last" / "column-card.json").read_text())
    assert last["training"]["step"] == 4
    assert last["training"]["config"]["sets"] == [[5101, 1, "randomised", 256, 1.0]]


def test_a_fine_tune_records_the_stages_behind_its_starting_weights(tmp_path: Path) -> None:
    """`--init`: the card names its starting weights and every stage that made them, oldest first."""
    first = train_column(tmp_path / "a", SMALL, max_minutes=0.0, cache_dir=tmp_path)
    assert "init_weights" not in first["training"]
    second = train_column(tmp_path / "b", SMALL, max_minutes=0.0, cache_dir=tmp_path, init_dir=tmp_path / "a" / "best")
    third = train_column(tmp_path / "c", SMALL, max_minutes=0.0, cache_dir=tmp_path, init_dir=tmp_path / "b" / "best")
    assert third["training"]["init_weights"]["weights_sha256"] == second["weights_sha256"]
    stages = third["training"]["previous_stages"]
    assert [st["weights_sha256"] for st in stages] == [first["weights_sha256"], second["weights_sha256"]]
    assert stages[1]["init_weights"]["weights_sha256"] == first["weights_sha256"]
    assert all("previous_stages" not in st for st in stages)


def test_the_shipped_card_records_the_default_configuration() -> None:
    """The shipped weights are `train --task column`'s default run: changing a default needs retraining."""
    card = ColumnRefiner.load().card
    recorded = {"label_flip": 0.0, **card["training"]["config"]}  # a card older than the option ran without it
    assert recorded == ColumnTrainConfig().to_dict()
    assert card["training"]["command"].startswith("lumbar-node train --task column")


def test_the_command_line_maps_onto_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`train --task column --pool-subjects 3 --steps 7` trains every default set with 3 studies."""
    import ai.train_column
    from node.cli import main

    seen: dict[str, object] = {}

    def fake_train(out: Path, cfg: ColumnTrainConfig, **kwargs: object) -> dict[str, object]:
        seen.update(out=out, cfg=cfg, **kwargs)
        return {"evaluation": {"validation": {"all": {"studies": 1}}}}

    monkeypatch.setattr(ai.train_column, "train_column", fake_train)
    assert main(["train", "--task", "column", "--out", str(tmp_path), "--pool-subjects", "3",
                 "--steps", "7", "--threads", "2", "--label-flip", "0.15"]) == 0
    cfg = seen["cfg"]
    assert isinstance(cfg, ColumnTrainConfig)
    assert cfg.label_flip == 0.15
    assert cfg.steps == 7 and [s[1] for s in cfg.sets] == [3] * len(ColumnTrainConfig().sets)
    assert [s[0] for s in cfg.sets] == [s[0] for s in ColumnTrainConfig().sets]
    assert seen["out"] == tmp_path and seen["threads"] == 2
