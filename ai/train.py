"""Training of the segmentation model on synthetic phantoms (and optional real data).

Recipe (reproducible from :class:`TrainConfig` and its seed):

1. A *pool* of training slices is rendered once from phantom subjects drawn with
   ``np.random.default_rng([seed, 0, i])``: random level, disc or mid-vertebral slice,
   ``realistic`` or ``randomised`` image mode, random native grid (0.3-1.2 mm pixels,
   256-1024 matrix), in-plane rotation and offset. Each slice goes through the same
   :func:`ai.inference.pre_process_slice` as inference, so training sees exactly the
   model-grid input of the node (resampling included). Real labelled slices
   (:mod:`ai.realdata`) are appended to the pool when given.
2. Every step draws a batch from the pool and augments it on the fly: random crop,
   rotation and scale, gamma, contrast, bias field, blur and noise. With
   ``synth_fraction`` > 0 that share of the batch first gets a fresh randomised image of
   its tissue map (:mod:`ai.domain_randomise`), so contrasts never repeat.
3. Loss: cross-entropy + soft Dice. AdamW with a one-cycle schedule. AMP on CUDA.
4. Every ``val_every`` steps: Dice per structure on held-out phantom subjects
   (``default_rng([VAL_SEED, i])``, disjoint from training), a resumable checkpoint
   (``checkpoint.pt``) and, when the mean Dice improves, ``best/`` (weights + card).
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from ai.card import ModelCard, label_map, lineage, load_model, save_weights
from ai.inference import pre_process_slice
from ai.labels import LEVEL_NAMES, MIRRORED, NUM_CLASSES, STRUCTURES, Label
from ai.model import UNet, UNetConfig, count_parameters
from ai.model_grid import labels_to_model
from ai.refiner_training import Progress

logger = logging.getLogger(__name__)

#: Seed root of the held-out validation subjects (never used for training subjects,
#: which are drawn from ``[seed, 0, i]``).
VAL_SEED = 918_273_645
MODEL_NAME = "lumbar-seg-unet"
AXIAL_ORIENTATION = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
#: Bumped whenever the pool's slice distribution changes (invalidates cached pools).
POOL_VERSION = 2
#: Labels that ``small_structure_weight`` up-weights in the cross-entropy.
SMALL_STRUCTURES: tuple[Label, ...] = (Label.VERTEBRAL_BODY, Label.DURAL_SAC, Label.EPIDURAL_SPACE)
#: Labels that ``canal_weight`` (when > 0) up-weights in the cross-entropy.
CANAL_STRUCTURES: tuple[Label, ...] = (Label.DURAL_SAC, Label.EPIDURAL_SPACE)
#: Pool sampling options and their defaults (the original pool distribution).
POOL_SAMPLING_DEFAULTS: dict[str, float] = {
    "randomised_fraction": 0.5, "severe_fraction": 0.0, "disc_fraction": 0.6,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (recorded in the model card)."""

    steps: int = 2400
    batch_size: int = 8
    crop: int = 160
    lr: float = 2e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    pool_subjects: int = 150
    slices_per_subject: int = 8
    val_subjects: int = 10
    val_slices_per_subject: int = 6
    val_every: int = 150
    seed: int = 0
    input_spacing_mm: float = 1.0
    input_size: int = 224
    channels: tuple[int, ...] = (12, 24, 48, 96, 128)
    version: str = "1.0.0"
    #: cross-entropy weight of the small canal structures and the vertebral body (others 1)
    small_structure_weight: float = 1.0
    #: weights folder (``seg.safetensors`` + card) to start from instead of random weights
    init_from: str = ""
    #: fraction of pool slices rendered in ``randomised`` image mode (the rest ``realistic``)
    randomised_fraction: float = 0.5
    #: fraction of pool subjects drawn with severe stenosis (Schizas C/D) at every level;
    #: the others draw each level's grade at random
    severe_fraction: float = 0.0
    #: fraction of pool slices at (or near) a disc centre; the others are mid-vertebral
    disc_fraction: float = 0.6
    #: cross-entropy weight of the dural sac and epidural space when > 0 (overrides
    #: ``small_structure_weight`` for those two labels)
    canal_weight: float = 0.0
    #: cross-entropy weight of the disc when > 0 (else 1). The vertebral body carries
    #: ``small_structure_weight``; on contrast that barely separates the two, an unweighted
    #: disc loses its ambiguous pixels to the vertebral body.
    disc_weight: float = 0.0
    #: fraction of every batch whose images are drawn afresh, with a new randomised
    #: contrast, from the slices' tissue maps (:mod:`ai.domain_randomise`); 0 trains on
    #: the cached pool images only
    synth_fraction: float = 0.0
    #: fraction of every batch mirrored left to right with the left / right labels swapped
    #: (the mirror image of a patient is a plausible patient)
    mirror_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.crop > self.input_size or self.crop % 16:
            raise ValueError("crop must be a multiple of 16 and <= input_size")
        if self.pool_subjects < 1 or self.slices_per_subject < 1:
            raise ValueError("pool needs at least one subject and slice")
        for name in ("randomised_fraction", "severe_fraction", "disc_fraction", "synth_fraction",
                     "mirror_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.canal_weight < 0 or self.disc_weight < 0:
            raise ValueError("canal_weight and disc_weight must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


# ------------------------------------------------------------------ phantom slices


def random_native_grid(rng: np.random.Generator) -> dict[str, Any]:
    """A random acquisition grid within the supported range (0.3-1.2 mm, 256-1024 px, FOV 160-300 mm)."""
    spacing = float(rng.uniform(0.45, 1.1) if rng.random() < 0.8 else rng.uniform(0.3, 1.2))
    fov = float(rng.uniform(160.0, 300.0))
    matrix = int(np.clip(round(fov / spacing / 32) * 32, 256, 1024))
    return {
        "pixel_spacing": (spacing, spacing),
        "matrix": (matrix, matrix),
        "rotation_deg": float(rng.normal(0.0, 8.0)),
        # slices of a block sit up to ~9 mm from the disc centre (endplate / vertebral body)
        "offset_mm": float(rng.normal(0.0, 1.5) if rng.random() < 0.4 else rng.uniform(-10.0, 10.0)),
        "fov_shift_mm": (float(rng.normal(0.0, 10.0)), float(rng.normal(8.0, 10.0))),
    }


def render_phantom_slice(
    subject: Any,
    level: str,
    kind: str,
    mode: str,
    rng: np.random.Generator,
    grid: dict[str, Any],
) -> Any:
    """One :class:`ai.phantom.PhantomSlice` on ``grid`` (import kept local: optional dep)."""
    from ai.phantom import render_slice

    return render_slice(subject, level, kind, mode, rng, **grid)


def slice_orientation(ph: Any) -> np.ndarray:
    """Orientation (6 cosines) of a phantom slice; axial when the slice does not say."""
    ori = getattr(ph, "orientation", None)
    if ori is None:
        return AXIAL_ORIENTATION
    return np.asarray(ori, dtype=np.float64).reshape(6)


class Pool(NamedTuple):
    """Model-grid training slices: images float16, labels uint8 and, when asked for,
    tissue maps uint8 (:func:`ai.domain_randomise.tissue_to_model`)."""

    images: np.ndarray
    labels: np.ndarray
    tissues: np.ndarray | None = None


def phantom_pool(
    n_subjects: int,
    slices_per_subject: int,
    seed_root: Sequence[int],
    card: ModelCard,
    *,
    progress: Callable[[int, int], None] | None = None,
    randomised_fraction: float = 0.5,
    severe_fraction: float = 0.0,
    disc_fraction: float = 0.6,
    with_tissue: bool = False,
) -> Pool:
    """Render phantom slices onto the model grid (see :class:`Pool`).

    The defaults reproduce the original pool exactly (no extra random draws);
    ``severe_fraction`` > 0 draws that share of subjects with Schizas C/D stenosis;
    ``with_tissue`` keeps each slice's tissue map too (it draws nothing).
    """
    from ai.domain_randomise import labels_of_tissue, tissue_to_model
    from ai.phantom import sample_subject

    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    tissues: list[np.ndarray] = []
    for i in range(n_subjects):
        rng = np.random.default_rng([*seed_root, i])
        n_levels = int(rng.integers(1, len(LEVEL_NAMES) + 1))
        levels = tuple(sorted(rng.choice(LEVEL_NAMES, size=n_levels, replace=False).tolist()))
        stenosis = "random"
        if severe_fraction > 0.0 and rng.random() < severe_fraction:
            stenosis = "severe"
        subject = sample_subject(rng, stenosis=stenosis, levels=levels)
        for _ in range(slices_per_subject):
            level = str(rng.choice(levels))
            kind = "disc" if rng.random() < disc_fraction else "mid"
            mode = "realistic" if rng.random() < 1.0 - randomised_fraction else "randomised"
            ph = render_phantom_slice(subject, level, kind, mode, rng, random_native_grid(rng))
            img, _valid, grid = pre_process_slice(
                np.asarray(ph.image, dtype=np.float32),
                slice_orientation(ph),
                tuple(ph.pixel_spacing),  # type: ignore[arg-type]
                card,
            )
            images.append(img.astype(np.float16))
            if with_tissue:  # one resampling: the labels follow from the tissue map
                tissues.append(tissue_to_model(np.asarray(ph.tissue), grid))
                labels.append(labels_of_tissue(tissues[-1]))
            else:
                labels.append(labels_to_model(np.asarray(ph.labels), grid))
        if progress is not None:
            progress(i + 1, n_subjects)
    return Pool(np.stack(images), np.stack(labels), np.stack(tissues) if with_tissue else None)


# ------------------------------------------------------------------ augmentation


def augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    crop: int,
    gen: torch.Generator,
    mirror_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random geometric and intensity augmentation of a batch (model grid, CPU).

    ``images`` ``(b, 1, H, W)`` float32, ``labels`` ``(b, H, W)`` int64; returns crops of
    ``crop x crop``. A ``mirror_fraction`` of the batch is mirrored left to right (the
    model grid's columns run along the patient's left-right axis) with the left and right
    labels swapped (:data:`ai.labels.MIRRORED`); with 0 no random number is drawn for it,
    so earlier configurations replay exactly.
    """
    b, _, h, w = images.shape

    def u(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    angle = u(-0.35, 0.35)  # radians, about +-20 degrees
    scale = u(0.85, 1.18)
    # crop centre jitter in normalised coordinates of the full image
    max_shift = 1.0 - crop / h
    tx = u(-max_shift, max_shift)
    ty = u(-max_shift, max_shift)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    frac = crop / h
    theta = torch.stack(
        [
            torch.stack([cos * frac, -sin * frac, tx], dim=1),
            torch.stack([sin * frac, cos * frac, ty], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [b, 1, crop, crop], align_corners=False)
    img = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(
        labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[:, 0].long()
    if mirror_fraction > 0:
        mirror = torch.rand(b, generator=gen) < mirror_fraction
        if mirror.any():
            img[mirror] = torch.flip(img[mirror], dims=[-1])
            lab[mirror] = torch.tensor(MIRRORED)[torch.flip(lab[mirror], dims=[-1])]

    # intensity: gamma, contrast / brightness, smooth bias field, blur, noise
    gamma = torch.exp(u(-0.35, 0.35)).view(b, 1, 1, 1)
    img = img.clamp(min=0.0) ** gamma
    img = img * u(0.85, 1.15).view(b, 1, 1, 1) + u(-0.08, 0.08).view(b, 1, 1, 1)
    coarse = torch.randn(b, 1, 3, 3, generator=gen) * 0.12
    bias = F.interpolate(coarse, size=(crop, crop), mode="bicubic", align_corners=False)
    img = img * torch.exp(bias)
    blur = torch.rand(b, generator=gen) < 0.25
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        kernel = (k[:, None] * k[None, :]).view(1, 1, 3, 3)
        img[blur] = F.conv2d(img[blur], kernel, padding=1)
    img = img + torch.randn(img.shape, generator=gen) * u(0.0, 0.05).view(b, 1, 1, 1)
    return img.clamp(-0.5, 2.0).contiguous(), lab


# ------------------------------------------------------------------ loss and metrics


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft multi-class Dice loss over the foreground classes present in the batch."""
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, NUM_CLASSES).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0
    dice = (2 * inter + 1.0) / (denom + 1.0)
    fg = present.clone()
    fg[0] = False
    if not fg.any():
        return logits.sum() * 0.0
    return 1.0 - dice[fg].mean()


def structure_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice per structure key (pooled over all slices); NaN where absent in both."""
    out: dict[str, float] = {}
    for key, labs in STRUCTURES.items():
        p = np.isin(pred, labs)
        t = np.isin(truth, labs)
        denom = int(p.sum()) + int(t.sum())
        out[key] = float(2 * int((p & t).sum()) / denom) if denom else float("nan")
    return out


# ------------------------------------------------------------------ training loop


def build_card(cfg: TrainConfig, extra: dict[str, Any]) -> ModelCard:
    """The card of a model trained with ``cfg`` (metrics added as they come)."""
    return ModelCard(
        name=MODEL_NAME,
        version=cfg.version,
        labels=label_map(),
        input_spacing_mm=cfg.input_spacing_mm,
        input_size=(cfg.input_size, cfg.input_size),
        architecture=UNetConfig(num_classes=NUM_CLASSES, channels=cfg.channels).to_dict(),
        training=extra,
    )


def _load_pool(path: Path, cfg: TrainConfig) -> Pool | None:
    if not path.is_file():
        return None
    with np.load(path) as z:
        if json.loads(str(z["config"])) != _pool_key(cfg):
            return None
        return Pool(z["images"], z["labels"], z["tissues"] if "tissues" in z.files else None)


def _save_pool(path: Path, pool: Pool, cfg: TrainConfig) -> None:
    arrays: dict[str, Any] = {"images": pool.images, "labels": pool.labels,
                              "config": json.dumps(_pool_key(cfg))}
    if pool.tissues is not None:
        arrays["tissues"] = pool.tissues
    np.savez(path, **arrays)


def _pool_key(cfg: TrainConfig) -> dict[str, Any]:
    key: dict[str, Any] = {
        "pool_version": POOL_VERSION,
        "seed": cfg.seed,
        "pool_subjects": cfg.pool_subjects,
        "slices_per_subject": cfg.slices_per_subject,
        "input_spacing_mm": cfg.input_spacing_mm,
        "input_size": cfg.input_size,
    }
    # sampling options enter the key only when changed, so older cached pools stay valid
    for name, default in POOL_SAMPLING_DEFAULTS.items():
        if getattr(cfg, name) != default:
            key[name] = getattr(cfg, name)
    if cfg.synth_fraction > 0:
        key["tissue"] = True
    return key


def _pool_sampling(cfg: TrainConfig) -> dict[str, float]:
    return {name: float(getattr(cfg, name)) for name in POOL_SAMPLING_DEFAULTS}


def class_weights(cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy weight per label: 1, ``small_structure_weight`` for the small
    structures and the vertebral body, then ``canal_weight`` / ``disc_weight`` when set."""
    weight = torch.ones(NUM_CLASSES)
    for lab in SMALL_STRUCTURES:
        weight[int(lab)] = cfg.small_structure_weight
    if cfg.canal_weight > 0:
        for lab in CANAL_STRUCTURES:
            weight[int(lab)] = cfg.canal_weight
    if cfg.disc_weight > 0:
        weight[int(Label.DISC)] = cfg.disc_weight
    return weight


def validate(
    model: UNet, images: np.ndarray, labels: np.ndarray, device: torch.device
) -> dict[str, float]:
    """Dice per structure on the held-out pool (model grid)."""
    model.eval()
    preds = []
    with torch.inference_mode():
        for s in range(0, len(images), 16):
            x = torch.from_numpy(images[s : s + 16].astype(np.float32))[:, None].to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                preds.append(model(x).argmax(1).cpu().numpy().astype(np.uint8))
    model.train()
    return structure_dice(np.concatenate(preds), labels)


def train(
    cfg: TrainConfig,
    out_dir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    real_slices: tuple[np.ndarray, np.ndarray] | None = None,
    max_minutes: float | None = None,
    command: str = "",
    progress: Callable[[str], None] | None = None,
) -> ModelCard:
    """Train (or resume) and return the card of the best weights written in ``out_dir/best``.

    Parameters
    ----------
    real_slices
        Extra model-grid training slices (images float, labels uint8) from
        :mod:`ai.realdata`, appended to the phantom pool.
    max_minutes
        Wall-clock safety stop; the best weights so far stay usable.
    """
    say = progress or (lambda msg: logger.info("%s", msg))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    card0 = build_card(cfg, {})
    t_pool = time.perf_counter()
    pool = _load_pool(out_dir / "pool.npz", cfg)
    if pool is None:
        say(f"rendering the training pool: {cfg.pool_subjects} subjects x {cfg.slices_per_subject} slices")
        pool = phantom_pool(
            cfg.pool_subjects, cfg.slices_per_subject, (cfg.seed, 0), card0,
            progress=lambda i, n: say(f"pool subject {i}/{n}") if i % 10 == 0 else None,
            **_pool_sampling(cfg), with_tissue=cfg.synth_fraction > 0,
        )
        _save_pool(out_dir / "pool.npz", pool, cfg)
    val = _load_pool(out_dir / "val.npz", cfg)
    if val is None:
        val = phantom_pool(cfg.val_subjects, cfg.val_slices_per_subject, (VAL_SEED,), card0)
        _save_pool(out_dir / "val.npz", val, cfg)
    pool_s = time.perf_counter() - t_pool
    images, labels, tissues = pool
    if cfg.synth_fraction > 0 and tissues is None:
        raise ValueError("synth_fraction needs a pool with tissue maps")
    if cfg.synth_fraction > 0:
        from ai.domain_randomise import randomise_images
    n_phantom = len(images)
    if real_slices is not None and len(real_slices[0]):
        images = np.concatenate([images, real_slices[0].astype(np.float16)])
        labels = np.concatenate([labels, real_slices[1].astype(np.uint8)])
    say(f"pool ready: {len(images)} training slices, {len(val[0])} validation slices ({pool_s:.0f} s)")

    model = UNet(card0.unet_config)
    history: dict[str, Any] = {}
    if cfg.init_from:
        init_model, init_card = load_model(Path(cfg.init_from))
        if init_card.unet_config != card0.unet_config:
            raise ValueError("init_from weights have another architecture")
        model.load_state_dict(init_model.state_dict())
        say(f"initialised from {cfg.init_from} ({init_card.weights_sha256[:12]})")
        history = lineage(init_card.name, init_card.version, init_card.weights_sha256, init_card.training)
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1, div_factor=10.0,
        final_div_factor=100.0,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed)
    state = Progress()
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["config"] != cfg.to_dict():
            raise ValueError("checkpoint was written with another configuration; refusing to resume")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        state = Progress(step=int(ckpt["step"]), best=float(ckpt["best_score"]),
                         history=list(ckpt["history"]), elapsed_s=float(ckpt["elapsed_s"]))
        say(f"resumed at step {state.step}")

    extra: dict[str, Any] = {
        "data": (
            "synthetic phantoms (ai.phantom), realistic and randomised modes, disc and "
            "mid-vertebral slices of L1-L2..L5-S1, all stenosis grades, native grids "
            "0.3-1.2 mm / 256-1024 px with rotation and offset"
            + (f"; plus {len(real_slices[0])} real labelled slices" if real_slices else "")
        ),
        "train_subjects": f"default_rng([{cfg.seed}, 0, i]) for i < {cfg.pool_subjects}",
        "validation_subjects": f"default_rng([{VAL_SEED}, i]) for i < {cfg.val_subjects}",
        "config": cfg.to_dict(),
        "command": command,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "parameters": count_parameters(model),
        **history,
    }
    model.train()
    t0 = time.perf_counter() - state.elapsed_s
    n = len(images)
    use_amp = device.type == "cuda"
    ce_weight = class_weights(cfg).to(device)
    loss_acc = 0.0
    last_val = state.step
    while state.step < cfg.steps:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen).numpy()
        x = torch.from_numpy(images[idx].astype(np.float32))[:, None]
        y = torch.from_numpy(labels[idx].astype(np.int64))
        if tissues is not None and cfg.synth_fraction > 0:
            # phantom slices only (real slices have no tissue map)
            fresh = (torch.rand(len(idx), generator=gen) < cfg.synth_fraction).numpy() & (idx < n_phantom)
            if fresh.any():
                x[torch.from_numpy(fresh)] = randomise_images(
                    torch.from_numpy(tissues[idx[fresh]]), gen, card0.normalisation)
        x, y = augment(x, y, cfg.crop, gen, cfg.mirror_fraction)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=ce_weight) + cfg.dice_weight * dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        state.step += 1
        loss_acc += float(loss.detach())
        stop = max_minutes is not None and (time.perf_counter() - t0) > max_minutes * 60
        if state.step % cfg.val_every == 0 or state.step == cfg.steps or stop:
            state.elapsed_s = time.perf_counter() - t0
            dice = validate(model, val[0], val[1], device)
            score = float(np.nanmean(list(dice.values())))
            entry = {"step": state.step, "loss": loss_acc / max(state.step - last_val, 1), "val_mean_dice": score,
                     "val_dice": dice, "elapsed_s": round(state.elapsed_s, 1)}
            state.history.append(entry)
            loss_acc = 0.0
            last_val = state.step
            say(f"step {state.step}/{cfg.steps} loss {entry['loss']:.3f} val mean Dice {score:.4f} "
                f"({state.elapsed_s / 60:.1f} min)")
            if score > state.best:
                state.best = score
                card = build_card(cfg, {**extra, "step": state.step,
                                        "elapsed_s": round(state.elapsed_s, 1)})
                card = ModelCard.from_dict({**card.to_dict(), "metrics": {
                    "validation_model_grid_dice": {k: round(v, 4) for k, v in dice.items()},
                    "validation_mean_dice": round(score, 4),
                }})
                save_weights(model, card, out_dir / "best")
            torch.save({
                "config": cfg.to_dict(), "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": gen.get_state(), "step": state.step,
                "best_score": state.best, "history": state.history,
                "elapsed_s": state.elapsed_s,
            }, out_dir / "checkpoint.tmp")
            (out_dir / "checkpoint.tmp").replace(ckpt_path)
            (out_dir / "history.json").write_text(json.dumps(state.history, indent=1))
            if stop:
                say(f"stopping at the {max_minutes} min limit")
                break
    final = build_card(cfg, {**extra, "step": state.step, "elapsed_s": round(state.elapsed_s, 1)})
    save_weights(model, final, out_dir / "last")
    return ModelCard.load(out_dir / "best" / "seg-card.json")


def command_line() -> str:
    """The command line of this process (recorded in the card)."""
    return " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))

