"""Training of the canal refiner (:mod:`ai.canal_refine`) on phantom canal crops.

Data: phantom subjects (:mod:`ai.phantom`) drawn from ``SeedSequence([seed, i])``, every
level L1-L2..L5-S1, Schizas grades uniform A-D, a share with a cord; per level one
``realistic`` and one ``randomised`` render, mostly through the disc (centre or up to 8 mm
off it, as in tilted blocks), some mid-vertebral; native pixels 0.3-1.2 mm. Each slice is
kept as a :data:`CROP_MM` crop around the canal with its TRUE labels (the target, on the
native grid). The coarse-mask input channels come either from the truth perturbed on the
fly (signed-distance boundary shift with a smooth random field, shift, dropped channel)
or, for the ``model`` subjects, from the shipped coarse segmentation model's own output
(full field of view, so the coarse model sees what it sees in the node).

Loss: the refiner's probabilities are resampled bilinearly onto the crop's native pixels
inside the patch (the same path as inference), then cross-entropy + soft Dice of the sac
against the native truth. Augmentation: rotation, scale, centre shift, mirror, gamma,
noise. Validation: held-out subjects (``SeedSequence([VAL_SEED, i])``, never the
evaluation studies' ``default_rng([9001|9002, i])``) with the coarse model's masks,
refined through :func:`ai.canal_refine.refine_slice_from_probs` (band and merge rules
included): native dural-sac Dice before / after.

Run through ``lumbar-node train --task canal --out DIR`` or :func:`train_canal`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from ai.canal_refine import (
    CLASSES,
    MODEL_NAME,
    CanalRefiner,
    RefinerConfig,
    canal_centre,
    label_map_of_classes,
    native_to_patch,
    patch_coords,
    patch_input,
    patch_matrix,
    refine_slice_from_probs,
    save_refiner,
)
from ai.labels import LEVEL_NAMES, Label
from ai.model import UNet
from ai.refiner_training import Progress, init_from, run_record, save_checkpoint
from ai.refiner_training import resume as resume_run
from ai.results import SCHIZAS_GRADES
from ai.train_grader import Segmenter, model_segmenter

logger = logging.getLogger(__name__)

#: Base seeds of training and validation subjects (``SeedSequence([seed, i])``); the
#: held-out evaluation set uses ``default_rng([9001 | 9002, i])``, the grader 20_250_001 /
#: 90_250_001, the segmentation model ``[0|1, 0, i]`` / 918_273_645.
TRAIN_SEED = 31_250_001
VAL_SEED = 71_250_001
#: Seed offset of the subjects rendered with the coarse model's masks.
MODEL_SEED_OFFSET = 13
#: Side of the stored native crop around the canal (mm): holds the rotated, shifted patch.
CROP_MM = 64.0
#: Native pixel spacing range (mm), drawn log-uniform.
SPACING_RANGE = (0.3, 1.2)
#: Field of view of the truth-only renders (mm): only the crop is kept.
SMALL_FOV_MM = 100.0
#: Field of view range of the coarse-model renders (mm), matrix 256-1024.
MODEL_FOV_MM = (180.0, 300.0)
#: Share of slices through the disc (the rest mid-vertebral); of those, share near the centre.
DISC_SHARE = 0.75
DISC_CENTRE_SHARE = 0.5
OFF_DISC_MM = 8.0
CORD_FRACTION = 0.2
#: Augmentation.
AUG_ROTATION_DEG = 15.0
AUG_SCALE = (0.9, 1.1)
AUG_SHIFT_MM = 1.5
AUG_GAMMA = (0.7, 1.4)
AUG_NOISE = (0.0, 0.05)
#: Truth-mask perturbation (mm): boundary offset sd and clip, smooth-field amplitude, shift.
PERTURB_OFFSET_SD = 0.5
PERTURB_OFFSET_MAX = 1.2
PERTURB_FIELD_MAX = 0.8
PERTURB_SHIFT_MM = 1.0
PERTURB_DROP_PROB = 0.05
#: Share of training inputs taken from the coarse model's masks (when the sample has them).
MODEL_MASK_SHARE = 0.7


@dataclass
class CanalSample:
    """One rendered slice cropped around the canal (native grid)."""

    image: np.ndarray
    truth: np.ndarray
    coarse: np.ndarray | None
    pixel_spacing: tuple[float, float]
    mode: str
    level: str
    schizas: str
    #: the fine tissue map of the crop (:class:`ai.phantom.tissues.Tissue`), from which
    #: training can draw fresh randomised contrasts (``CanalTrainConfig.synth_fraction``)
    tissue: np.ndarray | None = None


@dataclass(frozen=True)
class CanalTrainConfig:
    """Everything that determines a run (recorded in the card)."""

    subjects: int = 160
    model_subjects: int = 60
    val_subjects: int = 16
    steps: int = 1500
    batch_size: int = 12
    lr: float = 2e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    val_every: int = 150
    seed: int = TRAIN_SEED
    version: str = "1.0.0"
    #: share of training examples whose image is drawn afresh from the crop's tissue map
    #: with a new randomised contrast (:func:`ai.phantom.synth.synth_randomised`)
    synth_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.val_every < 1:
            raise ValueError("steps, batch_size and val_every must be >= 1")
        if self.subjects < 0 or self.model_subjects < 0 or self.val_subjects < 1:
            raise ValueError("subjects counts must be >= 0 (validation >= 1)")
        if self.seed == VAL_SEED:
            raise ValueError("training and validation seeds must differ")
        if not 0.0 <= self.synth_fraction <= 1.0:
            raise ValueError("synth_fraction must lie in [0, 1]")


def _crop_box(shape: tuple[int, ...], centre: tuple[float, float], spacing: tuple[float, float]) -> tuple[slice, slice]:
    hr = int(np.ceil(CROP_MM / 2 / spacing[0]))
    hc = int(np.ceil(CROP_MM / 2 / spacing[1]))
    r0 = max(0, int(centre[0]) - hr)
    c0 = max(0, int(centre[1]) - hc)
    return slice(r0, min(shape[0], int(centre[0]) + hr + 1)), slice(c0, min(shape[1], int(centre[1]) + hc + 1))


def render_canal_samples(
    n_subjects: int,
    seed: int,
    *,
    segment: Segmenter | None = None,
    segment_tag: str = "",
    cache_dir: Path | None = None,
) -> list[CanalSample]:
    """Render ``n_subjects`` x 5 levels x (realistic, randomised) canal crops.

    With ``segment`` the slices are rendered with a full field of view and the crop also
    carries the coarse model's labels. ``cache_dir`` keeps a pickle (trusted local cache).
    """
    from ai.phantom import render_slice, sample_subject

    cache: Path | None = None
    if cache_dir is not None:
        key = f"canal-v2-{n_subjects}-{seed}-{segment_tag if segment is not None else 'truth'}"
        cache = Path(cache_dir) / f"canal-samples-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pkl"
        if cache.is_file():
            with cache.open("rb") as fh:
                cached: list[CanalSample] = pickle.load(fh)  # noqa: S301 - our own local cache
            logger.info("loaded %d canal samples from %s", len(cached), cache)
            return cached
    out: list[CanalSample] = []
    grade_probs = {g: 1.0 for g in SCHIZAS_GRADES}
    t0 = time.monotonic()
    for i in range(n_subjects):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        options: dict[str, Any] = {"grade_probs": grade_probs}
        if rng.random() < CORD_FRACTION:
            options["cord"] = True
        subject = sample_subject(rng, stenosis="random", levels=LEVEL_NAMES, **options)
        for level in LEVEL_NAMES:
            for mode in ("realistic", "randomised"):
                sp = float(np.exp(rng.uniform(np.log(SPACING_RANGE[0]), np.log(SPACING_RANGE[1]))))
                if segment is not None:
                    fov = float(rng.uniform(*MODEL_FOV_MM))
                    n = int(np.clip(round(fov / sp), 256, 1024))
                    shift = None
                else:
                    n = int(np.ceil(SMALL_FOV_MM / sp))
                    shift = (float(rng.normal(0.0, 3.0)), float(rng.normal(8.0, 3.0)))
                if rng.random() < DISC_SHARE:
                    kind = "disc"
                    off = float(rng.normal(0.0, 1.5) if rng.random() < DISC_CENTRE_SHARE
                                else rng.uniform(-OFF_DISC_MM, OFF_DISC_MM))
                else:
                    kind, off = "mid", 0.0
                rot = None if mode == "randomised" else float(rng.normal(0.0, 5.0))
                sl = render_slice(subject, level, kind, mode, rng, pixel_spacing=sp, matrix=(n, n),
                                  rotation_deg=rot, offset_mm=off, fov_shift_mm=shift)
                spacing = (float(sl.pixel_spacing[0]), float(sl.pixel_spacing[1]))
                truth = np.asarray(sl.labels, dtype=np.uint8)
                centre = canal_centre(truth)
                if centre is None:
                    continue
                box = _crop_box(truth.shape, centre, spacing)
                coarse = None
                if segment is not None:
                    coarse = segment(np.asarray(sl.image, np.float32), spacing)[box].astype(np.uint8)
                    if canal_centre(coarse) is None:
                        continue  # the node would not refine this slice either
                out.append(CanalSample(
                    image=np.asarray(sl.image, np.float32)[box].copy(), truth=truth[box].copy(),
                    coarse=coarse, pixel_spacing=spacing, mode=mode, level=level,
                    schizas=str(sl.truth["schizas"]),
                    tissue=np.asarray(sl.tissue, np.uint8)[box].copy(),
                ))
        if (i + 1) % 20 == 0:
            logger.info("rendered %d/%d subjects (%.0f s)", i + 1, n_subjects, time.monotonic() - t0)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            pickle.dump(out, fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(cache)
    return out


# --------------------------------------------------------------------------- inputs


def _signed_distance(mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """mm, negative inside."""
    if not mask.any():
        return np.full(mask.shape, 1e3, dtype=np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return (outside - inside).astype(np.float32)


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    coarse = rng.normal(0.0, 1.0, size=(6, 6))
    zoom = (shape[0] / 6.0, shape[1] / 6.0)
    field = ndimage.zoom(coarse, zoom, order=3)[: shape[0], : shape[1]]
    if field.shape != tuple(shape):
        field = np.pad(field, ((0, shape[0] - field.shape[0]), (0, shape[1] - field.shape[1])), mode="edge")
    return (amplitude * field).astype(np.float32)


def perturb_truth(truth: np.ndarray, spacing: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A coarse-looking canal label map (4 sac, 5 epidural space, 0 else) from the truth."""
    sac = truth == int(Label.DURAL_SAC)
    canal = sac | (truth == int(Label.EPIDURAL_SPACE))

    def offset() -> float:
        return float(np.clip(rng.normal(0.0, PERTURB_OFFSET_SD), -PERTURB_OFFSET_MAX, PERTURB_OFFSET_MAX))

    amp = float(rng.uniform(0.0, PERTURB_FIELD_MAX))
    new_sac = _signed_distance(sac, spacing) < offset() + _smooth_field(sac.shape, rng, amp)
    new_canal = (_signed_distance(canal, spacing) < offset() + _smooth_field(sac.shape, rng, amp)) | new_sac
    out = np.zeros(truth.shape, dtype=np.uint8)
    out[new_canal] = int(Label.EPIDURAL_SPACE)
    out[new_sac] = int(Label.DURAL_SAC)
    if rng.random() < PERTURB_DROP_PROB:
        out[out == int(Label.DURAL_SAC)] = int(Label.EPIDURAL_SPACE)
    elif rng.random() < PERTURB_DROP_PROB:
        out[out == int(Label.EPIDURAL_SPACE)] = 0
    dy = rng.uniform(-PERTURB_SHIFT_MM, PERTURB_SHIFT_MM) / spacing[0]
    dx = rng.uniform(-PERTURB_SHIFT_MM, PERTURB_SHIFT_MM) / spacing[1]
    return ndimage.shift(out, (dy, dx), order=0, mode="constant", cval=0)  # type: ignore[no-any-return]


