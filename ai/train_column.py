"""Training of the column refiner (:mod:`ai.column_refine`) on phantom studies' angled blocks.

Data: whole phantom studies rendered in memory exactly as ``lumbar-node phantom`` writes
them (:func:`ai.phantom.study.render_axial_series`, subject ``default_rng([seed, i])``, one
contrast per study), for each ``(seed, subjects, mode, matrix, spacing)`` entry of
:attr:`ColumnTrainConfig.sets`. The input labels are the shipped segmentation model's own
(network + post-processing, the stages that run before the column refiner in the node),
so the refiner learns that model's identity errors. Each geometric block
(:func:`ai.levels.split_blocks`) is kept as a native crop around its true column with the
images, coarse labels and truth. Slices whose coarse identity is wrong on more than a
tenth of the column are drawn :attr:`ColumnTrainConfig.hard_weight` times as often.

Loss: cross-entropy over {other, disc, vertebral body} on the patch grid (nearest-sampled
truth), weight 1 on coarse or true column pixels, 0.1 elsewhere. Augmentation: rotation,
scale, mirror, centre shift, reversed slice order, gamma, noise.

Validation: held-out studies (:attr:`ColumnTrainConfig.val_sets`, seeds never used by the
evaluation (9001/9002, 9101-9107) or tuning (7701-7713) sets) through the node's own
:meth:`ai.column_refine.ColumnRefiner.refine` (``min_share`` rule included): disc and
vertebral-body Dice before / after. ``OUT/best`` keeps the best mean of the two.

Run through ``lumbar-node train --task column --out DIR`` or :func:`train_column`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ai.canal_refine import patch_coords, patch_matrix
from ai.column_refine import (
    BODY,
    CLASSES,
    DISC,
    MODEL_NAME,
    ColumnConfig,
    ColumnRefiner,
    block_input,
    column_centre,
    image_planes,
    sample_planes,
)
from ai.evaluate import identity_swapped
from ai.levels import split_blocks
from ai.model import UNet
from ai.refiner_training import Progress, init_from, run_record, save_checkpoint
from ai.refiner_training import resume as resume_run
from ai.volume import Volume

logger = logging.getLogger(__name__)

#: ``(seed, subjects, mode, matrix, spacing_mm)`` of a set of phantom studies.
StudySet = tuple[int, int, str, int, float]

#: Side of the stored native crop around a block's column (mm): holds the shifted, rotated patch.
BOX_MM = 130.0
#: Augmentation.
AUG_SHIFT_SD_MM = 4.0
AUG_ROTATION_DEG = 15.0
AUG_SCALE = (0.9, 1.1)
AUG_GAMMA_LOG_SD = 0.2
AUG_NOISE_MAX = 0.04
AUG_REVERSE = 0.5
#: Loss weight of pixels neither in the coarse nor in the true column.
BACKGROUND_WEIGHT = 0.1
#: A slice is "hard" when its coarse identity is wrong on more than this share of the column.
HARD_SHARE = 0.1

#: The sets the shipped weights were trained on (randomised contrast, matrix / spacing
#: spread), in the order they were drawn from (it decides which draw meets which slice).
DEFAULT_SETS: tuple[StudySet, ...] = (
    (5101, 40, "randomised", 448, 0.55),
    (5104, 40, "randomised", 512, 0.5),
    (5105, 40, "randomised", 256, 1.0),
    (5102, 40, "randomised", 384, 0.65),
    (5103, 40, "randomised", 320, 0.8),
    (5106, 40, "randomised", 384, 0.75),
    # version 2: twice the randomised studies, and realistic ones so that it keeps them right
    (5107, 40, "randomised", 512, 0.6),
    (5108, 40, "randomised", 320, 0.9),
    (5109, 40, "randomised", 448, 0.7),
    (5110, 40, "randomised", 384, 0.55),
    (5111, 40, "randomised", 256, 1.1),
    (5112, 40, "randomised", 512, 0.45),
    (5113, 30, "realistic", 448, 0.6),
    (5114, 30, "realistic", 320, 0.8),
)
DEFAULT_VAL_SETS: tuple[StudySet, ...] = (
    (5301, 24, "randomised", 384, 0.6),
    (5302, 8, "realistic", 320, 0.7),
)
#: Seeds the training must never draw from: held-out evaluation (9001, 9002; the geometry
#: sets 9101-9107 of docs/evaluation.md) and tuning sets (7701-7713).
RESERVED_SEEDS = frozenset({9001, 9002, 9101, 9102, 9103, 9104, 9105, 9106, 9107, 7701, 7702, 7703, 7704, 7705, 7706, 7707, 7708, 7709, 7710, 7711, 7712, 7713})


@dataclass(frozen=True)
class ColumnTrainConfig:
    """Everything that determines a run (recorded in the card)."""

    sets: tuple[StudySet, ...] = DEFAULT_SETS
    val_sets: tuple[StudySet, ...] = DEFAULT_VAL_SETS
    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    hard_weight: float = 4.0
    #: Chance that each slice's coarse identity in the input is swapped (disc <-> body on the
    #: whole slice) for one example, the target unchanged: the refiner must then read the
    #: images, not echo the coarse labels (version 2.1.0; 2.0.0 was trained with 0).
    label_flip: float = 0.2
    val_every: int = 250
    seed: int = 0
    version: str = "2.1.0"
    #: version 2: two neighbours each side, 1.2 mm pixels (1.6 mm blurred the thin cortical
    #: ring that tells an endplate slice from the disc)
    model: ColumnConfig = field(default_factory=lambda: ColumnConfig(patch_px=64, context=2))

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.val_every < 1:
            raise ValueError("steps, batch_size and val_every must be >= 1")
        if not self.sets or not self.val_sets:
            raise ValueError("training and validation need at least one set of studies each")
        seeds = [s[0] for s in self.sets]
        val_seeds = [s[0] for s in self.val_sets]
        if set(seeds) & set(val_seeds):
            raise ValueError("training and validation sets must use different seeds")
        if set(seeds + val_seeds) & RESERVED_SEEDS:
            raise ValueError(f"seeds {sorted(RESERVED_SEEDS)} are the evaluation and tuning sets")
        for s in (*self.sets, *self.val_sets):
            if len(s) != 5 or s[1] < 1 or s[2] not in ("realistic", "randomised"):
                raise ValueError(f"a study set is (seed, subjects >= 1, realistic|randomised, matrix, spacing): {s}")
        if self.hard_weight < 1.0:
            raise ValueError("hard_weight must be >= 1")
        if not 0.0 <= self.label_flip < 0.5:
            raise ValueError("label_flip must be in [0, 0.5)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["sets"] = [list(s) for s in self.sets]
        d["val_sets"] = [list(s) for s in self.val_sets]
        return d


@dataclass
class Study:
    """One phantom study in memory: its volume (slices caudal -> cranial) and label maps."""

    name: str
    mode: str
    volume: Volume
    truth: np.ndarray
    coarse: np.ndarray


# --------------------------------------------------------------------------- data


def render_study(seed: int, index: int, mode: str, matrix: int, spacing: float) -> tuple[Volume, np.ndarray]:
    """Volume and truth labels of ``lumbar-node phantom --seed SEED`` subject ``index``.

    The same draws as the phantom command, pixels stored as its DICOM stores them (rounded,
    clipped to uint16) and geometry rounded to its decimal strings, so training sees exactly
    what the node reads from disk.
    """
    from ai.phantom import sample_subject
    from ai.phantom.study import COSINE_DECIMALS, MM_DECIMALS, render_axial_series

    rng = np.random.default_rng([seed, index])
    subject = sample_subject(rng, stenosis="random")
    axials = render_axial_series(subject, mode, matrix, spacing, rng)
    pixels = np.stack([np.clip(np.rint(a.rendered.image), 0, 65535) for a in axials]).astype(np.float32)
    truth = np.stack([np.asarray(a.rendered.labels, np.uint8) for a in axials])
    orientations = np.round([[*a.plan.row_dir, *a.plan.col_dir] for a in axials], COSINE_DECIMALS)
    positions = np.round([a.position for a in axials], MM_DECIMALS)
    sp = np.round(axials[0].rendered.pixel_spacing, MM_DECIMALS)
    volume = Volume(pixels=pixels, pixel_spacing=(float(sp[0]), float(sp[1])), positions=positions,
                    orientations=orientations, slice_uids=tuple(f"{seed}.{index}.{k}" for k in range(len(axials))),
                    series_instance_uid=f"phantom.{seed}.{index}")
    order = np.argsort(volume.centres()[:, 2], kind="stable")  # as node.volume_io sorts
    if np.array_equal(order, np.arange(len(order))):
        return volume, truth
    sorted_volume = Volume(pixels=pixels[order], pixel_spacing=volume.pixel_spacing, positions=positions[order],
                           orientations=orientations[order],
                           slice_uids=tuple(volume.slice_uids[k] for k in order),
                           series_instance_uid=volume.series_instance_uid)
    return sorted_volume, truth[order]


def coarse_segmenter(threads: int = 1) -> tuple[Any, str]:
    """``labels = f(volume)``: the shipped network + post-processing, and a tag naming it.

    These are the labels the column refiner receives in :meth:`ai.pipeline.Analyzer.segment`.
    """
    from ai.inference import pre_process, predict_native
    from ai.pipeline import Analyzer
    from ai.postprocess import post_process

    analyzer = Analyzer(device="cpu", threads=threads, refine=False)

    def segment(volume: Volume) -> np.ndarray:
        raw = predict_native(analyzer.model, pre_process(volume, analyzer.card), analyzer.device,
                             analyzer.batch_size, analyzer.autocast)
        return post_process(raw.labels, volume)[0]

    return segment, analyzer.card.tag()


def render_studies(sets: tuple[StudySet, ...], segment: Any) -> list[Study]:
    """Every study of ``sets`` with its truth and coarse labels."""
    out: list[Study] = []
    t0 = time.monotonic()
    for seed, subjects, mode, matrix, spacing in sets:
        for i in range(subjects):
            volume, truth = render_study(seed, i, mode, matrix, spacing)
            out.append(Study(f"PHANTOM_{seed:04d}_{i + 1:03d}", mode, volume, truth, segment(volume)))
        logger.info("rendered set %d (%d %s studies, %.0f s)", seed, subjects, mode, time.monotonic() - t0)
    return out


def block_crops(study: Study) -> list[dict[str, Any]]:
    """Per geometric block: native crops of images (float16), coarse and true labels, geometry."""
    vol, truth = study.volume, study.truth
    out = []
    for block in split_blocks(vol):
        centres = [c for c in (column_centre(truth[k]) for k in block) if c is not None]
        if not centres:
            continue
        cy, cx = np.mean(centres, axis=0)
        hr, hc = BOX_MM / 2 / vol.pixel_spacing[0], BOX_MM / 2 / vol.pixel_spacing[1]
        rows = slice(max(int(cy - hr), 0), min(int(cy + hr), vol.pixels.shape[1]))
        cols = slice(max(int(cx - hc), 0), min(int(cx + hc), vol.pixels.shape[2]))
        out.append({"case": study.name, "imgs": vol.pixels[block][:, rows, cols].astype(np.float16),
                    "coarse": study.coarse[block][:, rows, cols].copy(),
                    "truth": truth[block][:, rows, cols].copy(),
                    "spacing": vol.pixel_spacing, "ori": vol.orientations[block[0]].copy()})
    return out


def load_or_render_blocks(cfg: ColumnTrainConfig, segment: Any, tag: str, cache_dir: Path) -> list[dict[str, Any]]:
    """The training blocks, from a pickle in ``cache_dir`` keyed by the sets and the coarse model."""
    key = json.dumps({"v": 1, "sets": [list(s) for s in cfg.sets], "coarse": tag}, sort_keys=True)
    cache = cache_dir / f"column-blocks-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pkl"
    if cache.is_file():
        with cache.open("rb") as fh:
            blocks: list[dict[str, Any]] = pickle.load(fh)  # noqa: S301 - our own local cache
        logger.info("loaded %d training blocks from %s", len(blocks), cache)
        return blocks
    blocks = []
    for seed, subjects, mode, matrix, spacing in cfg.sets:
        for study in render_studies(((seed, subjects, mode, matrix, spacing),), segment):
            blocks += block_crops(study)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        pickle.dump(blocks, fh, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(cache)
    return blocks


# --------------------------------------------------------------------------- examples


def is_hard(coarse: np.ndarray, truth: np.ndarray) -> bool:
    """True when the coarse identity is wrong on more than :data:`HARD_SHARE` of the column."""
    wrong = ((coarse == DISC) & (truth == BODY)) | ((coarse == BODY) & (truth == DISC))
    return bool(wrong.sum() > HARD_SHARE * max(int(np.isin(coarse, (DISC, BODY)).sum()), 1))


def flip_identities(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``labels`` (slices, rows, cols) with disc and vertebral body swapped on each slice drawn
    with probability ``share`` (a copy when any is drawn; the column's extent never changes)."""
    drawn = rng.random(len(labels)) < share
    if not drawn.any():
        return labels
    out = labels.copy()
    for j in np.flatnonzero(drawn):
        disc, body = out[j] == DISC, out[j] == BODY
        out[j][disc], out[j][body] = BODY, DISC
    return out


