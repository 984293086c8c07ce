"""The shipped grader: card and weights valid, and a loose accuracy floor on fixed phantoms.

A regression guard, not the evaluation: the held-out evaluation is in docs/grading.md.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from ai.grading import DEFAULT_WEIGHTS_DIR, StenosisGrader
from ai.grading_model import CARD_FILE, WEIGHTS_FILE, validate_card
from ai.results import SCHIZAS_GRADES

#: Fixed phantom seeds, disjoint from training (ai.train_grader.TRAIN_SEED) and held-out.
SEED = 4242
#: Two slices per grade: at most two mistakes out of eight allowed.
MIN_CORRECT = 6


@pytest.fixture(scope="module")
def grader() -> StenosisGrader:
    return StenosisGrader.load("cpu")


def test_card_is_valid_and_matches_weights() -> None:
    card = json.loads((DEFAULT_WEIGHTS_DIR / CARD_FILE).read_text())
    validate_card(card)
    digest = hashlib.sha256((DEFAULT_WEIGHTS_DIR / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert card["sha256"] == digest
    assert card["evaluation"]["patch_level"]["macro_f1"] >= 0.85
    assert card["training"]["seed"] != card["evaluation"]["heldout_seed"]


def test_grader_reaches_floor_on_fixed_phantoms(grader: StenosisGrader) -> None:
    from ai.phantom import render_slice, sample_subject

    correct = 0
    for k, grade in enumerate(SCHIZAS_GRADES):
        for j in range(2):
            rng = np.random.default_rng([SEED, k, j])
            subject = sample_subject(rng, stenosis=grade, levels=("L4-L5",))
            mode = ("realistic", "randomised")[j]
            sl = render_slice(subject, "L4-L5", kind="disc", mode=mode, rng=rng)
            st = grader.grade_slice(sl.image, sl.labels, sl.pixel_spacing)
            assert st.dsca_mm2 == pytest.approx(sl.truth["dsca_mm2"], rel=1e-6)
            correct += int(st.schizas == sl.truth["schizas"])
    assert correct >= MIN_CORRECT


def test_grader_tells_cord_from_rootlets(grader: StenosisGrader) -> None:
    from ai.phantom import render_slice, sample_subject

    rng = np.random.default_rng([SEED, 99])
    subject = sample_subject(rng, stenosis="A", levels=("L1-L2", "L4-L5"), cord=True)
    cord = render_slice(subject, "L1-L2", kind="disc", mode="realistic", rng=rng)
    roots = render_slice(subject, "L4-L5", kind="disc", mode="realistic", rng=rng)
    assert cord.truth["rootlets"] == "cord" and roots.truth["rootlets"] == "rootlets"
    assert grader.grade_slice(cord.image, cord.labels, cord.pixel_spacing).rootlets == "cord"
    assert grader.grade_slice(roots.image, roots.labels, roots.pixel_spacing).rootlets == "rootlets"