def target_classes(labels: np.ndarray) -> np.ndarray:
    """Label map -> refiner class indices (0 other, 1 dural sac, 2 epidural space)."""
    out = np.zeros(labels.shape, dtype=np.int64)
    out[labels == int(Label.DURAL_SAC)] = 1
    out[labels == int(Label.EPIDURAL_SPACE)] = 2
    return out


def make_example(
    sample: CanalSample, cfg: RefinerConfig, rng: np.random.Generator, synth_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Augmented input ``(3, n, n)``, native target pixels' patch grid ``(K, 2)`` and classes ``(K,)``.

    With ``synth_fraction`` > 0, that share of examples gets a fresh randomised image of
    the crop's tissue map instead of the rendered one (no extra draws when it is 0).
    """
    image = sample.image
    if synth_fraction > 0 and sample.tissue is not None and rng.random() < synth_fraction:
        from ai.phantom.synth import synth_randomised

        image = synth_randomised(sample.tissue, sample.pixel_spacing, rng)[0]
    if sample.coarse is not None and rng.random() < MODEL_MASK_SHARE:
        masks = sample.coarse
    else:
        masks = perturb_truth(sample.truth, sample.pixel_spacing, rng)
    centre = canal_centre(masks)
    if centre is None:
        return None
    centre = (centre[0] + rng.uniform(-AUG_SHIFT_MM, AUG_SHIFT_MM) / sample.pixel_spacing[0],
              centre[1] + rng.uniform(-AUG_SHIFT_MM, AUG_SHIFT_MM) / sample.pixel_spacing[1])
    matrix = patch_matrix(
        sample.pixel_spacing, cfg.mm_per_px, None,
        rotation_deg=float(rng.uniform(-AUG_ROTATION_DEG, AUG_ROTATION_DEG)),
        scale=float(rng.uniform(*AUG_SCALE)), flip_lr=bool(rng.random() < 0.5),
    )
    n = cfg.patch_px
    x = patch_input(image, masks, patch_coords(centre, matrix, n))
    img = np.clip(x[0], 0.0, None) ** float(rng.uniform(*AUG_GAMMA))
    x[0] = (img + rng.normal(0.0, float(rng.uniform(*AUG_NOISE)), size=img.shape)).astype(np.float32)
    rr, cc = np.meshgrid(np.arange(sample.truth.shape[0], dtype=np.float64),
                         np.arange(sample.truth.shape[1], dtype=np.float64), indexing="ij")
    pi, pj = native_to_patch(rr, cc, centre, matrix, n)
    inside = (pi >= 0) & (pi <= n - 1) & (pj >= 0) & (pj <= n - 1)
    grid = np.stack([pj[inside] / (n - 1) * 2 - 1, pi[inside] / (n - 1) * 2 - 1], axis=-1)
    return x, grid.astype(np.float32), target_classes(sample.truth)[inside]


def batch_loss(
    model: UNet, examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], dice_weight: float
) -> torch.Tensor:
    """CE + soft sac Dice on the native pixels, from bilinearly resampled probabilities."""
    x = torch.from_numpy(np.stack([e[0] for e in examples]))
    k = max(len(e[2]) for e in examples)
    grid = np.zeros((len(examples), 1, k, 2), dtype=np.float32)
    target = np.zeros((len(examples), k), dtype=np.int64)
    valid = np.zeros((len(examples), k), dtype=bool)
    for b, (_, g, t) in enumerate(examples):
        grid[b, 0, : len(t)] = g
        target[b, : len(t)] = t
        valid[b, : len(t)] = True
    probs = torch.softmax(model(x), dim=1)
    p = F.grid_sample(probs, torch.from_numpy(grid), mode="bilinear", padding_mode="border",
                      align_corners=True)[:, :, 0]  # (B, C, K)
    tgt = torch.from_numpy(target)
    vm = torch.from_numpy(valid).float()
    logp = torch.log(p.clamp_min(1e-6))
    nll = -logp.gather(1, tgt[:, None])[:, 0]
    ce = (nll * vm).sum() / vm.sum()
    sac_t = (tgt == 1).float() * vm
    sac_p = p[:, 1] * vm
    inter = (sac_t * sac_p).sum(1)
    denom = sac_t.sum(1) + sac_p.sum(1)
    present = sac_t.sum(1) > 0
    if present.any():
        dice = (2 * inter[present] + 1.0) / (denom[present] + 1.0)
        return ce + dice_weight * (1.0 - dice.mean())
    return ce


# --------------------------------------------------------------------------- validation


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    s = int(a.sum()) + int(b.sum())
    return None if int(b.sum()) == 0 else (2.0 * int((a & b).sum()) / s if s else 1.0)


def validate(model: UNet, cfg: RefinerConfig, samples: list[CanalSample]) -> dict[str, Any]:
    """Native dural-sac Dice and CSA error, coarse vs refined (full merge rules), per mode."""
    model.eval()
    rows: list[tuple[str, float, float, float, float]] = []
    with torch.inference_mode():
        for s in samples:
            assert s.coarse is not None
            centre = canal_centre(s.coarse)
            if centre is None:
                continue
            matrix = patch_matrix(s.pixel_spacing, cfg.mm_per_px, None)
            x = patch_input(s.image, s.coarse, patch_coords(centre, matrix, cfg.patch_px))
            probs = torch.softmax(model(torch.from_numpy(x[None])), dim=1)[0]
            refined = refine_slice_from_probs(s.coarse, probs, centre, matrix, s.pixel_spacing, cfg.band_mm)
            t = s.truth == int(Label.DURAL_SAC)
            if not t.any():
                continue
            c = s.coarse == int(Label.DURAL_SAC)
            r = refined == int(Label.DURAL_SAC)
            area_t = float(t.sum())
            rows.append((s.mode, _dice(c, t) or 0.0, _dice(r, t) or 0.0,
                         abs(float(c.sum()) - area_t) / area_t * 100, abs(float(r.sum()) - area_t) / area_t * 100))
    model.train()
    out: dict[str, Any] = {}
    for mode in ("all", "realistic", "randomised"):
        sel = [r for r in rows if mode == "all" or r[0] == mode]
        if not sel:
            continue
        a = np.array([r[1:] for r in sel])
        out[mode] = {
            "n": len(sel),
            "sac_dice_coarse": round(float(a[:, 0].mean()), 4),
            "sac_dice_refined": round(float(a[:, 1].mean()), 4),
            "sac_csa_abs_pct_err_coarse": round(float(np.median(a[:, 2])), 2),
            "sac_csa_abs_pct_err_refined": round(float(np.median(a[:, 3])), 2),
        }
    return out


# --------------------------------------------------------------------------- training


def train_canal(
    out_dir: Path | str,
    cfg: CanalTrainConfig | None = None,
    *,
    threads: int = 1,
    max_minutes: float | None = None,
    resume: bool = False,
    cache_dir: Path | str | None = None,
    command: str = "",
    init_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Render (or load cached) crops, train, validate, checkpoint; returns the best card.

    ``OUT/best/`` holds the best weights by validation refined sac Dice, ``OUT/last/`` the
    last; ``OUT/checkpoint.pt`` resumes exactly (``resume=True``). ``init_dir``: start
    from the refiner weights in that folder (a second, lower learning-rate stage).
    """
    cfg = cfg or CanalTrainConfig()
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out
    t0 = time.monotonic()
    train = render_canal_samples(cfg.subjects, cfg.seed, cache_dir=cache)
    segment, tag = model_segmenter(threads=threads, refine=False)
    train += render_canal_samples(cfg.model_subjects, cfg.seed + MODEL_SEED_OFFSET, segment=segment,
                                  segment_tag=tag, cache_dir=cache)
    val = render_canal_samples(cfg.val_subjects, VAL_SEED, segment=segment, segment_tag=tag, cache_dir=cache)
    render_s = time.monotonic() - t0
    logger.info("%d training and %d validation crops (%.0f s)", len(train), len(val), render_s)
    rcfg = RefinerConfig()
    model = UNet(rcfg.unet_config)
    history = init_from(model, CanalRefiner, init_dir) if init_dir is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1,
                                                div_factor=10.0, final_div_factor=50.0)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 999]))
    ckpt_path = out / "checkpoint.pt"
    progress = Progress()
    if resume and ckpt_path.is_file():
        progress = resume_run(ckpt_path, asdict(cfg), model, opt, sched, rng)
    if progress.step == 0:
        baseline = validate(model, rcfg, val)
        logger.info("coarse validation: %s", json.dumps({k: v["sac_dice_coarse"] for k, v in baseline.items()}))
    extra: dict[str, Any] = {
        "data": (f"ai.phantom canal crops (CROP_MM {CROP_MM:.0f} mm), levels L1-L2..L5-S1, realistic + randomised, "
                 f"Schizas uniform A-D, cord share {CORD_FRACTION:.1f}, disc (centre or <= {OFF_DISC_MM:.0f} mm "
                 f"off) and mid-vertebral slices, native spacing {SPACING_RANGE[0]:.1f}-{SPACING_RANGE[1]:.1f} "
                 "mm; target = phantom truth on the native grid"),
        "train_subjects": f"SeedSequence([{cfg.seed}, i]) i < {cfg.subjects} (perturbed-truth masks); "
                          f"SeedSequence([{cfg.seed + MODEL_SEED_OFFSET}, i]) i < {cfg.model_subjects} "
                          f"(coarse model masks, share {MODEL_MASK_SHARE} of their draws)",
        "validation_subjects": f"SeedSequence([{VAL_SEED}, i]) i < {cfg.val_subjects} (coarse model masks)",
        "coarse_model": tag,
        "train_slices": len(train),
        "config": asdict(cfg),
        "augmentation": {"rotation_deg": AUG_ROTATION_DEG, "scale": list(AUG_SCALE), "shift_mm": AUG_SHIFT_MM,
                         "gamma": list(AUG_GAMMA), "noise": list(AUG_NOISE), "flip_lr": True,
                         "mask_perturbation": {"offset_sd_mm": PERTURB_OFFSET_SD, "field_mm": PERTURB_FIELD_MAX,
                                               "shift_mm": PERTURB_SHIFT_MM, "drop_prob": PERTURB_DROP_PROB}},
        "loss": "cross-entropy + soft Dice (dural sac) on native pixels, bilinear probabilities",
        **run_record(model, command, threads, render_s, init_dir, history),
    }
    model.train()
    t_start = time.monotonic() - progress.elapsed_s
    stop = False
    while progress.step < cfg.steps and not stop:
        examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        while len(examples) < cfg.batch_size:
            ex = make_example(train[int(rng.integers(len(train)))], rcfg, rng, cfg.synth_fraction)
            if ex is not None:
                examples.append(ex)
        loss = batch_loss(model, examples, cfg.dice_weight)
        progress.take_step(loss, opt, sched)
        stop = max_minutes is not None and time.monotonic() - t_start > 60 * max_minutes
        if progress.step % cfg.val_every == 0 or progress.step == cfg.steps or stop:
            progress.elapsed_s = time.monotonic() - t_start
            metrics = validate(model, rcfg, val)
            score = float(metrics["all"]["sac_dice_refined"])
            mean_loss = progress.record_validation(metrics)
            logger.info("step %d loss %.4f val sac Dice coarse %.4f refined %.4f (%.1f min)", progress.step,
                        mean_loss, metrics["all"]["sac_dice_coarse"], score, progress.elapsed_s / 60)
            if score > progress.best:
                progress.best = score
                save_refiner(model, _card(cfg, rcfg, progress.training_record(extra), metrics), out / "best")
            save_checkpoint(ckpt_path, asdict(cfg), model, opt, sched, rng, progress)
            (out / "history.json").write_text(json.dumps(progress.history, indent=1))
    final = validate(model, rcfg, val)
    save_refiner(model, _card(cfg, rcfg, progress.training_record(extra), final), out / "last")
    return dict(json.loads((out / "best" / "canal-card.json").read_text()))


def _card(cfg: CanalTrainConfig, rcfg: RefinerConfig, training: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": MODEL_NAME,
        "version": cfg.version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": rcfg.to_dict(),
        "classes": list(CLASSES),
        "label_map": label_map_of_classes(),
        "input": {
            "channels": ["image (patch 1st-99th percentile -> 0..1)", "coarse dural sac mask",
                         "coarse epidural space mask"],
            "centre": "coarse dural sac centroid (else canal centroid)",
            "frame": "rows toward posterior, columns toward the patient's left (ai.model_grid.canonical_axes)",
            "patch_mm": rcfg.patch_mm, "patch_px": rcfg.patch_px, "mm_per_px": round(rcfg.mm_per_px, 5),
        },
        "seed": cfg.seed,
        "weights_sha256": "",
        "training": training,
        "evaluation": {"validation": metrics},
        "intended_use": ("research: refines the dural sac / epidural space of lumbar-seg-unet on axial T2 "
                         "slices; trained on synthetic phantoms only, not validated on patient data"),
    }
