"""Training of the Schizas / rootlets grader on phantom slices with known grades.

The data are mid-disc slices drawn by :mod:`ai.phantom` in both image modes (realistic
and randomised contrast), every level L1-L2 .. L5-S1, grades drawn uniformly over A-D
(the clinical mix is ~80 % A; balancing lets the rare C/D grades be learnt). Each slice
is kept as a native-resolution crop around the canal; patches are re-extracted every
epoch with random rotation, zoom, shift, mirror, intensity gamma, noise and a one-pixel
dilation or erosion of the dural-sac mask (so the grader tolerates segmentation error).

Seeds: training subjects use ``SeedSequence([seed, i])``; the held-out evaluation
(:mod:`ai.evaluate_grades`, ``docs/grading.md``) uses a disjoint base seed.

Run through ``lumbar-node train --task grader`` or :func:`train_grader`; CPU, one
thread, about 10-20 minutes for the shipped weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ai.grading_model import (
    MODEL_NAME,
    GraderConfig,
    SchizasNet,
    canal_centre,
    extract_patch,
    save_grader,
)
from ai.labels import LEVEL_NAMES, Label
from ai.results import SCHIZAS_GRADES
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: Base seeds: training and held-out subjects never share a seed.
TRAIN_SEED = 20_250_001
HELDOUT_SEED = 90_250_001
#: Side of the stored native crop around the canal (mm), larger than the rotated patch.
CROP_MM = 80.0
#: Augmentation ranges.
AUG_ROTATION_DEG = 20.0
AUG_SCALE = (0.9, 1.1)
AUG_SHIFT_MM = 2.0
AUG_GAMMA = (0.7, 1.4)
AUG_NOISE = 0.04
#: Probability of a one-pixel dilation or erosion of the dural-sac mask.
AUG_MASK_PROB = 0.4
#: Slice offsets from the disc centre drawn for training (mm): the grade is read there.
OFFSET_MM = 1.0
#: Share of training subjects drawn with a cord at the upper levels.
CORD_SUBJECT_FRACTION = 0.3
#: Image modes rendered per level and subject: randomised twice (domain randomisation is
#: what makes the grader robust), realistic once.
TRAIN_MODES: tuple[str, ...] = ("realistic", "randomised", "randomised")
#: Seed offset of the subjects rendered with the segmentation model's masks.
SEG_SEED_OFFSET = 7
#: Render matrix for training slices (the crop needs only ~80 mm around the canal).
RENDER_MATRIX = (192, 192)


@dataclass
class Sample:
    """One rendered slice, cropped around the canal (native resolution)."""

    image: np.ndarray
    labels: np.ndarray
    pixel_spacing: tuple[float, float]
    centre_px: tuple[float, float]
    schizas: int
    cord: int
    level: str
    mode: str


def _crop(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, float]) -> Sample | None:
    centre = canal_centre(labels)
    if centre is None:
        return None
    hr = int(np.ceil(CROP_MM / 2 / spacing[0]))
    hc = int(np.ceil(CROP_MM / 2 / spacing[1]))
    r0 = max(0, int(centre[0]) - hr)
    c0 = max(0, int(centre[1]) - hc)
    r1 = min(image.shape[0], int(centre[0]) + hr + 1)
    c1 = min(image.shape[1], int(centre[1]) + hc + 1)
    return Sample(
        image=image[r0:r1, c0:c1].astype(np.float32),
        labels=labels[r0:r1, c0:c1].astype(np.uint8),
        pixel_spacing=spacing,
        centre_px=(centre[0] - r0, centre[1] - c0),
        schizas=-1,
        cord=-1,
        level="",
        mode="",
    )


def render_samples(
    n_subjects: int,
    seed: int,
    *,
    levels: tuple[str, ...] = LEVEL_NAMES,
    modes: tuple[str, ...] = TRAIN_MODES,
    offset_mm: float = OFFSET_MM,
    uniform_grades: bool = True,
    cord_fraction: float = CORD_SUBJECT_FRACTION,
    matrix: tuple[int, int] = RENDER_MATRIX,
    cache_dir: Path | None = None,
    segment: Segmenter | None = None,
    segment_tag: str = "",
) -> list[Sample]:
    """Draw subjects and render their mid-disc slices (one per entry of ``modes``) as crops.

    With ``cache_dir`` the samples are kept in a pickle named after the arguments and
    re-used by later runs (a trusted local cache: never point it at foreign files).
    With ``segment`` the crops carry the segmentation model's labels instead of the
    phantom's (the grade stays the phantom's truth); ``segment_tag`` names the model in
    the cache key.

    ``cord_fraction`` of the subjects get a cord at L1-L2 and L2-L3 (the phantom's own
    rate is about a third at L1-L2 only), so that the rootlets/cord head sees enough cords.
    """
    from ai.phantom import render_slice, sample_subject

    cache: Path | None = None
    if cache_dir is not None:
        key = f"{n_subjects}-{seed}-{'_'.join(modes)}-{offset_mm}-{uniform_grades}-{cord_fraction}-{matrix[0]}x{matrix[1]}"
        if segment is not None:
            key += f"-seg-{segment_tag}"
        cache = Path(cache_dir) / f"grader-samples-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pkl"
        if cache.is_file():
            with cache.open("rb") as fh:
                cached: list[Sample] = pickle.load(fh)  # noqa: S301 - our own local cache
            logger.info("loaded %d samples from %s", len(cached), cache)
            return cached
    out: list[Sample] = []
    grade_probs = {g: 1.0 for g in SCHIZAS_GRADES} if uniform_grades else None
    for i in range(n_subjects):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        options: dict[str, Any] = {}
        if grade_probs is not None:
            options["grade_probs"] = grade_probs
        if rng.random() < cord_fraction:
            options["cord"] = True
        subject = sample_subject(rng, stenosis="random", levels=levels, **options)
        for level in levels:
            for mode in modes:
                sl = render_slice(
                    subject,
                    level,
                    kind="disc",
                    mode=mode,
                    rng=rng,
                    matrix=matrix,
                    offset_mm=float(rng.uniform(-offset_mm, offset_mm)),
                )
                spacing = (float(sl.pixel_spacing[0]), float(sl.pixel_spacing[1]))
                labels = segment(sl.image, spacing) if segment is not None else sl.labels
                sample = _crop(sl.image, labels, spacing)
                if sample is None:
                    logger.warning("subject %d level %s: no canal in the labels, skipped", i, level)
                    continue
                sample.schizas = SCHIZAS_GRADES.index(str(sl.truth["schizas"])[:1])
                sample.cord = int(sl.truth["rootlets"] == "cord")
                sample.level = level
                sample.mode = mode
                out.append(sample)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            pickle.dump(out, fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(cache)
    return out


Segmenter = Callable[[np.ndarray, tuple[float, float]], np.ndarray]


def model_segmenter(
    weights_dir: Path | str | None = None, threads: int = 1, *, refine: bool = True
) -> tuple[Segmenter, str]:
    """A one-slice segmenter from the shipped segmentation model, and its tag (name, sha).

    Training the grader on the model's own masks teaches it that model's boundary errors
    (a compressed Schizas C sac segmented partly as epidural space, for instance).
    ``refine=False`` leaves out the canal refiner (the refiner's own training uses that).
    The tag names every model behind the masks: sample caches keyed by it are never
    reused across models.
    """
    from ai.pipeline import Analyzer

    analyzer = Analyzer(device="cpu", weights_dir=weights_dir, threads=threads, refine=refine)
    identity = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

    def segment(image: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
        volume = Volume(
            pixels=image[None].astype(np.float32),
            pixel_spacing=spacing,
            positions=np.zeros((1, 3)),
            orientations=identity[None],
            slice_uids=("training",),
            series_instance_uid="training",
        )
        return analyzer.segment(volume)[0][0]

    tag = analyzer.card.tag()
    refiner = getattr(analyzer, "refiner", None)
    if refiner is not None:  # the masks depend on the refiner too: cached samples must say so
        tag += f"+{refiner.name}-{refiner.version}-{str(refiner.card.get('weights_sha256', ''))[:12]}"
    return segment, tag


def _perturb_mask(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() >= AUG_MASK_PROB:
        return labels
    sac = labels == int(Label.DURAL_SAC)
    if rng.random() < 0.5:
        grown = ndimage.binary_dilation(sac) & np.isin(labels, (int(Label.EPIDURAL_SPACE),))
        out = labels.copy()
        out[grown] = int(Label.DURAL_SAC)
        return out
    shrunk = sac & ~ndimage.binary_erosion(sac)
    if int(sac.sum()) - int(shrunk.sum()) < 4:
        return labels
    out = labels.copy()
    out[shrunk] = int(Label.EPIDURAL_SPACE)
    return out


def make_patch(
    sample: Sample, config: GraderConfig, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The network input of a sample, augmented when ``rng`` is given."""
    if rng is None:
        return extract_patch(
            sample.image, sample.labels, sample.pixel_spacing, sample.centre_px, config=config
        )
    labels = _perturb_mask(sample.labels, rng)
    patch = extract_patch(
        sample.image,
        labels,
        sample.pixel_spacing,
        sample.centre_px,
        config=config,
        rotation_deg=float(rng.uniform(-AUG_ROTATION_DEG, AUG_ROTATION_DEG)),
        scale=float(rng.uniform(*AUG_SCALE)),
        shift_mm=(float(rng.uniform(-AUG_SHIFT_MM, AUG_SHIFT_MM)), float(rng.uniform(-AUG_SHIFT_MM, AUG_SHIFT_MM))),
        flip_lr=bool(rng.random() < 0.5),
    )
    img = np.clip(patch[0], 0.0, None)
    img = img ** float(rng.uniform(*AUG_GAMMA))
    img = img + rng.normal(0.0, AUG_NOISE, size=img.shape)
    patch[0] = img.astype(np.float32)
    return patch


def _batches(
    samples: list[Sample], config: GraderConfig, batch: int, rng: np.random.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    order = rng.permutation(len(samples)) if rng is not None else np.arange(len(samples))
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        x = np.stack([make_patch(samples[i], config, rng) for i in idx])
        y = np.array([samples[i].schizas for i in idx], dtype=np.int64)
        c = np.array([samples[i].cord for i in idx], dtype=np.float32)
        yield torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(c)


def predict_samples(model: SchizasNet, samples: list[Sample], config: GraderConfig) -> tuple[np.ndarray, np.ndarray]:
    """Schizas probabilities and cord probabilities of un-augmented samples."""
    model.eval()
    probs: list[np.ndarray] = []
    cords: list[np.ndarray] = []
    with torch.inference_mode():
        for x, _, _ in _batches(samples, config, 128, None):
            logits, cord = model(x)
            probs.append(torch.softmax(logits, 1).numpy())
            cords.append(torch.sigmoid(cord).numpy())
    return np.concatenate(probs), np.concatenate(cords)


def patch_metrics(model: SchizasNet, samples: list[Sample], config: GraderConfig) -> dict[str, Any]:
    """Accuracy, macro-F1, kappa and confusion of the grader on samples (no augmentation)."""
    from ai.evaluate_grades import cohen_kappa, confusion_matrix, macro_f1

    probs, cords = predict_samples(model, samples, config)
    pred = [SCHIZAS_GRADES[int(k)] for k in probs.argmax(1)]
    truth = [SCHIZAS_GRADES[s.schizas] for s in samples]
    m = confusion_matrix(truth, pred, SCHIZAS_GRADES)
    cord_truth = np.array([s.cord for s in samples])
    return {
        "n": len(samples),
        "accuracy": round(float(np.trace(m)) / max(1, int(m.sum())), 4),
        "macro_f1": round(macro_f1(m), 4),
        "kappa": round(cohen_kappa(m), 4),
        "kappa_quadratic": round(cohen_kappa(m, "quadratic"), 4),
        "confusion": m.tolist(),
        "rootlets_accuracy": round(float(np.mean((cords >= 0.5) == (cord_truth == 1))), 4),
        "cord_levels": int(cord_truth.sum()),
    }


def train_grader(
    out_dir: Path | str,
    *,
    n_subjects: int = 200,
    n_heldout: int = 40,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = TRAIN_SEED,
    heldout_seed: int = HELDOUT_SEED,
    threads: int = 1,
    time_budget_s: float | None = None,
    version: str | None = None,
    cache_dir: Path | str | None = None,
    seg_subjects: int = 0,
    seg_weights_dir: Path | str | None = None,
    init_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Render phantom data, train the grader, evaluate on held-out subjects, save.

    Parameters
    ----------
    out_dir
        Where ``grader.safetensors`` and ``grader-card.json`` are written.
    n_subjects, n_heldout
        Phantom subjects (5 levels each) for training and for the held-out check.
    epochs, batch_size, lr
        Optimisation (AdamW, one-cycle schedule).
    seed, heldout_seed
        Disjoint base seeds of the training and held-out subjects.
    threads
        Torch CPU threads (keep 1 on a shared machine).
    time_budget_s
        Stop after the epoch that crosses this training time (rendering excluded; the
        card records the epochs run).
    cache_dir
        Keep rendered samples here for later runs.
    seg_subjects
        Also render this many subjects (a disjoint seed) with the segmentation model's
        labels (``seg_weights_dir``, default the shipped model), so the grader learns
        the model's masks as well as the truth's; the held-out check then runs on both.
    init_dir
        Start from the weights in this folder (fine-tuning) instead of from scratch.

    Returns
    -------
    dict
        The model card (also written to ``out_dir``).
    """
    if seed == heldout_seed:
        raise ValueError("training and held-out seeds must differ")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out_dir)
    t0 = time.monotonic()
    cache = Path(cache_dir) if cache_dir is not None else None
    train = render_samples(n_subjects, seed, cache_dir=cache)
    heldout = render_samples(n_heldout, heldout_seed, modes=("realistic", "randomised"), cache_dir=cache)
    heldout_seg: list[Sample] = []
    seg_tag = ""
    if seg_subjects > 0:
        segment, seg_tag = model_segmenter(seg_weights_dir, threads)
        train = train + render_samples(
            seg_subjects, seed + SEG_SEED_OFFSET, cache_dir=cache, segment=segment, segment_tag=seg_tag
        )
        heldout_seg = render_samples(
            n_heldout, heldout_seed, modes=("realistic", "randomised"), cache_dir=cache,
            segment=segment, segment_tag=seg_tag,
        )
    t_render = time.monotonic() - t0
    logger.info("rendered %d training and %d held-out slices in %.0f s", len(train), len(heldout), t_render)
    config = GraderConfig()
    model = SchizasNet(config)
    if init_dir is not None:
        from ai.grading_model import load_grader

        model, _ = load_grader(Path(init_dir), torch.device("cpu"))
        config = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    ce = nn.CrossEntropyLoss(label_smoothing=0.05)
    bce = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(seed)
    history: list[dict[str, float]] = []
    epochs_run = 0
    for epoch in range(epochs):
        model.train()
        total = 0.0
        n = 0
        for x, y, c in _batches(train, config, batch_size, rng):
            logits, cord = model(x)
            loss = ce(logits, y) + 0.5 * bce(cord, c)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        epochs_run = epoch + 1
        check = patch_metrics(model, heldout_seg or heldout, config)
        history.append({"epoch": epochs_run, "loss": round(total / max(n, 1), 4), "heldout_macro_f1": check["macro_f1"]})
        logger.info("epoch %d loss %.4f held-out macro-F1 %.3f", epochs_run, total / max(n, 1), check["macro_f1"])
        if time_budget_s is not None and time.monotonic() - t0 - t_render > time_budget_s:
            logger.warning("time budget reached after epoch %d", epochs_run)
            break
    final = patch_metrics(model, heldout, config)
    final_seg = patch_metrics(model, heldout_seg, config) if heldout_seg else None
    by_mode = {
        mode: patch_metrics(model, [s for s in heldout if s.mode == mode], config)
        for mode in ("realistic", "randomised")
    }
    counts = np.bincount([s.schizas for s in train], minlength=len(SCHIZAS_GRADES))
    card: dict[str, Any] = {
        "name": MODEL_NAME,
        "version": version or datetime.now(UTC).strftime("%Y.%m.%d"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "classes": list(SCHIZAS_GRADES),
        "outputs": {
            "schizas": "softmax over Schizas main grades A-D",
            "cord": "sigmoid: probability that the dural sac holds the cord/conus (vs rootlets)",
        },
        "input": {
            "channels": ["image (1st-99th percentile -> 0..1)", "dural sac mask", "epidural space mask"],
            "centre": "dural sac centroid (else canal centroid) on the mid-disc slice",
            "patch_mm": config.patch_mm,
            "patch_px": config.patch_px,
        },
        "training": {
            "data": "ai.phantom mid-disc slices (offset +-1 mm), one realistic and two randomised renders per level, levels L1-L2..L5-S1, grades uniform A-D",
            "subjects": n_subjects,
            "cord_subject_fraction": CORD_SUBJECT_FRACTION,
            "model_mask_subjects": seg_subjects,
            "model_mask_segmenter": seg_tag or None,
            "init": str(init_dir) if init_dir is not None else None,
            "slices": len(train),
            "grade_counts": dict(zip(SCHIZAS_GRADES, counts.tolist(), strict=True)),
            "cord_slices": int(sum(s.cord for s in train)),
            "seed": seed,
            "epochs": epochs_run,
            "batch_size": batch_size,
            "lr": lr,
            "augmentation": {
                "rotation_deg": AUG_ROTATION_DEG,
                "scale": list(AUG_SCALE),
                "shift_mm": AUG_SHIFT_MM,
                "gamma": list(AUG_GAMMA),
                "noise": AUG_NOISE,
                "mask_dilate_erode_prob": AUG_MASK_PROB,
                "flip_lr": True,
            },
            "history": history,
            "render_s": round(t_render, 1),
            "wall_s": round(time.monotonic() - t0, 1),
            "threads": threads,
            "device": "cpu",
        },
        "evaluation": {
            "heldout_seed": heldout_seed,
            "heldout_subjects": n_heldout,
            "patch_level": final,
            "by_mode": by_mode,
            "patch_level_model_masks": final_seg,
            "note": "phantom truth label maps as input; mid-disc slices of held-out subjects",
        },
        "intended_use": "research: central canal stenosis grade at lumbar disc levels on axial T2; trained on synthetic phantoms only, not validated on patient data",
    }
    weights, card_path = save_grader(model, card, out)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    card["sha256"] = digest
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    logger.info("grader written to %s (held-out macro-F1 %.3f)", out, final["macro_f1"])
    return card
