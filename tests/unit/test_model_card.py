"""Model card and weights validation: a card that does not fit its weights is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ai.card import (
    CARD_FILE,
    MAX_WEIGHTS_BYTES,
    SHIPPED_WEIGHTS_DIR,
    WEIGHTS_FILE,
    CardError,
    ModelCard,
    label_map,
    load_model,
    save_weights,
)
from ai.labels import NUM_CLASSES
from ai.model import UNet, UNetConfig, count_parameters


def _card(channels: tuple[int, ...] = (4, 8)) -> ModelCard:
    return ModelCard(
        name="test-unet", version="0.0.1", labels=label_map(), input_spacing_mm=1.0,
        input_size=(32, 32), architecture=UNetConfig(channels=channels).to_dict(),
        training={"seed": 0, "command": "pytest"},
    )


def _saved(tmp_path: Path) -> tuple[UNet, Path]:
    model = UNet(UNetConfig(channels=(4, 8)))
    save_weights(model, _card(), tmp_path)
    return model, tmp_path


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model, folder = _saved(tmp_path)
    loaded, card = load_model(folder)
    assert card.name == "test-unet" and len(card.weights_sha256) == 64
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x))


def test_wrong_label_map_is_refused(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    d = json.loads((folder / CARD_FILE).read_text())
    d["labels"]["4"] = "SOMETHING_ELSE"
    (folder / CARD_FILE).write_text(json.dumps(d))
    with pytest.raises(CardError, match="label map"):
        load_model(folder)


def test_wrong_architecture_is_refused(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    d = json.loads((folder / CARD_FILE).read_text())
    d["architecture"]["channels"] = [8, 16]
    (folder / CARD_FILE).write_text(json.dumps(d))
    with pytest.raises(CardError, match="shape"):
        load_model(folder)


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    other = UNet(UNetConfig(channels=(4, 8)))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(folder / WEIGHTS_FILE))
    with pytest.raises(CardError, match="checksum"):
        load_model(folder)


def test_invalid_cards_cannot_be_built() -> None:
    with pytest.raises(CardError):
        ModelCard(name="", version="1", labels=label_map(), input_spacing_mm=1.0,
                  input_size=(32, 32), architecture=UNetConfig(channels=(4, 8)).to_dict())
    with pytest.raises(CardError, match="multiples"):
        ModelCard(name="n", version="1", labels=label_map(), input_spacing_mm=1.0,
                  input_size=(31, 32), architecture=UNetConfig(channels=(4, 8)).to_dict())


def test_shipped_weights_fit_their_card_and_the_size_limit() -> None:
    model, card = load_model()
    assert (SHIPPED_WEIGHTS_DIR / WEIGHTS_FILE).stat().st_size <= MAX_WEIGHTS_BYTES
    assert card.unet_config.num_classes == NUM_CLASSES
    assert count_parameters(model) < 5_000_000
    for key in ("seed", "command", "config"):
        assert key in card.training or key in card.training.get("config", {})
    assert card.metrics, "the shipped card must carry held-out metrics"


def test_calibration_offsets_are_validated_and_round_trip() -> None:
    card = ModelCard.from_dict({**_card().to_dict(),
                                "calibration": {"logit_offsets": {"VERTEBRAL_BODY": 1.5, "PSOAS_LEFT": -0.3}}})
    offsets = ModelCard.from_dict(card.to_dict()).logit_offsets()
    assert offsets.shape == (NUM_CLASSES,)
    assert offsets[1].item() == pytest.approx(1.5) and offsets[6].item() == pytest.approx(-0.3)
    assert offsets.abs().sum().item() == pytest.approx(1.8)
    assert _card().logit_offsets().abs().sum().item() == 0.0  # uncalibrated card: raw logits
    for bad, match in (({"BONE": 1.0}, "unknown label"), ({"DISC": "1"}, "a number"),
                       ({"DISC": 9.0}, "a number"), ({"DISC": True}, "a number"), ({"DISC": float("nan")}, "a number")):
        with pytest.raises(CardError, match=match):
            ModelCard.from_dict({**_card().to_dict(), "calibration": {"logit_offsets": bad}})


def test_the_disc_evidence_floor_is_validated_and_optional() -> None:
    assert _card().disc_evidence_floor() is None  # the assignment's default applies
    card = ModelCard.from_dict({**_card().to_dict(), "calibration": {"disc_evidence_floor": 0.003}})
    assert ModelCard.from_dict(card.to_dict()).disc_evidence_floor() == pytest.approx(0.003)
    for bad in (-0.1, 1.0, "0.01", True, float("nan")):
        with pytest.raises(CardError, match="disc_evidence_floor"):
            ModelCard.from_dict({**_card().to_dict(), "calibration": {"disc_evidence_floor": bad}})


def test_the_tag_names_the_weights_and_their_calibration() -> None:
    card = ModelCard.from_dict({**_card().to_dict(), "weights_sha256": "ab" * 32})
    assert card.tag() == "test-unet-0.0.1-" + "ab" * 6  # uncalibrated: caches keyed before calibration stay valid
    calibrated = ModelCard.from_dict({**card.to_dict(), "calibration": {"logit_offsets": {"VERTEBRAL_BODY": 1.609}}})
    assert calibrated.tag() == card.tag() + "+offsets-VERTEBRAL_BODY=1.609"


@pytest.mark.parametrize("name", ["seg", "canal", "grader"])
def test_shipped_fine_tuned_cards_record_their_whole_lineage(name: str) -> None:
    """A shipped model fine-tuned from earlier weights says how those were made, stage by
    stage from scratch, ending at the weights it started from (issue #3: reproducible)."""
    card = json.loads((SHIPPED_WEIGHTS_DIR / f"{name}-card.json").read_text())
    training = card["training"]
    init, stages = training["init_weights"], training["previous_stages"]
    assert stages and stages[-1]["weights_sha256"] == init["weights_sha256"]
    assert init["version"] != card["version"]
    own = card.get("weights_sha256") or card["sha256"]
    shas = [stage["weights_sha256"] for stage in stages if stage.get("weights_sha256")]
    assert own not in shas
    assert all(stage.get("command") or stage.get("config") or stage.get("epochs") for stage in stages)
