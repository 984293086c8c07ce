"""Logit calibration: offsets move the anterior column against its surroundings, not disc against body."""

from __future__ import annotations

import copy

import torch

from ai.card import load_model
from ai.inference import CalibratedNetwork, calibrate_logits
from ai.labels import NUM_CLASSES, Label
from ai.model import UNet, UNetConfig
from ai.pipeline import Analyzer

BG, BODY, DISC, PSOAS = int(Label.BACKGROUND), int(Label.VERTEBRAL_BODY), int(Label.DISC), int(Label.PSOAS_LEFT)


def _pixels(*scores: dict[int, float]) -> torch.Tensor:
    """Logits ``(1, classes, 1, n)``: one pixel per dict of class -> logit (others -10)."""
    out = torch.full((1, NUM_CLASSES, 1, len(scores)), -10.0)
    for j, s in enumerate(scores):
        for c, v in s.items():
            out[0, c, 0, j] = v
    return out


def _offsets(**by_label: float) -> torch.Tensor:
    out = torch.zeros(NUM_CLASSES)
    for name, v in by_label.items():
        out[int(Label[name])] = v
    return out


def test_body_offset_moves_the_column_boundary_but_not_the_disc_body_identity() -> None:
    logits = _pixels(
        {BODY: 1.0, BG: 0.5},             # body barely ahead of background: becomes background
        {BODY: 3.0, BG: 0.5},             # clear body: stays body
        {BODY: 1.0, DISC: 0.8, BG: -1.0},  # body barely ahead of disc: stays body (identity raw)
        {DISC: 1.0, BODY: 0.9, BG: 0.5},   # disc ahead of body: stays disc
        {DISC: 1.0, BG: 0.5},             # disc and background: untouched by a body offset
    )
    raw = logits.argmax(1)[0, 0].tolist()
    assert raw == [BODY, BODY, BODY, DISC, DISC]
    out = calibrate_logits(logits, _offsets(VERTEBRAL_BODY=1.6))
    assert out.argmax(1)[0, 0].tolist() == [BG, BODY, BODY, DISC, DISC]
    # the disc - body margin is the raw one wherever the column wins
    margin = (out[0, BODY, 0] - out[0, DISC, 0])[2:4]
    assert torch.allclose(margin, (logits[0, BODY, 0] - logits[0, DISC, 0])[2:4])
    # a negative offset grows a structure
    grown = calibrate_logits(_pixels({PSOAS: 0.2, BG: 0.4}), _offsets(PSOAS_LEFT=-0.3))
    assert grown.argmax(1).item() == PSOAS


def test_zero_offsets_leave_the_logits_alone() -> None:
    logits = torch.randn(2, NUM_CLASSES, 4, 4)
    assert torch.equal(calibrate_logits(logits, torch.zeros(NUM_CLASSES)), logits)
    network = UNet(UNetConfig(channels=(4, 8))).eval()
    x = torch.randn(1, 1, 16, 16)
    raw = CalibratedNetwork(copy.deepcopy(network), torch.zeros(NUM_CLASSES))
    assert not raw.calibrated and torch.equal(raw(x), network(x))


def test_the_folded_network_equals_calibrating_its_logits() -> None:
    """CalibratedNetwork folds the offsets into the head's bias: same logits as calibrate_logits."""
    torch.manual_seed(0)
    network = UNet(UNetConfig(channels=(4, 8))).eval()
    offsets = _offsets(VERTEBRAL_BODY=1.6, POSTERIOR_ELEMENTS=0.8, PSOAS_LEFT=-0.3)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = calibrate_logits(network(x), offsets)
        folded = CalibratedNetwork(copy.deepcopy(network), offsets)
        assert folded.calibrated
        assert torch.allclose(folded(x), expected, atol=1e-5)


def test_analyzer_applies_the_shipped_cards_offsets() -> None:
    _, card = load_model()
    analyzer = Analyzer(device="cpu", refine=False)
    assert isinstance(analyzer.model, CalibratedNetwork)
    assert torch.equal(analyzer.model.offsets, card.logit_offsets())
    assert analyzer.model.calibrated, "the shipped card carries the calibration chosen on tuning studies"
    assert analyzer.disc_evidence_floor == card.disc_evidence_floor() == 0.003
