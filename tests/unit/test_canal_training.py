"""Canal refiner training examples: fresh randomised contrasts from the crop's tissue map."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ai.canal_refine import RefinerConfig, canal_centre
from ai.labels import Label
from ai.phantom import render_slice, sample_subject
from ai.train_canal import CanalSample, CanalTrainConfig, _crop_box, make_example


@pytest.fixture(scope="module")
def sample() -> CanalSample:
    rng = np.random.default_rng(11)
    subject = sample_subject(rng, levels=("L4-L5",))
    sl = render_slice(subject, "L4-L5", "disc", "realistic", rng, pixel_spacing=0.6, matrix=(200, 200))
    spacing = (float(sl.pixel_spacing[0]), float(sl.pixel_spacing[1]))
    centre = canal_centre(sl.labels)
    assert centre is not None
    box = _crop_box(sl.labels.shape, centre, spacing)
    return CanalSample(image=sl.image[box].copy(), truth=sl.labels[box].copy(), coarse=sl.labels[box].copy(),
                       pixel_spacing=spacing, mode="realistic", level="L4-L5",
                       schizas=str(sl.truth["schizas"]), tissue=sl.tissue[box].copy())


def _example(sample: CanalSample, seed: int, synth: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ex = make_example(sample, RefinerConfig(), np.random.default_rng(seed), synth)
    assert ex is not None
    return ex


def test_without_synthesis_the_tissue_map_changes_nothing(sample: CanalSample) -> None:
    plain = _example(dataclasses.replace(sample, tissue=None), 3, 0.0)
    with_tissue = _example(sample, 3, 0.0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, with_tissue, strict=True))


def test_synthesis_draws_a_new_image_over_the_same_target(sample: CanalSample) -> None:
    plain = _example(sample, 3, 0.0)
    fresh = [_example(sample, seed, 1.0) for seed in (3, 4)]
    for ex in fresh:
        assert np.isin(ex[2], [0, 1, 2]).all() and (ex[2] == 1).any()  # targets: sac present
        assert not np.allclose(ex[0][0], plain[0][0], atol=0.05)
    assert not np.allclose(fresh[0][0][0], fresh[1][0][0], atol=0.05)
    # the sac in the fresh image is one tissue region: its spread stays below the whole patch's
    sac_mask = fresh[0][0][1] > 0.99
    assert fresh[0][0][0][sac_mask].std() < fresh[0][0][0].std()
    assert int(Label.DURAL_SAC) in np.unique(sample.truth)


def test_synth_fraction_is_validated() -> None:
    with pytest.raises(ValueError):
        CanalTrainConfig(synth_fraction=1.2)


def test_evaluate_takes_each_stage_a_weights_folder_holds(tmp_path: Path) -> None:
    """`lumbar-node evaluate --weights DIR` evaluates DIR's stages, not silently the shipped ones."""
    from node.commands.evaluate import stage_dirs

    assert set(stage_dirs(None).values()) == {None}
    with pytest.raises(FileNotFoundError):
        stage_dirs(tmp_path)  # no card at all: a wrong path, not the shipped model
    (tmp_path / "canal-card.json").write_text("{}")
    assert stage_dirs(tmp_path) == {"weights_dir": None, "refiner_dir": tmp_path, "column_dir": None}
    (tmp_path / "column-card.json").write_text("{}")
    (tmp_path / "seg-card.json").write_text("{}")
    assert set(stage_dirs(tmp_path).values()) == {tmp_path}


def test_train_command_passes_the_canal_options_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train --task canal` options reach CanalTrainConfig (none silently dropped)."""
    import ai.train_canal
    from node.cli import build_parser
    from node.commands import train

    seen: dict[str, object] = {}

    def fake_train(out_dir: Path, cfg: CanalTrainConfig, **kwargs: object) -> dict[str, object]:
        seen["cfg"], seen["kwargs"] = cfg, kwargs
        return {"evaluation": {"validation": {"all": {}}}}

    monkeypatch.setattr(ai.train_canal, "train_canal", fake_train)
    args = build_parser().parse_args([
        "train", "--task", "canal", "--out", str(tmp_path), "--steps", "7", "--pool-subjects", "5",
        "--model-subjects", "9", "--synth-fraction", "0.3", "--lr", "0.001", "--init", str(tmp_path),
    ])
    assert train.run(args) == 0
    cfg = seen["cfg"]
    assert isinstance(cfg, CanalTrainConfig)
    assert (cfg.steps, cfg.subjects, cfg.model_subjects, cfg.synth_fraction, cfg.lr) == (7, 5, 9, 0.3, 0.001)
    assert seen["kwargs"]["init_dir"] == tmp_path  # type: ignore[index]
