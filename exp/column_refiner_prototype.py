"""Research prototype that trained lumbar-column-refiner 1.0.0 (ai/weights/column-card.json).

Usage::

    python exp/column_refiner_prototype.py extract OUT.pkl PHANTOM_DIR...
    python exp/column_refiner_prototype.py train OUT.pt STEPS A.pkl,B.pkl [INIT.pt]

``extract`` stores, per geometric block of each ``lumbar-node phantom`` study, native crops of
the images, the coarse labels (lumbar-seg-unet + post-processing) and the truth; ``train``
fits the network on patches built by the product's own :func:`ai.column_refine.block_input`.
Kept so the shipped weights can be reproduced until ``lumbar-node train --task column``
exists; not part of the package.
"""

import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ai.canal_refine import patch_coords, patch_matrix  # noqa: E402
from ai.column_refine import BODY, DISC, ColumnConfig, block_input, column_centre, sample_planes  # noqa: E402
from ai.levels import split_blocks  # noqa: E402
from ai.model import UNet  # noqa: E402

CONFIG = ColumnConfig()
#: Side of the stored native crop around a block's column (mm): holds the shifted, rotated patch.
BOX_MM = 130.0


def coarse_labels(analyzer, volume):
    """The coarse stage of ``Analyzer.segment``: network, then post-processing."""
    from ai.inference import pre_process, predict_native
    from ai.postprocess import post_process

    raw = predict_native(analyzer.model, pre_process(volume, analyzer.card), analyzer.device,
                         analyzer.batch_size, analyzer.autocast)
    return post_process(raw.labels, volume)[0]


def extract(root, analyzer):
    """Per block: native crops of images (float16), coarse and truth labels, geometry."""
    from node.commands.evaluate import phantom_cases

    out = []
    for case in phantom_cases(Path(root)):
        vol, truth = case.volume, case.truth_labels
        coarse = coarse_labels(analyzer, vol)
        for block in split_blocks(vol):
            centres = [c for c in (column_centre(truth[k]) for k in block) if c is not None]
            if not centres:
                continue
            cy, cx = np.mean(centres, axis=0)
            hr, hc = BOX_MM / 2 / vol.pixel_spacing[0], BOX_MM / 2 / vol.pixel_spacing[1]
            rows = slice(max(int(cy - hr), 0), min(int(cy + hr), vol.pixels.shape[1]))
            cols = slice(max(int(cx - hc), 0), min(int(cx + hc), vol.pixels.shape[2]))
            out.append({"case": case.name, "imgs": vol.pixels[block][:, rows, cols].astype(np.float16),
                        "coarse": coarse[block][:, rows, cols].copy(),
                        "truth": truth[block][:, rows, cols].copy(),
                        "spacing": vol.pixel_spacing, "ori": vol.orientations[block[0]].copy()})
        print("extracted", case.name, flush=True)
    return out


def make_example(blk, k, rng):
    """One augmented (input, target, weight) triple for slice ``k`` of block ``blk``."""
    imgs, labs, truth = blk["imgs"].astype(np.float32), blk["coarse"], blk["truth"]
    c = column_centre(labs[k])
    if c is None:
        return None
    c = (c[0] + rng.normal(0, 4 / blk["spacing"][0]), c[1] + rng.normal(0, 4 / blk["spacing"][1]))
    m = patch_matrix(blk["spacing"], CONFIG.mm_per_px, blk["ori"], rotation_deg=float(rng.uniform(-15, 15)),
                     scale=float(rng.uniform(0.9, 1.1)), flip_lr=bool(rng.random() < 0.5))
    coords = patch_coords(c, m, CONFIG.patch_px)
    if rng.random() < 0.5:  # reverse the slice order
        imgs, labs, truth, k = imgs[::-1], labs[::-1], truth[::-1], len(imgs) - 1 - k
    x = block_input(imgs, labs, k, coords)
    gamma = float(np.exp(rng.normal(0, 0.2)))
    x[:3] = np.sign(x[:3]) * np.abs(x[:3]) ** gamma
    x[:3] += rng.normal(0, rng.uniform(0, 0.04), x[:3].shape).astype(np.float32)
    t = sample_planes(truth[k][None].astype(np.float32), coords, "nearest")[0]
    y = np.zeros(t.shape, np.int64)
    y[t == DISC] = 1
    y[t == BODY] = 2
    column = sample_planes(np.isin(labs[k], (DISC, BODY))[None].astype(np.float32), coords, "nearest")[0] > 0
    w = np.where(column | (y > 0), 1.0, 0.1).astype(np.float32)
    return x, y, w


def train(blocks, steps, out, seed=0, lr=2e-3, batch=32, init=None):
    """AdamW, one-cycle; slices whose coarse identity is wrong on > 10 % of the column drawn 4x."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    items = [(b, k) for b, blk in enumerate(blocks) for k in range(len(blk["imgs"]))
             if column_centre(blk["coarse"][k]) is not None]
    weights = []
    for b, k in items:
        coarse, truth = blocks[b]["coarse"][k], blocks[b]["truth"][k]
        wrong = ((coarse == DISC) & (truth == BODY)) | ((coarse == BODY) & (truth == DISC))
        weights.append(4.0 if wrong.sum() > 0.1 * max(np.isin(coarse, (DISC, BODY)).sum(), 1) else 1.0)
    p = np.array(weights) / np.sum(weights)
    print("items", len(items), "hard", int((p > p.min() * 1.5).sum()), flush=True)
    net = UNet(CONFIG.unet_config)
    if init:
        net.load_state_dict(torch.load(init))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0, running = time.time(), 0.0
    for step in range(steps):
        examples = []
        while len(examples) < batch:
            b, k = items[rng.choice(len(items), p=p)]
            ex = make_example(blocks[b], k, rng)
            if ex is not None:
                examples.append(ex)
        x, y, w = (torch.from_numpy(np.stack(a)) for a in zip(*examples, strict=True))
        net.train()
        loss = (F.cross_entropy(net(x), y, reduction="none") * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * float(loss)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {running:.4f} {time.time() - t0:.0f}s", flush=True)
            torch.save(net.state_dict(), out)
    return net


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1] == "extract":
        from ai.pipeline import Analyzer

        analyzer = Analyzer(device="cpu", threads=2, refine=False)
        blocks = [blk for root in sys.argv[3:] for blk in extract(root, analyzer)]
        with open(sys.argv[2], "wb") as fh:
            pickle.dump(blocks, fh, protocol=4)
    elif sys.argv[1] == "train":
        blocks = []
        for path in sys.argv[4].split(","):
            with open(path, "rb") as fh:
                blocks += pickle.load(fh)  # noqa: S301 - our own extract output
        train(blocks, int(sys.argv[3]), sys.argv[2], init=sys.argv[5] if len(sys.argv) > 5 else None)
