"""DSCA formula, grade thresholds, severity mapping, patch extraction, weights and card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ai.grading import (
    StenosisGrader,
    dsca_grade,
    dsca_mm2,
    grade_conflict,
    severity_from_schizas,
)
from ai.grading_model import (
    CARD_FILE,
    GraderConfig,
    SchizasNet,
    canal_centre,
    extract_patch,
    load_grader,
    save_grader,
    validate_card,
)
from ai.labels import Label
from ai.levels import LevelAssignment
from ai.results import Stenosis
from ai.volume import Volume


def test_dsca_is_sac_pixels_times_pixel_area() -> None:
    lab = np.zeros((50, 60), dtype=np.uint8)
    lab[10:20, 10:25] = int(Label.DURAL_SAC)  # 150 px
    lab[20:22, 10:25] = int(Label.EPIDURAL_SPACE)  # not counted
    assert dsca_mm2(lab, (0.5, 0.8)) == pytest.approx(150 * 0.4)
    assert dsca_mm2(np.zeros_like(lab), (1.0, 1.0)) == 0.0


@pytest.mark.parametrize(
    ("area", "grade"),
    [(250.0, "normal"), (100.0, "normal"), (99.99, "relative"), (75.0, "relative"), (74.9, "absolute"), (0.0, "absolute")],
)
def test_dsca_grade_thresholds(area: float, grade: str) -> None:
    assert dsca_grade(area) == grade


def test_dsca_grade_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        dsca_grade(-1.0)
    with pytest.raises(ValueError):
        dsca_grade(float("nan"))


@pytest.mark.parametrize(
    ("grade", "severity"),
    [("A", "normal/mild"), ("A3", "normal/mild"), ("B", "moderate"), ("C", "severe"), ("D", "severe")],
)
def test_severity_mapping(grade: str, severity: str) -> None:
    assert severity_from_schizas(grade) == severity


def test_severity_rejects_unknown_grade() -> None:
    with pytest.raises(ValueError):
        severity_from_schizas("E")


@pytest.mark.parametrize(
    ("schizas", "area", "conflict"),
    [("A", 74.0, "absolute"), ("A", 80.0, None), ("B", 40.0, None), ("B", 150.0, None),
     ("C", 99.0, None), ("C", 100.0, "normal"), ("D", 180.0, "normal"), ("D", 40.0, None)],
)
def test_grades_two_classes_apart_are_flagged(schizas: str, area: float, conflict: str | None) -> None:
    st = Stenosis(schizas=schizas, schizas_probabilities={g: 0.25 for g in "ABCD"}, dsca_mm2=area,
                  dsca_grade=dsca_grade(area), severity=severity_from_schizas(schizas),
                  rootlets="rootlets", rootlets_probability=0.9, confidence=0.5)
    why = grade_conflict(st)
    if conflict is None:
        assert why is None
    else:
        assert why is not None and conflict in why and f"{area:.0f} mm2" in why


def _slice() -> tuple[np.ndarray, np.ndarray]:
    rr, cc = np.mgrid[:100, :120]
    lab = np.zeros((100, 120), dtype=np.uint8)
    sac = ((rr - 40) / 8) ** 2 + ((cc - 70) / 10) ** 2 <= 1
    lab[sac] = int(Label.DURAL_SAC)
    img = np.where(sac, 1.0, 0.3).astype(np.float32)
    return img, lab


def test_canal_centre_and_patch_are_centred_on_the_sac() -> None:
    img, lab = _slice()
    r, c = canal_centre(lab)  # type: ignore[misc]
    assert (r, c) == pytest.approx((40.0, 70.0), abs=0.01)
    cfg = GraderConfig()
    patch = extract_patch(img, lab, (0.5, 0.5), config=cfg)
    assert patch.shape == (3, cfg.patch_px, cfg.patch_px)
    sac = patch[1]
    rows, cols = np.nonzero(sac > 0.5)
    mid = (cfg.patch_px - 1) / 2
    assert abs(rows.mean() - mid) < 1.0 and abs(cols.mean() - mid) < 1.0
    # area preserved by the resampling: 8 x 10 px * 0.25 mm2 ~ 62.8 mm2
    assert float(sac.sum()) * cfg.mm_per_px**2 == pytest.approx(np.pi * 4 * 5, rel=0.1)
    assert canal_centre(np.zeros_like(lab)) is None


def _card(cfg: GraderConfig) -> dict[str, object]:
    return {
        "name": "test-grader",
        "version": "0.0.1",
        "config": cfg.to_dict(),
        "classes": ["A", "B", "C", "D"],
        "training": {},
        "evaluation": {},
        "intended_use": "tests",
    }


def test_save_load_roundtrip_gives_same_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = GraderConfig()
    model = SchizasNet(cfg).eval()
    save_grader(model, _card(cfg), tmp_path)
    loaded, card = load_grader(tmp_path, torch.device("cpu"))
    assert card["name"] == "test-grader"
    x = torch.rand(2, 3, cfg.patch_px, cfg.patch_px)
    with torch.inference_mode():
        a, b = model(x)
        c, d = loaded(x)
    assert torch.allclose(a, c) and torch.allclose(b, d)


def test_card_validation_names_the_field(tmp_path: Path) -> None:
    cfg = GraderConfig()
    card = _card(cfg)
    del card["intended_use"]
    with pytest.raises(ValueError, match="intended_use"):
        validate_card(card)
    card = _card(cfg)
    card["classes"] = ["A", "B", "C"]
    with pytest.raises(ValueError, match="classes"):
        validate_card(card)
    save_grader(SchizasNet(cfg), _card(cfg), tmp_path)
    bad = json.loads((tmp_path / CARD_FILE).read_text())
    bad["config"]["patch_px"] = 4
    (tmp_path / CARD_FILE).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="patch_px"):
        load_grader(tmp_path, torch.device("cpu"))
    with pytest.raises(FileNotFoundError):
        load_grader(tmp_path / "missing", torch.device("cpu"))


def test_grade_fills_a_valid_stenosis() -> None:
    torch.manual_seed(0)
    grader = StenosisGrader(SchizasNet(), torch.device("cpu"), {"name": "t", "version": "0"})
    img, lab = _slice()
    pixels = np.stack([img, img])
    labels = np.stack([lab, lab])
    vol = Volume(
        pixels=pixels,
        pixel_spacing=(0.5, 0.5),
        positions=np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 4.0]]),
        orientations=np.tile([1.0, 0, 0, 0, 1.0, 0], (2, 1)),
        slice_uids=("1", "2"),
        series_instance_uid="1.2",
    )
    st = grader.grade(vol, labels, LevelAssignment(None, 1, [0, 1], 1, 0.0))
    assert sum(st.schizas_probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert st.dsca_mm2 == pytest.approx(dsca_mm2(lab, (0.5, 0.5)))
    assert st.dsca_grade == dsca_grade(st.dsca_mm2)
    assert st.severity == severity_from_schizas(st.schizas)
    assert (st.rootlets == "rootlets") == (st.rootlets_probability >= 0.5)
    assert 0.0 <= st.confidence <= 1.0
    # No canal on the slice: a result, but with a much lower confidence.
    empty = grader.grade(vol, np.zeros_like(labels), LevelAssignment(None, 1, [0, 1], 1, 0.0))
    assert empty.dsca_mm2 == 0.0 and empty.dsca_grade == "absolute"
    assert empty.confidence <= 0.25


def test_the_analysis_flags_a_level_whose_grades_disagree() -> None:
    """The pipeline keeps both grades and puts the disagreement in the series' flags."""
    from ai.pipeline import Analyzer

    class _Grader:
        def grade(self, volume: object, labels: object, level: object) -> Stenosis:
            return Stenosis(schizas="A", schizas_probabilities={"A": 0.4, "B": 0.3, "C": 0.2, "D": 0.1},
                            dsca_mm2=43.0, dsca_grade="absolute", severity="normal/mild",
                            rootlets="rootlets", rootlets_probability=0.9, confidence=0.36)

    analyzer = Analyzer.__new__(Analyzer)
    analyzer.grader = _Grader()
    flags: list[str] = []
    st = analyzer._grade(None, None, None, flags, "L3-L4")  # type: ignore[arg-type]
    assert st is not None and st.schizas == "A" and st.dsca_grade == "absolute"
    assert len(flags) == 1 and flags[0].startswith("L3-L4: grades disagree") and "43 mm2" in flags[0]