def make_example(
    blk: dict[str, Any], k: int, cfg: ColumnConfig, rng: np.random.Generator, label_flip: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One augmented ``(input, target classes, pixel weights)`` for slice ``k`` of a block.

    ``label_flip``: :func:`flip_identities` on the coarse labels the input shows (the loss
    weights still follow the coarse column, which a swap does not move)."""
    imgs, labs, truth = blk["imgs"].astype(np.float32), blk["coarse"], blk["truth"]
    c = column_centre(labs[k])
    if c is None:
        return None
    sy, sx = blk["spacing"]
    c = (c[0] + rng.normal(0, AUG_SHIFT_SD_MM / sy), c[1] + rng.normal(0, AUG_SHIFT_SD_MM / sx))
    m = patch_matrix(blk["spacing"], cfg.mm_per_px, blk["ori"],
                     rotation_deg=float(rng.uniform(-AUG_ROTATION_DEG, AUG_ROTATION_DEG)),
                     scale=float(rng.uniform(*AUG_SCALE)), flip_lr=bool(rng.random() < 0.5))
    coords = patch_coords(c, m, cfg.patch_px)
    if rng.random() < AUG_REVERSE:
        imgs, labs, truth, k = imgs[::-1], labs[::-1], truth[::-1], len(imgs) - 1 - k
    x = block_input(imgs, flip_identities(labs, label_flip, rng) if label_flip else labs, k, coords, cfg.context)
    n_img = image_planes(cfg.context)
    gamma = float(np.exp(rng.normal(0, AUG_GAMMA_LOG_SD)))
    x[:n_img] = np.sign(x[:n_img]) * np.abs(x[:n_img]) ** gamma
    x[:n_img] += rng.normal(0, rng.uniform(0, AUG_NOISE_MAX), x[:n_img].shape).astype(np.float32)
    t = sample_planes(truth[k][None].astype(np.float32), coords, "nearest")[0]
    y = np.zeros(t.shape, np.int64)
    y[t == DISC] = 1
    y[t == BODY] = 2
    column = sample_planes(np.isin(labs[k], (DISC, BODY))[None].astype(np.float32), coords, "nearest")[0] > 0
    w = np.where(column | (y > 0), 1.0, BACKGROUND_WEIGHT).astype(np.float32)
    return x, y, w


# --------------------------------------------------------------------------- validation


def _slice_dice(pred: np.ndarray, truth: np.ndarray, label: int) -> tuple[list[float], int]:
    """Dice of each slice where ``label`` is in the truth, and the FP slices (predicted, not true)."""
    dices, fp = [], 0
    for p, t in zip(pred == label, truth == label, strict=True):
        if t.any():
            dices.append(2.0 * float((p & t).sum()) / float(p.sum() + t.sum()))
        elif p.any():
            fp += 1
    return dices, fp


def swapped_slices(pred: np.ndarray, truth: np.ndarray) -> int:
    """Slices whose true disc or vertebral body is given the other identity on more than half
    of it (:func:`ai.evaluate.identity_swapped`): what the CSA ICC of both is most sensitive to."""
    return sum(identity_swapped(t == DISC, p == BODY) or identity_swapped(t == BODY, p == DISC)
               for p, t in zip(pred, truth, strict=True))


def validate(model: UNet, card: dict[str, Any], studies: list[Study]) -> dict[str, Any]:
    """Disc / vertebral-body Dice (mean over slices) and disc FP slices, coarse vs refined, per mode."""
    refiner = ColumnRefiner(model, card)  # a folded inference copy: ``model`` stays trainable
    per_study = []
    for s in studies:
        refined, _ = refiner.refine(s.coarse, s.volume)
        per_study.append((s.mode, {"coarse": s.coarse, "refined": refined}, s.truth))
    out: dict[str, Any] = {}
    for mode in ("all", "realistic", "randomised"):
        sel = [(labels, truth) for m, labels, truth in per_study if mode in ("all", m)]
        if not sel:
            continue
        entry: dict[str, Any] = {"studies": len(sel)}
        for which in ("coarse", "refined"):
            disc: list[float] = []
            body: list[float] = []
            disc_fp = swaps = 0
            for labels, truth in sel:
                swaps += swapped_slices(labels[which], truth)
                d, fp = _slice_dice(labels[which], truth, DISC)
                disc += d
                disc_fp += fp
                body += _slice_dice(labels[which], truth, BODY)[0]
            entry[which] = {"disc_dice": round(float(np.mean(disc)) if disc else 1.0, 4),
                            "vb_dice": round(float(np.mean(body)) if body else 1.0, 4), "disc_fp_slices": disc_fp,
                            "swapped_slices": swaps}
        out[mode] = entry
    return out


def _score(metrics: dict[str, Any]) -> float:
    r = metrics["all"]["refined"]
    return 0.5 * (float(r["disc_dice"]) + float(r["vb_dice"]))


# --------------------------------------------------------------------------- training


def train_column(
    out_dir: Path | str,
    cfg: ColumnTrainConfig | None = None,
    *,
    threads: int = 1,
    max_minutes: float | None = None,
    resume: bool = False,
    cache_dir: Path | str | None = None,
    command: str = "",
    init_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Render (or load cached) blocks, train, validate, checkpoint; returns the best card.

    ``OUT/best/`` holds the best weights by validation (mean of refined disc and vertebral
    body Dice), ``OUT/last/`` the last; ``OUT/checkpoint.pt`` resumes (``resume=True``).
    ``init_dir``: start from the column refiner weights in that folder.
    """
    cfg = cfg or ColumnTrainConfig()
    torch.set_num_threads(max(1, threads))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    segment, tag = coarse_segmenter(threads)
    blocks = load_or_render_blocks(cfg, segment, tag, Path(cache_dir) if cache_dir is not None else out)
    val = render_studies(cfg.val_sets, segment)
    render_s = time.monotonic() - t0
    items = [(b, k) for b, blk in enumerate(blocks) for k in range(len(blk["imgs"]))
             if column_centre(blk["coarse"][k]) is not None]
    if not items:
        raise ValueError("no training slice has a coarse anterior column")
    draw = np.array([cfg.hard_weight if is_hard(blocks[b]["coarse"][k], blocks[b]["truth"][k]) else 1.0
                     for b, k in items])
    n_hard = int((draw > 1.0).sum())
    draw /= draw.sum()
    logger.info("%d blocks, %d slices (%d hard), %d validation studies (%.0f s)", len(blocks), len(items),
                n_hard, len(val), render_s)

    torch.manual_seed(cfg.seed)  # here, not earlier: loading the coarse model draws from torch's generator
    model = UNet(cfg.model.unet_config)
    history = init_from(model, ColumnRefiner, init_dir) if init_dir is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    ckpt_path = out / "checkpoint.pt"
    progress = Progress()
    if resume and ckpt_path.is_file():
        progress = resume_run(ckpt_path, cfg.to_dict(), model, opt, sched, rng)
    extra: dict[str, Any] = {
        "data": (f"phantom studies rendered in memory as `lumbar-node phantom` writes them "
                 f"(sets {[list(s) for s in cfg.sets]}: seed, subjects, mode, matrix, spacing; subject "
                 f"default_rng([seed, i])); {len(items)} slices with a coarse column in {len(blocks)} blocks; "
                 f"slices whose coarse identity is wrong on > {HARD_SHARE:.0%} of the column drawn "
                 f"{cfg.hard_weight:g}x as often"),
        "coarse_model": tag,
        "validation_sets": [list(s) for s in cfg.val_sets],
        "train_slices": len(items),
        "hard_slices": n_hard,
        "config": cfg.to_dict(),
        "augmentation": {"centre_shift_sd_mm": AUG_SHIFT_SD_MM, "rotation_deg": AUG_ROTATION_DEG,
                         "scale": list(AUG_SCALE), "flip_lr": True, "reverse_slice_order": AUG_REVERSE,
                         "gamma_log_sd": AUG_GAMMA_LOG_SD, "noise": [0.0, AUG_NOISE_MAX],
                         "coarse_identity_swapped_per_slice": cfg.label_flip},
        "loss": (f"cross-entropy over {{other, disc, body}}, weight 1 on coarse or true column pixels, "
                 f"{BACKGROUND_WEIGHT:g} elsewhere"),
        "optimiser": f"AdamW one-cycle (peak lr {cfg.lr:g}, weight decay {cfg.weight_decay:g})",
        **run_record(model, command, threads, render_s, init_dir, history),
    }
    model.train()
    t_start = time.monotonic() - progress.elapsed_s
    stop = False
    while progress.step < cfg.steps and not stop:
        examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        while len(examples) < cfg.batch_size:
            b, k = items[int(rng.choice(len(items), p=draw))]
            ex = make_example(blocks[b], k, cfg.model, rng, cfg.label_flip)
            if ex is not None:
                examples.append(ex)
        x, y, w = (torch.from_numpy(np.stack(a)) for a in zip(*examples, strict=True))
        loss = (F.cross_entropy(model(x), y, reduction="none") * w).sum() / w.sum()
        progress.take_step(loss, opt, sched)
        stop = max_minutes is not None and time.monotonic() - t_start > 60 * max_minutes
        if progress.step % cfg.val_every == 0 or progress.step == cfg.steps or stop:
            progress.elapsed_s = time.monotonic() - t_start
            card = _card(cfg, progress.training_record(extra), {})
            metrics = validate(model, card, val)
            model.train()
            score = _score(metrics)
            mean_loss = progress.record_validation(metrics)
            logger.info("step %d loss %.4f val disc Dice %.4f -> %.4f, body %.4f -> %.4f, swapped slices "
                        "%d -> %d (%.1f min)", progress.step, mean_loss, metrics["all"]["coarse"]["disc_dice"],
                        metrics["all"]["refined"]["disc_dice"], metrics["all"]["coarse"]["vb_dice"],
                        metrics["all"]["refined"]["vb_dice"], metrics["all"]["coarse"]["swapped_slices"],
                        metrics["all"]["refined"]["swapped_slices"], progress.elapsed_s / 60)
            card = _card(cfg, progress.training_record(extra), metrics)
            if score > progress.best:
                progress.best = score
                ColumnRefiner.save(model, card, out / "best")
            ColumnRefiner.save(model, card, out / "last")
            save_checkpoint(ckpt_path, cfg.to_dict(), model, opt, sched, rng, progress)
            (out / "history.json").write_text(json.dumps(progress.history, indent=1))
    return dict(json.loads((out / "best" / "column-card.json").read_text()))


def _channel_names(context: int) -> list[str]:
    """What each input channel of :func:`ai.column_refine.block_input` holds, in order."""
    offsets = [f"k{d:+d}" if d else "k" for d in range(-context, context + 1)]
    neighbours = [o for o in offsets if o != "k"]
    return ([f"image {o}" for o in offsets[:-1]]
            + [f"image {offsets[-1]} (joint 1st-99th percentile of slice k's patch -> 0..1; missing neighbour 0)"]
            + [f"coarse column {o}" + (" (+1 disc, -1 body)" if i == 0 else "") for i, o in enumerate(offsets)]
            + [f"neighbour {o} present" for o in neighbours])


def _card(cfg: ColumnTrainConfig, training: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": MODEL_NAME,
        "version": cfg.version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.model.to_dict(),
        "classes": list(CLASSES),
        "input": {
            "channels": _channel_names(cfg.model.context),
            "centre": "centroid of the coarse disc + vertebral body",
            "frame": "rows toward posterior, columns toward the patient's left (ai.model_grid.canonical_axes)",
        },
        "seed": cfg.seed,
        "weights_sha256": "",
        "training": training,
        "evaluation": {"validation": metrics},
        "intended_use": ("research: re-decides disc vs vertebral body on the coarse anterior column of "
                         "lumbar-seg-unet from the slice and its block neighbours; trained on synthetic "
                         "phantoms only, not validated on patient data"),
    }
